"""Fused linear + cross-entropy without materializing the (N, V) logits: chunk driver, registration, public API.

The specification is ``mdus_kernels.reference.linear_cross_entropy``.

Per chunk of rows: one GEMM for the logits, the row math in place (loss and d loss / d logits), then the GEMMs of
the backward (``grad_hidden = dlogits @ W`` and, for trainable blocks only, ``grad_W += dlogits.T @ hidden``).
For ``reduction="mean"/"sum"`` the upstream gradient is a scalar, so the gradients are computed in the forward and
the backward only scales them: the GEMM count equals eager's (logits, grad_hidden, grad_W) with no recompute,
and memory is one chunk of logits instead of N x V logits and their gradient. ``reduction="none"`` needs per-row
upstream gradients, so its backward (``mdus::linear_cross_entropy_backward``) recomputes the logits.
"""

import os

import torch

from mdus_kernels._checks import FLOAT_DTYPES, check_tensor
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


def _chunk_loop(hidden, weights, row_fn, row_scale, hidden_grad, weight_grad, cast_grads=True):
    """Runs ``row_fn`` over row chunks of ``hidden @ cat(weights).T``.

    ``row_fn(logits, start, stop, row_scale, compute_grad)`` returns the chunk's per-row losses and, with
    ``compute_grad``, overwrites the logits with d(sum row_scale * loss)/d(logits). Returns (per-row losses,
    grad_hidden or None, [grad_W_b or None]): in the inputs' dtypes, or in the accumulation dtype with
    ``cast_grads=False`` (so that a later scaling rounds only once).
    """
    n = hidden.shape[0]
    dt = _compute_dtype(hidden)
    w = (torch.cat(weights) if len(weights) > 1 else weights[0]).to(dt)
    bounds = [0]
    for b in weights:
        bounds.append(bounds[-1] + b.shape[0])
    acc = _loss_dtype(hidden)
    losses = torch.empty(n, dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden, dtype=acc) if hidden_grad else None
    grad_w = [torch.zeros(b.shape, dtype=acc, device=b.device) if g else None
              for b, g in zip(weights, weight_grad, strict=True)]
    compute_grad = hidden_grad or any(weight_grad)
    step = _chunk_rows(n, w.shape[0])
    for start in range(0, n, step):
        stop = min(start + step, n)
        h = hidden[start:stop].to(dt)
        logits = (h @ w.T).to(acc)
        losses[start:stop] = row_fn(logits, start, stop, None if row_scale is None else row_scale[start:stop],
                                    compute_grad)
        if not compute_grad:
            continue
        dlogits = logits.to(dt)
        if hidden_grad:
            grad_h[start:stop] = (dlogits @ w).to(acc)
        for i, g in enumerate(grad_w):
            if g is not None:
                g.addmm_(dlogits[:, bounds[i]:bounds[i + 1]].T.to(acc), h.to(acc))
    if cast_grads:
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        grad_w = [None if g is None else g.to(b.dtype) for g, b in zip(grad_w, weights, strict=True)]
    return losses, grad_h, grad_w


def _ce_rows(labels, ignore_index, label_smoothing, softcap):
    def row_fn(logits, start, stop, row_scale, compute_grad):
        return ref.logits_to_grad_(logits, labels[start:stop], ignore_index, label_smoothing, softcap, row_scale,
                                   compute_grad)

    return row_fn


def _kl_rows(teacher_hidden, teacher_weight, mask, temperature):
    dt = _compute_dtype(teacher_hidden)
    w_t = teacher_weight.to(dt)

    def row_fn(logits, start, stop, row_scale, compute_grad):
        teacher = (teacher_hidden[start:stop].to(dt) @ w_t.T).to(logits.dtype)
        return ref.kl_logits_to_grad_(logits, teacher, mask[start:stop], temperature, row_scale, compute_grad)

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
    grad_h = torch.empty_like(hidden, dtype=acc) if hidden_grad and eager_grads else hidden.new_empty(0)
    grad_w = [torch.empty_like(w, dtype=acc) if g and eager_grads else hidden.new_empty(0)
              for w, g in zip(weights, weight_grad, strict=True)]
    return loss, grad_h, grad_w


def _fake_backward(hidden, weights, hidden_grad, weight_grad):
    grad_h = torch.empty_like(hidden) if hidden_grad else hidden.new_empty(0)
    return grad_h, [torch.empty_like(w) if g else hidden.new_empty(0) for w, g in zip(weights, weight_grad,
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
    return _forward(hidden, weights, _ce_rows(labels, ignore_index, label_smoothing, softcap), labels != ignore_index,
                    reduction, hidden_grad, weight_grad)


@_lce_op.register_fake
def _(hidden, weights, labels, ignore_index, reduction, label_smoothing, softcap, hidden_grad, weight_grad):
    return _fake_forward(hidden, weights, reduction, hidden_grad, weight_grad)


@torch.library.custom_op("mdus::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weights: list[torch.Tensor],
                     labels: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float,
                     hidden_grad: bool, weight_grad: list[bool]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return _recompute(grad_loss, hidden, weights, _ce_rows(labels, ignore_index, label_smoothing, softcap),
                      hidden_grad, weight_grad)


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
    return _forward(hidden, weights, _kl_rows(teacher_hidden, teacher_weight, mask, temperature), mask, reduction,
                    hidden_grad, weight_grad)


@_lkl_op.register_fake
def _(hidden, weights, teacher_hidden, teacher_weight, mask, temperature, reduction, hidden_grad, weight_grad):
    return _fake_forward(hidden, weights, reduction, hidden_grad, weight_grad)


@torch.library.custom_op("mdus::linear_kl_div_backward", mutates_args=())
def _lkl_backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weights: list[torch.Tensor],
                     teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, mask: torch.Tensor,
                     temperature: float, hidden_grad: bool,
                     weight_grad: list[bool]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return _recompute(grad_loss, hidden, weights, _kl_rows(teacher_hidden, teacher_weight, mask, temperature),
                      hidden_grad, weight_grad)


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
        The fp32 loss: a scalar, or (N,) for ``reduction="none"``.

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
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")
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
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    grad_on = torch.is_grad_enabled()
    loss, _, _ = torch.ops.mdus.linear_kl_div(
        student_hidden, list(weights), teacher_hidden.detach(), teacher_weight.detach(), mask, float(temperature),
        reduction, grad_on and student_hidden.requires_grad, [grad_on and w.requires_grad for w in weights])
    return loss
