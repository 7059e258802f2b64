"""Evaluation of speech LMs: ASR by greedy decoding (WER / CER with jiwer) and text degradation against the base.

**English normalization** before WER/CER (both sides): lower case; accents folded (``café`` -> ``cafe``: NFKD, then
combining marks dropped); ``’`` -> ``'``; every character other than a-z, 0-9 and an apostrophe inside a word
becomes a space; whitespace collapsed. So "Hello, World!" and "hello world" match, and "don't" and "naïve"
("naive") stay one word each.

**Text degradation** on held-out text, with the base model (a separately loaded, untouched copy) as reference. Two
texts: general English the corpus never spoke (``general_text``: whole ``fortunes`` passages that contain no
training sentence), which is what an LLM's text abilities rest on and what the ``text_*`` numbers measure, and the
test transcripts as plain text (``transcript_*``), the in-domain text that training on transcripts moves toward.
* ``text_ppl`` / ``text_ppl_base``: perplexity of the model / the base on the text's next tokens;
* ``text_kl``: mean per-token KL(base ‖ model) of the next-token distributions;
* the model's distributions are taken over the text vocabulary (its logits renormalized without the speech rows),
  as the base has no speech rows: at initialization an up-scaled model then scores exactly like its base;
* ``greedy_agreement``: share of greedy continuation tokens on which model and base agree.

``evaluate_model`` runs both on a test split (the numbers ``mdus demo`` reports); ``mdus eval`` (``run``) does so
for a training run folder written by ``mdus train``, optionally adding lm-eval-harness tasks (``mdus.harness``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mdus_kernels._checks import check_number

_NON_WORD = re.compile(r"[^a-z0-9']+")
_EDGE_APOSTROPHES = re.compile(r"(^|\s)'+|'+(\s|$)")


def normalize_text(text: str) -> str:
    """The documented English normalization (module docstring).

    Example:
        >>> normalize_text("  Don’t PANIC -- it's 42!  ")
        "don't panic it's 42"
    """
    text = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    text = text.replace("\u2019", "'")
    text = _NON_WORD.sub(" ", text)
    text = _EDGE_APOSTROPHES.sub(" ", text)
    return " ".join(text.split())


def error_rates(references: Sequence[str], hypotheses: Sequence[str], *, confidence: float = 0.95,
                n_boot: int = 2000, seed: int = 0) -> dict:
    """Corpus WER and CER (jiwer) after ``normalize_text``: errors over reference words (characters), summed over
    the utterances. An utterance whose reference is empty adds no reference words, and every hypothesis word is an
    insertion (a hallucination counts); ``empty_references`` says how many there were. At least one reference must
    have words.

    ``wer_ci`` / ``cer_ci``: ``confidence`` percentile-bootstrap intervals (``n_boot`` resamples of the
    utterances, seeded): how tightly a test set of this size pins the rates down. Small test sets give wide
    intervals, and two methods whose intervals overlap widely are not told apart by it.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"references and hypotheses differ in length: {len(references)} != {len(hypotheses)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses, strict=True)]
    if not any(r for r, _ in pairs):
        raise ValueError("every reference is empty after normalization: WER is undefined")
    # Per utterance (jiwer's alignments): word errors, reference words, character errors, reference characters.
    # The corpus rates (jiwer.wer / jiwer.cer of the lists) are ratios of their sums, so a resample of the
    # utterances is a resample of these rows.
    counts = []
    for r, h in pairs:
        if not r:  # jiwer takes no empty reference: all of the hypothesis is inserted
            counts.append([len(h.split()), 0, len(h), 0])
            continue
        w, c = jiwer.process_words(r, h), jiwer.process_characters(r, h)
        counts.append([w.substitutions + w.deletions + w.insertions, w.substitutions + w.deletions + w.hits,
                       c.substitutions + c.deletions + c.insertions, c.substitutions + c.deletions + c.hits])
    counts = torch.tensor(counts, dtype=torch.float64)
    picks = torch.randint(len(pairs), (n_boot, len(pairs)), generator=torch.Generator().manual_seed(seed))
    sums = counts[picks].sum(1)
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    # A resample of empty references only has no reference words: its rate is undefined and left out.
    wer_ci, cer_ci = (torch.nanquantile(torch.where(sums[:, i + 1] > 0, sums[:, i] / sums[:, i + 1], torch.nan),
                                        q).tolist() for i in (0, 2))
    total = counts.sum(0).tolist()
    return {"wer": total[0] / total[1], "cer": total[2] / total[3], "wer_ci": wer_ci, "cer_ci": cer_ci,
            "utterances": len(pairs), "empty_references": sum(1 for r, _ in pairs if not r)}


def _cache_unsupported(lm) -> bool:
    # Centered (non-causal) convs read future positions: incremental decoding cannot reproduce them.
    return any(getattr(b, "causal", True) is False for b in getattr(lm, "blocks", []))


@torch.no_grad()
def greedy_decode(lm, prompt: torch.Tensor, *, max_new_tokens: int, eos: int | None = None,
                  allowed_vocab: int | None = None, use_cache: bool | None = None,
                  stop: Callable[[list[int]], bool] | None = None, **inputs) -> torch.Tensor:
    """Greedy continuation of one prompt (1-D ids) by a ``SpeechLM``; returns the new ids (1-D).

    ``allowed_vocab`` restricts the choice to ids below it (the text vocabulary, for ASR output). Decoding ends
    after ``max_new_tokens`` tokens, at ``eos`` (kept in the output), or when ``stop`` (called with the new ids
    so far after each token) returns True. With a KV cache (the default; impossible only with non-causal blocks)
    each step runs only the new token. ``inputs`` go to every forward that reads the prompt (``speech_features``
    for a model with continuous speech input).
    """
    from transformers import DynamicCache

    if use_cache is None:
        use_cache = not _cache_unsupported(lm)
    was_training = lm.training
    lm.eval()
    ids = prompt.reshape(1, -1)
    out_ids = []
    cache = DynamicCache() if use_cache else None
    step_input = ids
    for _ in range(max_new_tokens):
        extra = inputs if step_input.shape[1] == ids.shape[1] else {}  # the step reads the prompt
        logits = lm(step_input, past_key_values=cache, use_cache=use_cache, return_logits=True, **extra).logits[0, -1]
        if allowed_vocab is not None:
            logits = logits[:allowed_vocab]
        nxt = int(logits.argmax())
        out_ids.append(nxt)
        if (eos is not None and nxt == eos) or (stop is not None and stop(out_ids)):
            break
        new = torch.tensor([[nxt]], device=ids.device)
        ids = torch.cat([ids, new], dim=1)
        step_input = new if use_cache else ids
    lm.train(was_training)
    return torch.tensor(out_ids, dtype=torch.long)


@torch.no_grad()
def greedy_decode_batch(lm, prompts: Sequence[torch.Tensor], *, max_new_tokens: int, eos: int | None = None,
                        allowed_vocab: int | None = None, use_cache: bool | None = None,
                        speech_features: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``greedy_decode`` of several prompts (1-D ids each) at once: left-padded into one batch, with a KV cache
    (as ``greedy_decode``, none with non-causal blocks). Returns each prompt's new ids (1-D, through ``eos``).
    ``speech_features``: each prompt's log-mel frames, for a model with continuous speech input."""
    from transformers import DynamicCache

    if use_cache is None:
        use_cache = not _cache_unsupported(lm)
    was_training = lm.training
    lm.eval()
    device = prompts[0].device
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)  # id 0 (text) under the padding
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel():], mask[i, width - p.numel():] = p, 1
    extra = {}
    if speech_features is not None:
        extra = dict(speech_features=torch.nn.utils.rnn.pad_sequence(list(speech_features), batch_first=True),
                     speech_feature_lengths=torch.tensor([f.shape[0] for f in speech_features], device=device))
    cache = DynamicCache() if use_cache else None
    out = torch.zeros(len(prompts), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    step = ids
    for _ in range(max_new_tokens):
        logits = lm(step, attention_mask=mask, past_key_values=cache, use_cache=use_cache, return_logits=True,
                    **(extra if step is ids else {})).logits[:, -1]
        if allowed_vocab is not None:
            logits = logits[:, :allowed_vocab]
        nxt = logits.argmax(-1)
        out = torch.cat([out, nxt[:, None]], 1)
        if eos is not None:
            done |= nxt == eos
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
        step = nxt[:, None] if use_cache else ids  # (the full recomputation reads the features again)
    lm.train(was_training)
    result = []
    for row in out:
        stop = torch.nonzero(row == eos).flatten() if eos is not None else row.new_zeros(0)
        result.append(row[: int(stop[0]) + 1] if stop.numel() else row)
    return [r.cpu() for r in result]


def speech_prompt(lm, speech: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(prompt ids, forward inputs) of one utterance's speech: unit ids (1-D, ``0..K-1``) are placed above the text
    vocabulary; log-mel features (frames, n_mels) of a model with a speech encoder become its placeholder
    positions plus ``speech_features``."""
    if speech.is_floating_point():
        if getattr(lm, "speech_encoder", None) is None:
            raise ValueError("speech features given, but the model reads speech units (it has no speech encoder)")
        n = int(lm.speech_encoder.output_lengths(torch.tensor([speech.shape[0]]))[0])
        return torch.full((n,), lm.text_vocab_size, dtype=torch.long, device=speech.device), {"speech_features": speech}
    return speech.long() + lm.text_vocab_size, {}


def transcribe(lm, speech: Sequence[torch.Tensor], tokenizer, *, max_new_tokens: int = 64, batch_size: int = 8,
               progress: bool = True) -> list[str]:
    """Greedy ASR: ``speech`` holds each utterance's unit ids (0..K-1) or, for a model with continuous speech
    input, its log-mel features (see ``speech_prompt``); the output is decoded text up to the tokenizer's eos.
    Utterances are decoded ``batch_size`` at a time (``greedy_decode_batch``), in order of length so that a batch
    pads little."""
    from tqdm.auto import tqdm

    check_number(batch_size, "batch_size", "an int >= 1", integer=True, ok=lambda v: v >= 1)
    prompts = [speech_prompt(lm, utterance) for utterance in speech]
    order = sorted(range(len(prompts)), key=lambda i: prompts[i][0].numel())
    texts = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    with tqdm(total=len(prompts), desc="decode", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            features = [prompts[i][1]["speech_features"] for i in rows] if "speech_features" in prompts[0][1] else None
            news = greedy_decode_batch(lm, [prompts[i][0] for i in rows], max_new_tokens=max_new_tokens, eos=eos,
                                       allowed_vocab=lm.text_vocab_size, speech_features=features)
            for i, new in zip(rows, news, strict=True):
                if eos is not None and new.numel() and int(new[-1]) == eos:
                    new = new[:-1]
                texts[i] = tokenizer.decode(new.tolist(), skip_special_tokens=True)
            bar.update(len(rows))
    return texts


@torch.no_grad()
def text_degradation(lm, base, texts: Sequence[torch.Tensor], *, continuation_prompts: Sequence[torch.Tensor] = (),
                     continuation_tokens: int = 16) -> dict:
    """Perplexities, KL(base ‖ model) and greedy agreement on held-out text (lists of 1-D token id tensors)."""
    lm.eval()
    base.eval()
    nll_m = nll_b = kl = 0.0
    count = 0
    for ids in texts:
        if ids.numel() < 2:
            continue
        x = ids.reshape(1, -1)
        base_logits = base(x).logits[0, :-1].float()
        lm_logits = lm(x, return_logits=True).logits[0, :-1, :base_logits.shape[-1]].float()
        target = x[0, 1:]
        logp_m = F.log_softmax(lm_logits, -1)
        logp_b = F.log_softmax(base_logits, -1)
        nll_m += float(F.nll_loss(logp_m, target, reduction="sum"))
        nll_b += float(F.nll_loss(logp_b, target, reduction="sum"))
        kl += float((logp_b.exp() * (logp_b - logp_m)).sum())
        count += target.numel()
    if count == 0:
        raise ValueError("text_degradation needs at least one text of two or more tokens")
    result = {"text_ppl": float(torch.exp(torch.tensor(nll_m / count))),
              "text_ppl_base": float(torch.exp(torch.tensor(nll_b / count))), "text_kl": kl / count,
              "text_tokens": count}
    if continuation_prompts:
        agree = total = 0
        for prompt in continuation_prompts:
            a = greedy_decode(lm, prompt, max_new_tokens=continuation_tokens, allowed_vocab=lm.text_vocab_size)
            b = _greedy_base(base, prompt, continuation_tokens)
            n = min(a.numel(), b.numel())
            agree += int((a[:n] == b[:n]).sum())
            total += max(a.numel(), b.numel())
        result["greedy_agreement"] = agree / max(total, 1)
    return result


@torch.no_grad()
def _greedy_base(base, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy tokens of a plain transformers causal LM, like ``greedy_decode``: plain argmax steps, never
    stopping at nor suppressing any token (``generate``'s ``min_new_tokens`` would forbid the base's eos token,
    which the model's decoding may pick, and so count disagreements at identical distributions)."""
    from transformers import DynamicCache

    from mdus.upscale import cache_kwarg

    cache, step, out = DynamicCache(), prompt.reshape(1, -1), []
    for _ in range(n):
        nxt = int(base(step, **{cache_kwarg(type(base)): cache}, use_cache=True).logits[0, -1].argmax())
        out.append(nxt)
        step = torch.tensor([[nxt]], device=prompt.device)
    return torch.tensor(out, dtype=torch.long)


# ------------------------------------------------------------------------------------------- a whole test split


def general_text(exclude=(), *, n: int = 40, seed: int = 0) -> list[str]:
    """``n`` general English passages a corpus never spoke: a seeded sample of ``mdus.data.fortune_passages``
    without any passage that contains a sentence of ``exclude`` (pass the training transcripts)."""
    import random

    from mdus.data.synth import fortune_passages

    passages = fortune_passages(exclude=exclude)
    return random.Random(seed).sample(passages, min(n, len(passages)))


def replay_text(exclude=(), *, n: int = 40, seed: int = 0) -> list[str]:
    """General English for text replay (``mdus.train.TextReplay``): every ``fortune_passages`` passage without a
    sentence of ``exclude``, except the ``n`` that ``general_text`` (same ``exclude``, ``n`` and ``seed``) holds
    out to measure text degradation. About 2,200 passages."""
    from mdus.data.synth import fortune_passages

    held_out = set(general_text(exclude, n=n, seed=seed))
    return [p for p in fortune_passages(exclude=exclude) if p not in held_out]


def evaluate_model(lm, base, test_items, text_tokenizer, *, general=None, device=None, max_new_tokens: int = 48,
                   n_continuations: int = 10, max_text_tokens: int = 96, batch_size: int = 8,
                   progress: bool = True) -> dict:
    """ASR and text degradation of ``lm`` on a test split, against ``base`` (an untouched copy of its base model).

    ``test_items`` are ``(utterance, speech, text ids)`` as ``mdus.train.sequences_from_manifest`` returns them
    (its first value; speech = unit ids or log-mel features); ``utterance.text`` is the reference. ``general``
    is held-out general text (strings, e.g. ``general_text(training transcripts)``). Steps:

    * ASR: greedy decoding (``transcribe``, at most ``max_new_tokens`` tokens) from each utterance's speech,
      scored by ``error_rates``;
    * text degradation (``text_degradation``) on each text as plain token ids (no special tokens, at most
      ``max_text_tokens`` of each), with the first half (2 to 16 tokens) of the first ``n_continuations`` texts
      as greedy continuation prompts: ``text_*`` and ``greedy_agreement`` on ``general`` (on the references
      when ``general`` is None), ``transcript_ppl``, ``transcript_ppl_base`` and ``transcript_kl`` on the
      references.

    ``device`` defaults to that of ``lm``'s parameters. Returns ``{"wer", "cer", "wer_ci", "cer_ci", "text_ppl",
    "text_ppl_base", "text_kl", "greedy_agreement", "transcript_ppl", "transcript_ppl_base", "transcript_kl",
    "examples"}``, ``examples`` being the first five ``{"ref", "hyp"}`` pairs (the ``transcript_*``, and without
    ``general`` the ``text_*``, are None when every reference is a single token) and ``greedy_agreement`` None when
    ``n_continuations`` is 0.
    """
    if not test_items:
        raise ValueError("evaluate_model needs at least one test item")
    if general is not None and not any(t.strip() for t in general):
        raise ValueError("evaluate_model: general holds no text (give None to use the test transcripts)")
    device = torch.device(device) if device is not None else next(lm.parameters()).device
    refs = [utt.text for utt, _, _ in test_items]
    hyps = transcribe(lm, [speech.to(device) for _, speech, _ in test_items], text_tokenizer,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    rates = error_rates(refs, hyps)

    def degradation(texts, continuations):
        ids = [torch.tensor(text_tokenizer(t, add_special_tokens=False).input_ids[:max_text_tokens],
                            dtype=torch.long, device=device) for t in texts]
        if not any(t.numel() >= 2 for t in ids):
            return {}  # nothing to score: every text is a single token (command words, digits)
        prompts = [t[: min(16, max(2, t.numel() // 2))] for t in ids[:continuations]]
        return text_degradation(lm, base, ids, continuation_prompts=prompts)

    # The transcripts were never trained on, but they are the training domain.
    in_domain = degradation(refs, 0 if general is not None else n_continuations)
    deg = degradation(general, n_continuations) if general is not None else in_domain
    if general is not None and not deg:
        raise ValueError("evaluate_model: general holds no text of two or more tokens")
    return {"wer": rates["wer"], "cer": rates["cer"], "wer_ci": rates["wer_ci"], "cer_ci": rates["cer_ci"],
            "text_ppl": deg.get("text_ppl"), "text_ppl_base": deg.get("text_ppl_base"), "text_kl": deg.get("text_kl"),
            "greedy_agreement": deg.get("greedy_agreement"), "transcript_ppl": in_domain.get("text_ppl"),
            "transcript_ppl_base": in_domain.get("text_ppl_base"), "transcript_kl": in_domain.get("text_kl"),
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps, strict=True))[:5]]}


# ------------------------------------------------------------------------------------------------ command line


def add_arguments(p) -> None:
    from mdus.train import nonnegative_int, positive_int

    p.add_argument("--run", type=Path, default=None,
                   help="training run folder (what `mdus train --out RUN` wrote)")
    p.add_argument("--weights", type=Path, default=None, help="trained tensors (default RUN/trainable.safetensors)")
    p.add_argument("--tokenizer", type=Path, default=None, help="speech tokenizer folder (default RUN/tokenizer)")
    p.add_argument("--data", type=Path, required=True, help="corpus folder with <split>.jsonl")
    p.add_argument("--split", default="test", help="manifest to evaluate on: DATA/<split>.jsonl (default test)")
    p.add_argument("--model", default=None,
                   help="base model the run was trained from (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="longest transcript decoded (tokens)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="utterances decoded at once (default 8)")
    p.add_argument("--out", type=Path, default=None, help="also write the metrics JSON to this file")
    p.add_argument("--general-passages", type=nonnegative_int, default=40, metavar="N",
                   help="general English passages for text degradation: fortunes the corpus (DATA/train.jsonl) "
                        "never spoke (default 40; 0: the test transcripts only; `mdus train --text-kl` replays "
                        "the others, so more than 40 would score passages a replayed run trained on)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="comma-separated lm-eval-harness tasks to run on the text side (needs lm-eval)")
    p.add_argument("--lm-eval-limit", type=float, default=None, metavar="N",
                   help="examples per lm-eval task (a fraction of them when below 1)")
    p.add_argument("--no-progress", action="store_true")


def _paths(args) -> tuple[Path, Path, Path] | str:
    """(weights, speech tokenizer folder, manifest) of the command line, or a one-line error naming the argument."""
    if args.run is not None and not args.run.is_dir():
        return f"--run {args.run} is not a folder (give the folder `mdus train --out` wrote)"
    if args.run is None and (args.weights is None or args.tokenizer is None):
        return "give --run (a `mdus train` run folder), or both --weights and --tokenizer"
    weights = args.weights or args.run / "trainable.safetensors"
    if not weights.is_file():
        return f"--weights {weights} does not exist (`mdus train` writes RUN/trainable.safetensors when it ends)"
    tok_dir = args.tokenizer or args.run / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        return f"--tokenizer {tok_dir} holds no speech tokenizer (no tokenizer.json)"
    manifest = args.data / f"{args.split}.jsonl"
    if not manifest.is_file():
        return f"--data/--split: no manifest {manifest}"
    return weights, tok_dir, manifest


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _json_default(obj):
    # lm-eval results may hold numpy scalars.
    return obj.item() if hasattr(obj, "item") else str(obj)


def run(args) -> int:
    """Evaluate a trained run: ASR WER/CER and text degradation on a split (optionally lm-eval-harness tasks)."""
    import mdus
    from mdus.models import load_base
    from mdus.speech import load_tokenizer
    from mdus.train import TrainConfig, evaluate_loss, sequences_from_manifest

    paths = _paths(args)
    if isinstance(paths, str):
        print(f"mdus eval: {paths}")
        return 2
    weights, tok_dir, manifest = paths
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = not args.no_progress
    try:
        speech_tok = load_tokenizer(tok_dir, device=device)
    except ValueError as exc:
        print(f"mdus eval: --tokenizer {tok_dir}: {_first_line(exc)}")
        return 2
    try:
        base, text_tok = load_base(args.model, device=device)
        base_ref, _ = load_base(args.model, device=device)
    except OSError as exc:
        print(f"mdus eval: --model {args.model}: {_first_line(exc)}")
        return 2
    try:
        lm = mdus.load(weights, base)
    except Exception as exc:  # not an mdus checkpoint, another base model, a broken file
        print(f"mdus eval: --weights {weights} cannot be loaded onto the base model (--model "
              f"{args.model or 'default'}): {_first_line(exc)}")
        return 2
    lm.to(device).eval()
    from mdus.data.readers import read_manifest

    train = args.data / "train.jsonl"
    try:  # every line up front: a malformed one is named before anything is decoded
        list(read_manifest(manifest))
        spoken = [u.text for u in read_manifest(train)] if train.is_file() else []
    except ValueError as exc:
        print(f"mdus eval: {exc}")
        return 2
    items, seqs = sequences_from_manifest(manifest, speech_tok, text_tok, progress=progress)
    if not items:
        print(f"mdus eval: --data/--split: {manifest} has no readable utterance")
        return 2
    if not any(normalize_text(utt.text) for utt, _, _ in items):
        print(f"mdus eval: --data/--split: every transcript in {manifest} is empty after normalization (WER is "
              f"undefined)")
        return 2
    general = None
    if args.general_passages > 0:
        try:
            general = general_text(spoken, n=args.general_passages)
        except FileNotFoundError as exc:
            print(f"mdus eval: no general text ({_first_line(exc)}); text degradation uses the test transcripts")
    metrics = evaluate_model(lm, base_ref, items, text_tok, general=general, device=device,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=progress)
    # The transcripts' loss given their speech (teacher forcing): what the demo reports as "transcript loss".
    result = {"weights": str(weights), "manifest": str(manifest), "utterances": len(items), **metrics,
              "test_loss": evaluate_loss(lm, seqs, TrainConfig(), device)}
    if args.lm_eval:
        from mdus.harness import run_lm_eval

        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        limit = args.lm_eval_limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        result["lm_eval"] = run_lm_eval(lm, text_tok, tasks, limit=limit, device=device)
    text = json.dumps(result, indent=2, default=_json_default)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0
