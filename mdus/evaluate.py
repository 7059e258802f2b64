"""Evaluation of speech LMs: ASR by greedy decoding (WER / CER with jiwer) and text degradation against the base.

**English normalization** before WER/CER (both sides): lower case; ``’`` -> ``'``; every character other than
a-z, 0-9 and an apostrophe inside a word becomes a space; whitespace collapsed. So "Hello, World!" and "hello
world" match, and "don't" stays one word.

**Text degradation** on held-out text, with the base model (a separately loaded, untouched copy) as reference:
* ``text_ppl`` / ``text_ppl_base``: perplexity of the model / the base on the text's next tokens;
* ``text_kl``: mean per-token KL(base ‖ model) of the next-token distributions;
* the model's distributions are taken over the text vocabulary (its logits renormalized without the speech rows),
  as the base has no speech rows: at initialization an up-scaled model then scores exactly like its base;
* ``greedy_agreement``: share of greedy continuation tokens on which model and base agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_NON_WORD = re.compile(r"[^a-z0-9']+")
_EDGE_APOSTROPHES = re.compile(r"(^|\s)'+|'+(\s|$)")


def normalize_text(text: str) -> str:
    """The documented English normalization (module docstring).

    Example:
        >>> normalize_text("  Don’t PANIC -- it's 42!  ")
        "don't panic it's 42"
    """
    text = text.lower().replace("\u2019", "'")
    text = _NON_WORD.sub(" ", text)
    text = _EDGE_APOSTROPHES.sub(" ", text)
    return " ".join(text.split())


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus WER and CER (jiwer) after ``normalize_text``. Empty references are skipped (WER is undefined)."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"references and hypotheses differ in length: {len(references)} != {len(hypotheses)}")
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        raise ValueError("every reference is empty after normalization: WER is undefined")
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps), "utterances": len(pairs)}


def _cache_unsupported(lm) -> bool:
    # Centered (non-causal) convs read future positions: incremental decoding cannot reproduce them.
    return any(getattr(b, "causal", True) is False for b in getattr(lm, "blocks", []))


@torch.no_grad()
def greedy_decode(lm, prompt: torch.Tensor, *, max_new_tokens: int, eos: int | None = None,
                  allowed_vocab: int | None = None, use_cache: bool | None = None) -> torch.Tensor:
    """Greedy continuation of one prompt (1-D ids) by a ``SpeechLM``; returns the new ids (1-D).

    ``allowed_vocab`` restricts the choice to ids below it (the text vocabulary, for ASR output). With a KV cache
    (the default; impossible only with non-causal blocks) each step runs only the new token.
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
        logits = lm(step_input, past_key_values=cache, use_cache=use_cache, return_logits=True).logits[0, -1]
        if allowed_vocab is not None:
            logits = logits[:allowed_vocab]
        nxt = int(logits.argmax())
        out_ids.append(nxt)
        if eos is not None and nxt == eos:
            break
        new = torch.tensor([[nxt]], device=ids.device)
        ids = torch.cat([ids, new], dim=1)
        step_input = new if use_cache else ids
    lm.train(was_training)
    return torch.tensor(out_ids, dtype=torch.long)


def transcribe(lm, speech_prompts: Sequence[torch.Tensor], tokenizer, *, max_new_tokens: int = 64,
               progress: bool = True) -> list[str]:
    """Greedy ASR: each prompt is the utterance's speech ids (already shifted above the text vocabulary); the
    output is decoded text up to the tokenizer's eos."""
    from tqdm.auto import tqdm

    texts = []
    for prompt in tqdm(speech_prompts, desc="decode", disable=not progress):
        new = greedy_decode(lm, prompt, max_new_tokens=max_new_tokens, eos=tokenizer.eos_token_id,
                            allowed_vocab=lm.text_vocab_size)
        if tokenizer.eos_token_id is not None and new.numel() and int(new[-1]) == tokenizer.eos_token_id:
            new = new[:-1]
        texts.append(tokenizer.decode(new.tolist(), skip_special_tokens=True))
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
    out = base.generate(prompt.reshape(1, -1), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long, device=prompt.device))
    return out[0, prompt.numel():].cpu()
