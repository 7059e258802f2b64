"""mdus.gated_mlp: the host's SwiGLU MLP with a leaner backward gives autograd's results bit for bit and keeps two
of its three activations."""

import copy
import functools
import io

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import mdus
from mdus.gated_mlp import SiluMul, lean_gated_mlp, restore_gated_mlps
from tests.test_upscale import MODELS, V, _batch


def _leaves(*shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 3).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (37, 53), (2, 5, 131)])
def test_silu_mul_is_autograd_bitwise(dtype, shape):
    gate, up = _leaves(shape, shape, dtype=dtype, seed=sum(shape))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    want = F.silu(gate) * up
    want_grads = torch.autograd.grad(want, (gate, up), grad)
    got = SiluMul.apply(gate, up)
    got_grads = torch.autograd.grad(got, (gate, up), grad)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("which", [0, 1])
def test_silu_mul_one_input_needing_grad(which):
    gate, up = _leaves((4, 9), (4, 9), dtype=torch.float32, seed=3)
    (gate, up)[1 - which].requires_grad_(False)
    x = (gate, up)[which]
    (got,) = torch.autograd.grad(SiluMul.apply(gate, up).sum(), x)
    (want,) = torch.autograd.grad((F.silu(gate) * up).sum(), x)
    assert torch.equal(got, want)


def test_silu_mul_gradcheck():
    gate, up = _leaves((3, 7), (3, 7), dtype=torch.float64, seed=5)
    assert torch.autograd.gradcheck(SiluMul.apply, (gate, up))


def _saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves while ``fn`` runs, other than those of ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_mlp_keeps_two_of_three_activations(autocast):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=160, num_hidden_layers=1,
                                         num_attention_heads=6, num_key_value_heads=2))
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 13, 48, requires_grad=True)
    itemsize = 2 if autocast else 4

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            mlp(x)

    weights = [p for p in model.parameters()]
    plain = _saved_bytes(run, weights)
    assert lean_gated_mlp(mlp)
    lean = _saved_bytes(run, weights)
    # Whatever else is saved (the input, autocast's weight copies), the lean MLP keeps one intermediate less.
    assert plain - lean == 2 * 13 * 160 * itemsize


def test_other_mlps_are_left_alone():
    torch.manual_seed(0)
    gelu = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=6, num_key_value_heads=2, hidden_act="gelu"))
    assert not lean_gated_mlp(gelu.model.layers[0].mlp)
    assert "forward" not in vars(gelu.model.layers[0].mlp)
    assert not lean_gated_mlp(None)
    assert not lean_gated_mlp(torch.nn.Linear(3, 3))


def test_forwards_replaced_by_others_are_kept():
    """A forward something else installed (accelerate's device hooks replace it) is neither overwritten by
    lean_gated_mlp nor removed by restore_gated_mlps."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2))
    hooked, lean = model.model.layers[0].mlp, model.model.layers[1].mlp
    hook = functools.partial(type(hooked).forward, hooked)
    hooked.forward = hook
    assert not lean_gated_mlp(hooked) and vars(hooked)["forward"] is hook
    assert lean_gated_mlp(lean)
    assert restore_gated_mlps(model) == 1
    assert vars(hooked)["forward"] is hook and "forward" not in vars(lean)


def _step(lm, autocast):
    ids, cu, loss_mask = _batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = lm(ids, cu_seqlens=cu, loss_mask=loss_mask).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}


def _plain(lm):
    """The same model with every MLP back on its class's own forward."""
    lm = copy.deepcopy(lm)
    assert restore_gated_mlps(lm) == len(lm.stack())
    assert not any("forward" in vars(m) for m in lm.modules())
    return lm


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("method", ["upscale", "lora", "full_finetune"])
@pytest.mark.parametrize("name", list(MODELS))
def test_upscaled_model_is_bitwise_unchanged(name, method, autocast):
    torch.manual_seed(0)
    base = MODELS[name]()
    if method == "upscale":
        lm = mdus.upscale(base, n_insert=3, speech_vocab_size=20)
        with torch.no_grad():  # off the identity init, so that the blocks' MLPs matter
            for block in lm.blocks:
                block.mlp.down_proj.weight.normal_(std=0.1)
                block.self_attn.o_proj.weight.normal_(std=0.1)
    elif method == "lora":  # peft's adapters sit inside gate_proj and up_proj
        lm = mdus.lora(base, rank=4, speech_vocab_size=20)
        with torch.no_grad():
            for n, p in lm.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
    else:
        lm = mdus.full_finetune(base, speech_vocab_size=20)
    mlps = [layer.mlp for _, layer in lm.stack()]
    assert len(mlps) == 8 + (3 if method == "upscale" else 0)
    assert all(isinstance(vars(m).get("forward"), functools.partial) for m in mlps)
    plain = _plain(lm)
    loss, grads = _step(lm, autocast)
    loss_plain, grads_plain = _step(plain, autocast)
    assert torch.equal(loss, loss_plain)
    assert grads.keys() == grads_plain.keys() and grads
    for n in grads:
        assert torch.equal(grads[n], grads_plain[n]), n


def test_copies_and_pickles_keep_their_own_forward():
    torch.manual_seed(0)
    lm = mdus.upscale(MODELS["llama"](), n_insert=2, speech_vocab_size=20)
    buf = io.BytesIO()
    torch.save(lm, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(lm), torch.load(buf, weights_only=False)):
        for (_, a), (_, b) in zip(lm.stack(), clone.stack(), strict=True):
            assert vars(b.mlp)["forward"].args[0] is b.mlp is not a.mlp
        ids, cu, loss_mask = _batch(2)
        assert torch.equal(clone(ids, cu_seqlens=cu, loss_mask=loss_mask).loss,
                           lm(ids, cu_seqlens=cu, loss_mask=loss_mask).loss)


def test_compiles_fullgraph():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=6, num_key_value_heads=2))
    mlp = model.model.layers[0].mlp
    assert lean_gated_mlp(mlp)
    x = torch.randn(5, 48, requires_grad=True)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    (got,) = torch.autograd.grad(compiled(x).sum(), x)
    (want,) = torch.autograd.grad(mlp(x).sum(), x)
    torch.testing.assert_close(got, want)
