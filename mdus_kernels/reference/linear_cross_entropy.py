"""Fused linear + cross-entropy: the specification.

``linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, label_smoothing, logit_softcap)``
    ``hidden`` (N, d), ``weight`` (V, d) (or a tuple of row blocks, concatenated into the vocabulary), ``labels``
    (N,) int64 in ``[0, V)`` or ``ignore_index``. For each row ``i`` whose label ``y`` is not ignored:

    * logits ``z = hidden[i] @ weight.T``, computed with fp32 accumulation;
    * with ``logit_softcap = c``: ``s = c * tanh(z / c)``, else ``s = z``;
    * ``loss_i = lse(s) - (1 - eps) * s[y] - (eps / V) * sum_j s[j]`` with ``eps = label_smoothing``: exactly
      ``F.cross_entropy(s, y, label_smoothing=eps)``.

    Ignored rows have loss 0 and pass no gradient. ``reduction="mean"`` divides the sum by the number of non-ignored
    rows, and gives 0 (not NaN, unlike ``F.cross_entropy``) when every row is ignored; ``"sum"``; ``"none"`` gives
    the (N,) per-row losses (0 at ignored rows). The loss is fp32.

    Gradients: always for ``hidden`` (when it requires grad); for a weight block only when it requires grad. The
    (N, V) logits are never materialized: every backend works on row chunks.

``linear_kl_div(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature, reduction)``
    KL(teacher || student) of the two heads' next-token distributions at each position selected by ``mask``
    (SALAD's cross-modal distillation); see ``kl_logits_to_grad_``. Reductions as above, "mean" over the selected
    positions (0 when none is selected). Gradients reach the student side only.

``logits_to_grad_(logits, labels, ...)`` is the row math on one chunk: it returns the per-row losses and overwrites
``logits`` with ``d(sum_i scale_i * loss_i) / d(logits)`` (``kl_logits_to_grad_`` likewise for KL). The chunk loop
runs it on CPU and for float64; the Triton row kernels in ``mdus_kernels/ops/linear_cross_entropy.py`` have the same
contract and replace it on CUDA.
"""

import torch

REDUCTIONS = ("mean", "sum", "none")


def logits_to_grad_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                    softcap: float, row_scale: torch.Tensor | None, compute_grad: bool) -> torch.Tensor:
    """(C, V) fp32 logits chunk -> (C,) fp32 losses; with ``compute_grad`` the chunk becomes the loss gradient,
    each row scaled by ``row_scale`` (C,) (ignored rows: 0). The chunk is scratch space either way.

    Everything happens in place on the chunk (one exp pass, the softmax as exp(s - max) / sum), so the only
    chunk-sized buffer is the chunk itself (plus tanh's derivative with a softcap).
    """
    v = logits.shape[1]
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    s = logits
    d_cap = None
    if softcap:
        s.div_(softcap).tanh_()
        if compute_grad:
            d_cap = 1 - s * s  # d (c * tanh(z / c)) / dz
        s.mul_(softcap)
    target = s.gather(1, safe).squeeze(1)
    sum_s = s.sum(1) if label_smoothing else None
    row_max = s.amax(1, keepdim=True)
    s.sub_(row_max).exp_()
    sum_exp = s.sum(1)
    loss = row_max.squeeze(1) + sum_exp.log() - (1 - label_smoothing) * target
    if label_smoothing:
        loss -= (label_smoothing / v) * sum_s
    loss = torch.where(valid, loss, 0.0)
    if compute_grad:
        scale = valid.to(s.dtype) if row_scale is None else torch.where(valid, row_scale.to(s.dtype), 0.0)
        # scale * (softmax - (1 - eps) * onehot - eps / V)
        s.mul_((scale / sum_exp).unsqueeze(1))
        if label_smoothing:
            s.sub_((scale * (label_smoothing / v)).unsqueeze(1))
        s.scatter_add_(1, safe, (-(1 - label_smoothing) * scale).unsqueeze(1))
        if d_cap is not None:
            s.mul_(d_cap)
    return loss


def kl_logits_to_grad_(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float,
                       row_scale: torch.Tensor | None, compute_grad: bool) -> torch.Tensor:
    """KL(teacher || student) per row of a chunk: (C, V_s) student and (C, V_t) teacher logits, ``V_t <= V_s``.

    Both sides are ``softmax(logits / temperature)``; the student normalizes over its whole vocabulary and the
    teacher's vocabulary is the student's first ``V_t`` entries (the teacher gives the rest probability 0):
    ``kl_i = sum_{j < V_t} p_t[j] * (log p_t[j] - log p_s[j])``, 0 where ``mask`` is False. No temperature**2
    factor is applied. With ``compute_grad``, ``student`` becomes ``row_scale * (p_s - p_t) / temperature``, the
    gradient with respect to the student's logits (the teacher gets none).
    """
    vt = teacher.shape[1]
    log_ps = torch.log_softmax(student / temperature, dim=1)
    log_pt = torch.log_softmax(teacher / temperature, dim=1)
    pt = log_pt.exp()
    # xlogy-style: a teacher probability of exactly 0 contributes 0, even where its log is -inf.
    kl = torch.where(pt > 0, pt * (log_pt - log_ps[:, :vt]), 0.0).sum(1)
    kl = torch.where(mask, kl, 0.0)
    if compute_grad:
        scale = mask.to(student.dtype) if row_scale is None else torch.where(mask, row_scale.to(student.dtype), 0.0)
        student.copy_(log_ps.exp_())
        student[:, :vt] -= pt
        student.mul_((scale / temperature).unsqueeze(1))
    return kl
