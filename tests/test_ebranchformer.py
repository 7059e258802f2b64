"""EBranchformerBlock: exact identity at initialization, causality, speech-only cgMLP, packed and padded layouts."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import mdus  # noqa: F401  (registers attn_implementation="mdus")
from mdus.blocks.ebranchformer import EBranchformerBlock

CONFIG = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=8)


def _rope(x, position_ids):
    return LlamaRotaryEmbedding(CONFIG)(x, position_ids)


def _block(seed=0, randomize=True, **kw):
    torch.manual_seed(seed)
    block = EBranchformerBlock(CONFIG, layer_idx=0, cgmlp_units=32, cgmlp_kernel=5, merge_kernel=3, **kw)
    if randomize:  # a trained block: every parameter non-trivial
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return block


def _run(block, x, **kw):
    pos = kw.pop("position_ids", torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1))
    return block(x, position_ids=pos, position_embeddings=_rope(x, pos), **kw)


@pytest.mark.parametrize("ffns", [False, True])
def test_identity_at_initialization(ffns):
    block = _block(randomize=False, macaron_ffn=ffns, ffn=ffns)
    x = torch.randn(3, 13, 48)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :4] = 0
    speech = torch.rand(3, 13) < 0.6
    assert torch.equal(_run(block, x), x)
    assert torch.equal(_run(block, x, attention_mask=mask, speech_mask=speech), x)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]])
    assert torch.equal(_run(block, x[:1], position_ids=pos), x[:1])
    # Identity, yet trainable: one backward gives the attention branch and the merge a gradient.
    x.requires_grad_()
    _run(block, x).square().sum().backward()
    assert block.o_proj.weight.grad.abs().sum() > 0 and block.merge_proj.weight.grad.abs().sum() > 0


def test_causal():
    block = _block()
    x = torch.randn(2, 17, 48)
    y = _run(block, x, speech_mask=torch.ones(2, 17, dtype=torch.bool))
    x2 = x.clone()
    x2[:, 9:] += torch.randn(2, 8, 48)
    y2 = _run(block, x2, speech_mask=torch.ones(2, 17, dtype=torch.bool))
    torch.testing.assert_close(y2[:, :9], y[:, :9])
    assert not torch.allclose(y2[:, 9:], y[:, 9:])


def test_speech_mask_keeps_cgmlp_off_text():
    """With attention and the merge DWConv closed, only the cgMLP half acts: text positions must stay unchanged."""
    block = _block()
    with torch.no_grad():
        block.o_proj.weight.zero_()
        block.fusion_weight.zero_()
        block.fusion_bias.zero_()
        block.merge_proj.bias.zero_()
    x = torch.randn(2, 15, 48)
    speech = torch.zeros(2, 15, dtype=torch.bool)
    speech[:, :9] = True
    y = _run(block, x, speech_mask=speech)
    assert torch.equal(y[~speech], x[~speech])
    assert not torch.allclose(y[speech], x[speech])


def test_packed_equals_separate_sequences():
    block = _block()
    lengths = [5, 1, 8, 3]
    x = torch.randn(1, sum(lengths), 48)
    speech = torch.rand(1, sum(lengths)) < 0.7
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    packed = _run(block, x, position_ids=pos, speech_mask=speech)
    cu = torch.tensor([0, 5, 6, 14, 17], dtype=torch.int32)
    by_cu = _run(block, x, position_ids=pos, speech_mask=speech, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8,
                 max_length_k=8)
    alone = torch.cat([_run(block, x[:, a:b], speech_mask=speech[:, a:b])
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)], 1)
    torch.testing.assert_close(packed, alone)
    torch.testing.assert_close(by_cu, alone)


def test_padded_equals_unpadded():
    block = _block()
    x = torch.randn(2, 11, 48)
    speech = torch.rand(2, 11) < 0.7
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :4] = 0  # left padding: row 0 holds a 7-token sequence
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    y = _run(block, x, attention_mask=mask, position_ids=pos, speech_mask=speech)
    alone = _run(block, x[:1, 4:], speech_mask=speech[:1, 4:])
    torch.testing.assert_close(y[0, 4:], alone[0])
    torch.testing.assert_close(y[1], _run(block, x[1:], speech_mask=speech[1:])[0])


def test_layernorm_option_and_bad_speech_mask():
    block = _block(norm="layer", final_norm=True)
    assert isinstance(block.norm_mha, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="speech_mask must be"):
        _run(block, torch.randn(2, 5, 48), speech_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="norm must be"):
        EBranchformerBlock(CONFIG, norm="batch")
