"""The fused cgMLP gate and the segment-aware depthwise conv: Triton kernels, dispatch and registration.

The specification is ``mdus_kernels.reference.cgmlp``. Four registered ops:

* ``mdus::cgmlp_gate(x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, causal, eps)``:
  packed ``(N, U)`` -> ``(out (N, U/2), mean (N,), rstd (N,))``; mean/rstd are the LayerNorm statistics the backward
  reuses (not differentiable). Its backward is ``mdus::cgmlp_gate_backward``.
* ``mdus::depthwise_conv1d(x, weight, bias, cu_seqlens, speech_mask, causal)``: ``(N, C)`` -> ``(N, C)``; backward
  ``mdus::depthwise_conv1d_backward``.

The backward ops have no autograd of their own (no double backward).

Kernels
    Both ops are one pair of Triton kernels with the LayerNorm and the gate switched on or off (``LN``, ``GATE``).
    Each token carries its segment ``[lo, hi)`` (the reference's ``segment_bounds``; a text token has an empty one),
    so a tile of tokens may straddle segments: every tap masks its rows by ``lo <= t + j - L < hi``.

    * forward: a statistics kernel (one read of x_g: per-token mean/rstd, kept for the backward), then the fused
      kernel over (token block, channel block) tiles: each of the k taps loads the shifted x_g tile (L1/L2 hits after
      the first), normalizes it and accumulates ``w[:, j] * h`` in fp32 registers; bias, gate and one store follow.
      Memory traffic: x_g read twice, x_r once, out written once; the eager composition (LayerNorm, transposes,
      conv, multiply) reads and writes an (N, C) tensor in each of its passes.
    * backward: one kernel over (token range, channel block) programs recomputes h and z (no (N, C) activation is
      saved), writes dx_r = dout * z, dh = transposed conv of dz = dout * x_r, and the LayerNorm's dxhat with its two
      per-token partial row sums per channel block; a second kernel combines the row sums into dx_g. Parameter
      gradients are accumulated per program into its own slice of a partial-sum buffer (read-modify-write by that
      program only) and summed over programs with ``torch.sum``: deterministic, no atomics.

No CUDA C++ kernel: the op is memory-bound with a k-tap stencil over L1-resident tiles, which Triton expresses
directly; a hand-written CUDA kernel could only be justified by a GPU measurement showing Triton short of the
memory roofline, and none has been made. The C++ CPU kernels are ``csrc/cpu/cgmlp.cpp``.
"""

import torch

from mdus_kernels import _backend
from mdus_kernels._checks import FLOAT_DTYPES, check_number, check_offsets, check_offsets_values, check_tensor
from mdus_kernels.reference import cgmlp as ref
from mdus_kernels.reference.cgmlp import MAX_KERNEL_SIZE

triton = _backend.triton_module()
if triton is not None:
    import triton.language as tl

    @triton.jit
    def _ln_stats_kernel(p_x, p_lo, p_hi, p_mean, p_rstd, N, C, ldx, off_in, eps, ACC: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        i_t = tl.program_id(0).to(tl.int64)
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        m_t = o_t < N
        b_sum = tl.zeros([BLOCK_T], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_x = m_t[:, None] & (o_c < C)[None, :]
            b_x = tl.load(p_x + o_t[:, None] * ldx + off_in + o_c[None, :], mask=m_x, other=0.0).to(ACC)
            b_sum += tl.sum(b_x, axis=1)
        b_mean = b_sum / C
        # Second pass around the mean: the variance stays accurate for rows with a large mean.
        b_var = tl.zeros([BLOCK_T], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_x = m_t[:, None] & (o_c < C)[None, :]
            b_x = tl.load(p_x + o_t[:, None] * ldx + off_in + o_c[None, :], mask=m_x, other=0.0).to(ACC)
            b_d = tl.where(m_x, b_x - b_mean[:, None], 0.0)
            b_var += tl.sum(b_d * b_d, axis=1)
        b_rstd = 1.0 / tl.sqrt(b_var / C + eps)
        b_speech = tl.load(p_lo + o_t, mask=m_t, other=0) < tl.load(p_hi + o_t, mask=m_t, other=0)
        tl.store(p_mean + o_t, tl.where(b_speech, b_mean, 0.0), mask=m_t)
        tl.store(p_rstd + o_t, tl.where(b_speech, b_rstd, 0.0), mask=m_t)

    @triton.jit
    def _ln_params(p_nw, p_nb, o_c, m_c, LN: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
        if LN:
            b_nw = tl.load(p_nw + o_c, mask=m_c, other=0.0)
            b_nb = tl.load(p_nb + o_c, mask=m_c, other=0.0)
        else:  # unused; the pointers are dummies then
            b_nw = tl.zeros([BLOCK_C], dtype=ACC)
            b_nb = tl.zeros([BLOCK_C], dtype=ACC)
        return b_nw, b_nb

    @triton.jit
    def _conv_input(p_x, p_mean, p_rstd, b_nw, b_nb, o_p, m_p, o_c, m_c, ldx, off_in, LN: tl.constexpr,
                    ACC: tl.constexpr):
        """Rows o_p of the conv input (LayerNorm'ed x_g, or x), 0 where m_p is False."""
        m_pc = m_p[:, None] & m_c[None, :]
        b_h = tl.load(p_x + o_p[:, None] * ldx + off_in + o_c[None, :], mask=m_pc, other=0.0).to(ACC)
        if LN:
            b_mu = tl.load(p_mean + o_p, mask=m_p, other=0.0)
            b_rs = tl.load(p_rstd + o_p, mask=m_p, other=0.0)
            b_h = tl.where(m_pc, (b_h - b_mu[:, None]) * b_rs[:, None] * b_nw[None, :] + b_nb[None, :], 0.0)
        return b_h

    @triton.jit
    def _dwconv_fwd_kernel(p_x, p_lo, p_hi, p_mean, p_rstd, p_nw, p_nb, p_w, p_b, p_out, N, C, ldx, off_in, K, L,
                           LN: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        i_t = tl.program_id(0).to(tl.int64)
        i_c = tl.program_id(1)
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_t, m_c = o_t < N, o_c < C
        b_lo = tl.load(p_lo + o_t, mask=m_t, other=0)
        b_hi = tl.load(p_hi + o_t, mask=m_t, other=0)
        b_nw, b_nb = _ln_params(p_nw, p_nb, o_c, m_c, LN, ACC, BLOCK_C)
        b_acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
        for j in range(0, K):
            o_p = o_t + j - L
            m_p = (o_p >= b_lo) & (o_p < b_hi)  # inside the token's own segment: the zero padding at its edges
            b_h = _conv_input(p_x, p_mean, p_rstd, b_nw, b_nb, o_p, m_p, o_c, m_c, ldx, off_in, LN, ACC)
            b_w = tl.load(p_w + o_c * K + j, mask=m_c, other=0.0)
            b_acc += b_h * b_w[None, :]
        if HAS_BIAS:
            b_acc += tl.load(p_b + o_c, mask=m_c, other=0.0)[None, :]
        m_tc = m_t[:, None] & m_c[None, :]
        if GATE:
            b_acc *= tl.load(p_x + o_t[:, None] * ldx + o_c[None, :], mask=m_tc, other=0.0).to(ACC)
        b_acc = tl.where((b_lo < b_hi)[:, None], b_acc, 0.0)  # text tokens (empty segment) give 0
        tl.store(p_out + o_t[:, None] * C + o_c[None, :], b_acc.to(p_out.dtype.element_ty), mask=m_tc)

    @triton.jit
    def _dwconv_bwd_kernel(p_g, p_x, p_lo, p_hi, p_mean, p_rstd, p_nw, p_nb, p_w, p_b, p_dx, p_dxhat, p_rowsum,
                           p_dw_part, p_vec_part, N, C, ldx, off_in, K, L, ROWS_PER_PROG,
                           LN: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        i_g = tl.program_id(0).to(tl.int64)
        i_c = tl.program_id(1).to(tl.int64)  # (2 * i_c) * N indexes the row sums
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_nw, b_nb = _ln_params(p_nw, p_nb, o_c, m_c, LN, ACC, BLOCK_C)
        b_db = tl.zeros([BLOCK_C], dtype=ACC)
        b_dnw = tl.zeros([BLOCK_C], dtype=ACC)
        b_dnb = tl.zeros([BLOCK_C], dtype=ACC)
        t_begin = i_g * ROWS_PER_PROG
        t_end = tl.minimum(t_begin + ROWS_PER_PROG, N)
        for t0 in range(t_begin, t_end, BLOCK_T):
            o_t = t0 + tl.arange(0, BLOCK_T)
            m_t = o_t < t_end
            b_lo = tl.load(p_lo + o_t, mask=m_t, other=0)
            b_hi = tl.load(p_hi + o_t, mask=m_t, other=0)
            m_s = b_lo < b_hi  # speech rows (false past t_end too)
            m_tc = m_t[:, None] & m_c[None, :]
            m_sc = m_s[:, None] & m_c[None, :]
            b_g = tl.load(p_g + o_t[:, None] * C + o_c[None, :], mask=m_sc, other=0.0).to(ACC)
            b_dz = b_g
            if GATE:
                b_dz = b_g * tl.load(p_x + o_t[:, None] * ldx + o_c[None, :], mask=m_sc, other=0.0).to(ACC)
            b_db += tl.sum(b_dz, axis=0)
            # Forward taps: z (for dx_r) and the weight gradient sum_t dz[t] * h[t + j - L].
            b_z = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
            for j in range(0, K):
                o_p = o_t + j - L
                m_p = (o_p >= b_lo) & (o_p < b_hi)
                b_h = _conv_input(p_x, p_mean, p_rstd, b_nw, b_nb, o_p, m_p, o_c, m_c, ldx, off_in, LN, ACC)
                if GATE:
                    b_z += b_h * tl.load(p_w + o_c * K + j, mask=m_c, other=0.0)[None, :]
                # This program's own slice of the partial sums: no other program touches it, hence no atomics.
                p_part = p_dw_part + (i_g * C + o_c) * K + j
                tl.store(p_part, tl.load(p_part, mask=m_c, other=0.0) + tl.sum(b_dz * b_h, axis=0), mask=m_c)
            if GATE:
                if HAS_BIAS:
                    b_z += tl.load(p_b + o_c, mask=m_c, other=0.0)[None, :]
                b_dxr = tl.where(m_sc, b_g * b_z, 0.0)
                tl.store(p_dx + o_t[:, None] * ldx + o_c[None, :], b_dxr.to(p_dx.dtype.element_ty), mask=m_tc)
            # Transposed taps: dh[t] = sum_j w[j] * dz[t + L - j] over the same segment.
            b_dh = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
            for j in range(0, K):
                o_s = o_t + L - j
                m_q = (o_s >= b_lo) & (o_s < b_hi)
                m_qc = m_q[:, None] & m_c[None, :]
                b_dzs = tl.load(p_g + o_s[:, None] * C + o_c[None, :], mask=m_qc, other=0.0).to(ACC)
                if GATE:
                    b_dzs *= tl.load(p_x + o_s[:, None] * ldx + o_c[None, :], mask=m_qc, other=0.0).to(ACC)
                b_dh += b_dzs * tl.load(p_w + o_c * K + j, mask=m_c, other=0.0)[None, :]
            if LN:
                b_xg = tl.load(p_x + o_t[:, None] * ldx + off_in + o_c[None, :], mask=m_sc, other=0.0).to(ACC)
                b_mu = tl.load(p_mean + o_t, mask=m_s, other=0.0)
                b_rs = tl.load(p_rstd + o_t, mask=m_s, other=0.0)
                b_xhat = tl.where(m_sc, (b_xg - b_mu[:, None]) * b_rs[:, None], 0.0)
                b_dnw += tl.sum(b_dh * b_xhat, axis=0)
                b_dnb += tl.sum(b_dh, axis=0)
                b_dxhat = b_dh * b_nw[None, :]
                tl.store(p_dxhat + o_t[:, None] * C + o_c[None, :], b_dxhat, mask=m_tc)
                # LayerNorm's backward needs sums over all C channels: this block's share, combined later.
                tl.store(p_rowsum + (2 * i_c) * N + o_t, tl.sum(b_dxhat, axis=1), mask=m_t)
                tl.store(p_rowsum + (2 * i_c + 1) * N + o_t, tl.sum(b_dxhat * b_xhat, axis=1), mask=m_t)
            else:
                tl.store(p_dx + o_t[:, None] * ldx + off_in + o_c[None, :], b_dh.to(p_dx.dtype.element_ty),
                         mask=m_tc)
        tl.store(p_vec_part + (i_g * 3 + 0) * C + o_c, b_db, mask=m_c)
        tl.store(p_vec_part + (i_g * 3 + 1) * C + o_c, b_dnw, mask=m_c)
        tl.store(p_vec_part + (i_g * 3 + 2) * C + o_c, b_dnb, mask=m_c)

    @triton.jit
    def _ln_bwd_dx_kernel(p_x, p_mean, p_rstd, p_dxhat, p_rowsum, p_dx, N, C, ldx, off_in, N_CBLOCKS,
                          ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        i_t = tl.program_id(0).to(tl.int64)
        i_c = tl.program_id(1)
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_t, m_c = o_t < N, o_c < C
        m_tc = m_t[:, None] & m_c[None, :]
        b_a = tl.zeros([BLOCK_T], dtype=ACC)
        b_b = tl.zeros([BLOCK_T], dtype=ACC)
        for i in range(0, N_CBLOCKS):  # in channel-block order: the same sums whatever the launch
            b_a += tl.load(p_rowsum + (2 * i) * N + o_t, mask=m_t, other=0.0)
            b_b += tl.load(p_rowsum + (2 * i + 1) * N + o_t, mask=m_t, other=0.0)
        b_mu = tl.load(p_mean + o_t, mask=m_t, other=0.0)
        b_rs = tl.load(p_rstd + o_t, mask=m_t, other=0.0)  # 0 for text tokens, whose gradient is then 0
        b_xg = tl.load(p_x + o_t[:, None] * ldx + off_in + o_c[None, :], mask=m_tc, other=0.0).to(ACC)
        # where, not the product alone: a text token's x_g is never read, even if inf or NaN (inf * 0 = NaN).
        b_xhat = tl.where(b_rs[:, None] != 0.0, (b_xg - b_mu[:, None]) * b_rs[:, None], 0.0)
        b_dxhat = tl.load(p_dxhat + o_t[:, None] * C + o_c[None, :], mask=m_tc, other=0.0)
        b_dx = b_rs[:, None] * (b_dxhat - (b_a[:, None] + b_xhat * b_b[:, None]) / C)
        tl.store(p_dx + o_t[:, None] * ldx + off_in + o_c[None, :], b_dx.to(p_dx.dtype.element_ty), mask=m_tc)


def _acc(x: torch.Tensor):
    return ref.acc_dtype(x.dtype)


def _launch_config(x: torch.Tensor, channels: int) -> dict:
    block_c = min(triton.next_power_of_2(max(channels, 1)), 64)
    return dict(ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK_T=32, BLOCK_C=block_c,
                num_warps=4)


def _param(t: torch.Tensor | None, acc: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    # Parameters may come in another dtype than x (e.g. fp32 weights with bf16 activations): the kernels read them in
    # the computation dtype. A dummy pointer stands in for an absent one.
    return like.new_empty(1, dtype=acc) if t is None else t.to(acc).contiguous()


def _backward_programs(x: torch.Tensor, n: int, n_cblocks: int, block_t: int) -> tuple[int, int]:
    """(programs along the tokens, rows per program): enough programs to fill the GPU a few times over, few enough
    that the (programs, C, k) weight-gradient partials stay small. Depends on the device, not on the data."""
    if x.is_cuda:
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 4  # the interpreter: fewer, longer programs run faster
    n_blocks = triton.cdiv(n, block_t)
    programs = max(1, min(n_blocks, max(1, target // n_cblocks)))
    rows = triton.cdiv(n_blocks, programs) * block_t
    return triton.cdiv(n, rows), rows


def dwconv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
               speech_mask: torch.Tensor | None, causal: bool, *, ln: tuple | None = None,
               gate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher of both forwards: x (N, U) with the gate (conv input x[:, C:]) or (N, C) without.

    ``ln = (norm_weight, norm_bias, eps)`` switches the LayerNorm on. Returns (out (N, C), mean, rstd); mean/rstd
    are empty without LayerNorm.
    """
    x = x.contiguous()
    n, ldx = x.shape
    c = weight.shape[0]
    k = weight.shape[1]
    acc = _acc(x)
    out = x.new_empty(n, c)
    mean = x.new_empty(n if ln else 0, dtype=acc)
    rstd = x.new_empty(n if ln else 0, dtype=acc)
    if out.numel() == 0:
        return out, mean, rstd
    lo, hi = ref.segment_bounds(n, cu_seqlens, speech_mask)
    cfg = _launch_config(x, c)
    off_in = c if gate else 0
    if ln:
        _ln_stats_kernel[(triton.cdiv(n, cfg["BLOCK_T"]),)](x, lo, hi, mean, rstd, n, c, ldx, off_in, float(ln[2]),
                                                            **cfg)
    grid = (triton.cdiv(n, cfg["BLOCK_T"]), triton.cdiv(c, cfg["BLOCK_C"]))
    _dwconv_fwd_kernel[grid](x, lo, hi, mean if ln else out, rstd if ln else out, _param(ln and ln[0], acc, x),
                             _param(ln and ln[1], acc, x), _param(weight, acc, x), _param(bias, acc, x), out, n, c,
                             ldx, off_in, k, ref.left_pad(k, causal), LN=bool(ln), GATE=gate,
                             HAS_BIAS=bias is not None, **cfg)
    return out, mean, rstd


def dwconv_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               cu_seqlens: torch.Tensor, speech_mask: torch.Tensor | None, causal: bool, *,
               ln: tuple | None = None, gate: bool = False):
    """Triton launcher of both backwards. ``ln = (norm_weight, norm_bias, mean, rstd)``.

    Returns (dx like x, dweight (C, k), dbias (C,), dnorm_weight (C,), dnorm_bias (C,)), the parameter gradients in
    the computation dtype.
    """
    x = x.contiguous()
    grad = grad.to(x.dtype).contiguous()
    n, ldx = x.shape
    c, k = weight.shape
    acc = _acc(x)
    dx = x.new_empty(x.shape)
    if n == 0:
        z = x.new_zeros(c, dtype=acc)
        return dx, x.new_zeros(c, k, dtype=acc), z, z.clone(), z.clone()
    lo, hi = ref.segment_bounds(n, cu_seqlens, speech_mask)
    cfg = _launch_config(x, c)
    n_cblocks = triton.cdiv(c, cfg["BLOCK_C"])
    programs, rows = _backward_programs(x, n, n_cblocks, cfg["BLOCK_T"])
    dw_part = x.new_zeros(programs, c, k, dtype=acc)
    vec_part = x.new_empty(programs, 3, c, dtype=acc)
    dxhat = x.new_empty(n if ln else 0, c, dtype=acc)
    rowsum = x.new_empty(2 * n_cblocks if ln else 0, n, dtype=acc)
    mean, rstd = (ln[2], ln[3]) if ln else (dw_part, dw_part)
    off_in = c if gate else 0
    _dwconv_bwd_kernel[(programs, n_cblocks)](
        grad, x, lo, hi, mean, rstd, _param(ln and ln[0], acc, x), _param(ln and ln[1], acc, x),
        _param(weight, acc, x), _param(bias, acc, x), dx, dxhat if ln else dw_part, rowsum if ln else dw_part,
        dw_part, vec_part, n, c, ldx, off_in, k, ref.left_pad(k, causal), rows, LN=bool(ln), GATE=gate,
        HAS_BIAS=bias is not None, **cfg)
    if ln:
        grid = (triton.cdiv(n, cfg["BLOCK_T"]), n_cblocks)
        _ln_bwd_dx_kernel[grid](x, mean, rstd, dxhat, rowsum, dx, n, c, ldx, off_in, n_cblocks, ACC=cfg["ACC"],
                                BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    # torch.sum over the programs: a fixed reduction order, so deterministic; three separate tensors, since op
    # outputs must not alias each other.
    return dx, dw_part.sum(0), vec_part[:, 0].sum(0), vec_part[:, 1].sum(0), vec_part[:, 2].sum(0)


# ---------------------------------------------------------------------------------------------------- registration


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight as the kernels take it, (C, k): the ops also accept nn.Conv1d's (C, 1, k) (their weight
    gradient then comes back in that shape)."""
    return weight.reshape(weight.shape[0], -1)


@torch.library.custom_op("mdus::cgmlp_gate", mutates_args=())
def _cgmlp_gate_op(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, conv_weight: torch.Tensor,
                   conv_bias: torch.Tensor, cu_seqlens: torch.Tensor, speech_mask: torch.Tensor | None, causal: bool,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_offsets_values(cu_seqlens, "cu_seqlens", x.shape[0], "x.shape[0]")
    conv_weight = _taps(conv_weight)
    backend = _backend.choose_backend("cgmlp_gate_fwd_kernel", x.device)
    if backend in ("cpp", "cuda"):
        return torch.ops.mdus.cgmlp_gate_fwd_kernel(x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens,
                                                    speech_mask, causal, eps)
    if backend == "triton":
        return dwconv_fwd(x, conv_weight, conv_bias, cu_seqlens, speech_mask, causal,
                          ln=(norm_weight, norm_bias, eps), gate=True)
    return _backend.contiguous(ref.cgmlp_gate_fwd(x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens,
                                                  speech_mask, causal, eps))


@_cgmlp_gate_op.register_fake
def _(x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, causal, eps):
    acc = _acc(x)
    return (x.new_empty(x.shape[0], x.shape[1] // 2), x.new_empty(x.shape[0], dtype=acc),
            x.new_empty(x.shape[0], dtype=acc))


@torch.library.custom_op("mdus::cgmlp_gate_backward", mutates_args=())
def _cgmlp_gate_backward_op(grad: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor,
                            norm_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                            cu_seqlens: torch.Tensor, speech_mask: torch.Tensor | None, mean: torch.Tensor,
                            rstd: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor, torch.Tensor]:
    shape, conv_weight = conv_weight.shape, _taps(conv_weight)
    backend = _backend.choose_backend("cgmlp_gate_bwd_kernel", x.device)
    if backend in ("cpp", "cuda"):
        dx, dnw, dnb, dcw, dcb = torch.ops.mdus.cgmlp_gate_bwd_kernel(
            grad, x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, mean, rstd, causal)
    elif backend == "triton":
        dx, dcw, dcb, dnw, dnb = dwconv_bwd(grad, x, conv_weight, conv_bias, cu_seqlens, speech_mask, causal,
                                            ln=(norm_weight, norm_bias, mean, rstd), gate=True)
    else:
        dx, dnw, dnb, dcw, dcb = _backend.contiguous(ref.cgmlp_gate_bwd(
            grad, x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, mean, rstd, causal))
    return (dx, dnw.to(norm_weight.dtype), dnb.to(norm_bias.dtype), dcw.reshape(shape).to(conv_weight.dtype),
            dcb.to(conv_bias.dtype))


@_cgmlp_gate_backward_op.register_fake
def _(grad, x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, mean, rstd, causal):
    return tuple(t.new_empty(t.shape) for t in (x, norm_weight, norm_bias, conv_weight, conv_bias))


def _cgmlp_setup_context(ctx, inputs, output):
    x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, causal, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.causal = causal
    # mean/rstd (8 bytes a token) are all the backward keeps beyond the inputs: h and z are recomputed.
    ctx.save_for_backward(x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, mean, rstd)


def _cgmlp_backward(ctx, grad, _grad_mean, _grad_rstd):
    x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, mean, rstd = ctx.saved_tensors
    dx, dnw, dnb, dcw, dcb = torch.ops.mdus.cgmlp_gate_backward(grad, x, norm_weight, norm_bias, conv_weight,
                                                                conv_bias, cu_seqlens, speech_mask, mean, rstd,
                                                                ctx.causal)
    return dx, dnw, dnb, dcw, dcb, None, None, None, None


_cgmlp_gate_op.register_autograd(_cgmlp_backward, setup_context=_cgmlp_setup_context)


@torch.library.custom_op("mdus::depthwise_conv1d", mutates_args=())
def _dwconv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
               speech_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    check_offsets_values(cu_seqlens, "cu_seqlens", x.shape[0], "x.shape[0]")
    weight = _taps(weight)
    backend = _backend.choose_backend("depthwise_conv1d_fwd_kernel", x.device)
    if backend in ("cpp", "cuda"):
        return torch.ops.mdus.depthwise_conv1d_fwd_kernel(x, weight, bias, cu_seqlens, speech_mask, causal)
    if backend == "triton":
        return dwconv_fwd(x, weight, bias, cu_seqlens, speech_mask, causal)[0]
    return ref.depthwise_conv1d_fwd(x, weight, bias, cu_seqlens, speech_mask, causal).contiguous()


@_dwconv_op.register_fake
def _(x, weight, bias, cu_seqlens, speech_mask, causal):
    return x.new_empty(x.shape)


@torch.library.custom_op("mdus::depthwise_conv1d_backward", mutates_args=())
def _dwconv_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor,
                        speech_mask: torch.Tensor | None,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape, weight = weight.shape, _taps(weight)
    backend = _backend.choose_backend("depthwise_conv1d_bwd_kernel", x.device)
    if backend in ("cpp", "cuda"):
        dx, dw, db = torch.ops.mdus.depthwise_conv1d_bwd_kernel(grad, x, weight, cu_seqlens, speech_mask, causal)
    elif backend == "triton":
        dx, dw, db, _, _ = dwconv_bwd(grad, x, weight, None, cu_seqlens, speech_mask, causal)
    else:
        dx, dw, db = _backend.contiguous(ref.depthwise_conv1d_bwd(grad, x, weight, cu_seqlens, speech_mask, causal))
    return dx, dw.reshape(shape).to(weight.dtype), db.to(weight.dtype)


@_dwconv_backward_op.register_fake
def _(grad, x, weight, cu_seqlens, speech_mask, causal):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), x.new_empty(weight.shape[0], dtype=weight.dtype)


def _dwconv_setup_context(ctx, inputs, output):
    x, weight, bias, cu_seqlens, speech_mask, causal = inputs
    ctx.causal = causal
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, cu_seqlens, speech_mask)


def _dwconv_backward(ctx, grad):
    x, weight, cu_seqlens, speech_mask = ctx.saved_tensors
    dx, dw, db = torch.ops.mdus.depthwise_conv1d_backward(grad, x, weight, cu_seqlens, speech_mask, ctx.causal)
    return dx, dw, None if ctx.bias_dtype is None else db.to(ctx.bias_dtype), None, None, None


_dwconv_op.register_autograd(_dwconv_backward, setup_context=_dwconv_setup_context)


# ------------------------------------------------------------------------------------------------------ public API


def _check_layout(x, cu_seqlens, speech_mask, feature: str):
    """Checks x against its layout; returns (packed x (N, F), cu_seqlens, packed speech_mask or None)."""
    if cu_seqlens is None:
        check_tensor(x, "x", ndim=3, dtypes=FLOAT_DTYPES,
                     shape_doc=f"(B, T, {feature}) when cu_seqlens is None (pass cu_seqlens for a packed "
                               f"(total, {feature}) x)")
    else:
        check_tensor(x, "x", ndim=2, dtypes=FLOAT_DTYPES, shape_doc=f"(total, {feature}) when cu_seqlens is given")
        check_offsets(cu_seqlens, "cu_seqlens", device=x.device)
    if speech_mask is not None:
        check_tensor(speech_mask, "speech_mask", dtypes=(torch.bool,), device=x.device)
        if speech_mask.shape != x.shape[:-1]:
            expected = "(total,)" if cu_seqlens is not None else "(B, T)"
            raise ValueError(f"speech_mask must be {expected} like x's leading dimensions {tuple(x.shape[:-1])}, "
                             f"got shape {tuple(speech_mask.shape)}")
    if cu_seqlens is None:
        b, t = x.shape[:2]
        cu_seqlens = torch.arange(b + 1, device=x.device, dtype=torch.int64) * t
        x = x.reshape(b * t, x.shape[2])
        speech_mask = None if speech_mask is None else speech_mask.reshape(b * t)
    return x, cu_seqlens, speech_mask


def _check_vector(t, name: str, channels: int, device: torch.device) -> None:
    check_tensor(t, name, ndim=1, dtypes=FLOAT_DTYPES, device=device, shape_doc=f"({channels},)")
    if t.shape[0] != channels:
        raise ValueError(f"{name} must be ({channels},), got shape {tuple(t.shape)}")


def _check_conv_weight(w, name: str, channels: int, device: torch.device) -> torch.Tensor:
    """(C, 1, k) or (C, k) -> a (C, k) view."""
    check_tensor(w, name, dtypes=FLOAT_DTYPES, device=device)
    if not ((w.dim() == 3 and w.shape[1] == 1) or w.dim() == 2) or w.shape[0] != channels:
        raise ValueError(f"{name} must be ({channels}, 1, k) or ({channels}, k), got shape {tuple(w.shape)}")
    k = w.shape[-1]
    if not 1 <= k <= MAX_KERNEL_SIZE:
        raise ValueError(f"{name}'s kernel size k must be in [1, {MAX_KERNEL_SIZE}], got {k}")
    return w.reshape(channels, k)


def _check_flags(causal, eps=None) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if eps is not None:
        check_number(eps, "eps", "a float > 0", ok=lambda v: v > 0)


def cgmlp_gate(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, conv_weight: torch.Tensor,
               conv_bias: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
               speech_mask: torch.Tensor | None = None, causal: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """The cgMLP gate, fused: ``x_r * (DWConv_k(LayerNorm(x_g)) + conv_bias)``, ``x_r, x_g = x.chunk(2, -1)``.

    ESPnet's ConvolutionalSpatialGatingUnit (without its optional linear and activation) in one pass, segment-aware:
    the conv never crosses a sequence of a packed batch, nor (with ``speech_mask``) a change between speech and text
    tokens. See ``mdus_kernels.reference.cgmlp`` for the exact definition.

    Args:
        x: ``(total, U)`` packed with ``cu_seqlens``, or ``(B, T, U)`` padded (each row one sequence); U even,
            float16/bfloat16/float32/float64.
        norm_weight, norm_bias: ``(U/2,)`` LayerNorm affine parameters.
        conv_weight: ``(U/2, 1, k)`` (``nn.Conv1d(groups=U/2)``'s layout) or ``(U/2, k)``, ``1 <= k <= 63``.
        conv_bias: ``(U/2,)``.
        cu_seqlens: ``(B + 1,)`` int32/int64 sequence boundaries of a packed x.
        speech_mask: ``(total,)`` / ``(B, T)`` bool, True on speech tokens. The conv runs within each maximal run
            of speech tokens; text tokens output 0 and get zero gradient. None: every token is speech.
        causal: left padding ``k - 1`` (a token sees itself and the k - 1 before it) instead of "same" padding.
        eps: the LayerNorm epsilon (ESPnet's LayerNorm uses 1e-12).

    Returns:
        ``(..., U/2)`` in x's dtype, computed in fp32 (fp64 for fp64). Differentiable w.r.t. x and the four
        parameters; parameters may have another float dtype than x.

    Example:
        >>> x = torch.randn(10, 8)
        >>> c = 4
        >>> out = cgmlp_gate(x, torch.ones(c), torch.zeros(c), torch.randn(c, 1, 3), torch.ones(c),
        ...                  cu_seqlens=torch.tensor([0, 6, 10]))
        >>> out.shape
        torch.Size([10, 4])
    """
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] % 2:
        raise ValueError(f"x's last dimension U must be even (it splits into x_r and x_g), got {x.shape[-1]}")
    xp, cu, mask = _check_layout(x, cu_seqlens, speech_mask, "U")
    c = xp.shape[1] // 2
    if c == 0:
        raise ValueError("x's last dimension U must be >= 2")
    _check_vector(norm_weight, "norm_weight", c, x.device)
    _check_vector(norm_bias, "norm_bias", c, x.device)
    cw = _check_conv_weight(conv_weight, "conv_weight", c, x.device)
    _check_vector(conv_bias, "conv_bias", c, x.device)
    _check_flags(causal, eps)
    out, _, _ = torch.ops.mdus.cgmlp_gate(xp, norm_weight, norm_bias, cw, conv_bias, cu, mask, causal, float(eps))
    return out.reshape(*x.shape[:-1], c)


def depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     cu_seqlens: torch.Tensor | None = None, speech_mask: torch.Tensor | None = None,
                     causal: bool = False) -> torch.Tensor:
    """Segment-aware depthwise conv over time: ``(total, C)`` packed or ``(B, T, C)`` padded -> the same shape.

    ``y[t, c] = bias[c] + sum_j weight[c, j] * x[t + j - L, c]``, reading 0 outside t's sequence (or speech run,
    with ``speech_mask``); ``L = (k - 1) // 2`` ("same" padding, ``nn.Conv1d(C, C, k, padding=(k-1)//2, groups=C)``
    per sequence for odd k) or ``k - 1`` (causal).

    Args:
        x: ``(total, C)`` with ``cu_seqlens``, or ``(B, T, C)``; float16/bfloat16/float32/float64.
        weight: ``(C, 1, k)`` or ``(C, k)``, ``1 <= k <= 63``.
        bias: ``(C,)`` or None.
        cu_seqlens, speech_mask, causal: as for :func:`cgmlp_gate` (text tokens output 0).

    Example:
        >>> x = torch.randn(2, 5, 3)
        >>> depthwise_conv1d(x, torch.randn(3, 1, 3), torch.zeros(3)).shape
        torch.Size([2, 5, 3])
    """
    xp, cu, mask = _check_layout(x, cu_seqlens, speech_mask, "C")
    c = xp.shape[1]
    w = _check_conv_weight(weight, "weight", c, x.device)
    if bias is not None:
        _check_vector(bias, "bias", c, x.device)
    _check_flags(causal)
    return torch.ops.mdus.depthwise_conv1d(xp, w, bias, cu, mask, causal).reshape(x.shape)
