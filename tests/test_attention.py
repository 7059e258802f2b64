"""mdus_kernels.attention: every backend against the fp64 reference, the reference against PyTorch's SDPA.

Tolerance (flash-attn's rule): in fp16/bf16 a kernel's error against the fp64 reference may be at most 2x (3x for
gradients) the error that plain PyTorch makes computing the same thing in that dtype, plus one rounding step of
the dtype at the result's scale. The Triton kernels run under the interpreter on CPU, so their shapes are small.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import backends_for

import mdus_kernels as mk
from mdus_kernels.reference import attention as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, backend) pairs: on a GPU machine the Triton kernels run on CUDA tensors, else under the interpreter.
DEV_BACKENDS = [(dev, b) for dev in DEVICES for b in backends_for(dev, None)]
KERNELS = [(dev, b) for dev, b in DEV_BACKENDS if b != "reference"]
LOWP = (torch.float16, torch.bfloat16)


def _cu(lengths, dev="cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)


def _inputs(total_q, total_k, hq, hkv, d, dtype, seed, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(int(total_q), hq, d, generator=g).to(dev, dtype)
    k = torch.randn(int(total_k), hkv, d, generator=g).to(dev, dtype)
    v = torch.randn(int(total_k), hkv, d, generator=g).to(dev, dtype)
    return q, k, v


def _run(fn, q, k, v, dout, dlse):
    """(out, lse, dq, dk, dv) of ``fn(q, k, v) -> (out, lse)`` for the upstream gradients (dout, dlse)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    finite = torch.isfinite(lse)
    # At least fp32, and fp64 stays fp64: rounding fp64 gradients through fp32 made the fp64 checks flaky.
    acc = torch.promote_types(out.dtype, torch.float32)
    loss = (out.to(acc) * dout.to(acc)).sum() + (torch.where(finite, lse, 0.0).to(acc) * dlse.to(acc)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [out.detach(), lse.detach(), *grads]


def _check(got, ref64, base, dtype, names=("out", "lse", "dq", "dk", "dv")):
    for i, (name, a, r, b) in enumerate(zip(names, got, ref64, base, strict=True)):
        assert torch.isfinite(a[torch.isfinite(r)]).all(), f"{name}: non-finite values"
        assert torch.equal(torch.isinf(a), torch.isinf(r)), f"{name}: -inf pattern differs from the reference"
        m = torch.isfinite(r)
        err = (a.double() - r)[m].abs().max().item() if m.any() else 0.0
        if dtype == torch.float32:
            tol = 2e-5 * max(1.0, r[m].abs().max().item() if m.any() else 1.0)
        else:
            base_err = (b.double() - r)[m].abs().max().item() if m.any() else 0.0
            ulp = torch.finfo(dtype).eps * (r[m].abs().max().item() if m.any() else 1.0)
            tol = (2 if i < 2 else 3) * base_err + ulp
        assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g}"


def _compare(backend, use_backend, q, k, v, cu_q, cu_k, *, causal, prefix=None, seed=0):
    """Runs the public op on ``backend`` and checks values and gradients against the references."""
    use_backend(backend)
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g).to(q.device)
    dlse = torch.randn(q.shape[1], q.shape[0], generator=g).to(q.device)
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
    cu = cu_q if cu_q is cu_k else (cu_q, cu_k)
    got = _run(lambda a, b, c: mk.attention(a, b, c, cu_seqlens=cu, max_seqlen=(max_q, max_k), causal=causal,
                                            prefix_lens=prefix, return_lse=True), q, k, v, dout, dlse)
    exact = _run(lambda a, b, c: ref.attention(a, b, c, cu_q, cu_k, causal=causal, prefix_lens=prefix),
                 q.double(), k.double(), v.double(), dout.double(), dlse.double())
    base = _run(lambda a, b, c: ref.attention(a, b, c, cu_q, cu_k, causal=causal, prefix_lens=prefix,
                                              compute_dtype=dtype), q, k, v, dout, dlse)
    _check(got, exact, base, dtype)
    return got


# ------------------------------------------------------------------------------------------- the reference = spec


@pytest.mark.parametrize("mask", ["causal", "full", "prefix"])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (113, 203), (40, 9)])
def test_reference_matches_sdpa(mask, sq, sk):
    """The spec against torch's math SDPA with the mask written independently (bottom-right causal + prefix)."""
    b, hq, hkv, d = 2, 6, 2, 24
    g = torch.Generator().manual_seed(sq * 1000 + sk)
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    prefix = torch.tensor([5, 0]) if mask == "prefix" else None
    out, lse = ref.attention(q.reshape(-1, hq, d), k.reshape(-1, hkv, d), v.reshape(-1, hkv, d),
                             torch.arange(b + 1) * sq, torch.arange(b + 1) * sk, causal=mask != "full",
                             prefix_lens=prefix)
    for i in range(b):
        allowed = torch.ones(sq, sk, dtype=torch.bool)
        if mask != "full":
            p = 0 if prefix is None else int(prefix[i])
            for r in range(sq):
                allowed[r] = torch.tensor([(c - (sk - sq) <= r) or c < p for c in range(sk)])
        qi, ki, vi = (t[i].transpose(0, 1) for t in (q, k, v))
        live = allowed.any(1)
        expect = F.scaled_dot_product_attention(qi[:, live], ki, vi, attn_mask=allowed[live], enable_gqa=True)
        got = out.view(b, sq, hq, d)[i].transpose(0, 1)
        torch.testing.assert_close(got[:, live], expect)
        assert (got[:, ~live] == 0).all()
        scores = (qi @ ki.repeat_interleave(hq // hkv, 0).transpose(1, 2)) * d ** -0.5
        expect_lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
        torch.testing.assert_close(lse.view(hq, b, sq)[:, i], expect_lse)


def test_reference_backward_matches_autograd():
    lengths = [3, 0, 11, 1, 7]
    cu = _cu(lengths)
    q, k, v = _inputs(cu[-1], cu[-1], 6, 3, 16, torch.float64, 3)
    prefix = torch.tensor([2, 0, 4, 1, 9])
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=g)
    dlse = torch.randn(6, q.shape[0], dtype=torch.float64, generator=g)
    auto = _run(lambda a, b, c: ref.attention(a, b, c, cu, cu, prefix_lens=prefix), q, k, v, dout, dlse)[2:]
    manual = ref.attention_backward(dout, dlse, q, k, v, cu, cu, prefix_lens=prefix)
    for a, m in zip(auto, manual, strict=True):
        torch.testing.assert_close(m, a)


# ---------------------------------------------------------------------------------------------- kernels vs spec

# (Sq, Sk, mask, GQA group, head dim): covers every sequence length, mask and group of the issue at least once
# per backend and dtype, and non-power-of-two head dims. The interpreter makes large cases slow.
CASES = [
    (1, 1, "causal", 1, 64),
    (17, 17, "causal", 3, 80),
    (17, 17, "prefix", 5, 32),
    (97, 97, "full", 1, 96),
    (97, 97, "prefix", 3, 64),
    (113, 203, "causal", 5, 48),
    (113, 203, "prefix", 1, 128),
    (203, 113, "causal", 3, 64),  # more queries than keys: the first 90 rows see no key
    (33, 33, "full", 5, 256),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sq,sk,mask,group,d", CASES)
@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_padded_matches_reference(dev, backend, use_backend, dtype, sq, sk, mask, group, d):
    if backend == "triton" and dev == "cpu" and dtype == torch.float32 and d > 96:
        pytest.skip("fp32 is covered at smaller head dims under the interpreter")
    b, hkv = 2, 1
    seed = sq * 7 + sk + group + d
    q, k, v = _inputs(b * sq, b * sk, hkv * group, hkv, d, dtype, seed, dev)
    prefix = torch.tensor([sk // 2, 3], dtype=torch.int32, device=dev) if mask == "prefix" else None
    got_packed = _compare(backend, use_backend, q, k, v, torch.arange(b + 1, dtype=torch.int32, device=dev) * sq,
                          torch.arange(b + 1, dtype=torch.int32, device=dev) * sk, causal=mask != "full", prefix=prefix,
                          seed=seed)
    # The padded layout is the same computation: it must agree bitwise with the packed call.
    out, lse = mk.attention(q.view(b, sq, -1, d), k.view(b, sk, hkv, d), v.view(b, sk, hkv, d),
                            causal=mask != "full", prefix_lens=prefix, return_lse=True)
    assert torch.equal(out.reshape(q.shape), got_packed[0])
    assert torch.equal(lse.transpose(0, 1).reshape(lse.shape[1], -1), got_packed[1])


@pytest.mark.parametrize("mask", ["causal", "prefix", "full"])
@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_varlen_with_empty_sequences(dev, backend, use_backend, mask):
    lengths = [0, 7, 1, 0, 30, 13, 0]
    cu = _cu(lengths, dev)
    q, k, v = _inputs(cu[-1], cu[-1], 6, 2, 64, torch.bfloat16, 11, dev)
    prefix = torch.tensor([0, 3, 1, 5, 12, 40, 2], device=dev) if mask == "prefix" else None
    got = _compare(backend, use_backend, q, k, v, cu, cu, causal=mask != "full", prefix=prefix, seed=5)
    # No leakage: each sequence alone gives the same rows (fp32 accumulation order may differ only by tiling).
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        rows = slice(int(cu[i]), int(cu[i + 1]))
        alone = mk.attention(q[rows], k[rows], v[rows], cu_seqlens=_cu([n], dev), max_seqlen=n, causal=mask != "full",
                             prefix_lens=None if prefix is None else prefix[i:i + 1])
        torch.testing.assert_close(alone, got[0][rows], atol=0, rtol=0)


@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_varlen_kv_cache_lengths(dev, backend, use_backend):
    """Separate query and key lengths per sequence (decoding with a KV cache), bottom-right causal."""
    cu_q, cu_k = _cu([1, 3, 0, 5], dev), _cu([9, 3, 4, 2], dev)
    q, k, v = _inputs(cu_q[-1], cu_k[-1], 4, 2, 32, torch.float16, 2, dev)
    _compare(backend, use_backend, q, k, v, cu_q, cu_k, causal=True, seed=9)


@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_fully_masked_rows_are_zero(dev, backend, use_backend):
    use_backend(backend)
    q, k, v = _inputs(20, 7, 2, 1, 32, torch.float16, 4, dev)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = mk.attention(q[None], k[None], v[None], return_lse=True)
    assert (out[0, :13] == 0).all() and torch.isinf(lse[0, :, :13]).all() and (lse[0, :, :13] < 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[0, :, 13:]).all()
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:13] == 0).all()


@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_strided_index_tensors(dev, backend, use_backend):
    """cu_seqlens and prefix_lens given as strided views (every other element) read the right values."""
    use_backend(backend)
    lengths = [5, 0, 9, 3]
    cu = _cu(lengths, dev)
    q, k, v = _inputs(cu[-1], cu[-1], 4, 2, 16, torch.float32, 12, dev)
    prefix = torch.tensor([2, 0, 4, 1], device=dev)
    cu_strided = torch.stack([cu, torch.full_like(cu, 99)], 1).flatten()[::2]
    prefix_strided = torch.stack([prefix, torch.full_like(prefix, 50)], 1).flatten()[::2]
    assert not cu_strided.is_contiguous() and torch.equal(cu_strided, cu)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dev)
    runs = []
    for c, p in ((cu, prefix), (cu_strided, prefix_strided)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mk.attention(*leaves, cu_seqlens=c, max_seqlen=9, prefix_lens=p)
        runs.append([out, *torch.autograd.grad(out, leaves, dout)])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, -0.4])
@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_nonpositive_softmax_scale(dev, backend, use_backend, scale):
    """A zero or negative scale is plain math (uniform or reversed attention): every backend, the causal fast
    paths included, gives the reference's finite values."""
    use_backend(backend)
    cu = _cu([7, 4], dev)
    q, k, v = _inputs(cu[-1], cu[-1], 2, 1, 16, torch.float32, 13, dev)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = mk.attention(*leaves, cu_seqlens=cu, max_seqlen=7, softmax_scale=scale, return_lse=True)
    grads = torch.autograd.grad(out.sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    exp_out, exp_lse = ref.attention(*leaves64, cu, cu, causal=True, softmax_scale=scale)
    exp_grads = torch.autograd.grad(exp_out.sum(), leaves64)
    for a, b in zip((out, lse, *grads), (exp_out, exp_lse, *exp_grads), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dev,backend", KERNELS)
def test_long_sequence(dev, backend, use_backend):
    """One 1023-token causal sequence (slow under the interpreter, so one dtype and one head)."""
    q, k, v = _inputs(1023, 1023, 1, 1, 64, torch.float16, 8, dev)
    _compare(backend, use_backend, q, k, v, _cu([1023], dev), _cu([1023], dev), causal=True, seed=1)


@pytest.mark.parametrize("dev,backend", KERNELS)
def test_deterministic(dev, backend, use_backend):
    use_backend(backend)
    cu = _cu([37, 5, 60], dev)
    q, k, v = _inputs(cu[-1], cu[-1], 6, 2, 64, torch.bfloat16, 6, dev)
    dout = torch.randn(q.shape).to(dev, torch.bfloat16)
    results = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mk.attention(*leaves, cu_seqlens=cu, max_seqlen=60, prefix_lens=torch.tensor([10, 0, 30], device=dev),
                           deterministic=True)
        results.append([out, *torch.autograd.grad(out, leaves, dout)])
    for again in results[1:]:
        for a, b in zip(results[0], again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradcheck_float64(backend, use_backend):
    use_backend(backend)
    cu = _cu([3, 0, 5])
    q, k, v = (t.requires_grad_() for t in _inputs(8, 8, 2, 1, 4, torch.float64, 1))

    def fn(a, b, c):
        out, lse = mk.attention(a, b, c, cu_seqlens=cu, max_seqlen=5, prefix_lens=torch.tensor([2, 0, 3]),
                                return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


# ------------------------------------------------------------------------------------- registration and compile


@pytest.mark.parametrize("dev,backend", KERNELS)
def test_opcheck(dev, backend, use_backend):
    use_backend(backend)
    cu = _cu([5, 0, 9], dev)
    q, k, v = (t.requires_grad_() for t in _inputs(14, 14, 4, 2, 32, torch.float32, 0, dev))
    torch.library.opcheck(torch.ops.mdus.attention_fwd.default,
                          (q, k, v, cu, cu, torch.tensor([2, 0, 4], device=dev), 9, 9, True, 0.2, False))
    dout = torch.randn(q.shape, device=dev)
    out, lse = torch.ops.mdus.attention_fwd(q, k, v, cu, cu, None, 9, 9, True, 0.2, False)
    torch.library.opcheck(torch.ops.mdus.attention_bwd.default,
                          (dout, None, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu, cu, None,
                           9, 9, True, 0.2, False))
    # Head-major storage (a transposed view): the outputs are contiguous on every backend, as the fakes say.
    qt, kt, vt = (t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.mdus.attention_fwd.default, (qt, kt, vt, cu, cu, None, 9, 9, False, 0.2, False))


@pytest.mark.parametrize("dev,backend", KERNELS)
def test_torch_compile_fullgraph(dev, backend, use_backend):
    use_backend(backend)
    cu = _cu([6, 10], dev)
    prefix = torch.tensor([3, 4], device=dev)

    def step(q, k, v):
        return mk.attention(q, k, v, cu_seqlens=cu, max_seqlen=10, prefix_lens=prefix).float().square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q, k, v = _inputs(16, 16, 4, 2, 32, torch.float32, 2, dev)
    grads_eager = torch.autograd.grad(step(*(t.requires_grad_() for t in (q, k, v))), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    grads_compiled = torch.autograd.grad(compiled(q2, k2, v2), (q2, k2, v2))
    for a, b in zip(grads_eager, grads_compiled, strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs():
    q, k, v = _inputs(10, 10, 4, 2, 16, torch.float32, 0)
    cu = _cu([4, 6])
    with pytest.raises(ValueError, match="q must be 3-D"):
        mk.attention(q[None], k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="q must be 4-D"):
        mk.attention(q, k, v)
    with pytest.raises(TypeError, match="k must have dtype"):
        mk.attention(q, k.half(), v, cu_seqlens=cu)
    with pytest.raises(TypeError, match="q must have dtype"):
        mk.attention(q.long(), k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="multiple"):
        mk.attention(q[:, :3], k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="head dim"):
        mk.attention(q, k[..., :8], v[..., :8], cu_seqlens=cu)
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.attention(q, k, v, cu_seqlens=torch.tensor([0, 7, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] must equal"):
        mk.attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must be int32 or int64"):
        mk.attention(q, k, v, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="prefix_lens must have one entry per sequence"):
        mk.attention(q, k, v, cu_seqlens=cu, prefix_lens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="prefix_lens needs causal=True"):
        mk.attention(q, k, v, cu_seqlens=cu, causal=False, prefix_lens=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="pair"):
        mk.attention(q, k, v, cu_seqlens=(cu, cu, cu))
    with pytest.raises(ValueError, match=r"max_seqlen_q=5 is smaller than the longest sequence in cu_seqlens_q \(6\)"):
        mk.attention(q, k, v, cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match=r"max_seqlen must be an int >= 0"):
        mk.attention(q, k, v, cu_seqlens=cu, max_seqlen=-1)
    with pytest.raises(ValueError, match="same batch size"):
        mk.attention(q.view(2, 5, 4, 16), k.view(1, 10, 2, 16), v.view(1, 10, 2, 16))


def test_checked_offsets_are_remembered_until_changed(monkeypatch):
    """On GPU a cu_seqlens that passed is not read again (the layers of a model share one: one sync per forward),
    an in-place change is checked again, and a remembered tensor still meets every call's own max_seqlen. (Made to
    remember on CPU here; there it checks every time, next test.)"""
    from mdus_kernels import _checks

    monkeypatch.setattr(_checks, "_remembers", lambda t: not t.is_inference())
    q, k, v = _inputs(10, 10, 4, 2, 16, torch.float32, 0)
    cu = _cu([4, 6])
    expect = mk.attention(q, k, v, cu_seqlens=cu)
    cu.data[1] = 7  # behind the version counter's back, so not noticed: a re-read would find 7 > max_seqlen 6
    mk.attention(q, k, v, cu_seqlens=cu, max_seqlen=6)
    with pytest.raises(ValueError, match=r"max_seqlen_q=5 is smaller than the longest sequence in cu_seqlens_q \(6\)"):
        mk.attention(q, k, v, cu_seqlens=cu, max_seqlen=5)
    cu[1] = 12  # a tracked in-place change: checked again
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.attention(q, k, v, cu_seqlens=cu)
    cu[1] = 3
    out = mk.attention(q, k, v, cu_seqlens=cu)
    assert not torch.allclose(out, expect)
    torch.testing.assert_close(out, mk.attention(q, k, v, cu_seqlens=_cu([3, 7])), rtol=0, atol=0)


def test_cpu_offsets_are_checked_every_call():
    """A CPU offsets tensor rewritten behind the version counter (a reused numpy collate buffer, ``.data``) is still
    caught: CPU checks are not remembered."""
    q, k, v = _inputs(10, 10, 4, 2, 16, torch.float32, 0)
    buf = np.array([0, 4, 10], dtype=np.int32)
    cu = torch.from_numpy(buf)
    mk.attention(q, k, v, cu_seqlens=cu)
    buf[:] = [0, 12, 10]
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.attention(q, k, v, cu_seqlens=cu)
    offsets = torch.tensor([0, 3, 7])
    mk.patch_unpool(torch.ones(2, 4), offsets, num_tokens=7)
    offsets.data[2] = 5
    with pytest.raises(ValueError, match=r"offsets\[-1\] must equal"):
        mk.patch_unpool(torch.ones(2, 4), offsets, num_tokens=7)


@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_nan_query_propagates(dev, backend, use_backend):
    """A NaN in a query row gives NaN out and lse in that row on every backend (ATen's CPU kernel alone would
    give 0), other rows untouched; rows that see no key keep 0 and -inf."""
    use_backend(backend)
    q, k, v = _inputs(9, 7, 4, 2, 16, torch.float32, 3, dev)
    cu_q, cu_k = _cu([2, 7], dev), _cu([3, 4], dev)
    clean, clean_lse = mk.attention(q, k, v, cu_seqlens=(cu_q, cu_k), max_seqlen=(7, 4), return_lse=True)
    q[5, 1, 3] = float("nan")
    out, lse = mk.attention(q, k, v, cu_seqlens=(cu_q, cu_k), max_seqlen=(7, 4), return_lse=True)
    assert out[5, 1].isnan().all() and lse[1, 5].isnan()
    hit = torch.zeros(9, 4, dtype=torch.bool, device=dev)
    hit[5, 1] = True
    torch.testing.assert_close(out[~hit], clean[~hit], rtol=0, atol=0)
    torch.testing.assert_close(lse.t()[~hit], clean_lse.t()[~hit], rtol=0, atol=0)
    assert (clean_lse[:, 2:5] == float("-inf")).all()  # sequence 2's first 3 rows see no key (7 queries, 4 keys)


def test_scalar_arguments_are_checked():
    q, k, v = _inputs(6, 6, 2, 1, 8, torch.float32, 1)
    cu = _cu([6])
    for kwargs, error, message in ((dict(causal=None), TypeError, "causal must be a bool, got None"),
                                   (dict(causal="False"), TypeError, "causal must be a bool"),
                                   (dict(deterministic=1), TypeError, "deterministic must be a bool"),
                                   (dict(softmax_scale="0.5"), ValueError, "softmax_scale must be a finite number"),
                                   (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite")):
        with pytest.raises(error, match=message):
            mk.attention(q, k, v, cu_seqlens=cu, **kwargs)
    torch.testing.assert_close(mk.attention(q, k, v, cu_seqlens=cu, softmax_scale=np.float64(0.3)),
                               mk.attention(q, k, v, cu_seqlens=cu, softmax_scale=0.3), rtol=0, atol=0)


def test_compile_dynamic_shapes():
    """torch.compile(dynamic=True): the default scale of a symbolic head dim is not inspected in Python."""
    fn = torch.compile(lambda q, k, v, cu: mk.attention(q, k, v, cu_seqlens=cu, max_seqlen=7), fullgraph=True,
                       dynamic=True, backend="aot_eager")
    for total, d in ((7, 16), (5, 24)):
        q, k, v = _inputs(total, total, 4, 2, d, torch.float32, total)
        cu = _cu([2, total - 2])
        torch.testing.assert_close(fn(q, k, v, cu), mk.attention(q, k, v, cu_seqlens=cu, max_seqlen=7))
