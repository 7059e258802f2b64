"""mdus.evaluate: normalization, WER/CER through jiwer, greedy decoding with and without a KV cache, text
degradation against the base."""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mdus
from mdus import evaluate as E

V = 64
CONFIG = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)


def _pair(block="transformer", perturb=0.0):
    torch.manual_seed(0)
    base = LlamaForCausalLM(CONFIG).eval()
    ref = copy.deepcopy(base)
    cfg = dict(cgmlp_units=16, cgmlp_kernel=3, merge_kernel=3) if block == "ebranchformer" else None
    lm = mdus.upscale(base, block=block, block_config=cfg, speech_vocab_size=10)
    if perturb:
        with torch.no_grad():
            for p in lm.blocks.parameters():
                p.add_(perturb * torch.randn_like(p))
    return lm, ref


def test_normalize_and_error_rates():
    assert E.normalize_text("  Don\u2019t PANIC -- it's 42!  ") == "don't panic it's 42"
    assert E.normalize_text("'quoted' words.") == "quoted words"
    assert E.normalize_text("Naïve CAFÉ résumé") == "naive cafe resume"  # one word each, as written
    r = E.error_rates(["Hello, world!", "a b c d"], ["hello world", "a x c"])
    assert r["wer"] == pytest.approx(2 / 6)  # one substitution + one deletion over 6 reference words
    assert 0 < r["cer"] < 1 and r["utterances"] == 2
    with pytest.raises(ValueError, match="differ in length"):
        E.error_rates(["a"], [])
    with pytest.raises(ValueError, match="every reference is empty"):
        E.error_rates(["!!"], ["a"])
    # An empty reference adds no words; what is decoded for it is inserted (a hallucination is not hidden).
    r = E.error_rates(["hello world", "?"], ["hello world", "lots of words here"], n_boot=200)
    assert r["wer"] == 4 / 2 and r["cer"] == len("lots of words here") / len("hello world")
    assert r["utterances"] == 2 and r["empty_references"] == 1
    assert all(map(math.isfinite, r["wer_ci"])) and r["wer_ci"][0] == 0.0


def test_error_rate_confidence_intervals():
    """The bootstrap intervals against jiwer itself on the same resamples of utterances, fresh random text."""
    import jiwer

    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    words = [f"w{i}" for i in range(12)]

    def sentence(n):
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist())

    refs = [sentence(int(torch.randint(1, 9, (), generator=g))) for _ in range(23)]
    hyps = [r if torch.rand((), generator=g) < 0.4 else sentence(int(torch.randint(0, 9, (), generator=g)))
            for r in refs]
    r = E.error_rates(refs, hyps, n_boot=64, seed=5, confidence=0.9)
    picks = torch.randint(len(refs), (64, len(refs)), generator=torch.Generator().manual_seed(5))
    for key, rate in (("wer", jiwer.wer), ("cer", jiwer.cer)):
        boot = torch.tensor([rate([refs[i] for i in p], [hyps[i] for i in p]) for p in picks.tolist()],
                            dtype=torch.float64)
        expect = torch.quantile(boot, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
        assert r[f"{key}_ci"] == pytest.approx(expect, rel=1e-12)
        assert r[key] == rate(refs, hyps)  # the corpus rate from the same per-utterance counts is jiwer's own
    lo, hi = E.error_rates(refs, hyps, n_boot=400, confidence=0.9)["wer_ci"]
    many = E.error_rates(refs * 9, hyps * 9, n_boot=400, confidence=0.9)  # 9x the utterances: ~1/3 the width
    assert many["wer"] == pytest.approx(r["wer"]) and 0 < many["wer_ci"][1] - many["wer_ci"][0] < (hi - lo) / 2
    assert E.error_rates(refs, refs)["wer_ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="confidence must be in"):
        E.error_rates(refs, hyps, confidence=1.5)


@pytest.mark.parametrize("block", ["transformer", "ebranchformer"])
def test_greedy_decode_cache_matches_recompute(block):
    lm, _ = _pair(block, perturb=0.3)
    prompt = torch.tensor([V + 1, V + 4, V + 2, 5, 9])
    cached = E.greedy_decode(lm, prompt, max_new_tokens=12, allowed_vocab=V, use_cache=True)
    full = E.greedy_decode(lm, prompt, max_new_tokens=12, allowed_vocab=V, use_cache=False)
    assert torch.equal(cached, full) and cached.numel() == 12 and int(cached.max()) < V


@pytest.mark.parametrize("block", ["transformer", "ebranchformer"])
def test_cache_built_from_the_host_config(block):
    """``DynamicCache(config=...)``, the way ``generate`` builds it, has slots for the host's layers only: the
    wrapper adds the inserted blocks' and decodes as with a plain ``DynamicCache()``."""
    from transformers import DynamicCache

    lm, _ = _pair(block, perturb=0.3)
    ids = torch.tensor([[V + 1, V + 4, 5, 9]])
    outs = []
    for cache in (DynamicCache(), DynamicCache(config=lm.base.config)):
        first = lm(ids, past_key_values=cache, use_cache=True, return_logits=True).logits
        step = lm(torch.tensor([[7]]), past_key_values=cache, use_cache=True, return_logits=True).logits
        outs.append(torch.cat([first, step], 1))
        assert len(cache.layers) == CONFIG.num_hidden_layers + len(lm.blocks)
    assert torch.equal(*outs)


def test_ebranchformer_conv_state_follows_the_cache():
    """The E-Branchformer keeps its conv history beside the KV cache: a cache cropped behind its back raises
    instead of decoding with the wrong history, and a reset cache starts afresh."""
    from transformers import DynamicCache

    lm, _ = _pair("ebranchformer", perturb=0.3)
    prompt, more = torch.tensor([[V + 1, V + 4, V + 2, 5]]), torch.tensor([[9, 3]])
    whole = lm(torch.cat([prompt, more], 1), return_logits=True).logits
    cache = DynamicCache()
    for _ in range(2):  # the second time on the emptied cache: a new prompt starts a new history
        lm(prompt, past_key_values=cache, use_cache=True)
        torch.testing.assert_close(lm(more, past_key_values=cache, use_cache=True, return_logits=True).logits,
                                   whole[:, -2:], rtol=1e-5, atol=1e-5)
        cache.crop(-6)  # negative: the tokens to drop (transformers 4.x and 5.x agree on that form)
    lm(torch.cat([prompt, more], 1), past_key_values=cache, use_cache=True)
    cache.crop(-1)
    with pytest.raises(ValueError, match=r"the KV cache holds 5 tokens but this E-Branchformer block's conv state "
                                         r"was saved at 6"):
        lm(more[:, :1], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("block", ["transformer", "ebranchformer"])
def test_cache_batch_edits_match_recompute(block):
    """Beam search's ``reorder_cache``, ``batch_select_indices`` and ``batch_repeat_interleave`` move the
    E-Branchformer's conv history with the KV rows: the next step equals recomputing the chosen rows in full."""
    from transformers import DynamicCache

    lm, _ = _pair(block, perturb=0.3)
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    prompts = torch.randint(0, V + 10, (3, 5), generator=g)
    step = torch.randint(0, V, (6, 1), generator=g)
    for edit, rows in (("reorder_cache", torch.tensor([2, 2, 0])), ("batch_select_indices", torch.tensor([1, 2])),
                       ("batch_repeat_interleave", 2)):
        cache = DynamicCache()
        lm(prompts, past_key_values=cache, use_cache=True)
        getattr(cache, edit)(rows)
        kept = prompts.repeat_interleave(rows, 0) if isinstance(rows, int) else prompts[rows]
        nxt = step[: kept.shape[0]]
        cached = lm(nxt, past_key_values=cache, use_cache=True, return_logits=True).logits
        full = lm(torch.cat([kept, nxt], 1), return_logits=True).logits[:, -1:]
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5, msg=edit)


@pytest.mark.parametrize("block", ["transformer", "ebranchformer"])
def test_cached_decoding_of_a_left_padded_batch(block):
    """A left-padded batch decoded with a KV cache, a chunk then single tokens, gives the logits of the no-cache
    forward over the whole padded batch: padding is never speech and never reaches the convs."""
    from transformers import DynamicCache

    lm, _ = _pair(block, perturb=0.3)
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    ids = torch.randint(0, V + 10, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4], mask[2, :7] = 0, 0
    full = lm(ids, attention_mask=mask, return_logits=True).logits
    cache, got = DynamicCache(), []
    for a, b in ((0, 6), (6, 9), (9, 10), (10, 11)):
        got.append(lm(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True,
                      return_logits=True).logits)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(got, 1)[valid], full[valid], rtol=1e-5, atol=1e-5)


def test_ebranchformer_slot_filled_by_another_model_raises():
    from transformers import DynamicCache

    lm, _ = _pair("ebranchformer", perturb=0.3)
    cache = DynamicCache()
    slot = CONFIG.num_hidden_layers  # the first inserted block's
    for i in range(slot + 1):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), i)
    with pytest.raises(ValueError, match=f"KV-cache slot {slot} .* is a DynamicLayer holding 3 tokens"):
        lm(torch.tensor([[5]]), past_key_values=cache, use_cache=True)


def test_greedy_decode_ebranchformer_and_eos():
    lm, _ = _pair("ebranchformer", perturb=0.3)
    prompt = torch.tensor([V + 1, V + 2, 3])
    out = E.greedy_decode(lm, prompt, max_new_tokens=8, allowed_vocab=V)
    first = int(out[0])
    stopped = E.greedy_decode(lm, prompt, max_new_tokens=8, allowed_vocab=V, eos=first)
    assert stopped.tolist() == [first]


def test_text_degradation():
    texts = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12, 5)]
    prompts = [t[:3] for t in texts]
    lm, ref = _pair()
    same = E.text_degradation(lm, ref, texts, continuation_prompts=prompts, continuation_tokens=6)
    assert same["text_kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["text_ppl"] == pytest.approx(same["text_ppl_base"], rel=1e-5)
    assert same["greedy_agreement"] == 1.0
    lm, ref = _pair(perturb=0.5)
    moved = E.text_degradation(lm, ref, texts, continuation_prompts=prompts, continuation_tokens=6)
    assert moved["text_kl"] > 1e-3 and moved["text_ppl"] != pytest.approx(moved["text_ppl_base"], rel=1e-3)


def test_transcribe_continuous_input():
    """A model with a speech encoder decodes from log-mel features: cached decoding equals recomputing the whole
    prefix with the features every step, and ``speech_prompt`` makes ceil(frames / stride) placeholder positions."""
    torch.manual_seed(0)
    lm = mdus.upscale(LlamaForCausalLM(CONFIG).eval(), speech_vocab_size=1, speech_encoder={"n_mels": 6, "stride": 4})
    with torch.no_grad():
        for p in lm.blocks.parameters():
            p.add_(0.3 * torch.randn_like(p))
    feats = torch.randn(10, 6)
    ids, inputs = E.speech_prompt(lm, feats)
    assert torch.equal(ids, torch.full((3,), V)) and inputs["speech_features"] is feats
    cached = E.greedy_decode(lm, ids, max_new_tokens=8, allowed_vocab=V, use_cache=True, **inputs)
    full = E.greedy_decode(lm, ids, max_new_tokens=8, allowed_vocab=V, use_cache=False, **inputs)
    assert torch.equal(cached, full)

    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    assert E.transcribe(lm, [feats], Tok(), max_new_tokens=8, progress=False) == [" ".join(map(str, cached.tolist()))]
    units_lm, _ = _pair()
    with pytest.raises(ValueError, match="no speech encoder"):
        E.speech_prompt(units_lm, feats)


@pytest.mark.parametrize("block", ["transformer", "ebranchformer"])
def test_batched_greedy_decoding_matches_one_at_a_time(block):
    """``greedy_decode_batch`` (left-padded, one KV cache) gives each prompt what ``greedy_decode`` gives it alone,
    with and without a cache, prompts of odd lengths, rows stopping at eos at different steps."""
    lm, _ = _pair(block, perturb=0.3)
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    prompts = [torch.randint(0, V + 10, (n,), generator=g) for n in (5, 1, 9, 3)]
    alone = [E.greedy_decode(lm, p, max_new_tokens=7, allowed_vocab=V) for p in prompts]
    eos = int(alone[0][2])  # an id the first prompt emits at its third step: that row stops there
    alone = [E.greedy_decode(lm, p, max_new_tokens=7, allowed_vocab=V, eos=eos) for p in prompts]
    for use_cache in (True, False):
        got = E.greedy_decode_batch(lm, prompts, max_new_tokens=7, allowed_vocab=V, eos=eos, use_cache=use_cache)
        assert all(torch.equal(a, b) for a, b in zip(got, alone, strict=True)), (use_cache, got, alone)
    assert got[0].numel() <= 3 and int(got[0][-1]) == eos


def test_batched_transcribe_continuous_input():
    torch.manual_seed(0)
    lm = mdus.upscale(LlamaForCausalLM(CONFIG).eval(), speech_vocab_size=1, speech_encoder={"n_mels": 6, "stride": 4})
    with torch.no_grad():
        for p in lm.blocks.parameters():
            p.add_(0.3 * torch.randn_like(p))
    feats = [torch.randn(n, 6) for n in (10, 3, 17)]
    alone = [E.greedy_decode(lm, E.speech_prompt(lm, f)[0], max_new_tokens=6, allowed_vocab=V, speech_features=f)
             for f in feats]

    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    for batch_size in (1, 2, 8):
        assert E.transcribe(lm, feats, Tok(), max_new_tokens=6, batch_size=batch_size, progress=False) == \
            [" ".join(map(str, a.tolist())) for a in alone]
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        E.transcribe(lm, feats, Tok(), batch_size=0, progress=False)
