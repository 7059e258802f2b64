"""cgmlp_gate / depthwise_conv1d: the reference against ESPnet's eager composition, every backend against the
reference (values and all gradients), low-precision error, gradcheck, determinism, registration, torch.compile,
argument errors, and the ConvolutionalGatingMLP module against an ESPnet-style eager module."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, backends_for
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mdus_kernels as mk
from mdus.blocks import ConvolutionalGatingMLP
from mdus_kernels import _backend
from mdus_kernels.reference import cgmlp as ref

BACKENDS = backends_for("cpu", "cgmlp_gate_fwd_kernel")
DEVICE_BACKENDS = [(d, b) for d in DEVICES for b in backends_for(d, "cgmlp_gate_fwd_kernel")]
KERNELS = [3, 7, 31, 63]


def make_cu(lengths, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=dtype)


def make_inputs(lengths, c, k, *, dtype=torch.float32, masked=False, seed=0, param_dtype=None, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    x = (torch.randn(n, 2 * c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    pd = param_dtype or dtype
    params = [
        (1 + 0.3 * torch.randn(c, generator=gen, dtype=torch.float64)).to(pd),  # norm_weight
        (0.3 * torch.randn(c, generator=gen, dtype=torch.float64)).to(pd),  # norm_bias
        (torch.randn(c, 1, k, generator=gen, dtype=torch.float64) / k**0.5).to(pd),  # conv_weight, ESPnet layout
        (1 + 0.3 * torch.randn(c, generator=gen, dtype=torch.float64)).to(pd),  # conv_bias
    ]
    mask = torch.rand(n, generator=gen) < 0.7 if masked else None
    return (x.to(device), [p.to(device) for p in params], make_cu(lengths).to(device),
            None if mask is None else mask.to(device))


def runs(lengths, mask):
    """(start, end, is_speech) of every maximal same-modality run of every sequence, by plain iteration."""
    out, start = [], 0
    for n in lengths:
        t = start
        while t < start + n:
            e = t + 1
            while mask is not None and e < start + n and bool(mask[e]) == bool(mask[t]):
                e += 1
            if mask is None:
                e = start + n
            out.append((t, e, True if mask is None else bool(mask[t])))
            t = e
        start += n
    return out


def espnet_conv(h, weight, bias, causal):
    """ESPnet's eager path on one segment: (T, C) -> Conv1d(groups=C) over time -> (T, C)."""
    c, _, k = weight.shape
    conv = nn.Conv1d(c, c, k, groups=c, padding=(k - 1) // 2 if (k % 2 and not causal) else 0,
                     dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
    ht = h.t().unsqueeze(0)
    if causal or k % 2 == 0:  # Conv1d's symmetric padding cannot express these: pad explicitly
        left = k - 1 if causal else (k - 1) // 2
        ht = F.pad(ht, (left, k - 1 - left))
    return conv(ht)[0].t()


def definition_gate(x, params, lengths, mask, causal, eps):
    """Per segment: torch.nn.LayerNorm -> torch.nn.Conv1d(groups=C) -> multiply, zeros for text runs."""
    nw, nb, cw, cb = params
    c = x.shape[1] // 2
    ln = nn.LayerNorm(c, eps=eps, dtype=x.dtype)
    with torch.no_grad():
        ln.weight.copy_(nw)
        ln.bias.copy_(nb)
    out = torch.zeros(x.shape[0], c, dtype=x.dtype)
    for s, e, speech in runs(lengths, mask):
        if speech:
            x_r, x_g = x[s:e].chunk(2, dim=-1)
            out[s:e] = x_r * espnet_conv(ln(x_g), cw, cb, causal)
    return out.detach()


def definition_conv(x, weight, bias, lengths, mask, causal):
    out = torch.zeros_like(x)
    for s, e, speech in runs(lengths, mask):
        if speech:
            out[s:e] = espnet_conv(x[s:e], weight, bias, causal)
    return out.detach()


def run_op(fn, x, params, upstream, **kw):
    """Forward and backward through the public op: (out, [dx, dparam...])."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params) if t is not None]
    args = list(leaves)
    if len(params) == 2 and params[1] is None:  # depthwise conv without bias
        args.append(None)
    out = fn(*args, **kw)
    out.backward(upstream)
    return out.detach(), [t.grad for t in leaves]


def assert_close(actual, expected, rtol):
    scale = expected.abs().max().clamp(min=1) if expected.numel() else 1
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


lengths_strategy = st.lists(st.one_of(st.just(0), st.just(1), st.integers(0, 12), st.integers(20, 90)), min_size=1,
                            max_size=6)


# ------------------------------------------------------------------------------------------- the specification


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_strategy, c=st.integers(1, 9), k=st.integers(1, 63), causal=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 2**31))
def test_reference_matches_espnet_composition(lengths, c, k, causal, masked, seed):
    x, params, cu, mask = make_inputs(lengths, c, k, dtype=torch.float64, masked=masked, seed=seed)
    out = ref.cgmlp_gate(x, *params, cu_seqlens=cu, speech_mask=mask, causal=causal, eps=1e-6)
    torch.testing.assert_close(out, definition_gate(x, params, lengths, mask, causal, 1e-6), rtol=1e-10,
                               atol=1e-10)
    xc = x[:, :c]
    torch.testing.assert_close(ref.depthwise_conv1d(xc, params[2], params[3], cu_seqlens=cu, speech_mask=mask,
                                                    causal=causal),
                               definition_conv(xc, params[2], params[3], lengths, mask, causal), rtol=1e-10,
                               atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(lengths=lengths_strategy, c=st.integers(1, 6), k=st.integers(1, 40), causal=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 2**31))
def test_reference_backward_matches_autograd(lengths, c, k, causal, masked, seed):
    """The explicit backward of the reference backend is the vector-Jacobian product of the reference forward."""
    x, params, cu, mask = make_inputs(lengths, c, k, dtype=torch.float64, masked=masked, seed=seed)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    out = ref.cgmlp_gate(*leaves, cu_seqlens=cu, speech_mask=mask, causal=causal)
    g = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, g)
    _, mean, rstd = ref.cgmlp_gate_fwd(x, params[0], params[1], params[2].view(c, k), params[3], cu, mask, causal,
                                       1e-5)
    got = ref.cgmlp_gate_bwd(g, x, params[0], params[1], params[2].view(c, k), params[3], cu, mask, mean, rstd,
                             causal)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e.reshape(a.shape), rtol=1e-10, atol=1e-10)
    leaves = [t.clone().requires_grad_() for t in (x[:, :c], params[2], params[3])]
    out = ref.depthwise_conv1d(*leaves, cu_seqlens=cu, speech_mask=mask, causal=causal)
    expected = torch.autograd.grad(out, leaves, g)
    got = ref.depthwise_conv1d_bwd(g, x[:, :c], params[2].view(c, k), cu, mask, causal)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e.reshape(a.shape), rtol=1e-10, atol=1e-10)


def test_segment_bounds_by_hand():
    cu = torch.tensor([0, 4, 4, 9])
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1], dtype=torch.bool)
    lo, hi = ref.segment_bounds(9, cu, mask)
    assert lo.tolist() == [0, 0, 2, 3, 4, 4, 6, 7, 8]  # text tokens: empty segment [t, t)
    assert hi.tolist() == [2, 2, 2, 4, 6, 6, 6, 7, 9]
    lo, hi = ref.segment_bounds(9, cu)
    assert lo.tolist() == [0] * 4 + [4] * 5 and hi.tolist() == [4] * 4 + [9] * 5


# ----------------------------------------------------------------------------------------- backends vs reference

# Odd lengths, one-token and empty sequences; 79 tokens keep the Triton interpreter quick even at k = 63.
LENGTHS = [23, 1, 0, 38, 5, 0, 12]
C = 10


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_gate_matches_reference(device, backend, k, causal, masked, use_backend):
    x, params, cu, mask = make_inputs(LENGTHS, C, k, masked=masked, seed=k, device=device)
    g = torch.randn(x.shape[0], C, generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(cu_seqlens=cu.to(torch.int32), speech_mask=mask, causal=causal)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    expected = ref.cgmlp_gate(*leaves, **kw)
    expected_grads = torch.autograd.grad(expected, leaves, g)
    use_backend(backend)
    out, grads = run_op(mk.cgmlp_gate, x, params, g, **kw)
    assert out.dtype == x.dtype and all(d.dtype == p.dtype for d, p in zip(grads, (x, *params), strict=True))
    assert_close(out, expected.detach(), 1e-4)
    for d, e in zip(grads, expected_grads, strict=True):
        assert_close(d, e, 1e-4)
    if masked:  # text tokens: output 0, and no gradient to either half of x
        assert (out[~mask] == 0).all() and (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_depthwise_conv_matches_reference(device, backend, k, causal, use_backend):
    x, params, cu, _ = make_inputs(LENGTHS, C, k, seed=k, device=device)
    x = x[:, :C].contiguous()
    g = torch.randn(x.shape[0], C, generator=torch.Generator().manual_seed(2)).to(device)
    for bias in (params[3], None):
        leaves = [t.clone().requires_grad_() for t in (x, params[2], bias) if t is not None]
        expected = ref.depthwise_conv1d(*leaves, cu_seqlens=cu, causal=causal)
        expected_grads = torch.autograd.grad(expected, leaves, g)
        use_backend(backend)
        out, grads = run_op(mk.depthwise_conv1d, x, [params[2], bias], g, cu_seqlens=cu, causal=causal)
        assert_close(out, expected.detach(), 1e-4)
        for d, e in zip(grads, expected_grads, strict=True):
            assert_close(d, e, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_layout_equals_packed(backend, use_backend):
    """(B, T, U) with a (B, T) mask is the packed layout with cu_seqlens = [0, T, 2T, ...]."""
    b, t, k = 3, 11, 7
    x, params, _, mask = make_inputs([t] * b, C, k, masked=True, seed=5)
    use_backend(backend)
    packed = mk.cgmlp_gate(x, *params, cu_seqlens=make_cu([t] * b), speech_mask=mask)
    padded = mk.cgmlp_gate(x.view(b, t, 2 * C), *params, speech_mask=mask.view(b, t))
    assert padded.shape == (b, t, C)
    torch.testing.assert_close(padded.reshape(b * t, C), packed, rtol=0, atol=0)
    conv_packed = mk.depthwise_conv1d(x[:, :C], params[2], params[3], cu_seqlens=make_cu([t] * b))
    conv_padded = mk.depthwise_conv1d(x[:, :C].reshape(b, t, C), params[2], params[3])
    torch.testing.assert_close(conv_padded.reshape(b * t, C), conv_packed, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, use_backend):
    use_backend(backend)
    x, params, _, _ = make_inputs([4, 1, 3], C, 5, seed=3)
    # Empty batch: no tokens at all, and sequences that are all empty.
    for cu in (torch.tensor([0]), torch.tensor([0, 0, 0])):
        x0 = x[:0].clone().requires_grad_()
        out = mk.cgmlp_gate(x0, *params, cu_seqlens=cu)
        assert out.shape == (0, C)
        out.sum().backward()
        assert x0.grad.shape == (0, 2 * C)
    # An all-text batch: zeros out, zero gradients for x; the parameters only see the zero upstream.
    mask = torch.zeros(8, dtype=torch.bool)
    out, grads = run_op(mk.cgmlp_gate, x, params, torch.ones(8, C), cu_seqlens=make_cu([4, 1, 3]),
                        speech_mask=mask)
    assert (out == 0).all() and all((d == 0).all() for d in grads)
    # One-token sequences: the conv sees the token alone (centered: the middle tap; causal: the last).
    xs = x[:3]
    for causal, tap in ((False, 2), (True, 4)):
        got = mk.depthwise_conv1d(xs[:, :C], params[2], None, cu_seqlens=make_cu([1, 1, 1]), causal=causal)
        torch.testing.assert_close(got, xs[:, :C] * params[2][:, 0, tap], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_mixed_parameter_dtype(backend, use_backend):
    use_backend(backend)
    x, params, cu, mask = make_inputs([9, 14], C, 7, masked=True, seed=4)
    strided = torch.cat([x, x], dim=1)[:, ::2]  # (N, 2C) with a column stride of 2
    expected = ref.cgmlp_gate(strided.contiguous(), *params, cu_seqlens=cu, speech_mask=mask)
    assert_close(mk.cgmlp_gate(strided, *params, cu_seqlens=cu, speech_mask=mask), expected, 1e-5)
    # bf16 activations with fp32 parameters (autocast-style): the parameters' gradients come back in fp32.
    xb = x.to(torch.bfloat16).requires_grad_()
    leaves = [p.clone().requires_grad_() for p in params]
    out = mk.cgmlp_gate(xb, *leaves, cu_seqlens=cu, speech_mask=mask)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in leaves)


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DEVICE_BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_vs_pytorch(device, backend, dtype, use_backend):
    """flash-attn's rule: error vs a float64 truth at most 2x that of the reference computed in the same dtype (by
    PyTorch, rounding at every op), values and every gradient, plus a floor of a few ulps of the largest value."""
    k = 31
    # On a GPU, also a realistic width: many channel blocks and token programs.
    lengths, c = ([37, 1, 60], 16) if device == "cpu" else ([1500, 1, 2600], 768)
    x, params, cu, mask = make_inputs(lengths, c, k, masked=True, seed=7, device=device)
    g = torch.randn(x.shape[0], c, generator=torch.Generator().manual_seed(8)).to(device)
    kw = dict(cu_seqlens=cu, speech_mask=mask, causal=False)

    def reference(tensors, compute_dtype):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = ref.cgmlp_gate(*leaves, compute_dtype=compute_dtype, **kw)
        return [out.detach(), *torch.autograd.grad(out, leaves, g.to(out.dtype))]

    low = [t.to(dtype) for t in (x, *params)]
    truth = reference([t.double() for t in low], torch.float64)
    torch_same_dtype = reference(low, dtype)
    use_backend(backend)
    out, grads = run_op(mk.cgmlp_gate, low[0], low[1:], g.to(dtype), **kw)
    eps = torch.finfo(dtype).eps
    for name, got, same, true in zip(["out", "dx", "dnorm_weight", "dnorm_bias", "dconv_weight", "dconv_bias"],
                                     [out, *grads], torch_same_dtype, truth, strict=True):
        assert got.dtype == dtype
        kernel_err = (got.double() - true).abs().max()
        torch_err = (same.double() - true).abs().max()
        assert kernel_err <= 2 * torch_err + 4 * eps * true.abs().max(), (name, kernel_err, torch_err)


# ----------------------------------------------------------------------------------------- autograd, determinism


GRADCHECK_BACKENDS = [b for b in BACKENDS if b in ("reference", "cpp", "triton")]


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(backend, causal, use_backend):
    use_backend(backend)
    x, params, cu, mask = make_inputs([4, 1, 0, 3], 3, 3, dtype=torch.float64, masked=True, seed=11)
    mask[0] = True
    leaves = [t.clone().requires_grad_() for t in (x, *params)]

    def gate(*ts):
        return mk.cgmlp_gate(*ts, cu_seqlens=cu, speech_mask=mask, causal=causal)

    assert torch.autograd.gradcheck(gate, tuple(leaves))

    def conv(xc, w, b):
        return mk.depthwise_conv1d(xc, w, b, cu_seqlens=cu, causal=causal)

    assert torch.autograd.gradcheck(conv, (leaves[0][:, :3].detach().clone().requires_grad_(), leaves[3],
                                           leaves[4]))


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DEVICE_BACKENDS if b in ("cpp", "triton")])
def test_parameter_gradients_are_deterministic(device, backend, use_backend):
    use_backend(backend)
    # Large enough for the C++ kernel (and a GPU) to split the tokens into many tiles and groups.
    small = device == "cpu" and backend == "triton"  # the interpreter
    lengths = [90, 3, 60] if small else [700, 3, 1200, 97]
    x, params, cu, mask = make_inputs(lengths, 20 if small else 70, 31, masked=True, seed=12, device=device)
    g = torch.randn(x.shape[0], params[0].shape[0], generator=torch.Generator().manual_seed(13)).to(device)
    first = run_op(mk.cgmlp_gate, x, params, g, cu_seqlens=cu, speech_mask=mask)[1]
    threads = torch.get_num_threads()
    try:
        for n_threads in (threads, 1, threads):  # also independent of the thread count
            torch.set_num_threads(n_threads)
            again = run_op(mk.cgmlp_gate, x, params, g, cu_seqlens=cu, speech_mask=mask)[1]
            assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, use_backend):
    use_backend(backend)
    x, params, cu, mask = make_inputs([5, 0, 4], 4, 3, masked=True, seed=14)
    nw, nb, cw, cb = (p.requires_grad_() for p in params)
    cw2 = cw.detach().view(4, 3).requires_grad_()
    torch.library.opcheck(torch.ops.mdus.cgmlp_gate.default,
                          (x.requires_grad_(), nw, nb, cw2, cb, cu, mask, False, 1e-5))
    torch.library.opcheck(torch.ops.mdus.cgmlp_gate.default, (x, nw, nb, cw2, cb, cu, None, True, 1e-5))
    xc = x.detach()[:, :4].contiguous().requires_grad_()
    torch.library.opcheck(torch.ops.mdus.depthwise_conv1d.default, (xc, cw2, cb, cu, None, True))
    torch.library.opcheck(torch.ops.mdus.depthwise_conv1d.default, (xc, cw2, None, cu, mask, False))
    # nn.Conv1d's (C, 1, k) weight layout: its gradient comes back in that shape.
    torch.library.opcheck(torch.ops.mdus.cgmlp_gate.default, (x, nw, nb, cw, cb, cu, mask, True, 1e-5))
    torch.library.opcheck(torch.ops.mdus.depthwise_conv1d.default, (xc, cw, cb, cu, None, False))
    # Transposed (channel-major) inputs: the outputs are contiguous on every backend, as the fakes say.
    xt = x.detach().t().contiguous().t().requires_grad_()
    torch.library.opcheck(torch.ops.mdus.cgmlp_gate.default, (xt, nw, nb, cw2, cb, cu, mask, True, 1e-5))
    xct = xc.detach().t().contiguous().t().requires_grad_()
    torch.library.opcheck(torch.ops.mdus.depthwise_conv1d.default, (xct, cw2, cb, cu, None, False))


@pytest.mark.parametrize("backend,compile_backend",
                         [(b, "aot_eager") for b in BACKENDS] + [("auto", "inductor")])
def test_torch_compile_fullgraph(backend, compile_backend, use_backend):
    use_backend(backend)
    torch._dynamo.reset()

    def step(x, nw, nb, cw, cb, cu, mask):
        h = mk.cgmlp_gate(x, nw, nb, cw, cb, cu_seqlens=cu, speech_mask=mask)
        return (mk.depthwise_conv1d(h, cw, cb, cu_seqlens=cu, causal=True) * h).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    for seed in (15, 16):  # the second call reuses the compiled graph
        x, params, cu, mask = make_inputs([6, 1, 9], 4, 3, masked=True, seed=seed)
        eager_leaves = [t.clone().requires_grad_() for t in (x, *params)]
        compiled_leaves = [t.clone().requires_grad_() for t in (x, *params)]
        expected = step(*eager_leaves, cu, mask)
        expected.backward()
        got = compiled(*compiled_leaves, cu, mask)
        got.backward()
        torch.testing.assert_close(got, expected)
        for a, b in zip(compiled_leaves, eager_leaves, strict=True):
            torch.testing.assert_close(a.grad, b.grad)


def test_auto_uses_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("MDUS_KERNEL_BACKEND", raising=False)
    expected = "cpp" if _backend.has_native_kernel("cgmlp_gate_fwd_kernel", torch.device("cpu")) else "reference"
    assert _backend.choose_backend("cgmlp_gate_fwd_kernel", torch.device("cpu")) == expected
    monkeypatch.setenv("MDUS_KERNEL_BACKEND", "cuda")  # there is no CUDA C++ kernel for this op
    x, params, cu, _ = make_inputs([3], 2, 3)
    with pytest.raises(RuntimeError, match=r"MDUS_KERNEL_BACKEND=cuda cannot run this call"):
        mk.cgmlp_gate(x, *params, cu_seqlens=cu)


# ---------------------------------------------------------------------------------------------------- bad input


def _gate_call(**changes):
    x, params, cu, mask = make_inputs([3, 4], 4, 3, masked=True)
    args = dict(x=x, norm_weight=params[0], norm_bias=params[1], conv_weight=params[2], conv_bias=params[3])
    kw = dict(cu_seqlens=cu, speech_mask=mask)
    for key, value in changes.items():
        (args if key in args else kw)[key] = value(args, kw) if callable(value) else value
    return mk.cgmlp_gate(*args.values(), **kw)


@pytest.mark.parametrize("changes,exc,match", [
    (dict(x=lambda a, k: a["x"][:, :7]), ValueError, r"x's last dimension U must be even.*got 7"),
    (dict(x=lambda a, k: a["x"].long()), TypeError, r"x must have dtype in \(float16, bfloat16, float32, float64\)"),
    (dict(cu_seqlens=None), ValueError, r"x must be 3-D \(B, T, U\) when cu_seqlens is None"),
    (dict(x=lambda a, k: a["x"].view(1, 7, 8)), ValueError, r"x must be 2-D \(total, U\) when cu_seqlens is given"),
    (dict(cu_seqlens=torch.tensor([0, 3, 8])), ValueError, r"cu_seqlens\[-1\] must equal x.shape\[0\]=7, got 8"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 7])), ValueError, r"cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([1, 7])), ValueError, r"cu_seqlens\[0\] must be 0, got 1"),
    (dict(cu_seqlens=torch.tensor([0.0, 7.0])), ValueError, r"cu_seqlens must be int32 or int64, got float32"),
    (dict(speech_mask=torch.ones(7, dtype=torch.int64)), TypeError, r"speech_mask must have dtype in \(bool\)"),
    (dict(speech_mask=torch.ones(6, dtype=torch.bool)), ValueError, r"speech_mask must be \(total,\) like x's"),
    (dict(norm_weight=torch.ones(5)), ValueError, r"norm_weight must be \(4,\), got shape \(5,\)"),
    (dict(norm_bias=torch.ones(4, 1)), ValueError, r"norm_bias must be 1-D \(4,\), got shape \(4, 1\)"),
    (dict(conv_weight=torch.ones(4, 2, 3)), ValueError, r"conv_weight must be \(4, 1, k\) or \(4, k\)"),
    (dict(conv_weight=torch.ones(4, 1, 64)), ValueError, r"conv_weight's kernel size k must be in \[1, 63\], got 64"),
    (dict(conv_bias=torch.ones(3)), ValueError, r"conv_bias must be \(4,\), got shape \(3,\)"),
    (dict(conv_bias=[1.0] * 4), TypeError, r"conv_bias must be a torch.Tensor, got list"),
    (dict(causal=1), TypeError, r"causal must be a bool, got int"),
    (dict(eps=0.0), ValueError, r"eps must be a float > 0, got 0.0"),
    (dict(norm_weight=torch.ones(4, device="meta")), ValueError, r"norm_weight must be on cpu.*got meta"),
])
def test_bad_gate_arguments(changes, exc, match):
    with pytest.raises(exc, match=match):
        _gate_call(**changes)


def test_bad_conv_arguments():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"weight must be \(3, 1, k\) or \(3, k\), got shape \(4, 1, 3\)"):
        mk.depthwise_conv1d(x, torch.ones(4, 1, 3))
    with pytest.raises(ValueError, match=r"weight's kernel size k must be in \[1, 63\], got 0"):
        mk.depthwise_conv1d(x, torch.ones(3, 0))
    with pytest.raises(ValueError, match=r"bias must be \(3,\), got shape \(2,\)"):
        mk.depthwise_conv1d(x, torch.ones(3, 3), torch.ones(2))
    with pytest.raises(ValueError, match=r"speech_mask must be \(B, T\) like x's leading dimensions \(2, 5\)"):
        mk.depthwise_conv1d(x, torch.ones(3, 3), speech_mask=torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cu_seqlens must be on cpu.*got meta"):
        mk.depthwise_conv1d(x[0], torch.ones(3, 3), cu_seqlens=torch.tensor([0, 5], device="meta"))


# ------------------------------------------------------------------------------------------- the nn.Module


class EspnetCSGU(nn.Module):
    """ESPnet's ConvolutionalSpatialGatingUnit, eager, written from its semantics."""

    def __init__(self, size, kernel_size, use_linear_after_conv=False, activation=None):
        super().__init__()
        n = size // 2
        self.norm = nn.LayerNorm(n, eps=1e-12)  # ESPnet's LayerNorm subclass fixes eps = 1e-12
        self.conv = nn.Conv1d(n, n, kernel_size, 1, (kernel_size - 1) // 2, groups=n)
        self.linear = nn.Linear(n, n) if use_linear_after_conv else None
        self.act = activation or nn.Identity()

    def forward(self, x):
        x_r, x_g = x.chunk(2, dim=-1)
        x_g = self.conv(self.norm(x_g).transpose(1, 2)).transpose(1, 2)
        if self.linear is not None:
            x_g = self.linear(x_g)
        return x_r * self.act(x_g)


class EspnetCgMLP(nn.Module):
    def __init__(self, size, units, kernel_size, **kw):
        super().__init__()
        self.channel_proj1 = nn.Sequential(nn.Linear(size, units), nn.GELU())
        self.csgu = EspnetCSGU(units, kernel_size, **kw)
        self.channel_proj2 = nn.Linear(units // 2, size)

    def forward(self, x):
        return self.channel_proj2(self.csgu(self.channel_proj1(x)))


@pytest.mark.parametrize("variant", ["fused", "linear_gelu"])
def test_module_matches_espnet(variant):
    torch.manual_seed(0)
    kw, ours_kw = {}, {}
    if variant == "linear_gelu":
        kw = dict(use_linear_after_conv=True, activation=nn.GELU())
        ours_kw = dict(use_linear_after_conv=True, gate_activation="gelu")
    espnet = EspnetCgMLP(16, 64, 31, **kw)
    with torch.no_grad():  # a trained-looking module, not ESPnet's near-identity initialization
        for p in espnet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = ConvolutionalGatingMLP(16, 64, 31, **ours_kw)
    assert ours.csgu.fused == (variant == "fused")
    assert list(ours.state_dict()) == list(espnet.state_dict())
    ours.load_state_dict(espnet.state_dict(), strict=True)
    x = torch.randn(1, 45, 16)
    torch.testing.assert_close(ours(x), espnet(x), rtol=1e-4, atol=1e-5)
    xg = x.clone().requires_grad_()
    ours(xg).square().sum().backward()
    xe = x.clone().requires_grad_()
    espnet(xe).square().sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), espnet.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_module_init_packed_and_speech_mask():
    mlp = ConvolutionalGatingMLP(8, 24, 5, causal=True)
    assert mlp.csgu.conv.weight.shape == (12, 1, 5) and torch.equal(mlp.csgu.conv.bias, torch.ones(12))
    assert mlp.csgu.conv.weight.abs().max() < 1e-4  # ESPnet's normal(std=1e-6)
    x = torch.randn(2, 9, 8)
    mask = torch.rand(2, 9) < 0.6
    padded = mlp(x, speech_mask=mask)
    packed = mlp(x.view(18, 8), cu_seqlens=torch.tensor([0, 9, 18]), speech_mask=mask.view(18))
    torch.testing.assert_close(packed.view(2, 9, 8), padded)
    assert (padded[~mask] == 0).all()  # text positions: the block adds nothing
    with pytest.raises(ValueError, match=r"linear_units must be even"):
        ConvolutionalGatingMLP(8, 7, 5)
    with pytest.raises(ValueError, match=r"gate_activation must be one of"):
        ConvolutionalGatingMLP(8, 8, 5, gate_activation="mish")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_text_tokens_are_never_read(backend, use_backend):
    """A text token's x is never read: inf or NaN there (an fp16 overflow, garbage in padding) leaves the output
    and every gradient exactly as with zeros there."""
    use_backend(backend)
    x, params, cu, mask = make_inputs([9, 6], 4, 3, masked=True, seed=21)
    text = torch.nonzero(~mask).flatten()[:2]
    assert text.numel() == 2
    clean = x.clone()
    clean[text] = 0.0
    g = torch.randn(x.shape[0], 4, generator=torch.Generator().manual_seed(4))
    expect = run_op(mk.cgmlp_gate, clean, params, g, cu_seqlens=cu, speech_mask=mask)
    dirty = clean.clone()
    dirty[text[0]], dirty[text[1], 4:] = float("inf"), float("nan")  # the x_g half of the second
    got = run_op(mk.cgmlp_gate, dirty, params, g, cu_seqlens=cu, speech_mask=mask)
    torch.testing.assert_close(got[0], expect[0], rtol=0, atol=0)
    for a, b in zip(got[1], expect[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
