"""lm-eval-harness on the text side of a ``SpeechLM`` (``mdus eval --lm-eval TASKS``).

lm-eval-harness (``pip install lm-eval``) is optional and never imported at module load. ``run_lm_eval`` wraps the
model in an ``lm_eval.api.model.LM`` subclass and runs ``lm_eval.simple_evaluate`` one task at a time, so a task
that cannot load (no network for its dataset, an unknown name) is reported and skipped while the others run.

The adapter scores text only: every distribution is the model's next-token distribution over the text vocabulary
(its logits without the speech rows, renormalized), as in ``mdus.evaluate.text_degradation``, so an up-scaled model
at initialization scores exactly like its base. Requests are handled one at a time:

* ``loglikelihood``: ``(context, continuation)`` -> ``(sum of the continuation tokens' log-probabilities, whether
  each of them is the argmax)``. Trailing spaces of the context move to the continuation and the continuation's
  tokens are those of ``context + continuation`` after the context's (as lm-eval's own HF model does); an empty
  context becomes the eos token;
* ``loglikelihood_rolling``: ``(text,)`` -> the text's log-probability given the eos token, in windows of the
  model's context length where the text is longer (each token scored once, with as much context as fits);
* ``generate_until``: ``(context, gen_kwargs)`` -> the greedy continuation (``mdus.evaluate.greedy_decode``, text
  vocabulary only) of at most ``max_gen_toks`` tokens (default 256), stopped at eos or at the first of the
  ``until`` strings, which is cut off. Sampling options are ignored: decoding is always greedy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NOT_INSTALLED = "lm-eval-harness is not installed (pip install lm-eval); skipping --lm-eval"
DEFAULT_MAX_GEN_TOKS = 256


class SpeechLMAdapter:
    """The request handlers lm-eval calls, for a ``SpeechLM`` and its text tokenizer (see the module docstring).

    Used as the first base of a subclass of ``lm_eval.api.model.LM`` (``make_lm_eval_model``); it needs nothing from
    lm-eval itself. ``max_length`` (the longest input, in tokens) defaults to the base model's
    ``max_position_embeddings`` (2048 when it has none).
    """

    def __init__(self, lm, tokenizer, *, device=None, max_length: int | None = None):
        super().__init__()
        self.lm, self.tokenizer = lm, tokenizer
        self.model = lm.base  # lm-eval reads model.config._name_or_path from here for its report
        self.device = torch.device(device) if device is not None else next(lm.parameters()).device
        self.vocab = lm.text_vocab_size
        self.max_length = max_length or getattr(lm.base.config, "max_position_embeddings", None) or 2048
        self.eot_token_id = tokenizer.eos_token_id

    # ---------------------------------------------------------------------------------------------- helpers

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _prefix(self) -> list[int]:
        if self.eot_token_id is None:
            raise ValueError("the text tokenizer has no eos token to stand for an empty context")
        return [self.eot_token_id]

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), text vocab) next-token log-probabilities over the text vocabulary, one row per input token."""
        self.lm.eval()
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.lm(x, return_logits=True).logits[0, :, : self.vocab].float()
        return F.log_softmax(logits, -1)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Log-probability of ``continuation`` after ``context`` (left-truncated to fit), and whether it is greedy."""
        if not continuation:
            return 0.0, True
        if len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's context "
                             f"(max_length={self.max_length})")
        ids = (context + continuation)[-(self.max_length + 1):]
        logp = self._logprobs(ids[:-1])[-len(continuation):]
        target = torch.tensor(continuation, device=logp.device)
        total = float(logp.gather(1, target[:, None]).sum())
        return total, bool((logp.argmax(-1) == target).all())

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            return self._prefix(), self._encode(continuation)
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    # -------------------------------------------------------------------------------------------- lm-eval API

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = req.args
            out.append(self._score(*self._split(context, continuation)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            seq = self._prefix() + self._encode(text)
            n, total = len(seq) - 1, 0.0  # seq[i] predicts seq[i + 1]
            for start in range(0, n, self.max_length):
                end = min(start + self.max_length, n)
                first = max(0, end - self.max_length)
                logp = self._logprobs(seq[first:end])[start - first:]
                target = torch.tensor(seq[start + 1:end + 1], device=logp.device)
                total += float(logp.gather(1, target[:, None]).sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        return [self._generate(*req.args) for req in tqdm(requests, desc="generate_until", disable=disable_tqdm)]

    def _generate(self, context: str, gen_kwargs: dict | None) -> str:
        from mdus.evaluate import greedy_decode

        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [u for u in ([until] if isinstance(until, str) else until) if u]
        max_new = gen_kwargs.get("max_gen_toks")
        max_new = DEFAULT_MAX_GEN_TOKS if max_new is None else int(max_new)
        if max_new < 0:
            raise ValueError(f"generate_until: max_gen_toks must be >= 0, got {max_new}")
        if max_new == 0:
            return ""
        ids = self._encode(context) if context else self._prefix()
        ids = ids[-max(1, self.max_length - max_new):]

        # As lm-eval's stopping criteria, the stop strings are looked for in the text with its special tokens, so
        # that one such as "<|im_end|>" stops too; the answer is cut there and then loses its special tokens.
        def stop(new: list[int]) -> bool:
            text = self.tokenizer.decode(new)
            return any(u in text for u in until)

        new = greedy_decode(self.lm, torch.tensor(ids, device=self.device), max_new_tokens=max_new,
                            eos=self.eot_token_id, allowed_vocab=self.vocab, stop=stop if until else None)
        text = self.tokenizer.decode(new.tolist())
        for u in until:
            text = text.split(u, 1)[0]
        for special in sorted(self.tokenizer.all_special_tokens, key=len, reverse=True):
            text = text.replace(special, "")
        return text


def make_lm_eval_model(lm, tokenizer, *, device=None, max_length: int | None = None):
    """A ``lm_eval.api.model.LM`` for ``lm`` (``SpeechLMAdapter`` mixed into lm-eval's base class). Needs lm-eval."""
    from lm_eval.api.model import LM

    cls = type("SpeechLMEval", (SpeechLMAdapter, LM), {"__doc__": SpeechLMAdapter.__doc__})
    return cls(lm, tokenizer, device=device, max_length=max_length)


def run_lm_eval(lm, text_tokenizer, tasks: list[str], *, limit: int | float | None = None, device=None) -> dict | None:
    """lm-eval-harness ``tasks`` on ``lm``'s text side: ``{task: metrics}`` merged from ``simple_evaluate``'s
    ``results`` of each task, or None when lm-eval is not installed or no task ran.

    ``limit`` caps the examples per task (a fraction of them when below 1). A task that fails (its dataset cannot
    be loaded offline, an unknown name, ...) is reported on one line with the reason and skipped; this never
    raises for a task's failure.
    """
    try:
        import lm_eval
    except ImportError:
        print(NOT_INSTALLED)
        return None
    model = make_lm_eval_model(lm, text_tokenizer, device=device)
    results = {}
    for task in tasks:
        try:
            out = lm_eval.simple_evaluate(model=model, tasks=[task], limit=limit)
        except Exception as exc:  # offline datasets, unknown tasks, ...: report it and go on with the others
            print(f"lm-eval task {task!r} failed, skipping it: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        if out and out.get("results"):
            results.update(out["results"])
        else:
            print(f"lm-eval task {task!r} returned no results")
    return results or None
