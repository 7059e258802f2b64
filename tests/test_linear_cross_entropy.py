"""linear_cross_entropy / linear_kl_div against eager F.linear + F.cross_entropy / KL: values, gradients, options,
registration; the Triton row kernels against the torch row math (under the interpreter on CPU, on CUDA when present).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES

import mdus_kernels as mk
from mdus_kernels import _backend
from mdus_kernels.ops import linear_cross_entropy as lce_mod
from mdus_kernels.reference import linear_cross_entropy as ref

N, D, V1, V2 = 37, 24, 61, 40  # odd sizes; two vocabulary blocks


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 5 rows, so that every test crosses chunk boundaries (and a last, partial chunk)."""
    monkeypatch.setattr(lce_mod, "_CHUNK_BYTES", 4 * (V1 + V2) * 5)


def eager(hidden, weights, labels, reduction="mean", label_smoothing=0.0, softcap=None):
    logits = F.linear(hidden, torch.cat(weights) if isinstance(weights, tuple) else weights)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing)


def make(dtype, seed, ignore=(3, 17, 18)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen).to(dtype)
    w1 = (torch.randn(V1, D, generator=gen) * 0.3).to(dtype)
    w2 = (torch.randn(V2, D, generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, V1 + V2, (N,), generator=gen)
    labels[list(ignore)] = -100
    return hidden, w1, w2, labels


def grads(loss_fn, hidden, w1, w2, upstream):
    leaves = [t.detach().clone().requires_grad_(rg) for t, rg in ((hidden, True), (w1, False), (w2, True))]
    loss = loss_fn(leaves[0], (leaves[1], leaves[2]))
    loss.backward(upstream)
    assert leaves[1].grad is None  # the frozen block never gets a gradient
    return loss.detach(), leaves[0].grad, leaves[2].grad


OPTIONS = [(0.0, None), (0.1, None), (0.0, 15.0), (0.2, 4.0)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,softcap", OPTIONS)
def test_matches_eager_float64(reduction, label_smoothing, softcap):
    hidden, w1, w2, labels = make(torch.float64, 0)
    upstream = torch.randn(N if reduction == "none" else (), dtype=torch.float64)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    got = grads(lambda h, w: mk.linear_cross_entropy(h, w, labels, logit_softcap=softcap, **kw), hidden, w1, w2,
                upstream)
    exp = grads(lambda h, w: eager(h, w, labels, softcap=softcap, **kw), hidden, w1, w2, upstream)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_smoothing,softcap", [(0.0, None), (0.1, 10.0)])
def test_low_precision_error_vs_eager(dtype, reduction, label_smoothing, softcap):
    """flash-attn's rule: error against the float64 truth at most 2x that of eager PyTorch in the same dtype."""
    hidden, w1, w2, labels = make(dtype, 1)
    upstream = torch.randn(N if reduction == "none" else ())
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    truth = grads(lambda h, w: eager(h, w, labels, softcap=softcap, **kw), hidden.double(), w1.double(), w2.double(),
                  upstream.double())
    got = grads(lambda h, w: mk.linear_cross_entropy(h, w, labels, logit_softcap=softcap, **kw), hidden, w1, w2,
                upstream)
    ref = grads(lambda h, w: eager(h, w, labels, softcap=softcap, **kw), hidden, w1, w2, upstream.to(
        torch.float32 if dtype == torch.float32 or reduction != "none" else dtype))
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for g, r, t in zip(got, ref, truth, strict=True):
        err = (g.double() - t).abs().max()
        ref_err = (r.double() - t).abs().max()
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(reduction):
    hidden, w1, w2, labels = make(torch.float32, 2)
    labels[:] = -100
    upstream = torch.ones(N) if reduction == "none" else torch.tensor(1.0)
    loss, gh, gw = grads(lambda h, w: mk.linear_cross_entropy(h, w, labels, reduction=reduction), hidden, w1, w2,
                         upstream)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


def test_custom_ignore_index_and_int32_labels():
    hidden, w1, w2, labels = make(torch.float64, 3, ignore=())
    labels[[0, 5]] = 7
    got = mk.linear_cross_entropy(hidden, (w1, w2), labels.int(), ignore_index=7)
    exp = F.cross_entropy(hidden @ torch.cat([w1, w2]).T, labels, ignore_index=7)
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_weight_requires_grad_override():
    hidden, w1, w2, labels = make(torch.float32, 4)
    w1.requires_grad_(True)
    w2.requires_grad_(True)
    mk.linear_cross_entropy(hidden, (w1, w2), labels, weight_requires_grad=(False, True)).backward()
    assert w1.grad is None and w2.grad is not None
    w = torch.cat([w1, w2]).detach().requires_grad_()
    mk.linear_cross_entropy(hidden.requires_grad_(), w, labels, weight_requires_grad=False).backward()
    assert w.grad is None and hidden.grad is not None


def test_no_grad_mode_computes_no_gradients():
    hidden, w1, w2, labels = make(torch.float32, 5)
    hidden.requires_grad_()
    with torch.no_grad():
        loss = mk.linear_cross_entropy(hidden, (w1, w2), labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, eager(hidden.detach(), (w1, w2), labels))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(reduction):
    hidden, w1, w2, labels = make(torch.float64, 6)
    hidden, w2 = hidden[:9].requires_grad_(), w2.requires_grad_()
    labels = labels[:9]
    assert torch.autograd.gradcheck(
        lambda h, b: mk.linear_cross_entropy(h, (w1, b), labels, reduction=reduction, label_smoothing=0.1,
                                             logit_softcap=3.0), (hidden, w2))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    hidden, w1, w2, labels = make(torch.float32, 7)
    hidden.requires_grad_()
    w2.requires_grad_()
    torch.library.opcheck(torch.ops.mdus.linear_cross_entropy.default,
                          (hidden, [w1, w2], labels, -100, reduction, 0.1, 5.0, True, [False, True]))
    torch.library.opcheck(torch.ops.mdus.linear_cross_entropy_backward.default,
                          (torch.randn(N), hidden.detach(), [w1, w2.detach()], labels, -100, 0.0, 0.0, True,
                           [False, True]))
    # A head stored (d, V) and passed as its transpose: its gradient is contiguous, as the fake says.
    w2t = w2.detach().t().contiguous().t().requires_grad_()
    torch.library.opcheck(torch.ops.mdus.linear_cross_entropy.default,
                          (hidden, [w1, w2t], labels, -100, reduction, 0.0, 0.0, True, [False, True]))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    hidden, w1, w2, labels = make(torch.float32, 8)

    def step(h, b):
        return mk.linear_cross_entropy(torch.tanh(h), (w1, b), labels, label_smoothing=0.1) * 2

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    got = grads(lambda h, w: compiled(h, w[1]), hidden, w1, w2, torch.tensor(1.0))
    exp = grads(lambda h, w: step(h, w[1]), hidden, w1, w2, torch.tensor(1.0))
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e)


def test_bad_arguments():
    hidden, w1, w2, labels = make(torch.float32, 9)
    bad = labels.clone()
    bad[4] = V1 + V2
    with pytest.raises(ValueError, match=r"labels must be in \[0, 101\).*ignore_index=-100, got labels\[4\]=101"):
        mk.linear_cross_entropy(hidden, (w1, w2), bad)
    with pytest.raises(ValueError, match=r"weight\[1\] must have d=24 columns \(like hidden\), got shape \(40, 23\)"):
        mk.linear_cross_entropy(hidden, (w1, w2[:, :-1]), labels)
    with pytest.raises(TypeError, match=r"weight must have hidden's dtype torch.float32, got torch.float64"):
        mk.linear_cross_entropy(hidden, w1.double(), labels)
    with pytest.raises(ValueError, match=r"labels must have N=37 entries \(hidden.shape\[0\]\), got 36"):
        mk.linear_cross_entropy(hidden, w1, labels[1:])
    with pytest.raises(TypeError, match=r"labels must have dtype in \(int64, int32\), got float32"):
        mk.linear_cross_entropy(hidden, w1, labels.float())
    with pytest.raises(ValueError, match=r"hidden must be 2-D \(N, d\), got shape \(37,\)"):
        mk.linear_cross_entropy(hidden[:, 0], w1, labels)
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"):
        mk.linear_cross_entropy(hidden, w1, labels, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\], got 1.5"):
        mk.linear_cross_entropy(hidden, w1, labels, label_smoothing=1.5)
    for cap in (0, float("inf")):
        with pytest.raises(ValueError, match=rf"logit_softcap must be a finite number > 0, or None, got {cap}"):
            mk.linear_cross_entropy(hidden, w1, labels, logit_softcap=cap)
    with pytest.raises(ValueError, match=r"weight must have at least one row"):
        mk.linear_cross_entropy(hidden, w1[:0], torch.full_like(labels, -100))
    with pytest.raises(ValueError, match=r"weight_requires_grad must have one flag per weight block \(2\), got 1"):
        mk.linear_cross_entropy(hidden, (w1, w2), labels, weight_requires_grad=(True,))
    with pytest.raises(ValueError, match=r"weight must be a tensor or a non-empty tuple"):
        mk.linear_cross_entropy(hidden, (), labels)


# --------------------------------------------------------------------------------------------------- linear_kl_div

VT, DT = 70, 16  # teacher vocabulary (a prefix of the student's V1 + V2) and hidden size


def make_kl(dtype, seed):
    hidden, w1, w2, _ = make(dtype, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    teacher_hidden = torch.randn(N, DT, generator=gen).to(dtype)
    teacher_weight = (torch.randn(VT, DT, generator=gen) * 0.3).to(dtype)
    mask = torch.rand(N, generator=gen) < 0.7
    return hidden, w1, w2, teacher_hidden, teacher_weight, mask


def eager_kl(hidden, weights, teacher_hidden, teacher_weight, mask, temperature=1.0, reduction="mean"):
    log_ps = torch.log_softmax(F.linear(hidden, torch.cat(weights)) / temperature, -1)
    log_pt = torch.log_softmax(F.linear(teacher_hidden, teacher_weight) / temperature, -1)
    kl = F.kl_div(log_ps[:, :VT], log_pt, log_target=True, reduction="none").sum(-1)
    kl = torch.where(mask, kl, 0.0)
    if reduction == "none":
        return kl
    return kl.sum() if reduction == "sum" else kl.sum() / mask.sum().clamp(min=1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_eager_float64(reduction, temperature):
    hidden, w1, w2, th, tw, mask = make_kl(torch.float64, 10)
    upstream = torch.randn(N if reduction == "none" else (), dtype=torch.float64)
    kw = dict(temperature=temperature, reduction=reduction)
    got = grads(lambda h, w: mk.linear_kl_div(h, w, th, tw, mask=mask, **kw), hidden, w1, w2, upstream)
    exp = grads(lambda h, w: eager_kl(h, w, th, tw, mask, **kw), hidden, w1, w2, upstream)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_low_precision_error_vs_eager(dtype):
    hidden, w1, w2, th, tw, mask = make_kl(dtype, 11)
    up = torch.tensor(1.0)
    truth = grads(lambda h, w: eager_kl(h, w, th.double(), tw.double(), mask), hidden.double(), w1.double(),
                  w2.double(), up.double())
    got = grads(lambda h, w: mk.linear_kl_div(h, w, th, tw, mask=mask), hidden, w1, w2, up)
    ref = grads(lambda h, w: eager_kl(h, w, th, tw, mask), hidden, w1, w2, up)
    for g, r, t in zip(got, ref, truth, strict=True):
        assert (g.double() - t).abs().max() <= 2 * (r.double() - t).abs().max() + 1e-6


def test_kl_empty_mask_and_identical_models():
    hidden, w1, w2, th, tw, _ = make_kl(torch.float32, 12)
    none = torch.zeros(N, dtype=torch.bool)
    loss, gh, gw = grads(lambda h, w: mk.linear_kl_div(h, w, th, tw, mask=none), hidden, w1, w2, torch.tensor(1.0))
    assert loss.item() == 0 and not gh.any() and not gw.any()
    # A student identical to its teacher (same vocabulary) has KL 0.
    w = torch.cat([w1, w2])
    assert mk.linear_kl_div(hidden, w, hidden, w).abs().item() < 1e-5


def test_kl_gradcheck_opcheck_compile():
    hidden, w1, w2, th, tw, mask = make_kl(torch.float64, 13)
    h9, w2r = hidden[:9].clone().requires_grad_(), w2.clone().requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, b, r=reduction: mk.linear_kl_div(h, (w1, b), th[:9], tw, mask=mask[:9], temperature=2.0,
                                                       reduction=r), (h9, w2r))
        torch.library.opcheck(torch.ops.mdus.linear_kl_div.default,
                              (h9, [w1, w2r], th[:9], tw, mask[:9], 2.0, reduction, True, [False, True]))
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, b: mk.linear_kl_div(h, (w1, b), th, tw, mask=mask), fullgraph=True,
                             backend="aot_eager")
    got = grads(lambda h, w: compiled(h, w[1]), hidden, w1, w2, torch.tensor(1.0))
    exp = grads(lambda h, w: eager_kl(h, w, th, tw, mask), hidden, w1, w2, torch.tensor(1.0))
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e)


def test_kl_bad_arguments():
    hidden, w1, w2, th, tw, mask = make_kl(torch.float32, 14)
    with pytest.raises(ValueError, match=r"teacher_weight must have at most V_s=101 rows.*got 102"):
        mk.linear_kl_div(hidden, (w1, w2), th, torch.randn(102, DT))
    with pytest.raises(ValueError, match=r"teacher_hidden must have N=37 rows \(like student_hidden\), got 36"):
        mk.linear_kl_div(hidden, (w1, w2), th[1:], tw)
    with pytest.raises(ValueError, match=r"teacher_weight must have d=16 columns \(like teacher_hidden\)"):
        mk.linear_kl_div(hidden, (w1, w2), th, torch.randn(VT, 15))
    with pytest.raises(TypeError, match=r"mask must have dtype in \(bool\), got int64"):
        mk.linear_kl_div(hidden, (w1, w2), th, tw, mask=mask.long())
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        mk.linear_kl_div(hidden, (w1, w2), th, tw, temperature=0)
    with pytest.raises(ValueError, match=r"teacher_hidden must be on cpu"):
        mk.linear_kl_div(hidden, (w1, w2), th.to("meta"), tw.to("meta"))
    with pytest.raises(TypeError, match=r"teacher_weight must be one \(V_t, d_t\) torch.Tensor, got tuple"):
        mk.linear_kl_div(hidden, (w1, w2), th, (tw[:10], tw[10:]))


# ---------------------------------------------------------------------------------------------- Triton row kernels

# CUDA, and CPU under the interpreter (conftest turns it on when there is no GPU).
TRITON_DEVICES = [dev for dev in DEVICES if _backend._available("triton", None, torch.device(dev)) is None]
# (V, BLOCK_V): one partial block; eight blocks, the last partial; 4096 + a 1-wide block.
ROW_SHAPES = [(1000, None), (1000, 128), (4097, None)]
CE_ROW_OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 3.0), (0.2, 15.0)]  # (label_smoothing, softcap); 0 = no softcap


def row_logits(rows, v, seed, dev):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, v, generator=gen) * 4
    z[1] += 60  # far from 0: the online max must keep every exp in range
    return z.to(dev), gen


def check_rows(got_loss, exp_loss, got, exp, untouched, compute_grad):
    torch.testing.assert_close(got_loss, exp_loss, rtol=1e-5, atol=1e-5)
    if compute_grad:
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)
    else:  # the kernels write nothing without compute_grad (the reference uses the chunk as scratch)
        assert torch.equal(got, untouched)
    assert torch.isfinite(got_loss).all() and torch.isfinite(got).all()


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("label_smoothing,softcap", CE_ROW_OPTIONS)
@pytest.mark.parametrize("v,block", ROW_SHAPES)
@pytest.mark.parametrize("dev", TRITON_DEVICES)
def test_ce_row_kernel_matches_torch_rows(monkeypatch, dev, v, block, label_smoothing, softcap, scaled):
    if block:
        monkeypatch.setattr(lce_mod, "_ROW_BLOCK_V", block)
    z, gen = row_logits(7, v, v + int(10 * softcap + 100 * label_smoothing), dev)
    labels = torch.randint(0, v, (7,), generator=gen)
    labels[[2, 5]] = -100
    labels[0], labels[3] = 0, v - 1  # the first and last column
    labels = labels.to(dev)
    scale = (torch.rand(7, generator=gen) + 0.5).to(dev) if scaled else None
    for compute_grad in (True, False):
        got, exp = z.clone(), z.clone()
        loss = lce_mod.ce_rows_triton_(got, labels, -100, label_smoothing, softcap, scale, compute_grad)
        loss_exp = ref.logits_to_grad_(exp, labels, -100, label_smoothing, softcap, scale, compute_grad)
        check_rows(loss, loss_exp, got, exp, z, compute_grad)
        if compute_grad:
            assert (got[[2, 5]] == 0).all() and (loss[[2, 5]] == 0).all()


@pytest.mark.parametrize("dev", TRITON_DEVICES)
def test_ce_row_kernel_all_ignored(dev):
    """An ignore_index inside the vocabulary (7), every row ignored: zero losses and gradients, never NaN."""
    z, _ = row_logits(4, 1000, 0, dev)
    labels = torch.full((4,), 7, device=dev)
    loss = lce_mod.ce_rows_triton_(z, labels, 7, 0.1, 5.0, torch.ones(4, device=dev), True)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(z, torch.zeros_like(z))


# (V_s, V_t, BLOCK_V): equal vocabularies; a teacher prefix ending inside a block; blocks past V_t; one teacher
# entry; an empty teacher vocabulary (KL 0, gradient p_s).
KL_ROW_SHAPES = [(1000, 1000, None), (1000, 700, 128), (4097, 4000, None), (4097, 1, None), (1000, 0, None)]


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("vs,vt,block", KL_ROW_SHAPES)
@pytest.mark.parametrize("dev", TRITON_DEVICES)
def test_kl_row_kernel_matches_torch_rows(monkeypatch, dev, vs, vt, block, temperature, scaled):
    if block:
        monkeypatch.setattr(lce_mod, "_ROW_BLOCK_V", block)
    student, gen = row_logits(6, vs, vs + vt, dev)
    # A teacher close to the student (small KL, where cancellation would show) and one far from it (row 4).
    teacher = student[:, :vt] + torch.randn(6, vt, generator=gen).to(dev) * 0.05
    teacher[4] = torch.randn(vt, generator=gen).to(dev) * 8
    mask = torch.tensor([True, True, False, True, True, False], device=dev)
    scale = (torch.rand(6, generator=gen) + 0.5).to(dev) if scaled else None
    for compute_grad in (True, False):
        got, exp = student.clone(), student.clone()
        loss = lce_mod.kl_rows_triton_(got, teacher, mask, temperature, scale, compute_grad)
        loss_exp = ref.kl_logits_to_grad_(exp, teacher, mask, temperature, scale, compute_grad)
        check_rows(loss, loss_exp, got, exp, student, compute_grad)
        if compute_grad:
            assert (got[~mask] == 0).all() and (loss[~mask] == 0).all()


@pytest.mark.parametrize("dev", TRITON_DEVICES)
def test_kl_row_kernel_all_masked(dev):
    student, _ = row_logits(3, 1000, 1, dev)
    loss = lce_mod.kl_rows_triton_(student, student[:, :600].clone(), torch.zeros(3, dtype=torch.bool, device=dev),
                                   2.0, None, True)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(student, torch.zeros_like(student))


def to_dev(dev, *tensors):
    return tuple(t.to(dev) for t in tensors)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,softcap", OPTIONS)
@pytest.mark.parametrize("dev", TRITON_DEVICES)
def test_triton_rows_end_to_end(dev, use_backend, reduction, label_smoothing, softcap):
    use_backend("triton")
    hidden, w1, w2, labels = to_dev(dev, *make(torch.float32, 20))
    upstream = torch.randn(N if reduction == "none" else (), device=dev)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    got = grads(lambda h, w: mk.linear_cross_entropy(h, w, labels, logit_softcap=softcap, **kw), hidden, w1, w2,
                upstream)
    exp = grads(lambda h, w: eager(h, w, labels, softcap=softcap, **kw), hidden, w1, w2, upstream)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dev", TRITON_DEVICES)
def test_triton_rows_low_precision_error_vs_eager(dev, use_backend):
    """bf16 through the Triton rows: flash-attn's 2x rule against the float64 truth, as on the torch path."""
    use_backend("triton")
    hidden, w1, w2, labels = to_dev(dev, *make(torch.bfloat16, 21))
    kw = dict(label_smoothing=0.1, softcap=10.0)
    up = torch.tensor(1.0, device=dev)
    truth = grads(lambda h, w: eager(h, w, labels, **kw), hidden.double(), w1.double(), w2.double(), up.double())
    got = grads(lambda h, w: mk.linear_cross_entropy(h, w, labels, label_smoothing=0.1, logit_softcap=10.0), hidden,
                w1, w2, up)
    base = grads(lambda h, w: eager(h, w, labels, **kw), hidden, w1, w2, up)
    for g, b, t in zip(got, base, truth, strict=True):
        assert (g.double() - t).abs().max() <= 2 * (b.double() - t).abs().max() + 1e-6


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dev", TRITON_DEVICES)
def test_triton_rows_kl_end_to_end(dev, use_backend, reduction, temperature):
    use_backend("triton")
    hidden, w1, w2, th, tw, mask = to_dev(dev, *make_kl(torch.float32, 22))
    upstream = torch.randn(N if reduction == "none" else (), device=dev)
    kw = dict(temperature=temperature, reduction=reduction)
    got = grads(lambda h, w: mk.linear_kl_div(h, w, th, tw, mask=mask, **kw), hidden, w1, w2, upstream)
    exp = grads(lambda h, w: eager_kl(h, w, th, tw, mask, **kw), hidden, w1, w2, upstream)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dev", TRITON_DEVICES)
def test_triton_rows_nothing_selected(dev, use_backend):
    use_backend("triton")
    hidden, w1, w2, th, tw, _ = to_dev(dev, *make_kl(torch.float32, 23))
    labels = torch.full((N,), -100, device=dev)
    none = torch.zeros(N, dtype=torch.bool, device=dev)
    one = torch.tensor(1.0, device=dev)
    for fn in (lambda h, w: mk.linear_cross_entropy(h, w, labels, label_smoothing=0.1, logit_softcap=4.0),
               lambda h, w: mk.linear_kl_div(h, w, th, tw, mask=none)):
        loss, gh, gw = grads(fn, hidden, w1, w2, one)
        assert loss.item() == 0 and torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("dev", TRITON_DEVICES)
def test_triton_rows_opcheck_and_compile(dev, use_backend):
    """The same registration with the Triton rows inside (the KL op's body differs only in its row function)."""
    use_backend("triton")
    hidden, w1, w2, labels = to_dev(dev, *make(torch.float32, 24))
    hidden.requires_grad_()
    w2.requires_grad_()
    torch.library.opcheck(torch.ops.mdus.linear_cross_entropy.default,
                          (hidden, [w1, w2], labels, -100, "none", 0.1, 5.0, True, [False, True]))
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, b: mk.linear_cross_entropy(h, (w1, b), labels, label_smoothing=0.1),
                             fullgraph=True, backend="aot_eager")
    got = grads(lambda h, w: compiled(h, w[1]), hidden, w1, w2, torch.tensor(1.0, device=dev))
    exp = grads(lambda h, w: eager(h, w, labels, label_smoothing=0.1), hidden, w1, w2, torch.tensor(1.0, device=dev))
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_row_math_dispatch(monkeypatch, use_backend):
    """auto: Triton rows for CUDA tensors (so the benchmark's GPU runs take them), torch rows on CPU and for
    float64; a forced backend is obeyed or refused, never silently replaced."""
    monkeypatch.delenv("MDUS_KERNEL_BACKEND", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    if _backend.triton_module() is not None:
        assert lce_mod._triton_rows(cuda, torch.bfloat16) and lce_mod._triton_rows(cuda, torch.float32)
    assert not lce_mod._triton_rows(cuda, torch.float64)
    assert not lce_mod._triton_rows(cpu, torch.float32)
    use_backend("reference")
    assert not lce_mod._triton_rows(cpu, torch.float32)
    if "cpu" not in TRITON_DEVICES:
        return
    use_backend("triton")
    assert lce_mod._triton_rows(cpu, torch.float32)
    with pytest.raises(RuntimeError, match=r"MDUS_KERNEL_BACKEND=triton cannot run this call: .*float32"):
        lce_mod._triton_rows(cpu, torch.float64)
    calls = []
    monkeypatch.setattr(lce_mod, "ce_rows_triton_", lambda *a: calls.append(1) or ref.logits_to_grad_(*a))
    hidden, w1, w2, labels = make(torch.float32, 25)
    mk.linear_cross_entropy(hidden, (w1, w2), labels)
    assert len(calls) == 8  # ceil(37 / 5) chunks, each through the Triton launcher


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_raises(reduction):
    """The gradients come from the forward's chunks (or a recomputation outside autograd) and carry no graph:
    create_graph=True raises instead of silently dropping second-order terms (a gradient penalty)."""
    hidden, w1, w2, labels = make(torch.float32, 3)
    hidden.requires_grad_()
    for loss in (mk.linear_cross_entropy(hidden, (w1, w2), labels, reduction=reduction),
                 mk.linear_kl_div(hidden, (w1, w2), hidden.detach() + 1, w1, reduction=reduction)):
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(loss.sum(), hidden, create_graph=True)
        assert torch.autograd.grad(loss.sum(), hidden)[0].isfinite().all()  # first order as before


def test_scalar_arguments_are_checked():
    hidden, w1, w2, labels = make(torch.float32, 4)
    for kwargs, message in ((dict(label_smoothing=None), "label_smoothing must be a number in"),
                            (dict(ignore_index=-100.5), "ignore_index must be an int"),
                            (dict(logit_softcap=float("inf")), "logit_softcap must be a finite number > 0")):
        with pytest.raises(ValueError, match=message):
            mk.linear_cross_entropy(hidden, (w1, w2), labels, **kwargs)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        mk.linear_kl_div(hidden, (w1, w2), hidden, w1, temperature=float("nan"))
