"""mdus.upscale and the baselines on tiny random Llama / Qwen2 / Qwen3 / Mistral models."""

import copy

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import mdus
from mdus.upscale import LORA_TARGETS, SpeechLMConfig

V = 96
SHAPE = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=8, num_attention_heads=6,
             num_key_value_heads=2, head_dim=8)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=False)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=4096)),
}
BLOCKS = ["transformer", "ebranchformer"]
EB_CONFIG = dict(cgmlp_units=32, cgmlp_kernel=5, merge_kernel=3)


def _pair(name, seed=0):
    """(model to wrap, an untouched copy of the same weights)."""
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    return model, copy.deepcopy(model)


def _upscale(model, block, **kw):
    return mdus.upscale(model, block=block, block_config=EB_CONFIG if block == "ebranchformer" else None, **kw)


def _batch(seed=1, speech=True):
    """A packed batch of 3 sequences: [speech units ...] -> [text transcript ...]."""
    g = torch.Generator().manual_seed(seed)
    parts, lengths = [], [9, 4, 12]
    for n in lengths:
        n_speech = n // 2 if speech else 0
        parts += [torch.randint(V, V + 20, (n_speech,), generator=g), torch.randint(0, V, (n - n_speech,), generator=g)]
    ids = torch.cat(parts)
    cu = torch.tensor([0, 9, 13, 25], dtype=torch.int32)
    return ids, cu, ids < V  # loss on the text tokens


def _train(lm, steps=3, seed=1):
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        ids, cu, loss_mask = _batch(seed + i)
        loss = lm(ids, cu_seqlens=cu, loss_mask=loss_mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", list(MODELS))
def test_identity_at_init(name, block):
    model, ref = _pair(name)
    ref.set_attn_implementation("sdpa")
    lm = _upscale(model, block, speech_vocab_size=20)
    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :3] = 0
    got = lm(ids, attention_mask=mask).logits[..., :V]
    want = ref(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max() <= 1e-6 * max(1.0, want.abs().max())


@pytest.mark.parametrize("block", BLOCKS)
def test_frozen_base_trains_only_new_parts(block):
    model, ref = _pair("llama")
    lm = _upscale(model, block, speech_vocab_size=20)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    new_before = {k: v.clone() for k, v in lm.trainable_state_dict().items()}
    assert all(not p.requires_grad for p in model.parameters())
    ids, cu, loss_mask = _batch()
    lm(ids, cu_seqlens=cu, loss_mask=loss_mask).loss.backward()
    assert all(p.grad is None for p in model.parameters()), "a frozen base weight got a gradient"
    lm.zero_grad()
    _train(lm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base weight {k} changed"
    changed = [k for k, v in lm.trainable_state_dict().items() if not torch.equal(v, new_before[k])]
    assert "speech_embed.weight" in changed and any(k.startswith("blocks.") for k in changed)
    # The base model, unwrapped, is still exactly the original.
    ref.set_attn_implementation("mdus")
    ids = torch.randint(0, V, (2, 7))
    assert torch.equal(lm.without_inserted()(ids).logits, ref(ids).logits)


def test_train_text_embeddings_flag():
    model, _ = _pair("qwen2")
    lm = mdus.upscale(model, speech_vocab_size=8, train_text_embeddings=True)
    assert model.get_input_embeddings().weight.requires_grad and model.get_output_embeddings().weight.requires_grad
    assert not any(p.requires_grad for p in model.get_decoder().layers.parameters())
    assert lm.speech_out is not None and lm.speech_head is lm.speech_out  # qwen2 here does not tie its head
    lm.speech_out.requires_grad_(False)  # frozen by the user: describe says so
    row = next(ln for ln in mdus.describe(lm).splitlines() if ln.startswith("speech head")).split()
    assert row[-2:] == ["0", f"{lm.speech_out.numel():,}"]


@pytest.mark.parametrize("block", BLOCKS)
def test_speech_only_route_keeps_text_exact(block):
    model, ref = _pair("llama")
    ref.set_attn_implementation("mdus")
    lm = _train(_upscale(model, block, speech_vocab_size=20, route="speech_only"))
    ids = torch.randint(0, V, (2, 10))
    assert torch.equal(lm(ids).logits[..., :V], ref(ids).logits)
    # ... while speech inputs do go through the trained blocks: closing them changes the speech logits.
    sp, cu, _ = _batch(7)
    trained = lm(sp, cu_seqlens=cu).logits
    with torch.no_grad():
        for b in lm.blocks:
            b.reset_identity() if hasattr(b, "reset_identity") else (b.self_attn.o_proj.weight.zero_(),
                                                                     b.mlp.down_proj.weight.zero_())
    assert not torch.allclose(lm(sp, cu_seqlens=cu).logits, trained)


def test_packed_and_padded_losses_agree():
    model, _ = _pair("mistral")
    lm = _train(mdus.upscale(model, speech_vocab_size=20), steps=1)
    ids, cu, loss_mask = _batch(5)
    packed = lm(ids, cu_seqlens=cu, loss_mask=loss_mask)
    assert packed.logits is None  # training never forms the logits
    lengths = (cu[1:] - cu[:-1]).tolist()
    width = max(lengths)
    padded_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    padded_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        padded_ids[i, width - (b - a):] = ids[a:b]  # left padding
        padded_mask[i, width - (b - a):] = 1
        labels[i, width - (b - a):] = torch.where(loss_mask[a:b], ids[a:b], -100)
    padded = lm(padded_ids, attention_mask=padded_mask, labels=labels)
    torch.testing.assert_close(padded.loss, packed.loss, atol=1e-5, rtol=1e-5)


def test_left_and_right_padding_and_packing_give_the_same_loss():
    """Sequences that start with a target-bearing token: a left-padding position must not predict the first real
    token."""
    model, _ = _pair("llama")
    lm = _train(mdus.upscale(model, speech_vocab_size=20), steps=1)
    seqs = [torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21]), torch.tensor([V + 3, 5, 6])]
    ids = torch.cat(seqs)
    packed = lm(ids, cu_seqlens=torch.tensor([0, 4, 6, 9], dtype=torch.int32), labels=ids).loss
    for left in (True, False):
        batch = torch.zeros(3, 4, dtype=torch.long)
        mask = torch.zeros(3, 4, dtype=torch.long)
        for i, t in enumerate(seqs):
            cols = slice(4 - len(t), 4) if left else slice(0, len(t))
            batch[i, cols], mask[i, cols] = t, 1
        padded = lm(batch, attention_mask=mask, labels=torch.where(mask.bool(), batch, 7)).loss
        torch.testing.assert_close(padded, packed, atol=1e-6, rtol=1e-6)
    # One row packed by restarting position_ids (transformers' convention): the same sequences, the same loss.
    pos = torch.cat([torch.arange(len(t)) for t in seqs])[None]
    for block in BLOCKS:
        lm = _train(_upscale(_pair("llama")[0], block, speech_vocab_size=20), steps=1)
        packed = lm(ids, cu_seqlens=torch.tensor([0, 4, 6, 9], dtype=torch.int32), labels=ids).loss
        torch.testing.assert_close(lm(ids[None], position_ids=pos, labels=ids[None]).loss, packed, atol=1e-6,
                                   rtol=1e-6)


@pytest.mark.parametrize("block", BLOCKS)
def test_gradient_checkpointing_covers_the_inserted_blocks(block):
    """``lm.gradient_checkpointing_enable()`` checkpoints the host's layers and the inserted blocks: the same loss
    and gradients, and the activations kept for the backward shrink to the layer inputs."""
    lm = _train(_upscale(_pair("llama")[0], block, speech_vocab_size=20), steps=1).train()  # checkpoints in training
    ids, cu, loss_mask = _batch(4)

    def step():
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        lm.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = lm(ids, cu_seqlens=cu, loss_mask=loss_mask).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}, sum(kept)

    loss, grads, plain = step()
    lm.gradient_checkpointing_enable()
    assert all(b.gradient_checkpointing for b in lm.blocks)
    loss_c, grads_c, checkpointed = step()
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    assert grads_c.keys() == grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-6, atol=1e-7, msg=name)
    assert checkpointed < plain / 10, (checkpointed, plain)  # the host alone checkpointed: ~plain / 3.5
    lm.gradient_checkpointing_disable()
    assert not any(b.gradient_checkpointing for b in lm.blocks) and step()[2] == plain


def test_loss_matches_eager_cross_entropy():
    model, _ = _pair("llama")
    lm = _train(mdus.upscale(model, speech_vocab_size=20), steps=1)
    ids, cu, loss_mask = _batch(3)
    loss = lm(ids, cu_seqlens=cu, loss_mask=loss_mask).loss
    logits = lm(ids, cu_seqlens=cu).logits
    targets = torch.where(loss_mask, ids, -100)
    pieces = [torch.nn.functional.cross_entropy(logits[a:b - 1], targets[a + 1:b], reduction="sum")
              for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
    n = sum(int((targets[a + 1:b] != -100).sum()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
    torch.testing.assert_close(loss, sum(pieces) / n, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["dus-transformer", "dus-ebranchformer", "lora", "full_finetune"])
def test_save_and_load_round_trip(tmp_path, method):
    model, fresh = _pair("llama")
    if method.startswith("dus"):
        lm = _upscale(model, method.split("-")[1], speech_vocab_size=20, placement="sandwich", n_insert=3)
    elif method == "lora":
        lm = mdus.lora(model, rank=4, speech_vocab_size=20)
    else:
        lm = mdus.full_finetune(model, speech_vocab_size=20)
    _train(lm, steps=2)
    path = lm.save_trainable(tmp_path / "adapter.safetensors")
    loaded = mdus.load(path, fresh)
    for k, v in lm.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[k], v), k
    ids, cu, _ = _batch(9)
    assert torch.equal(loaded(ids, cu_seqlens=cu).logits, lm(ids, cu_seqlens=cu).logits)


def test_lora_match_params_and_full_finetune():
    dus = mdus.upscale(_pair("llama")[0], speech_vocab_size=20)
    target = mdus.count_trainable(dus)
    lo = mdus.lora(_pair("llama")[0], match_params=target, speech_vocab_size=20)
    per_rank = sum(m.base_layer.in_features + m.base_layer.out_features for n, m in lo.base.named_modules()
                   if n.rsplit(".", 1)[-1] in LORA_TARGETS)
    reached = mdus.count_trainable(lo)
    assert abs(reached - target) <= per_rank / 2  # the closest rank
    assert "LoRA adapters" in mdus.describe(lo)
    ff = mdus.full_finetune(_pair("llama")[0], speech_vocab_size=20)
    assert all(p.requires_grad for p in ff.parameters())


def test_placements():
    pos = mdus.insertion_positions
    assert pos(32, 8, "interleaved") == [4, 8, 12, 16, 20, 24, 28, 32]
    assert pos(8, 2, "top") == [8, 8] and pos(8, 2, "bottom") == [0, 0] and pos(8, 2, "middle") == [4, 4]
    assert pos(8, 3, "sandwich") == [0, 8, 8]
    assert pos(8, None, [5, 1]) == [1, 5]
    for n in range(1, 27):  # every count, also more blocks than the 8 layers: each after a layer, evenly spread
        got = pos(8, n, "interleaved")
        per_layer = [got.count(layer) for layer in range(1, 9)]
        assert len(got) == n and got == sorted(got) and got[-1] == 8 and 0 not in got
        assert max(per_layer) - min(per_layer) <= 1 if n >= 8 else max(per_layer) == 1
    model, _ = _pair("llama")
    lm = mdus.upscale(model)
    assert len(lm.blocks) == 2 and [k for k, _ in lm.stack()].count("inserted") == 2  # 25% of 8 layers
    with pytest.raises(ValueError, match="placement must be one of"):
        pos(8, 2, "diagonal")
    with pytest.raises(ValueError, match=r"placement positions must be in \[0, 8\]"):
        pos(8, None, [9])


def test_bad_inputs():
    lm = mdus.upscale(_pair("llama")[0], speech_vocab_size=4)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 100\)"):
        lm(torch.tensor([[1, 2, 100]]))
    with pytest.raises(ValueError, match="packed input_ids must be 1-D"):
        lm(torch.zeros(2, 3, dtype=torch.long), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        lm(torch.zeros(5, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="labels or loss_mask"):
        lm(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long),
           loss_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="route must be one of"):
        mdus.upscale(_pair("llama")[0], route="text_only")
    with pytest.raises(TypeError, match="input_ids must be"):
        lm(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, past \+ tokens\) = \(2, 3\).*got \(2, 5\)"):
        lm(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"route='speech_only' needs speech_vocab_size >= 1"):
        mdus.upscale(_pair("llama")[0], route="speech_only")
    with pytest.raises(ValueError, match=r"insertion positions must be in \[0, 8\].*got \[9\]"):
        mdus.SpeechLM(_pair("llama")[0], SpeechLMConfig(positions=[2, 9]))


def test_bad_construction_arguments_name_themselves():
    model = _pair("llama")[0]
    bad = [(dict(placement=[1.7]), TypeError, "placement positions must be ints"),
           (dict(n_insert=True), TypeError, "n_insert must be an int"),
           (dict(n_insert=2.5), TypeError, "n_insert must be an int"),
           (dict(speech_vocab_size=2.5), TypeError, "speech_vocab_size must be an int"),
           (dict(route="speech_only", speech_vocab_size=4, train_text_embeddings=True), ValueError,
            "route='speech_only' keeps text outputs.*train_text_embeddings"),
           (dict(block_config={"intermediate_sise": 32}), ValueError, "block_config: 'intermediate_sise' is not"),
           (dict(block_config={"hidden_size": 32}), ValueError, "block_config: 'hidden_size' must stay the host's"),
           (dict(block_config={"head_dim": 4, "num_attention_heads": 12}), ValueError, "block_config: 'head_dim'")]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            mdus.upscale(model, **kwargs)
    assert mdus.insertion_positions(8, None, [np.int64(3)]) == [3]  # numpy ints are ints
    lm = mdus.upscale(model, n_insert=1, block_config={"intermediate_size": 24})
    assert lm.blocks[0].mlp.up_proj.out_features == 24
    with pytest.raises(ValueError, match="match_params must be an int >= 1"):
        mdus.lora(_pair("llama")[0], match_params=-5)


def test_without_inserted_only_where_the_host_is_untouched():
    for lm in (mdus.upscale(_pair("llama")[0], train_text_embeddings=True), mdus.lora(_pair("llama")[0], rank=2),
               mdus.full_finetune(_pair("llama")[0])):
        with pytest.raises(ValueError, match="without_inserted"):
            lm.without_inserted()


def test_load_checks_the_base_before_touching_it(tmp_path):
    small = dict(SHAPE, num_hidden_layers=4)
    path = mdus.upscale(LlamaForCausalLM(LlamaConfig(**SHAPE)), placement=[2, 8], speech_vocab_size=5).save_trainable(
        tmp_path / "dus.safetensors")
    with pytest.raises(ValueError, match=r"different base model \(layers: checkpoint 8, model 4\)"):
        mdus.load(path, LlamaForCausalLM(LlamaConfig(**small)))
    with pytest.raises(ValueError, match=r"text_vocab: checkpoint 96, model 100"):
        mdus.load(path, LlamaForCausalLM(LlamaConfig(**dict(SHAPE, vocab_size=100))))
    # Same depth, width and vocabulary, other projection shapes: the names match, the shapes do not. The check
    # runs on a skeleton, so the model is left as it was (no adapters, nothing trainable, its own attention).
    lora_path = mdus.lora(LlamaForCausalLM(LlamaConfig(**SHAPE)), rank=2).save_trainable(tmp_path / "lora.safetensors")
    for p in (path, lora_path):
        other = LlamaForCausalLM(LlamaConfig(**dict(SHAPE, intermediate_size=80)))
        before = {k: v.clone() for k, v in other.state_dict().items()}
        attn, trainable = other.config._attn_implementation, [v.requires_grad for v in other.parameters()]
        with pytest.raises(ValueError, match="the model expects"):
            mdus.load(p, other)
        assert other.config._attn_implementation == attn
        assert [v.requires_grad for v in other.parameters()] == trainable
        assert other.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_fingerprint_indices_stay_in_range():
    from mdus.upscale import _spread

    for n in (1, 16, 17, 2**24 + 3, 49152 * 576):  # the last: SmolLM2's embedding, past float32's exact integers
        index = _spread(n, 16)
        assert index[0] == 0 and index[-1] == n - 1 and bool((index[1:] >= index[:-1]).all())


def test_load_checks_the_attention_layout_and_the_base_weights(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SHAPE))
    trained = copy.deepcopy(base)
    path = mdus.upscale(copy.deepcopy(base), n_insert=2, speech_vocab_size=5).save_trainable(tmp_path / "d.st")
    # Shapes alike, computation not: another head layout, another RoPE, other weights of the same architecture.
    for kw, message in ((dict(num_attention_heads=12, head_dim=4, num_key_value_heads=4),
                         "num_attention_heads: checkpoint 6, model 12"),
                        (dict(rope_theta=500.0), "rope_parameters: checkpoint"),
                        ({}, "trained on other base weights")):
        other = LlamaForCausalLM(LlamaConfig(**dict(SHAPE, **kw)))
        with pytest.raises(ValueError, match=message):
            mdus.load(path, other)
    assert isinstance(mdus.load(path, other, check_weights=False), mdus.SpeechLM)
    # The same weights in bf16 pass (within bf16's rounding).
    assert mdus.load(path, copy.deepcopy(trained).to(torch.bfloat16)).blocks[0].mlp.up_proj.weight.dtype == \
        torch.bfloat16
    with pytest.raises(TypeError, match="not a SpeechLM wrapper"):
        mdus.load(path, mdus.upscale(copy.deepcopy(trained)))
    # Full fine-tuning trains the host itself, so its checkpoint carries no fingerprint to check.
    ft = mdus.full_finetune(copy.deepcopy(base))
    with torch.no_grad():
        ft.base.get_input_embeddings().weight.add_(1.0)
    mdus.load(ft.save_trainable(tmp_path / "ft.st"), copy.deepcopy(trained))


def test_real_smollm2_135m(tmp_path):
    """The real embedded SmolLM2-135M-Instruct: identity at initialization and a frozen base after training."""
    from mdus.models import embedded_gguf, load_base

    try:
        embedded_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    base, tok = load_base()
    ref, _ = load_base()
    tok.pad_token = tok.pad_token or tok.eos_token
    ref.set_attn_implementation("mdus")
    lm = mdus.upscale(base, speech_vocab_size=64)
    assert len(lm.blocks) == 8 and lm.config.positions == [3, 7, 11, 15, 18, 22, 26, 30]  # 25% of 30 layers
    ids = tok(["The capital of France is", "Speech units then text"], return_tensors="pt", padding=True)
    want = ref(**ids).logits
    got = lm(ids.input_ids, attention_mask=ids.attention_mask).logits[..., :49152]
    valid = ids.attention_mask.bool()
    assert (got[valid] - want[valid]).abs().max() <= 1e-6 * want.abs().max()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3)
    speech = torch.randint(49152, 49152 + 64, (20,))
    text = tok(" hello world", return_tensors="pt").input_ids[0]
    seq = torch.cat([speech, text])
    loss = lm(seq, cu_seqlens=torch.tensor([0, seq.numel()], dtype=torch.int32), loss_mask=seq < 49152).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    # Saved and loaded onto a freshly loaded base (the fingerprint reads past float32's exact integers here).
    path = lm.save_trainable(tmp_path / "real.safetensors")
    with torch.no_grad():
        restored = mdus.load(path, ref)
        torch.testing.assert_close(restored(seq[None]).logits, lm(seq[None]).logits, rtol=0, atol=0)


ENCODER = {"n_mels": 5, "stride": 4}


def _feature_batch(seed=3):
    """Two utterances (13 and 6 frames -> 4 and 2 speech positions), each followed by text, packed."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(13, 5, generator=g), torch.randn(6, 5, generator=g)]
    texts = [torch.randint(0, V, (3,), generator=g), torch.randint(0, V, (5,), generator=g)]
    seqs = [torch.cat([torch.full((4,), V), texts[0]]), torch.cat([torch.full((2,), V), texts[1]])]
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    return seqs, feats, padded, torch.tensor([13, 6])


@pytest.mark.parametrize("method", ["dus-transformer", "lora", "full_finetune"])
def test_continuous_speech_input(tmp_path, method):
    """Speech features through the model's ConvSubsampler: a packed batch equals each utterance alone, and (with
    the blocks at identity) transformers' own model run on the same embeddings (``inputs_embeds``)."""
    model, fresh = _pair("llama")
    build = {"dus-transformer": lambda m: mdus.upscale(m, speech_vocab_size=1, speech_encoder=ENCODER),
             "lora": lambda m: mdus.lora(m, rank=2, speech_vocab_size=1, speech_encoder=ENCODER),
             "full_finetune": lambda m: mdus.full_finetune(m, speech_vocab_size=1, speech_encoder=ENCODER)}[method]
    lm = build(model).eval()
    seqs, feats, padded, lengths = _feature_batch()
    cu = torch.tensor([0, seqs[0].numel(), seqs[0].numel() + seqs[1].numel()], dtype=torch.int32)
    packed = lm(torch.cat(seqs), cu_seqlens=cu, speech_features=padded, speech_feature_lengths=lengths).logits
    for i, (ids, f) in enumerate(zip(seqs, feats, strict=True)):
        alone = lm(ids[None], speech_features=f).logits[0]
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, atol=1e-5, rtol=1e-5)
        emb = fresh.get_input_embeddings()(ids.clamp(max=V - 1))
        emb[ids == V] = lm.speech_encoder(f)
        want = fresh(inputs_embeds=emb[None]).logits[0]
        torch.testing.assert_close(alone[:, :V], want, atol=1e-5, rtol=1e-5)
    # The encoder trains, and the wrapper saves and reloads with it.
    loss = lm(torch.cat(seqs), cu_seqlens=cu, speech_features=padded, speech_feature_lengths=lengths,
              loss_mask=torch.cat(seqs) < V).loss
    loss.backward()
    assert lm.speech_encoder.conv1.weight.grad.abs().sum() > 0
    loaded = mdus.load(lm.save_trainable(tmp_path / "w.safetensors"), _pair("llama")[0])
    one = dict(input_ids=seqs[0][None], speech_features=feats[0])
    assert torch.equal(loaded(**one).logits, lm(**one).logits)
    assert "speech encoder" in mdus.describe(lm)


def test_continuous_speech_input_errors():
    lm = mdus.upscale(_pair("llama")[0], speech_vocab_size=1, speech_encoder=ENCODER)
    seqs, feats, _, _ = _feature_batch()
    with pytest.raises(ValueError, match="pass speech_features"):
        lm(seqs[0][None])
    with pytest.raises(ValueError, match="speech_features give 2 speech positions .* input_ids hold 4"):
        lm(seqs[0][None], speech_features=feats[1])
    with pytest.raises(ValueError, match="no speech encoder"):
        mdus.upscale(_pair("llama")[0], speech_vocab_size=1)(seqs[0][None], speech_features=feats[0])
    with pytest.raises(ValueError, match="speech_vocab_size >= 1"):
        mdus.upscale(_pair("llama")[0], speech_encoder=ENCODER)
    # Text-only input needs no features.
    assert lm(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, V + 1)


def test_lora_match_params_counts_the_speech_encoder():
    dus = mdus.upscale(_pair("llama")[0], speech_vocab_size=1, speech_encoder=ENCODER)
    lo = mdus.lora(_pair("llama")[0], match_params=mdus.count_trainable(dus), speech_vocab_size=1,
                   speech_encoder=ENCODER)
    per_rank = sum(m.base_layer.in_features + m.base_layer.out_features for n, m in lo.base.named_modules()
                   if n.rsplit(".", 1)[-1] in LORA_TARGETS)
    assert abs(mdus.count_trainable(lo) - mdus.count_trainable(dus)) <= per_rank / 2


@pytest.mark.parametrize("method", ["dus-transformer", "lora"])
def test_symbol_posterior_speech_input(tmp_path, method):
    """Character posteriors through a SymbolProjection started from the text embeddings: one-hot posteriors of
    symbols whose tokens are t_1..t_n give (blocks at identity) exactly the base model run on t_1..t_n; the table
    trains, and the wrapper saves and reloads it."""
    model, fresh = _pair("llama")
    token_ids = [[7], [3], [V - 1], [11]]
    encoder = {"type": "symbols", "token_ids": token_ids}
    build = {"dus-transformer": lambda m: mdus.upscale(m, speech_vocab_size=1, speech_encoder=encoder),
             "lora": lambda m: mdus.lora(m, rank=2, speech_vocab_size=1, speech_encoder=encoder)}[method]
    lm = build(model).eval()
    symbols = torch.tensor([2, 0, 0, 3, 1])
    text = torch.tensor([5, 9])
    ids = torch.cat([torch.full((5,), V), text])
    posteriors = torch.nn.functional.one_hot(symbols, 4).float()
    got = lm(ids[None], speech_features=posteriors).logits[0, :, :V]
    spelled = torch.cat([torch.tensor([token_ids[s][0] for s in symbols]), text])
    torch.testing.assert_close(got, fresh(spelled[None]).logits[0], atol=1e-5, rtol=1e-5)
    loss = lm(ids[None], speech_features=posteriors, loss_mask=(ids < V)[None]).loss
    loss.backward()
    assert lm.speech_encoder.weight.grad.abs().sum() > 0 and lm.speech_encoder.weight.requires_grad
    with torch.no_grad():
        lm.speech_encoder.weight.add_(torch.randn_like(lm.speech_encoder.weight))
    loaded = mdus.load(lm.save_trainable(tmp_path / "w.safetensors"), _pair("llama")[0])
    soft = torch.rand(5, 4).softmax(-1)
    assert torch.equal(loaded(ids[None], speech_features=soft).logits, lm(ids[None], speech_features=soft).logits)
