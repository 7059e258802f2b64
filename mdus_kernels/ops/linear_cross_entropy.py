"""Fused linear + cross-entropy without materializing the (N, V) logits: row kernels, chunk driver, registration,
public API.

The specification is ``mdus_kernels.reference.linear_cross_entropy``.

Per chunk of rows: one GEMM for the logits, the row math in place (loss and d loss / d logits), then the GEMMs of
the backward (``grad_hidden = dlogits @ W`` and, for trainable blocks only, ``grad_W += dlogits.T @ hidden``).
For ``reduction="mean"/"sum"`` the upstream gradient is a scalar, so the gradients are computed in the forward and
the backward only scales them: the GEMM count equals eager's (logits, grad_hidden, grad_W) with no recompute,
and memory is one chunk of logits instead of N x V logits and their gradient. ``reduction="none"`` needs per-row
upstream gradients, so its backward (``mdus::linear_cross_entropy_backward``) recomputes the logits.

The row math: on CUDA tensors (or with ``MDUS_KERNEL_BACKEND=triton``, on CPU under ``TRITON_INTERPRET=1``) one
Triton program per row (``_ce_rows_kernel``, ``_kl_rows_kernel``) does it in fp32 and in place: an online max /
sum-exp sweep over the row in ``BLOCK_V`` blocks gives the loss, and a second sweep overwrites the row with the
gradient, so the only chunk-sized buffers are the logits chunk (and, for KL, the teacher's logits chunk). On CPU
(and for float64, the gradcheck dtype) the row math is the reference's torch ops (``ref.logits_to_grad_``,
``ref.kl_logits_to_grad_``).
"""

import os

import torch

from mdus_kernels import _backend
from mdus_kernels._checks import FLOAT_DTYPES, check_number, check_tensor
from mdus_kernels.reference import linear_cross_entropy as ref
from mdus_kernels.reference.linear_cross_entropy import REDUCTIONS

# Bytes of fp32 logits per chunk: large enough for efficient GEMMs, small enough to keep the peak far below eager's.
_CHUNK_BYTES = int(os.environ.get("MDUS_LCE_CHUNK_BYTES", 32 << 20))


def _chunk_rows(n: int, v: int) -> int:
    return max(1, min(n, _CHUNK_BYTES // (4 * max(v, 1))))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # CPU GEMMs are fastest (and exact enough) in fp32; on GPU the input dtype feeds the tensor cores.
    if t.dtype == torch.float64:
        return t.dtype
    return torch.float32 if t.device.type == "cpu" else t.dtype


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_labels_values(labels: torch.Tensor, v: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"labels must be in [0, {v}) (the vocabulary size) or ignore_index={ignore_index}, "
                         f"got labels[{i}]={int(labels[i])}")


# ---------------------------------------------------------------------------------------------- Triton row kernels

# Largest vocabulary block one program holds in registers per sweep (fp32: 16 values per thread at 8 warps).
_ROW_BLOCK_V = 4096

triton = _backend.triton_module()
if triton is not None:
    import triton.language as tl

    @triton.jit
    def _softcap(b_z, softcap):
        """``softcap * tanh(z / softcap)`` and its derivative ``1 - tanh^2``, from one exp (no tanh in the core
        language, and libdevice does not run under the interpreter)."""
        b_x = b_z / softcap
        b_a = tl.abs(b_x)
        b_e = tl.exp(-2.0 * b_a)
        b_big = (1.0 - b_e) / (1.0 + b_e)
        # 1 - e cancels as |x| -> 0; there the odd Taylor series to x^9 is exact to fp32 rounding (the first
        # dropped term is < 1e-8 relative for |x| < 0.25).
        b_x2 = b_x * b_x
        b_small = b_x * (1.0 + b_x2 * (-0.3333333333333333 + b_x2 * (0.13333333333333333 + b_x2 * (
            -0.05396825396825397 + b_x2 * 0.021869488536155203))))
        b_t = tl.where(b_a < 0.25, b_small, tl.where(b_x < 0, -b_big, b_big))
        # 4e / (1 + e)^2 is sech^2 without the cancellation of 1 - tanh^2 where tanh saturates
        return softcap * b_t, 4.0 * b_e / ((1.0 + b_e) * (1.0 + b_e))

    @triton.jit
    def _ce_rows_kernel(p_z, p_y, p_scale, p_loss, stride_z, V, ignore_index, eps, softcap,
                        HAS_SCALE: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, GRAD: tl.constexpr,
                        BLOCK_V: tl.constexpr):
        i_r = tl.program_id(0).to(tl.int64)
        p_row = p_z + i_r * stride_z  # int64: rows x V passes 2^31 in a chunk of a large vocabulary
        o_v = tl.arange(0, BLOCK_V)
        b_y = tl.load(p_y + i_r)
        if b_y == ignore_index:
            # Ignored rows (prompt tokens, padding) are never read: zeros written (or nothing without GRAD).
            if GRAD:
                for v0 in range(0, V, BLOCK_V):
                    tl.store(p_row + v0 + o_v, tl.zeros([BLOCK_V], dtype=tl.float32), mask=v0 + o_v < V)
            tl.store(p_loss + i_r, 0.0)
        else:
            # Labels are checked at the API; the clamp only keeps an unchecked one inside the row.
            i_y = tl.minimum(tl.maximum(b_y, 0), V - 1)
            b_sy = tl.load(p_row + i_y)
            if SOFTCAP:
                # (Distinct names for the unused derivatives: one name reused inside the loop below would be a
                # loop-carried variable changing from scalar to block, which the GPU compiler rejects.)
                b_sy, b_dsy = _softcap(b_sy, softcap)
            # Sweep 1: online max and sum of exp(s - max), rescaled when the max grows; sum of s for smoothing.
            b_m = float("-inf")
            b_d = 0.0
            b_sum = 0.0
            for v0 in range(0, V, BLOCK_V):
                o_j = v0 + o_v
                m_j = o_j < V
                b_s = tl.load(p_row + o_j, mask=m_j, other=0.0)
                if SOFTCAP:
                    b_s, b_ds = _softcap(b_s, softcap)
                if SMOOTH:
                    b_sum += tl.sum(b_s)  # masked lanes hold 0 (and the softcap keeps 0 at 0)
                b_s = tl.where(m_j, b_s, float("-inf"))
                b_mn = tl.maximum(b_m, tl.max(b_s, 0))
                b_d = b_d * tl.exp(b_m - b_mn) + tl.sum(tl.exp(b_s - b_mn))
                b_m = b_mn
            b_loss = b_m + tl.log(b_d) - (1.0 - eps) * b_sy
            if SMOOTH:
                b_loss -= eps / V * b_sum
            tl.store(p_loss + i_r, b_loss)
            if GRAD:
                if HAS_SCALE:
                    b_c = tl.load(p_scale + i_r).to(tl.float32)
                else:
                    b_c = 1.0
                b_p = b_c / b_d
                # Sweep 2: re-read z (recomputing the softcap is cheaper than storing s and reading it back) and
                # overwrite it with scale * (softmax - (1 - eps) * onehot - eps / V) * dsoftcap.
                for v0 in range(0, V, BLOCK_V):
                    o_j = v0 + o_v
                    m_j = o_j < V
                    b_s = tl.load(p_row + o_j, mask=m_j, other=0.0)
                    if SOFTCAP:
                        b_s, b_dcap = _softcap(b_s, softcap)
                    b_g = tl.exp(b_s - b_m) * b_p
                    if SMOOTH:
                        b_g -= b_c * eps / V
                    b_g = tl.where(o_j == i_y, b_g - b_c * (1.0 - eps), b_g)
                    if SOFTCAP:
                        b_g *= b_dcap
                    tl.store(p_row + o_j, b_g, mask=m_j)

    @triton.jit
    def _kl_rows_kernel(p_s, p_t, p_mask, p_scale, p_loss, stride_s, stride_t, VS, VT, temperature,
                        HAS_SCALE: tl.constexpr, GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        i_r = tl.program_id(0).to(tl.int64)
        p_srow = p_s + i_r * stride_s
        p_trow = p_t + i_r * stride_t
        o_v = tl.arange(0, BLOCK_V)
        if tl.load(p_mask + i_r) == 0:
            if GRAD:
                for v0 in range(0, VS, BLOCK_V):
                    tl.store(p_srow + v0 + o_v, tl.zeros([BLOCK_V], dtype=tl.float32), mask=v0 + o_v < VS)
            tl.store(p_loss + i_r, 0.0)
        else:
            # Sweep 1 over the student row, with the teacher row alongside for its first VT entries: online
            # (max, sum-exp) of both, and A = sum_j exp(w_j - m_t) * (w_j - u_j) rescaled with the teacher's sum.
            b_ms = float("-inf")
            b_ds = 0.0
            b_mt = float("-inf")
            b_dt = 0.0
            b_a = 0.0
            for v0 in range(0, VS, BLOCK_V):
                o_j = v0 + o_v
                m_s = o_j < VS
                m_t = o_j < VT  # blocks past VT load nothing from the teacher
                b_u = tl.load(p_srow + o_j, mask=m_s, other=0.0) / temperature
                b_w = tl.load(p_trow + o_j, mask=m_t, other=0.0) / temperature
                b_mn = tl.maximum(b_ms, tl.max(tl.where(m_s, b_u, float("-inf")), 0))
                b_ds = b_ds * tl.exp(b_ms - b_mn) + tl.sum(tl.where(m_s, tl.exp(b_u - b_mn), 0.0))
                b_ms = b_mn
                b_mn = tl.maximum(b_mt, tl.max(tl.where(m_t, b_w, float("-inf")), 0))
                # The first block holds teacher entries unless VT == 0; then a max of 0 keeps exp(m_t - m_n) from
                # being exp(-inf + inf) = NaN, and the teacher's sums stay 0.
                b_mn = tl.where(b_mn == float("-inf"), 0.0, b_mn)
                b_alpha = tl.exp(b_mt - b_mn)
                b_pt = tl.where(m_t, tl.exp(b_w - b_mn), 0.0)
                b_dt = b_dt * b_alpha + tl.sum(b_pt)
                b_a = b_a * b_alpha + tl.sum(b_pt * (b_w - b_u))
                b_mt = b_mn
            # KL = E_pt[w - u] - lse_t + lse_s with lse_s - lse_t = (m_s - m_t) + log(d_s / d_t): the terms cancel
            # at the scale of |w - u|, not of the lse (~log V), so nearly equal models keep a small absolute error.
            # An underflowed teacher probability contributes exactly 0 (the reference's xlogy convention). d_t >= 1
            # as soon as VT >= 1, so the max(., 1) only matters for an empty teacher vocabulary (KL 0).
            b_dt1 = tl.maximum(b_dt, 1.0)
            b_kl = tl.where(b_dt > 0, b_a / b_dt1 + (b_ms - b_mt) + tl.log(b_ds / b_dt1), 0.0)
            tl.store(p_loss + i_r, b_kl)
            if GRAD:
                if HAS_SCALE:
                    b_c = tl.load(p_scale + i_r).to(tl.float32) / temperature
                else:
                    b_c = 1.0 / temperature
                b_cs = b_c / b_ds
                b_ct = b_c / b_dt1
                # Sweep 2: the student row becomes scale / T * (p_s - p_t), p_t = 0 past VT.
                for v0 in range(0, VS, BLOCK_V):
                    o_j = v0 + o_v
                    m_s = o_j < VS
                    m_t = o_j < VT
                    b_u = tl.load(p_srow + o_j, mask=m_s, other=0.0) / temperature
                    b_w = tl.load(p_trow + o_j, mask=m_t, other=0.0) / temperature
                    b_g = tl.exp(b_u - b_ms) * b_cs - tl.where(m_t, tl.exp(b_w - b_mt) * b_ct, 0.0)
                    tl.store(p_srow + o_j, b_g, mask=m_s)


def _row_launch_config(v: int) -> dict:
    block = min(triton.next_power_of_2(max(v, 1)), _ROW_BLOCK_V)
    return dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4)


def _check_chunk(t: torch.Tensor, name: str) -> None:
    # The kernels write the gradient into the chunk itself, so they cannot work on a contiguous copy.
    if t.dtype != torch.float32 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be a float32 chunk with unit column stride, got {t.dtype}, strides "
                         f"{t.stride()}")


def ce_rows_triton_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                    softcap: float, row_scale: torch.Tensor | None, compute_grad: bool) -> torch.Tensor:
    """Triton launcher with the contract of ``ref.logits_to_grad_``: (C, V) fp32 logits -> (C,) fp32 losses, and
    with ``compute_grad`` the chunk overwritten by the (row-scaled) gradient. One program per row."""
    _check_chunk(logits, "logits")
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _ce_rows_kernel[(c,)](
            logits, labels.long().contiguous(), loss if row_scale is None else row_scale.contiguous(), loss,
            logits.stride(0), v, int(ignore_index), float(label_smoothing), float(softcap or 1.0),
            HAS_SCALE=row_scale is not None, SMOOTH=bool(label_smoothing), SOFTCAP=bool(softcap),
            GRAD=bool(compute_grad), **_row_launch_config(v))
    return loss


def kl_rows_triton_(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float,
                    row_scale: torch.Tensor | None, compute_grad: bool) -> torch.Tensor:
    """Triton launcher with the contract of ``ref.kl_logits_to_grad_``: (C, V_s) student and (C, V_t) teacher
    fp32 logits -> (C,) fp32 KL(teacher || student); with ``compute_grad`` the student chunk becomes the gradient."""
    _check_chunk(student, "student")
    _check_chunk(teacher, "teacher")
    c, vs = student.shape
    loss = torch.empty(c, dtype=torch.float32, device=student.device)
    if c:
        _kl_rows_kernel[(c,)](
            student, teacher, mask.contiguous().view(torch.uint8), loss if row_scale is None else
            row_scale.contiguous(), loss, student.stride(0), teacher.stride(0), vs, teacher.shape[1],
            float(temperature), HAS_SCALE=row_scale is not None, GRAD=bool(compute_grad), **_row_launch_config(vs))
    return loss


def _triton_rows(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the row math of a call on ``device`` runs in the Triton row kernels, else in the reference's torch
    ops.

    The op has no compiled kernel (``native_op=None``): on CPU "cpp" (auto's choice) and "reference" both mean the
    torch row math; on CUDA auto picks Triton. float64 (gradcheck) keeps the torch row math, as attention does.
    """
    backend = _backend.choose_backend(None, device)
    if backend == "triton" and dtype == torch.float64:
        if _backend.requested_backend() == "triton":
            raise RuntimeError("MDUS_KERNEL_BACKEND=triton cannot run this call: the Triton row kernels of the fused "
                               "loss take float16, bfloat16 and float32 inputs (fp32 logits)")
        return False
    return backend == "triton"


# ---------------------------------------------------------------------------------------------------- chunk driver


def _chunk_loop(hidden, weights, row_fn, row_scale, hidden_grad, weight_grad, cast_grads=True):
    """Runs ``row_fn`` over row chunks of ``hidden @ cat(weights).T``.

    ``row_fn(logits, start, stop, row_scale, compute_grad)`` returns the chunk's per-row losses and, with
    ``compute_grad``, overwrites the logits with d(sum row_scale * loss)/d(logits). Returns (per-row losses,
    grad_hidden or None, [grad_W_b or None]): in the inputs' dtypes, or in the accumulation dtype with
    ``cast_grads=False`` (so that a later scaling rounds only once).
    """
    n = hidden.shape[0]
    dt = _compute_dtype(hidden)
    # Per head, never concatenated: joining the heads would copy the whole (V, d) text head on every call (35 ms
    # for SmolLM2-135M's on CPU) for what is a slice of the logits columns.
    ws = [b.to(dt) for b in weights]
    bounds = [0]
    for b in weights:
        bounds.append(bounds[-1] + b.shape[0])
    acc = _loss_dtype(hidden)
    losses = torch.empty(n, dtype=acc, device=hidden.device)
    grad_h = hidden.new_empty(hidden.shape, dtype=acc) if hidden_grad else None
    grad_w = [torch.zeros(b.shape, dtype=acc, device=b.device) if g else None
              for b, g in zip(weights, weight_grad, strict=True)]
    compute_grad = hidden_grad or any(weight_grad)
    step = _chunk_rows(n, bounds[-1])
    for start in range(0, n, step):
        stop = min(start + step, n)
        h = hidden[start:stop].to(dt)
        if len(ws) == 1:
            logits = (h @ ws[0].T).to(acc)
        else:
            logits = torch.empty(stop - start, bounds[-1], dtype=acc, device=hidden.device)
            for i, w in enumerate(ws):
                logits[:, bounds[i]:bounds[i + 1]] = h @ w.T
        losses[start:stop] = row_fn(logits, start, stop, None if row_scale is None else row_scale[start:stop],
                                    compute_grad)
        if not compute_grad:
            continue
        dlogits = logits.to(dt)
        if hidden_grad:
            for i, w in enumerate(ws):
                part = (dlogits[:, bounds[i]:bounds[i + 1]] @ w).to(acc)
                if i == 0:
                    grad_h[start:stop] = part
                else:
                    grad_h[start:stop] += part
        for i, g in enumerate(grad_w):
            if g is not None:
                g.addmm_(dlogits[:, bounds[i]:bounds[i + 1]].T.to(acc), h.to(acc))
    if cast_grads:
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        grad_w = [None if g is None else g.to(b.dtype) for g, b in zip(grad_w, weights, strict=True)]
    return losses, grad_h, grad_w


def _ce_rows(labels, ignore_index, label_smoothing, softcap, triton_rows):
    rows = ce_rows_triton_ if triton_rows else ref.logits_to_grad_

    def row_fn(logits, start, stop, row_scale, compute_grad):
        return rows(logits, labels[start:stop], ignore_index, label_smoothing, softcap, row_scale, compute_grad)

    return row_fn


def _kl_rows(teacher_hidden, teacher_weight, mask, temperature, triton_rows):
    dt = _compute_dtype(teacher_hidden)
    w_t = teacher_weight.to(dt)
    rows = kl_rows_triton_ if triton_rows else ref.kl_logits_to_grad_

    def row_fn(logits, start, stop, row_scale, compute_grad):
        teacher = (teacher_hidden[start:stop].to(dt) @ w_t.T).to(logits.dtype)
        return rows(logits, teacher, mask[start:stop], temperature, row_scale, compute_grad)

    return row_fn


def _forward(hidden, weights, row_fn, selected, reduction, hidden_grad, weight_grad):
    """Shared forward of the loss ops. For mean/sum the gradients are computed here, scaled by 1/#selected (mean)
    inside the row math and kept in the accumulation dtype until the backward applies the upstream gradient, so
    low-precision gradients are rounded once. "none" leaves them to the recomputing backward op."""
    eager_grads = reduction != "none"
    n_selected = int(selected.sum()) if reduction == "mean" else 1
    scale = torch.full((hidden.shape[0],), 1.0 / max(n_selected, 1), dtype=_loss_dtype(hidden),
                       device=hidden.device)
    losses, grad_h, grad_w = _chunk_loop(hidden, weights, row_fn, scale, hidden_grad and eager_grads,
                                         [g and eager_grads for g in weight_grad], cast_grads=False)
    if reduction == "none":
        loss = losses
    else:
        # mean over the selected rows; 0 (not NaN) when none is selected
        loss = losses.sum() / max(n_selected, 1)
    return loss, _or_empty(grad_h, hidden), [_or_empty(g, hidden) for g in grad_w]


def _fake_forward(hidden, weights, reduction, hidden_grad, weight_grad):
    eager_grads = reduction != "none"
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=_loss_dtype(hidden))
    acc = _loss_dtype(hidden)
    grad_h = hidden.new_empty(hidden.shape, dtype=acc) if hidden_grad and eager_grads else hidden.new_empty(0)
    grad_w = [w.new_empty(w.shape, dtype=acc) if g and eager_grads else hidden.new_empty(0)
              for w, g in zip(weights, weight_grad, strict=True)]
    return loss, grad_h, grad_w


def _fake_backward(hidden, weights, hidden_grad, weight_grad):
    grad_h = hidden.new_empty(hidden.shape) if hidden_grad else hidden.new_empty(0)
    return grad_h, [w.new_empty(w.shape) if g else hidden.new_empty(0) for w, g in zip(weights, weight_grad,
                                                                                       strict=True)]


def _recompute(grad_loss, hidden, weights, row_fn, hidden_grad, weight_grad):
    """Body of the recomputing backward ops (reduction="none"): gradients of sum(grad_loss * loss)."""
    _, grad_h, grad_w = _chunk_loop(hidden, weights, row_fn, grad_loss.to(_loss_dtype(hidden)), hidden_grad,
                                    weight_grad)
    return _or_empty(grad_h, hidden), [_or_empty(g, hidden) for g in grad_w]


def _setup(ctx, output, reduction, hidden, hidden_grad, weight_grad, recompute_inputs):
    """setup_context of both loss ops: save the forward's gradients, or (reduction="none") what recomputes them."""
    ctx.reduction, ctx.hidden_grad, ctx.weight_grad = reduction, hidden_grad, list(weight_grad)
    ctx.hidden_dtype = hidden.dtype  # the weights share it (checked by the public functions)
    _, grad_h, grad_w = output
    # The gradient outputs are not differentiable, and autograd must not allocate zero "gradients" for them: for a
    # trainable head that would be another (V, d) buffer at the peak.
    ctx.mark_non_differentiable(grad_h, *grad_w)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*(recompute_inputs if reduction == "none" else (grad_h, *grad_w)))


def _scaled_or_recomputed(ctx, grad_loss, recompute):
    """Backward of both loss ops: scale the forward's gradients, or (reduction="none") recompute them."""
    if grad_loss is None:  # the loss itself received no gradient (grads are not materialized)
        return None, [None] * len(ctx.weight_grad)
    if torch.is_grad_enabled():
        # create_graph=True: the gradients come from the forward's chunks (or a recomputation outside autograd),
        # so they carry no graph, and a second derivative through them would silently drop terms.
        raise NotImplementedError("double backward (create_graph=True) through linear_cross_entropy / "
                                  "linear_kl_div is not supported")
    if ctx.reduction == "none":
        grad_h, grad_w = recompute()
    else:
        grad_h, *grad_w = ctx.saved_tensors
        grad_h = (grad_h * grad_loss).to(ctx.hidden_dtype)
        grad_w = [(g * grad_loss).to(ctx.hidden_dtype) for g in grad_w]
    return (grad_h if ctx.hidden_grad else None,
            [g if flag else None for g, flag in zip(grad_w, ctx.weight_grad, strict=True)])


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # An op cannot return None in a Tensor slot, nor the same tensor twice: a fresh empty tensor stands for "none".
    return like.new_empty(0) if t is None else t


# ---------------------------------------------------------------------------------------------------- registration


@torch.library.custom_op("mdus::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: torch.Tensor, weights: list[torch.Tensor], labels: torch.Tensor, ignore_index: int,
            reduction: str, label_smoothing: float, softcap: float, hidden_grad: bool,
            weight_grad: list[bool]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    _check_labels_values(labels, sum(w.shape[0] for w in weights), ignore_index)
    rows = _ce_rows(labels, ignore_index, label_smoothing, softcap, _triton_rows(hidden.device, hidden.dtype))
    return _forward(hidden, weights, rows, labels != ignore_index, reduction, hidden_grad, weight_grad)


@_lce_op.register_fake
def _(hidden, weights, labels, ignore_index, reduction, label_smoothing, softcap, hidden_grad, weight_grad):
    return _fake_forward(hidden, weights, reduction, hidden_grad, weight_grad)


@torch.library.custom_op("mdus::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weights: list[torch.Tensor],
                     labels: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float,
                     hidden_grad: bool, weight_grad: list[bool]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    rows = _ce_rows(labels, ignore_index, label_smoothing, softcap, _triton_rows(hidden.device, hidden.dtype))
    return _recompute(grad_loss, hidden, weights, rows, hidden_grad, weight_grad)


@_lce_backward_op.register_fake
def _(grad_loss, hidden, weights, labels, ignore_index, label_smoothing, softcap, hidden_grad, weight_grad):
    return _fake_backward(hidden, weights, hidden_grad, weight_grad)


def _lce_setup_context(ctx, inputs, output):
    hidden, weights, labels, ignore_index, reduction, label_smoothing, softcap, hidden_grad, weight_grad = inputs
    ctx.args = (ignore_index, label_smoothing, softcap)
    _setup(ctx, output, reduction, hidden, hidden_grad, weight_grad, (hidden, labels, *weights))


def _lce_backward(ctx, grad_loss, _grad_h, _grad_w):
    def recompute():
        hidden, labels, *weights = ctx.saved_tensors
        return torch.ops.mdus.linear_cross_entropy_backward(grad_loss, hidden, weights, labels, *ctx.args,
                                                            ctx.hidden_grad, ctx.weight_grad)

    grad_h, grad_w = _scaled_or_recomputed(ctx, grad_loss, recompute)
    return grad_h, grad_w, None, None, None, None, None, None, None


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


@torch.library.custom_op("mdus::linear_kl_div", mutates_args=())
def _lkl_op(hidden: torch.Tensor, weights: list[torch.Tensor], teacher_hidden: torch.Tensor,
            teacher_weight: torch.Tensor, mask: torch.Tensor, temperature: float, reduction: str, hidden_grad: bool,
            weight_grad: list[bool]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    rows = _kl_rows(teacher_hidden, teacher_weight, mask, temperature, _triton_rows(hidden.device, hidden.dtype))
    return _forward(hidden, weights, rows, mask, reduction, hidden_grad, weight_grad)


@_lkl_op.register_fake
def _(hidden, weights, teacher_hidden, teacher_weight, mask, temperature, reduction, hidden_grad, weight_grad):
    return _fake_forward(hidden, weights, reduction, hidden_grad, weight_grad)


@torch.library.custom_op("mdus::linear_kl_div_backward", mutates_args=())
def _lkl_backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weights: list[torch.Tensor],
                     teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, mask: torch.Tensor,
                     temperature: float, hidden_grad: bool,
                     weight_grad: list[bool]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    rows = _kl_rows(teacher_hidden, teacher_weight, mask, temperature, _triton_rows(hidden.device, hidden.dtype))
    return _recompute(grad_loss, hidden, weights, rows, hidden_grad, weight_grad)


@_lkl_backward_op.register_fake
def _(grad_loss, hidden, weights, teacher_hidden, teacher_weight, mask, temperature, hidden_grad, weight_grad):
    return _fake_backward(hidden, weights, hidden_grad, weight_grad)


def _lkl_setup_context(ctx, inputs, output):
    hidden, weights, teacher_hidden, teacher_weight, mask, temperature, reduction, hidden_grad, weight_grad = inputs
    ctx.temperature = temperature
    _setup(ctx, output, reduction, hidden, hidden_grad, weight_grad,
           (hidden, teacher_hidden, teacher_weight, mask, *weights))


def _lkl_backward(ctx, grad_loss, _grad_h, _grad_w):
    def recompute():
        hidden, teacher_hidden, teacher_weight, mask, *weights = ctx.saved_tensors
        return torch.ops.mdus.linear_kl_div_backward(grad_loss, hidden, weights, teacher_hidden, teacher_weight,
                                                     mask, ctx.temperature, ctx.hidden_grad, ctx.weight_grad)

    grad_h, grad_w = _scaled_or_recomputed(ctx, grad_loss, recompute)
    return grad_h, grad_w, None, None, None, None, None, None, None


_lkl_op.register_autograd(_lkl_backward, setup_context=_lkl_setup_context)


# ------------------------------------------------------------------------------------------------------ public API


def _check_head(hidden, weight, hidden_name: str, weight_name: str) -> tuple[torch.Tensor, ...]:
    """Checks (N, d) hidden states and a (V, d) head or tuple of row blocks; returns the blocks."""
    weights = tuple(weight) if isinstance(weight, (tuple, list)) else (weight,)
    check_tensor(hidden, hidden_name, ndim=2, dtypes=FLOAT_DTYPES, shape_doc="(N, d)")
    if not weights:
        raise ValueError(f"{weight_name} must be a tensor or a non-empty tuple of (V_b, d) blocks")
    for i, w in enumerate(weights):
        name = weight_name if len(weights) == 1 else f"{weight_name}[{i}]"
        check_tensor(w, name, ndim=2, device=hidden.device, shape_doc="(V, d)")
        if w.shape[1] != hidden.shape[1]:
            raise ValueError(f"{name} must have d={hidden.shape[1]} columns (like {hidden_name}), "
                             f"got shape {tuple(w.shape)}")
        if w.dtype != hidden.dtype:
            raise TypeError(f"{name} must have {hidden_name}'s dtype {hidden.dtype}, got {w.dtype}")
    if sum(w.shape[0] for w in weights) == 0:
        raise ValueError(f"{weight_name} must have at least one row (a vocabulary of V >= 1 entries)")
    return weights


def _weight_flags(weights, weight_requires_grad) -> list[bool]:
    """Which blocks get a gradient: those that require grad, unless ``weight_requires_grad`` says otherwise."""
    if weight_requires_grad is None:
        return [w.requires_grad for w in weights]
    if isinstance(weight_requires_grad, bool):
        return [weight_requires_grad and w.requires_grad for w in weights]
    flags = list(weight_requires_grad)
    if len(flags) != len(weights):
        raise ValueError(f"weight_requires_grad must have one flag per weight block ({len(weights)}), "
                         f"got {len(flags)}")
    return [bool(f) and w.requires_grad for f, w in zip(flags, weights, strict=True)]


def linear_cross_entropy(hidden: torch.Tensor, weight, labels: torch.Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, logit_softcap: float | None = None,
                         weight_requires_grad=None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, without materializing the logits.

    Args:
        hidden: (N, d) float16/bfloat16/float32/float64 final hidden states.
        weight: (V, d) output head, or a tuple of (V_b, d) row blocks whose concatenation is the vocabulary (e.g.
            frozen text rows, trainable speech rows). Same dtype and device as ``hidden``.
        labels: (N,) int64/int32 targets in ``[0, V)`` or ``ignore_index``.
        reduction: ``"mean"`` over non-ignored rows (0 when all are ignored), ``"sum"`` or ``"none"`` ((N,) losses).
        label_smoothing: in [0, 1], as in ``F.cross_entropy``.
        logit_softcap: ``c`` applies ``c * tanh(logits / c)`` before the softmax (Gemma-style); None disables it.
        weight_requires_grad: None follows ``requires_grad`` of each block; a bool (or one per block) overrides it,
            e.g. False to skip the head's weight gradient (the largest GEMM) for a frozen head.

    Returns:
        The fp32 loss (fp64 for fp64 inputs): a scalar, or (N,) for ``reduction="none"``.

    Example:
        >>> hidden, head = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8)
        >>> loss = linear_cross_entropy(hidden, head, torch.tensor([1, 2, 3, -100, 5, 19]))
        >>> loss.backward()  # hidden.grad is set; the frozen head gets no gradient
    """
    weights = _check_head(hidden, weight, "hidden", "weight")
    check_tensor(labels, "labels", ndim=1, dtypes=(torch.int64, torch.int32), device=hidden.device)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must have N={hidden.shape[0]} entries (hidden.shape[0]), got {labels.shape[0]}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    check_number(ignore_index, "ignore_index", "an int", integer=True)
    check_number(label_smoothing, "label_smoothing", "a number in [0, 1]", ok=lambda v: 0 <= v <= 1)
    if logit_softcap is not None:
        check_number(logit_softcap, "logit_softcap", "a finite number > 0, or None", ok=lambda v: v > 0)
    flags = _weight_flags(weights, weight_requires_grad)
    grad_on = torch.is_grad_enabled()
    loss, _, _ = torch.ops.mdus.linear_cross_entropy(
        hidden, list(weights), labels.long(), int(ignore_index), reduction, float(label_smoothing),
        float(logit_softcap or 0.0), grad_on and hidden.requires_grad, [grad_on and f for f in flags])
    return loss


def linear_kl_div(student_hidden: torch.Tensor, student_weight, teacher_hidden: torch.Tensor,
                  teacher_weight: torch.Tensor, *, mask: torch.Tensor | None = None, temperature: float = 1.0,
                  reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) between two heads' next-token distributions, without materializing logits.

    SALAD's cross-modal distillation: the teacher (the frozen text LLM reading the text) and the student (the
    speech LM) are compared position by position. The student normalizes over its whole vocabulary; the teacher's
    vocabulary must be the student's first ``V_t`` entries (e.g. the text rows), and gives the others probability 0.

    Args:
        student_hidden: (N, d) student hidden states.
        student_weight: (V_s, d) student head, or a tuple of row blocks (e.g. frozen text rows, trainable speech
            rows); gradients follow each block's ``requires_grad``.
        teacher_hidden: (N, d_t) teacher hidden states; no gradient.
        teacher_weight: (V_t, d_t) teacher head, ``V_t <= V_s``; no gradient.
        mask: (N,) bool, the positions to distill (SALAD: those whose next token is text); default all.
        temperature: softmax temperature of both sides (no temperature**2 factor is applied).
        reduction: "mean" over selected positions (0 if none), "sum", or "none" ((N,), 0 where not selected).

    Example:
        >>> s, t = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8)
        >>> kl = linear_kl_div(s, torch.randn(12, 8), t, torch.randn(10, 8))
        >>> kl.backward()
    """
    weights = _check_head(student_hidden, student_weight, "student_hidden", "student_weight")
    if not isinstance(teacher_weight, torch.Tensor):
        raise TypeError(f"teacher_weight must be one (V_t, d_t) torch.Tensor, got {type(teacher_weight).__name__}")
    check_tensor(teacher_hidden, "teacher_hidden", device=student_hidden.device)
    (teacher_weight,) = _check_head(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight")
    n, v_s = student_hidden.shape[0], sum(w.shape[0] for w in weights)
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"teacher_hidden must have N={n} rows (like student_hidden), got {teacher_hidden.shape[0]}")
    if teacher_weight.shape[0] > v_s:
        raise ValueError(f"teacher_weight must have at most V_s={v_s} rows (the student's vocabulary), "
                         f"got {teacher_weight.shape[0]}")
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=student_hidden.device)
    check_tensor(mask, "mask", ndim=1, dtypes=(torch.bool,), device=student_hidden.device)
    if mask.shape[0] != n:
        raise ValueError(f"mask must have N={n} entries, got {mask.shape[0]}")
    check_number(temperature, "temperature", "a finite number > 0", ok=lambda v: v > 0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    grad_on = torch.is_grad_enabled()
    loss, _, _ = torch.ops.mdus.linear_kl_div(
        student_hidden, list(weights), teacher_hidden.detach(), teacher_weight.detach(), mask, float(temperature),
        reduction, grad_on and student_hidden.requires_grad, [grad_on and w.requires_grad for w in weights])
    return loss
