"""attn_implementation="mdus" in transformers models: same logits and gradients as "sdpa" on padded batches, and
no leakage between packed sequences."""

import pytest
import torch
from conftest import backends_for
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import mdus  # noqa: F401  (registers "mdus")
from mdus.attention import cu_seqlens_from_position_ids

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEV_BACKENDS = [(dev, b) for dev in DEVICES for b in backends_for(dev, None) if b != "reference"]
# SmolLM2's attention layout (9 query heads, 3 KV heads, head dim 64) at two layers; Qwen2 adds q/k/v biases;
# Mistral a sliding window longer than the inputs.
SHAPE = dict(vocab_size=128, hidden_size=576, intermediate_size=256, num_hidden_layers=2, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=4096)),
}


def _model(name, dev="cpu"):
    torch.manual_seed(0)
    return MODELS[name]().float().to(dev)


def _logits_and_grads(model, impl, **batch):
    model.set_attn_implementation(impl)
    model.zero_grad()
    logits = model(**batch, use_cache=False).logits
    valid = batch["attention_mask"].bool()
    (logits[valid].float().square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), valid, grads


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_padded_batch_matches_sdpa(name, dev, backend, use_backend):
    use_backend(backend)
    model = _model(name, dev)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 11), generator=g).to(dev)
    mask = torch.ones(3, 11, dtype=torch.long, device=dev)
    mask[0, :4] = 0   # left padding
    mask[2, 8:] = 0   # right padding
    ref_logits, valid, ref_grads = _logits_and_grads(model, "sdpa", input_ids=ids, attention_mask=mask)
    logits, _, grads = _logits_and_grads(model, "mdus", input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=2e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=2e-5, rtol=1e-3, msg=n)


@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_packed_sequences_do_not_leak(dev, backend, use_backend):
    use_backend(backend)
    model = _model("llama", dev)
    model.set_attn_implementation("mdus")
    lengths = [4, 1, 6, 3]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (1, sum(lengths)), generator=g).to(dev)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(dev)
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    cu = torch.tensor([0, 4, 5, 11, 14], dtype=torch.int32, device=dev)
    by_cu = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
                  max_length_k=6, use_cache=False).logits
    alone = torch.cat([model(input_ids=ids[:, a:b], use_cache=False).logits
                       for a, b in zip(cu[:-1], cu[1:], strict=True)], 1)
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(by_cu, alone, atol=2e-5, rtol=1e-4)
    # A change to one sequence changes no other sequence's logits.
    ids2 = ids.clone()
    ids2[0, 5:11] = (ids2[0, 5:11] + 1) % 128
    changed = model(input_ids=ids2, position_ids=pos, use_cache=False).logits
    assert torch.equal(changed[:, :5], packed[:, :5]) and torch.equal(changed[:, 11:], packed[:, 11:])
    assert not torch.allclose(changed[:, 5:11], packed[:, 5:11])


def test_generate_with_padding_matches_sdpa():
    model = _model("llama").eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    out = {}
    for impl in ("sdpa", "mdus"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out["mdus"], out["sdpa"])


def test_cu_seqlens_from_position_ids():
    cu, max_len = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1, 5, 6]]))
    assert cu.tolist() == [0, 3, 4, 6, 8] and max_len == 3


def test_unsupported_features_raise():
    model = _model("llama")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.set_attn_implementation("mdus")
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
