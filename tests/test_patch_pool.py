"""patch_pool / patch_unpool / offset builders: every backend against the reference, the reference against an
independent per-patch definition, autograd, registration, torch.compile and argument errors."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICES, backends_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mdus_kernels as mk
from mdus_kernels.reference import patch_pool as ref

REDUCES = ["mean", "max", "min", "sum"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
POOL_BACKENDS = [(d, b) for d in DEVICES for b in backends_for(d, "patch_pool_kernel")]


def make_offsets(lengths, device="cpu", dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=dtype, device=device)


def definition_pool(x, lengths, reduce):
    """Per-patch loop in float64 with torch's own reductions: independent of the reference's vectorization."""
    rows, start = [], 0
    for n in lengths:
        seg = x[start:start + n].double()
        start += n
        if n == 0:
            rows.append(torch.zeros(x.shape[1], dtype=torch.float64))
        else:
            rows.append({"sum": seg.sum(0), "mean": seg.mean(0), "max": seg.amax(0), "min": seg.amin(0)}[reduce])
    return torch.stack(rows) if rows else torch.zeros(0, x.shape[1], dtype=torch.float64)


def definition_grad(x, lengths, reduce, g):
    """d(sum(pool(x) * g))/dx per patch: broadcast, /len, or to the first arg-extreme (torch.argmax is documented
    to return the first maximal index)."""
    out, start = torch.zeros(x.shape, dtype=torch.float64), 0
    for p, n in enumerate(lengths):
        if n:
            if reduce in ("sum", "mean"):
                out[start:start + n] = g[p].double() / (n if reduce == "mean" else 1)
            else:
                seg = x[start:start + n].double()
                first = (seg.argmax(0) if reduce == "max" else seg.argmin(0)) + start
                out[first, torch.arange(x.shape[1])] = g[p].double()
        start += n
    return out


lengths_strategy = st.lists(
    st.one_of(st.just(0), st.just(1), st.integers(0, 9), st.integers(40, 300)), min_size=1, max_size=24)


def run_pool(x, offsets, reduce, g):
    x = x.detach().clone().requires_grad_()
    out = mk.patch_pool(x, offsets, reduce)
    out.backward(g)
    return out.detach(), x.grad


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_strategy, d=st.integers(1, 40), reduce=st.sampled_from(REDUCES), seed=st.integers(0, 2**31))
def test_reference_matches_definition(lengths, d, reduce, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), d, generator=gen, dtype=torch.float64)
    offsets = make_offsets(lengths)
    out = ref.patch_pool(x, offsets, reduce)
    torch.testing.assert_close(out, definition_pool(x, lengths, reduce), rtol=1e-12, atol=1e-12)
    g = torch.randn(len(lengths), d, generator=gen, dtype=torch.float64)
    grad = ref.patch_unpool(g, offsets, x.shape[0], reduce, x, out)
    torch.testing.assert_close(grad, definition_grad(x, lengths, reduce, g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=lengths_strategy, d=st.integers(1, 70), reduce=st.sampled_from(REDUCES),
       dtype=st.sampled_from(DTYPES), idx_dtype=st.sampled_from([torch.int32, torch.int64]), seed=st.integers(0, 2**31))
def test_backend_matches_reference(device, backend, use_backend, lengths, d, reduce, dtype, idx_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), d, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(len(lengths), d, generator=gen).to(device=device, dtype=dtype)
    offsets = make_offsets(lengths, device, idx_dtype)
    expected = ref.patch_pool(x, offsets, reduce)
    expected_grad = ref.patch_unpool(g, offsets, x.shape[0], reduce, x, expected)
    use_backend(backend)
    out, grad = run_pool(x, offsets, reduce, g)
    assert out.dtype == dtype and grad.dtype == dtype
    if reduce in ("max", "min"):  # a max/min is one of its inputs: exact, and so is the routing of its gradient
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, expected, rtol=RTOL[dtype], atol=1e-4)
        torch.testing.assert_close(grad, expected_grad, rtol=RTOL[dtype], atol=1e-6)


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_vs_pytorch(device, backend, use_backend, dtype):
    """flash-attn's rule: error vs a float64 truth at most 2x that of PyTorch computing in the same dtype."""
    lengths = [1, 5, 4000, 0, 37, 999]
    x = (torch.randn(sum(lengths), 24) * 3 + 1).to(device=device, dtype=dtype)
    offsets = make_offsets(lengths, device)
    truth = definition_pool(x.cpu(), lengths, "mean")
    torch_same_dtype = torch.segment_reduce(x, "mean", lengths=torch.tensor(lengths, device=device), axis=0,
                                            unsafe=True).nan_to_num(0.0)
    use_backend(backend)
    out = mk.patch_pool(x, offsets, "mean")
    kernel_err = (out.cpu().double() - truth).abs().max()
    torch_err = (torch_same_dtype.cpu().double() - truth).abs().max()
    assert kernel_err <= 2 * torch_err + 1e-6, (kernel_err, torch_err)


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_single_huge_patch_and_ties(device, backend, use_backend):
    use_backend(backend)
    x = torch.randn(5000, 33, device=device)
    x[[7, 4000]] = 1e6  # two tied maxima in every column: the gradient must go to the first, token 7
    offsets = torch.tensor([0, 5000], device=device)
    out, grad = run_pool(x, offsets, "max", torch.ones(1, 33, device=device))
    assert torch.equal(out, torch.full((1, 33), 1e6, device=device))
    expected = torch.zeros_like(x)
    expected[7] = 1
    assert torch.equal(grad, expected)
    # Repeated runs give bitwise-equal gradients.
    for _ in range(3):
        assert torch.equal(run_pool(x, offsets, "max", torch.ones(1, 33, device=device))[1], grad)


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_nan_propagates_in_max(device, backend, use_backend):
    use_backend(backend)
    x = torch.randn(12, 5, device=device)
    x[3, 2] = float("nan")
    out = mk.patch_pool(x, torch.tensor([0, 6, 12], device=device), "max")
    assert torch.isnan(out[0, 2]) and not torch.isnan(out[1]).any() and not torch.isnan(out[0, [0, 1, 3, 4]]).any()


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_empty_inputs(device, backend, use_backend):
    use_backend(backend)
    x = torch.randn(0, 8, device=device, requires_grad=True)
    out = mk.patch_pool(x, torch.zeros(4, dtype=torch.int32, device=device), "max")  # three empty patches
    assert torch.equal(out, torch.zeros(3, 8, device=device))
    out.sum().backward()
    assert x.grad.shape == (0, 8)
    assert mk.patch_pool(torch.randn(0, 8, device=device), torch.zeros(1, device=device, dtype=torch.long)).shape \
        == (0, 8)
    assert mk.patch_unpool(torch.randn(0, 3, device=device), torch.zeros(1, device=device, dtype=torch.long)).shape \
        == (0, 3)


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_non_contiguous_input(device, backend, use_backend):
    use_backend(backend)
    base = torch.randn(9, 40, device=device)
    x = base.t()[:, ::2]  # (40, 5), strided
    offsets = torch.tensor([0, 13, 13, 40], device=device)
    torch.testing.assert_close(mk.patch_pool(x, offsets, "mean"), ref.patch_pool(x.contiguous(), offsets, "mean"))


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_unpool_and_its_backward(device, backend, use_backend):
    use_backend(backend)
    offsets = torch.tensor([0, 2, 2, 7, 8], device=device, dtype=torch.int32)
    p = torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True)
    out = mk.patch_unpool(p, offsets, num_tokens=8)
    seg = torch.tensor([0, 0, 2, 2, 2, 2, 2, 3], device=device)
    assert torch.equal(out, p.detach()[seg])
    assert torch.equal(mk.patch_unpool(p, offsets), out)  # num_tokens read from offsets[-1]
    g = torch.randn(8, 6, device=device, dtype=torch.float64)
    out.backward(g)
    expected = torch.zeros(4, 6, device=device, dtype=torch.float64).index_add_(0, seg, g)
    torch.testing.assert_close(p.grad, expected)


GRADCHECK_BACKENDS = backends_for("cpu", "patch_pool_kernel")


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_gradcheck_float64(backend, reduce, use_backend):
    use_backend(backend)
    x = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 1, 1, 5, 11])
    assert torch.autograd.gradcheck(lambda t: mk.patch_pool(t, offsets, reduce), (x,))
    if reduce in ("sum", "mean"):  # double backward goes through patch_unpool's own backward
        assert torch.autograd.gradgradcheck(lambda t: mk.patch_pool(t, offsets, reduce), (x,))
    p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mk.patch_unpool(t, offsets, 11), (p,))


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_opcheck(backend, reduce, use_backend):
    use_backend(backend)
    x = torch.randn(10, 7, requires_grad=True)
    offsets = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    torch.library.opcheck(torch.ops.mdus.patch_pool.default, (x, offsets, reduce))
    pooled = mk.patch_pool(x.detach(), offsets, reduce)
    p = torch.randn(3, 7, requires_grad=reduce in ("sum", "mean"))
    torch.library.opcheck(torch.ops.mdus.patch_unpool.default, (p, offsets, 10, reduce, x.detach(), pooled))
    xt = x.detach().t().contiguous().t().requires_grad_()  # feature-major storage
    torch.library.opcheck(torch.ops.mdus.patch_pool.default, (xt, offsets, reduce))


@pytest.mark.parametrize("backend,compile_backend",
                         [(b, "aot_eager") for b in GRADCHECK_BACKENDS] + [("auto", "inductor")])
def test_torch_compile_fullgraph(backend, compile_backend, use_backend):
    use_backend(backend)
    torch._dynamo.reset()

    def step(x, offsets):
        pooled = mk.patch_pool(x, offsets, "mean") + mk.patch_pool(x, offsets, "max")
        return (mk.patch_unpool(pooled.tanh(), offsets, num_tokens=x.shape[0]) * x).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    offsets = torch.tensor([0, 4, 4, 9, 16])
    for n_tokens in (16, 16):  # the second call reuses the compiled graph
        x = torch.randn(n_tokens, 12, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        expected = step(x, offsets)
        expected.backward()
        got = compiled(x2, offsets)
        got.backward()
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(x2.grad, x.grad)


# ------------------------------------------------------------------------------------------------- offset builders


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=10), size=st.integers(1, 7),
       dtype=st.sampled_from([torch.int32, torch.int64]))
def test_static_patch_offsets(lengths, size, dtype):
    cu = make_offsets(lengths, dtype=dtype)
    got = mk.static_patch_offsets(cu, size)
    expected, start = [0], 0
    for n in lengths:
        expected += [min(s + size, start + n) for s in range(start, start + n, size)]
        start += n
    assert got.dtype == dtype and got.tolist() == expected


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 20), min_size=1, max_size=8), seed=st.integers(0, 2**31))
def test_boundary_patch_offsets(lengths, seed):
    cu = make_offsets(lengths)
    n = sum(lengths)
    starts = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.3
    got = mk.boundary_patch_offsets(starts, cu).tolist()
    seq_starts = set(cu[:-1][cu[1:] > cu[:-1]].tolist())
    expected = [t for t in range(n) if starts[t] or t in seq_starts] + [n]
    assert got == expected
    assert set(cu.tolist()) <= set(got)  # no patch crosses a sequence boundary


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "offsets,exc,match",
    [
        (torch.tensor([0, 5, 3, 10]), ValueError, r"non-decreasing.*offsets\[1\]=5 > offsets\[2\]=3"),
        (torch.tensor([1, 5, 10]), ValueError, r"offsets\[0\] must be 0, got 1"),
        (torch.tensor([0, 5, 11]), ValueError, r"offsets\[-1\] must equal x.shape\[0\]=10, got 11"),
        (torch.tensor([0, 5, 9]), ValueError, r"offsets\[-1\] must equal x.shape\[0\]=10, got 9"),
        (torch.tensor([0.0, 10.0]), ValueError, r"offsets must be int32 or int64, got float32"),
        (torch.tensor([[0, 10]]), ValueError, r"offsets must be 1-D.*got shape \(1, 2\)"),
        (torch.tensor([], dtype=torch.long), ValueError, r"at least one element"),
        ([0, 10], ValueError, r"offsets must be a torch.Tensor, got list"),
    ],
)
def test_bad_offsets(offsets, exc, match):
    with pytest.raises(exc, match=match):
        mk.patch_pool(torch.randn(10, 4), offsets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offsets_on_wrong_device():
    with pytest.raises(ValueError, match=r"offsets must be on cuda:0.*got cpu"):
        mk.patch_pool(torch.randn(10, 4, device="cuda"), torch.tensor([0, 10]))


def test_offsets_on_wrong_device_meta():
    with pytest.raises(ValueError, match=r"offsets must be on cpu.*got meta"):
        mk.patch_pool(torch.randn(10, 4), torch.tensor([0, 10], device="meta"))


def test_bad_x_and_reduce():
    with pytest.raises(ValueError, match=r"x must be 2-D \(total_tokens, D\), got shape \(2, 5, 4\)"):
        mk.patch_pool(torch.randn(2, 5, 4), torch.tensor([0, 5]))
    with pytest.raises(TypeError, match=r"x must have dtype in \(float16, bfloat16, float32, float64\), got int64"):
        mk.patch_pool(torch.arange(10).view(10, 1), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"reduce must be one of 'mean', 'max', 'min', 'sum', got 'median'"):
        mk.patch_pool(torch.randn(10, 4), torch.tensor([0, 10]), "median")
    with pytest.raises(ValueError, match=r"p must have one row per patch: expected 2 rows.*got 3"):
        mk.patch_unpool(torch.randn(3, 4), torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match=r"offsets\[-1\] must equal num_tokens=12, got 10"):
        mk.patch_unpool(torch.randn(2, 4), torch.tensor([0, 4, 10]), num_tokens=12)


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match=r"cu_seqlens must be a torch.Tensor, got list"):
        mk.static_patch_offsets([0, 5], 2)
    with pytest.raises(ValueError, match=r"patch_size must be an int >= 1, got 0"):
        mk.static_patch_offsets(torch.tensor([0, 5]), 0)
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing"):
        mk.static_patch_offsets(torch.tensor([0, 5, 2]), 2)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal is_patch_start.shape\[0\]=4, got 5"):
        mk.boundary_patch_offsets(torch.zeros(4, dtype=torch.bool), torch.tensor([0, 5]))
    with pytest.raises(TypeError, match=r"is_patch_start must have dtype in \(bool\), got int64"):
        mk.boundary_patch_offsets(torch.zeros(5, dtype=torch.long), torch.tensor([0, 5]))


def test_forced_backend_errors(monkeypatch):
    monkeypatch.setenv("MDUS_KERNEL_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"MDUS_KERNEL_BACKEND=cuda cannot run this call: .*cpu tensors"):
        mk.patch_pool(torch.randn(4, 2), torch.tensor([0, 4]))
    monkeypatch.setenv("MDUS_KERNEL_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"MDUS_KERNEL_BACKEND must be one of auto, triton, cuda, cpp, reference"):
        mk.patch_pool(torch.randn(4, 2), torch.tensor([0, 4]))


def test_auto_uses_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("MDUS_KERNEL_BACKEND", raising=False)
    from mdus_kernels import _backend

    expected = "cpp" if _backend.has_native_kernel("patch_pool_kernel", torch.device("cpu")) else "reference"
    assert _backend.choose_backend("patch_pool_kernel", torch.device("cpu")) == expected


# ----------------------------------------------------------------------------------------- missing or stale _C


def _copy_package(tmp_path: Path) -> Path:
    src = Path(mk.__file__).parent
    dst = tmp_path / "mdus_kernels"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


PROBE = (
    "import warnings, torch\n"
    "warnings.simplefilter('always')\n"
    "import mdus_kernels as mk\n"
    "from mdus_kernels import _backend\n"
    "print('BACKEND', _backend.choose_backend('patch_pool_kernel', torch.device('cpu')))\n"
    "print('VALUE', mk.patch_pool(torch.ones(4, 2), torch.tensor([0, 1, 4])).tolist())\n"
)


def _run_probe(pkg_parent: Path) -> subprocess.CompletedProcess:
    # -S skips .pth files, so an editable install's import hook cannot hand out the real _C; site-packages
    # (for torch) is put on the path explicitly, after the copied package.
    path = os.pathsep.join([str(pkg_parent), *site.getsitepackages()])
    env = {**os.environ, "PYTHONPATH": path, "MDUS_KERNEL_BACKEND": "auto"}
    return subprocess.run([sys.executable, "-S", "-c", PROBE], cwd=pkg_parent, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("breakage", ["missing", "stale", "corrupt"])
def test_import_falls_back_without_working_extension(tmp_path, breakage):
    pkg = _copy_package(tmp_path)
    libs = list(pkg.glob("_C*.so"))
    if breakage == "missing":
        for lib in libs:
            lib.unlink()
        expected = "is not built"
    elif breakage == "stale":
        (pkg / "_build_info.py").write_text("TORCH_VERSION = '1.0.0'\nTORCH_CUDA_VERSION = None\nWITH_CUDA = False\n")
        expected = "was built for torch 1.0.0"
    else:
        if not libs:
            pytest.skip("no compiled extension to corrupt")
        libs[0].write_bytes(b"\x7fELF not really a library")
        expected = "failed to load"
    proc = _run_probe(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stderr
    assert "BACKEND reference" in proc.stdout
    assert "VALUE [[1.0, 1.0], [1.0, 1.0]]" in proc.stdout


def test_num_tokens_is_checked():
    offsets = torch.tensor([0, 2, 2])
    for bad in (2.0, True, -1):
        with pytest.raises(ValueError, match=r"num_tokens must be an int >= 0"):
            mk.patch_unpool(torch.ones(2, 3), offsets, num_tokens=bad)
    assert mk.patch_unpool(torch.ones(2, 3), offsets, num_tokens=np.int64(2)).shape == (2, 3)
