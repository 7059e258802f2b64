"""Insert-layer attention: FlashAttention-2-style Triton kernels, a CPU path on ATen's fused SDPA kernels,
registration and the public API.

The specification is ``mdus_kernels.reference.attention``. Two registered ops:

* ``mdus::attention_fwd(q, k, v, cu_q, cu_k, prefix_lens, max_q, max_k, causal, scale, deterministic)``
  -> ``(out, lse)``, packed layout only (the public function maps the padded layout onto it without copies).
* ``mdus::attention_bwd(dout, dlse, q, k, v, out, lse, ...)`` -> ``(dq, dk, dv)``, the registered backward.

Triton kernels (one program per (block of rows, sequence, head)):

* forward: online softmax in fp32 with exp2, two key loops per query block: the keys every row of the block
  sees run without any mask arithmetic, only the blocks on the causal diagonal / prefix edge / sequence end pay
  for it. Programs past a short sequence's end exit at once, so varlen costs what its tokens cost.
* backward: ``delta = rowsum(dout * out) - dlse`` in a small kernel, then dK/dV with one program per key block
  and KV head that loops over the query heads of its GQA group (so dK/dV of a shared head are summed in
  registers, never with atomics), and dQ with one program per query block. No atomics anywhere, so every
  backward is deterministic. ``deterministic=True`` additionally bypasses the autotuner (whose pick may differ
  between processes) so that the bits are the same from one run to the next.

GQA never materializes repeated K/V: query head ``h`` reads KV head ``h // (Hq // Hkv)`` through its stride.
Head dims that are not powers of two are padded to the next one inside the kernel (masked loads).

Precision: dot products accumulate in fp32 from fp16/bf16 inputs. fp32 inputs are multiplied in full fp32
(``input_precision="ieee"``, not TF32) so that fp32 means fp32. The CPU path computes in ATen's kernels (fp32
accumulation; fp64 for fp64 inputs).
"""

import torch

from mdus_kernels import _backend
from mdus_kernels._checks import check_number, check_offsets, check_offsets_values, check_tensor, longest_segment
from mdus_kernels.reference import attention as ref

# float64 is for gradcheck on the CPU and reference paths; the Triton kernels take the other three.
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

triton = _backend.triton_module()
if triton is not None:
    import triton.language as tl

    @triton.jit
    def _seq_bounds(p_cu_q, p_cu_k, p_prefix, i_b, total_q, total_k, HAS_PREFIX: tl.constexpr):
        # Clamped so that unchecked bad offsets stay inside the tensors.
        bos_q = tl.minimum(tl.maximum(tl.load(p_cu_q + i_b).to(tl.int64), 0), total_q)
        eos_q = tl.minimum(tl.maximum(tl.load(p_cu_q + i_b + 1).to(tl.int64), bos_q), total_q)
        bos_k = tl.minimum(tl.maximum(tl.load(p_cu_k + i_b).to(tl.int64), 0), total_k)
        eos_k = tl.minimum(tl.maximum(tl.load(p_cu_k + i_b + 1).to(tl.int64), bos_k), total_k)
        if HAS_PREFIX:
            prefix = tl.load(p_prefix + i_b).to(tl.int64)
        else:
            prefix = tl.zeros([], dtype=tl.int64)
        return bos_q, eos_q - bos_q, bos_k, eos_k - bos_k, prefix

    @triton.jit
    def _load_tile(p, rows, s_t, o_d, m_rows, m_d, UPCAST: tl.constexpr, TRANSPOSED: tl.constexpr):
        """One head's (rows, D) tile of a (tokens, heads, D) tensor, ``p`` pointing at the head; 0 outside the
        masks; (D, rows) with TRANSPOSED; fp32 with UPCAST (the interpreter's bf16 dot is wrong)."""
        if TRANSPOSED:
            b = tl.load(p + rows[None, :] * s_t + o_d[:, None], mask=m_rows[None, :] & m_d[:, None], other=0.0)
        else:
            b = tl.load(p + rows[:, None] * s_t + o_d[None, :], mask=m_rows[:, None] & m_d[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        return b

    @triton.jit
    def _visible(o_m, o_n, lk, off, prefix, CAUSAL: tl.constexpr):
        # (rows, cols) of the spec's mask: key in range and, when causal, on or below the bottom-right diagonal
        # or inside the prefix.
        vis = (o_n < lk)[None, :] & (o_m >= 0)[:, None]
        if CAUSAL:
            vis = vis & ((o_n[None, :] <= o_m[:, None] + off) | (o_n[None, :] < prefix))
        return vis

    @triton.jit
    def _fwd_block(b_q, acc, l_i, m_i, p_k, p_v, bos_k, n0, o_m, o_d, m_d, lk, off, prefix, s_kt, s_vt,
                   scale_log2, CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < lk
        b_kt = _load_tile(p_k, bos_k + o_n, s_kt, o_d, m_n, m_d, UPCAST, True)
        b_v = _load_tile(p_v, bos_k + o_n, s_vt, o_d, m_n, m_d, UPCAST, False)
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * scale_log2
        if MASKED:
            b_s = tl.where(_visible(o_m, o_n, lk, off, prefix, CAUSAL), b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        # Rows that have seen no visible key yet keep m = -inf; shifting by 0 instead avoids inf - inf = NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_p = tl.math.exp2(b_s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        return acc, l_i, m_new

    @triton.jit
    def _fwd_key_ranges(m0, lk, off, prefix, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        """(end of the unmasked key blocks, end of all key blocks) for the query rows m0:m0+BLOCK_M."""
        if CAUSAL:
            # Rows i >= m0 see every key j <= m0 + off and every key j < prefix; the last row sees j <= last + off.
            n_end = tl.minimum(tl.maximum(m0 + BLOCK_M + off, prefix), lk)
            n_full = tl.minimum(tl.maximum(m0 + 1 + off, prefix), lk)
        else:
            n_end = lk
            n_full = lk
        n_end = tl.maximum(n_end, 0)
        n_full = (tl.maximum(tl.minimum(n_full, n_end), 0) // BLOCK_N) * BLOCK_N
        return n_full, n_end

    @triton.jit
    def _attn_fwd_kernel(p_q, p_k, p_v, p_o, p_lse, p_cu_q, p_cu_k, p_prefix, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh,
                         s_ot, s_oh, total_q, total_k, D, scale_log2, GROUP: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        i_m = tl.program_id(0)
        i_b = tl.program_id(1)
        i_h = tl.program_id(2).to(tl.int64)
        bos_q, lq, bos_k, lk, prefix = _seq_bounds(p_cu_q, p_cu_k, p_prefix, i_b, total_q, total_k, HAS_PREFIX)
        m0 = i_m * BLOCK_M
        if m0 >= lq:
            return
        i_hk = i_h // GROUP
        off = lk - lq
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < lq
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_q = _load_tile(p_q + i_h * s_qh, bos_q + o_m, s_qt, o_d, m_m, m_d, UPCAST, False)
        p_kh = p_k + i_hk * s_kh
        p_vh = p_v + i_hk * s_vh
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        n_full, n_end = _fwd_key_ranges(m0, lk, off, prefix, CAUSAL, BLOCK_M, BLOCK_N)
        for n0 in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _fwd_block(b_q, acc, l_i, m_i, p_kh, p_vh, bos_k, n0, o_m, o_d, m_d, lk, off, prefix,
                                       s_kt, s_vt, scale_log2, CAUSAL, False, UPCAST, PRECISION, BLOCK_N)
        for n0 in range(n_full, n_end, BLOCK_N):
            acc, l_i, m_i = _fwd_block(b_q, acc, l_i, m_i, p_kh, p_vh, bos_k, n0, o_m, o_d, m_d, lk, off, prefix,
                                       s_kt, s_vt, scale_log2, CAUSAL, True, UPCAST, PRECISION, BLOCK_N)
        # A row that saw no key has l = 0 and acc = 0: it gives 0 and lse = -inf (the spec), not 0/0.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        b_o = acc / l_safe[:, None]
        tl.store(p_o + (bos_q + o_m)[:, None] * s_ot + i_h * s_oh + o_d[None, :], b_o.to(p_o.dtype.element_ty),
                 mask=m_m[:, None] & m_d[None, :])
        b_lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(p_lse + i_h * total_q + bos_q + o_m, b_lse, mask=m_m)

    @triton.jit
    def _attn_bwd_delta_kernel(p_o, p_do, p_dlse, p_delta, s_ot, s_oh, s_dot, s_doh, total_q, D,
                               HAS_DLSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # delta = rowsum(dout * out) - dlse: the softmax-backward term shared by dQ and dK.
        i_t = tl.program_id(0)
        i_h = tl.program_id(1).to(tl.int64)
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        m_t = o_t < total_q
        o_d = tl.arange(0, BLOCK_D)
        m = m_t[:, None] & (o_d < D)[None, :]
        b_o = tl.load(p_o + o_t[:, None] * s_ot + i_h * s_oh + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_do = tl.load(p_do + o_t[:, None] * s_dot + i_h * s_doh + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_delta = tl.sum(b_o * b_do, 1)
        if HAS_DLSE:
            b_delta -= tl.load(p_dlse + i_h * total_q + o_t, mask=m_t, other=0.0).to(tl.float32)
        tl.store(p_delta + i_h * total_q + o_t, b_delta, mask=m_t)

    @triton.jit
    def _load_row_stats(p_lse, p_delta, i_h, total_q, bos_q, o_m, m_m):
        b_lse = tl.load(p_lse + i_h * total_q + bos_q + o_m, mask=m_m, other=0.0)
        # A row that saw no key has lse = -inf; +inf makes its probabilities exp(s - inf) = 0 instead of inf.
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
        b_delta = tl.load(p_delta + i_h * total_q + bos_q + o_m, mask=m_m, other=0.0)
        return b_lse, b_delta

    @triton.jit
    def _dkdv_block(b_k, b_v, dk, dv, p_q, p_do, p_lse, p_delta, i_h, m0, o_n, o_d, m_d, bos_q, lq, lk, off,
                    prefix, total_q, s_qt, s_qh, s_dot, s_doh, scale_log2, CAUSAL: tl.constexpr,
                    MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < lq
        # Rows past the sequence load q = dout = 0, so they add nothing to dK and dV even unmasked.
        b_q = _load_tile(p_q + i_h * s_qh, bos_q + o_m, s_qt, o_d, m_m, m_d, UPCAST, False)
        b_do = _load_tile(p_do + i_h * s_doh, bos_q + o_m, s_dot, o_d, m_m, m_d, UPCAST, False)
        b_lse, b_delta = _load_row_stats(p_lse, p_delta, i_h, total_q, bos_q, o_m, m_m)
        # Work on the transposed scores (keys x rows) so that dK and dV come out of plain dots.
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * scale_log2
        b_pt = tl.math.exp2(b_st - b_lse[None, :])
        if MASKED:
            b_pt = tl.where(tl.trans(_visible(o_m, o_n, lk, off, prefix, CAUSAL)), b_pt, 0.0)
        dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(p_q, p_k, p_v, p_do, p_lse, p_delta, p_dk, p_dv, p_cu_q, p_cu_k, p_prefix,
                              s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dkt, s_dkh, s_dvt, s_dvh,
                              total_q, total_k, D, scale, scale_log2, GROUP: tl.constexpr,
                              CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
                              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        i_n = tl.program_id(0)
        i_b = tl.program_id(1)
        i_hk = tl.program_id(2).to(tl.int64)
        bos_q, lq, bos_k, lk, prefix = _seq_bounds(p_cu_q, p_cu_k, p_prefix, i_b, total_q, total_k, HAS_PREFIX)
        n0 = i_n * BLOCK_N
        if n0 >= lk:
            return
        off = lk - lq
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < lk
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < D
        m_nd = m_n[:, None] & m_d[None, :]
        b_k = _load_tile(p_k + i_hk * s_kh, bos_k + o_n, s_kt, o_d, m_n, m_d, UPCAST, False)
        b_v = _load_tile(p_v + i_hk * s_vh, bos_k + o_n, s_vt, o_d, m_n, m_d, UPCAST, False)
        # Rows that see any key of this block start at q_start; rows from q_full on see all of them.
        if CAUSAL:
            if n0 < prefix:
                q_start = tl.zeros([], dtype=tl.int64)
            else:
                q_start = tl.maximum(n0 - off, 0)
            if n0 + BLOCK_N <= prefix:
                q_full = q_start
            else:
                q_full = tl.maximum(n0 + BLOCK_N - 1 - off, q_start)
        else:
            q_start = tl.zeros([], dtype=tl.int64)
            q_full = q_start
        if n0 + BLOCK_N > lk:
            q_full = lq  # keys past the sequence end: mask every row
        q_full = q_start + tl.cdiv(tl.minimum(q_full, lq) - q_start, BLOCK_M) * BLOCK_M
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(GROUP):
            i_h = i_hk * GROUP + g
            for m0 in range(q_start, q_full, BLOCK_M):
                dk, dv = _dkdv_block(b_k, b_v, dk, dv, p_q, p_do, p_lse, p_delta, i_h, m0, o_n, o_d, m_d, bos_q,
                                     lq, lk, off, prefix, total_q, s_qt, s_qh, s_dot, s_doh, scale_log2, CAUSAL,
                                     True, UPCAST, PRECISION, BLOCK_M)
            for m0 in range(q_full, lq, BLOCK_M):
                dk, dv = _dkdv_block(b_k, b_v, dk, dv, p_q, p_do, p_lse, p_delta, i_h, m0, o_n, o_d, m_d, bos_q,
                                     lq, lk, off, prefix, total_q, s_qt, s_qh, s_dot, s_doh, scale_log2, CAUSAL,
                                     False, UPCAST, PRECISION, BLOCK_M)
        tl.store(p_dk + (bos_k + o_n)[:, None] * s_dkt + i_hk * s_dkh + o_d[None, :],
                 (dk * scale).to(p_dk.dtype.element_ty), mask=m_nd)
        tl.store(p_dv + (bos_k + o_n)[:, None] * s_dvt + i_hk * s_dvh + o_d[None, :],
                 dv.to(p_dv.dtype.element_ty), mask=m_nd)

    @triton.jit
    def _dq_block(b_q, b_do, b_lse, b_delta, dq, p_k, p_v, bos_k, n0, o_m, o_d, m_d, lk, off, prefix, s_kt, s_vt,
                  scale_log2, CAUSAL: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < lk
        b_kt = _load_tile(p_k, bos_k + o_n, s_kt, o_d, m_n, m_d, UPCAST, True)
        b_vt = _load_tile(p_v, bos_k + o_n, s_vt, o_d, m_n, m_d, UPCAST, True)
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * scale_log2
        b_p = tl.math.exp2(b_s - b_lse[:, None])
        if MASKED:
            b_p = tl.where(_visible(o_m, o_n, lk, off, prefix, CAUSAL), b_p, 0.0)
        b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq, p_cu_q, p_cu_k, p_prefix,
                            s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dqt, s_dqh,
                            total_q, total_k, D, scale, scale_log2, GROUP: tl.constexpr,
                            CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        i_m = tl.program_id(0)
        i_b = tl.program_id(1)
        i_h = tl.program_id(2).to(tl.int64)
        bos_q, lq, bos_k, lk, prefix = _seq_bounds(p_cu_q, p_cu_k, p_prefix, i_b, total_q, total_k, HAS_PREFIX)
        m0 = i_m * BLOCK_M
        if m0 >= lq:
            return
        i_hk = i_h // GROUP
        off = lk - lq
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < lq
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < D
        m_md = m_m[:, None] & m_d[None, :]
        b_q = _load_tile(p_q + i_h * s_qh, bos_q + o_m, s_qt, o_d, m_m, m_d, UPCAST, False)
        b_do = _load_tile(p_do + i_h * s_doh, bos_q + o_m, s_dot, o_d, m_m, m_d, UPCAST, False)
        b_lse, b_delta = _load_row_stats(p_lse, p_delta, i_h, total_q, bos_q, o_m, m_m)
        p_kh = p_k + i_hk * s_kh
        p_vh = p_v + i_hk * s_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_full, n_end = _fwd_key_ranges(m0, lk, off, prefix, CAUSAL, BLOCK_M, BLOCK_N)
        for n0 in range(0, n_full, BLOCK_N):
            dq = _dq_block(b_q, b_do, b_lse, b_delta, dq, p_kh, p_vh, bos_k, n0, o_m, o_d, m_d, lk, off, prefix,
                           s_kt, s_vt, scale_log2, CAUSAL, False, UPCAST, PRECISION, BLOCK_N)
        for n0 in range(n_full, n_end, BLOCK_N):
            dq = _dq_block(b_q, b_do, b_lse, b_delta, dq, p_kh, p_vh, bos_k, n0, o_m, o_d, m_d, lk, off, prefix,
                           s_kt, s_vt, scale_log2, CAUSAL, True, UPCAST, PRECISION, BLOCK_N)
        tl.store(p_dq + (bos_q + o_m)[:, None] * s_dqt + i_h * s_dqh + o_d[None, :],
                 (dq * scale).to(p_dq.dtype.element_ty), mask=m_md)

    # Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim bucket (BLOCK_D <= 64,
    # 128, 256) for the GPU autotuner; the first of each list is the fixed choice of deterministic=True. Every one
    # compiles for sm_90 without spilling registers, with Triton 3.6 (the GPU image's) and 3.9
    # (`python scripts/check_sm90.py`): large head dims need small tiles or 8 warps. These are for fp16/bf16.
    _TILES = {
        "fwd": {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
                128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2)],
                256: [(64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3), (32, 64, 8, 3)]},
        "dkdv": {64: [(32, 64, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (32, 64, 4, 2)],
                 128: [(16, 64, 8, 2), (32, 32, 8, 3), (16, 32, 8, 3)],
                 256: [(16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)]},
        "dq": {64: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 16, 4, 2)],
               128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3), (64, 16, 4, 2)],
               256: [(64, 32, 8, 2), (128, 16, 8, 3), (32, 64, 8, 2), (64, 16, 8, 3)]},
    }
    # fp32 inputs compute in IEEE fp32 (PRECISION="ieee"): no tensor cores, so the products live in registers and
    # only small tiles stay spill-free (at head dims up to 128; at 256 every tile tried spills 32-136 bytes).
    _TILES_FP32 = {
        "fwd": {64: [(64, 32, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2)],
                128: [(32, 64, 8, 2), (32, 16, 8, 2), (16, 64, 8, 2)],
                256: [(16, 16, 8, 2), (16, 32, 8, 2)]},
        "dkdv": {64: [(16, 16, 4, 2)],
                 128: [(32, 16, 8, 2), (64, 16, 8, 2)],
                 256: [(16, 16, 8, 2), (16, 32, 8, 2)]},
        "dq": {64: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
               128: [(32, 32, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2), (32, 16, 8, 2)],
               256: [(16, 16, 8, 2), (16, 32, 8, 2)]},
    }
    _TUNE_KEY = ["BLOCK_D", "CAUSAL", "HAS_PREFIX", "GROUP", "PRECISION"]

    def _config(tile):
        m, n, w, s = tile
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)

    def _tiles(name: str, block_d: int, precision: str) -> list:
        """The candidate configs of kernel ``name`` for head dims padded to ``block_d`` at ``precision``."""
        table = _TILES_FP32 if precision == "ieee" else _TILES
        return [_config(t) for t in table[name][64 if block_d <= 64 else 128 if block_d <= 128 else 256]]

    def _pruner(name: str):
        def prune(configs, named_args, **kwargs):
            arg = lambda key: kwargs.get(key, named_args.get(key))  # noqa: E731
            keep = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    for c in _tiles(name, arg("BLOCK_D"), arg("PRECISION"))}
            return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    in keep]
        return prune

    _kernels = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
    _tuned = {
        name: triton.autotune(configs=[_config(t) for t in dict.fromkeys(t for table in (_TILES, _TILES_FP32)
                                                                            for ts in table[name].values()
                                                                            for t in ts)],
                              key=_TUNE_KEY, prune_configs_by={"early_config_prune": _pruner(name)})(kernel)
        for name, kernel in _kernels.items()
    }


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _launch(name: str, grid_rows: int, grid_rest: tuple, deterministic: bool, args: tuple, **meta):
    """Launches one kernel: autotuned on GPU; one fixed config under the interpreter (small tiles, it is slow) and
    for ``deterministic=True`` (the same tiles in every process)."""
    kernel = _kernels[name]
    if _backend.triton_interpreting():
        grid = (triton.cdiv(grid_rows, 16), *grid_rest)
        kernel[grid](*args, BLOCK_M=16, BLOCK_N=16, **meta)
        return
    if deterministic:
        cfg = _tiles(name, meta["BLOCK_D"], meta["PRECISION"])[0]
        block = cfg.kwargs["BLOCK_N" if name == "dkdv" else "BLOCK_M"]
        kernel[(triton.cdiv(grid_rows, block), *grid_rest)](*args, **cfg.kwargs, num_warps=cfg.num_warps,
                                                            num_stages=cfg.num_stages, **meta)
        return
    axis = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
    _tuned[name][lambda m: (triton.cdiv(grid_rows, m[axis]), *grid_rest)](*args, **meta)


def _common_meta(q, k, causal, prefix_lens):
    upcast = _backend.triton_interpreting() and q.dtype == torch.bfloat16  # the interpreter's bf16 dot is wrong
    return dict(GROUP=q.shape[1] // k.shape[1], CAUSAL=causal, HAS_PREFIX=prefix_lens is not None,
                UPCAST=upcast, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_D=_block_d(q.shape[-1]))


def _index_args(cu_q, cu_k, prefix_lens):
    """The kernels index cu_seqlens and prefix_lens densely (``p + b``): strided views must be made contiguous.
    Without a prefix the kernels never read ``prefix`` (HAS_PREFIX=False); cu_q stands in for the pointer."""
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    return cu_q, cu_k, (prefix_lens.contiguous() if prefix_lens is not None else cu_q)


def attention_fwd_triton(q, k, v, cu_q, cu_k, prefix_lens, max_q, causal, scale, deterministic):
    total_q, hq, d = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty(hq, total_q, dtype=torch.float32, device=q.device)
    batch = cu_q.shape[0] - 1
    if total_q == 0 or batch == 0:
        return out, lse
    cu_q, cu_k, prefix = _index_args(cu_q, cu_k, prefix_lens)
    args = (q, k, v, out, lse, cu_q, cu_k, prefix, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), out.stride(0), out.stride(1), total_q, k.shape[0], d, scale * _LOG2E)
    _launch("fwd", max_q, (batch, hq), deterministic, args, **_common_meta(q, k, causal, prefix_lens))
    return out, lse


def attention_bwd_triton(dout, dlse, q, k, v, out, lse, cu_q, cu_k, prefix_lens, max_q, max_k, causal, scale,
                         deterministic):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    dq, dk, dv = q.new_empty(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)  # keys of no sequence get 0
    batch = cu_q.shape[0] - 1
    if total_q == 0 or batch == 0 or k.shape[0] == 0:
        return dq.zero_(), dk, dv
    meta = _common_meta(q, k, causal, prefix_lens)
    delta = torch.empty(hq, total_q, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(total_q, 64), hq)](
        out, dout, dlse if dlse is not None else lse, delta, out.stride(0), out.stride(1), dout.stride(0),
        dout.stride(1), total_q, d, HAS_DLSE=dlse is not None, BLOCK_T=64, BLOCK_D=meta["BLOCK_D"])
    cu_q, cu_k, prefix = _index_args(cu_q, cu_k, prefix_lens)
    common = (cu_q, cu_k, prefix, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              dout.stride(0), dout.stride(1))
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, *common, dk.stride(0), dk.stride(1), dv.stride(0),
                 dv.stride(1), total_q, k.shape[0], d, scale, scale * _LOG2E)
    _launch("dkdv", max_k, (batch, hkv), deterministic, dkdv_args, **meta)
    dq_args = (q, k, v, dout, lse, delta, dq, *common, dq.stride(0), dq.stride(1), total_q, k.shape[0], d, scale,
               scale * _LOG2E)
    _launch("dq", max_q, (batch, hq), deterministic, dq_args, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------- CPU path (ATen SDPA)


def _cpu_groups(cu_q, cu_k, prefix_lens, causal, scale):
    """Batches of sequences for ATen's fused CPU kernels, which take (B, H, L, D) batches of equal lengths: all
    sequences at once when they share (Lq, Lk, prefix) (the padded layout), else one call per sequence.

    Yields (first query row, first key row, sequences, Lq, Lk, first live row, is_causal, additive-mask maker).
    Rows before the first live row see no key: they stay 0 with lse = -inf by the spec (ATen would give lse = 0),
    so they are left out of the call. ``is_causal`` is used only where ATen's top-left causal mask equals ours,
    and only for a positive scale: ATen scales its causal mask too, and 0 or a negative scale turns -inf into NaN
    or +inf (the additive mask is added after the scaling).
    """
    cq, ck = cu_q.tolist(), cu_k.tolist()
    batch = len(cq) - 1
    prefixes = prefix_lens.tolist() if (prefix_lens is not None and causal) else [0] * batch
    shapes = [(cq[b + 1] - cq[b], ck[b + 1] - ck[b], prefixes[b]) for b in range(batch)]
    if batch > 1 and len(set(shapes)) == 1:
        groups = [(0, batch)]
    else:
        groups = [(b, 1) for b in range(batch)]
    for b, n in groups:
        lq, lk, p = shapes[b]
        if lq == 0 or lk == 0:
            continue
        first = 0 if (not causal or p > 0) else max(0, lq - lk)
        if first == lq:
            continue
        if not causal or p >= lk or lq == 1:  # (one causal query row, as in decoding, is the last: it sees all)
            yield cq[b], ck[b], n, lq, lk, first, False, None
        elif p == 0 and lq == lk and scale > 0:
            yield cq[b], ck[b], n, lq, lk, first, True, None
        else:
            yield cq[b], ck[b], n, lq, lk, first, False, ref.visible(lq, lk, True, p, cu_q.device)[first:]


def _additive(vis: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if vis is None:
        return None
    return torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, float("-inf"))


def _batch(t: torch.Tensor, start: int, n: int, length: int, first: int = 0) -> torch.Tensor:
    """Rows start:start+n*length of a (total, H, D) tensor as an (n, H, length - first, D) view."""
    return t[start:start + n * length].view(n, length, *t.shape[1:])[:, first:].transpose(1, 2)


def attention_fwd_cpu(q, k, v, cu_q, cu_k, prefix_lens, causal, scale):
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=ref.acc_dtype(q.dtype), device=q.device)
    for q0, k0, n, lq, lk, first, is_causal, vis in _cpu_groups(cu_q, cu_k, prefix_lens, causal, scale):
        o, s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _batch(q, q0, n, lq, first), _batch(k, k0, n, lk), _batch(v, k0, n, lk), 0.0, is_causal,
            attn_mask=_additive(vis, q.dtype), scale=scale)
        _batch(out, q0, n, lq, first).copy_(o)
        lse[:, q0:q0 + n * lq].view(-1, n, lq)[:, :, first:].copy_(s.transpose(0, 1))
    # ATen's CPU kernel turns a query row holding NaN into out = 0, lse = 0; the spec (and the other backends)
    # propagate it, so that a diverging model is not hidden. Rows that see no key keep 0 and -inf.
    nan_rows = q.isnan().any(-1) & lse.t().isfinite()
    if bool(nan_rows.any()):
        out[nan_rows] = float("nan")
        lse.t()[nan_rows] = float("nan")
    return out, lse


def attention_bwd_cpu(dout, q, k, v, out, lse, cu_q, cu_k, prefix_lens, causal, scale):
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # ATen's CPU backward is ~3x slower in bf16 than in fp32 at speech-LM shapes (16 x 64 and 4 x 256 tokens,
        # 9 heads of 64); it accumulates in fp32 either way, so run it in fp32 and round the gradients once.
        grads = attention_bwd_cpu(*(t.float() for t in (dout, q, k, v, out)), lse, cu_q, cu_k, prefix_lens, causal,
                                  scale)
        return tuple(g.to(dtype) for g in grads)
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for q0, k0, n, lq, lk, first, is_causal, vis in _cpu_groups(cu_q, cu_k, prefix_lens, causal, scale):
        s = lse[:, q0:q0 + n * lq].view(-1, n, lq)[:, :, first:].transpose(0, 1)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _batch(dout, q0, n, lq, first), _batch(q, q0, n, lq, first), _batch(k, k0, n, lk), _batch(v, k0, n, lk),
            _batch(out, q0, n, lq, first), s.to(torch.float64 if q.dtype == torch.float64 else torch.float32),
            0.0, is_causal, attn_mask=_additive(vis, q.dtype), scale=scale)
        _batch(dq, q0, n, lq, first).copy_(gq)
        _batch(dk, k0, n, lk).copy_(gk)
        _batch(dv, k0, n, lk).copy_(gv)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------- registration


def _choose(device: torch.device) -> str:
    # The CPU path is ATen's own fused SDPA kernels, so it needs nothing from mdus_kernels._C.
    return _backend.choose_backend(None, device)


@torch.library.custom_op("mdus::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, prefix_lens: torch.Tensor | None, max_seqlen_q: int,
                      max_seqlen_k: int, causal: bool, softmax_scale: float,
                      deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_offsets_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0], "q.shape[0]", max_seqlen_q, "max_seqlen_q")
    check_offsets_values(cu_seqlens_k, "cu_seqlens_k", k.shape[0], "k.shape[0]", max_seqlen_k, "max_seqlen_k")
    backend = _choose(q.device)
    if backend == "triton" and q.dtype == torch.float64:
        if _backend.requested_backend() == "triton":
            raise RuntimeError("MDUS_KERNEL_BACKEND=triton cannot run this call: the Triton attention kernels take "
                               "float16, bfloat16 and float32")
        backend = "reference"
    if backend == "triton":
        return attention_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, causal,
                                    softmax_scale, deterministic)
    if backend == "cpp":
        return attention_fwd_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, causal, softmax_scale)
    out, lse = ref.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, prefix_lens=prefix_lens,
                             softmax_scale=softmax_scale)
    return out.contiguous(), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
      deterministic):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=lse_dtype)


@torch.library.custom_op("mdus::attention_bwd", mutates_args=())
def _attention_bwd_op(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, prefix_lens: torch.Tensor | None, max_seqlen_q: int,
                      max_seqlen_k: int, causal: bool, softmax_scale: float,
                      deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _choose(q.device)
    if backend == "triton" and q.dtype == torch.float64:
        backend = "reference"
    if backend == "triton":
        return attention_bwd_triton(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens,
                                    max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic)
    if backend == "cpp" and dlse is None:
        return attention_bwd_cpu(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens, causal,
                                 softmax_scale)
    # The reference backend, and d(lse) on CPU (ATen's backward has no lse input).
    return _backend.contiguous(ref.attention_backward(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                                      prefix_lens=prefix_lens, softmax_scale=softmax_scale))


@_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix_lens, max_seqlen_q, max_seqlen_k, causal,
      softmax_scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, prefix_lens, max_q, max_k, causal, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, prefix_lens)
    ctx.args = (max_q, max_k, causal, scale, deterministic)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, prefix_lens = ctx.saved_tensors
    if dout is None:
        dout = out.new_zeros(out.shape)
    # Upstream gradients may arrive expanded or strided (e.g. from a sum); the kernels index dlse densely.
    dq, dk, dv = torch.ops.mdus.attention_bwd(dout.contiguous(), None if dlse is None else dlse.contiguous(), q, k, v,
                                              out, lse, cu_q, cu_k, prefix_lens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------ public API


def _as_pair(value, name: str):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value or a (query, key) pair, got {len(value)} values")
        return value[0], value[1]
    return value, value


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens=None, max_seqlen=None,
              causal: bool = True, prefix_lens: torch.Tensor | None = None, softmax_scale: float | None = None,
              deterministic: bool = False, return_lse: bool = False):
    """Attention over packed (varlen) or padded sequences, with GQA, causal / prefix-LM / full masks.

    Args:
        q: packed ``(total_q, Hq, D)`` or padded ``(B, Sq, Hq, D)``; float16, bfloat16 or float32 (float64 on
            the CPU and reference backends, for gradcheck).
        k, v: packed ``(total_k, Hkv, D)`` or padded ``(B, Sk, Hkv, D)``, same dtype and device; ``Hq`` must be a
            multiple of ``Hkv`` (GQA / MQA, never expanded in memory). D from 1 to 256.
        cu_seqlens: ``(B + 1,)`` int32 or int64 cumulative sequence lengths for the packed layout (``None`` for padded),
            or a ``(cu_seqlens_q, cu_seqlens_k)`` pair when queries and keys differ in length (a KV cache).
        max_seqlen: the longest sequence as a Python int (or a (q, k) pair); computed from ``cu_seqlens`` (one
            device sync) when omitted. A value below the longest sequence raises (it would size the GPU grid).
        causal: causal mask, aligned bottom-right when a sequence has fewer queries than keys.
        prefix_lens: ``(B,)`` int: the first ``prefix_lens[b]`` tokens of sequence ``b`` are visible to all of
            its queries, so they attend each other bidirectionally (prefix-LM). Needs ``causal=True``.
        softmax_scale: defaults to ``D ** -0.5``.
        deterministic: bitwise-reproducible results across runs and processes. The kernels never use atomics;
            this also pins the GPU tile configuration instead of autotuning it.
        return_lse: also return the fp32 log-sum-exp of the scaled scores, ``(Hq, total_q)`` packed or
            ``(B, Hq, Sq)`` padded; it is differentiable.

    Returns:
        The output, shaped and typed like ``q`` (and the lse with ``return_lse``). Rows that see no key are 0.
        fp16/bf16 compute with fp32 accumulation; fp32 computes in full fp32 (no TF32).

    Example:
        >>> q = torch.randn(10, 6, 64, dtype=torch.bfloat16)            # two sequences of 3 and 7 tokens
        >>> k = v = torch.randn(10, 2, 64, dtype=torch.bfloat16)        # GQA with 3 query heads per KV head
        >>> cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        >>> attention(q, k, v, cu_seqlens=cu, max_seqlen=7, prefix_lens=torch.tensor([2, 4])).shape
        torch.Size([10, 6, 64])
    """
    for name, flag in (("causal", causal), ("deterministic", deterministic), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    padded = cu_seqlens is None
    ndim = 4 if padded else 3
    layout = "(B, S, H, D)" if padded else "(total, H, D) with cu_seqlens"
    check_tensor(q, "q", ndim=ndim, dtypes=ATTENTION_DTYPES, shape_doc=layout)
    check_tensor(k, "k", ndim=ndim, dtypes=(q.dtype,), device=q.device, shape_doc=layout)
    check_tensor(v, "v", ndim=ndim, dtypes=(q.dtype,), device=q.device, shape_doc=layout)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    d, hq, hkv = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same head dim, got {d} and {k.shape[-1]}")
    if not 1 <= d <= 256:
        raise ValueError(f"head dim (q.shape[-1]) must be in [1, 256], got {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's head count ({hq}) must be a multiple of k's and v's ({hkv})")
    if padded:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * sq
        cu_k = cu_q if sk == sq else torch.arange(batch + 1, dtype=torch.int32, device=q.device) * sk
        max_q, max_k = sq, sk
        q3, k3, v3 = q.reshape(batch * sq, hq, d), k.reshape(batch * sk, hkv, d), v.reshape(batch * sk, hkv, d)
    else:
        cu_q, cu_k = _as_pair(cu_seqlens, "cu_seqlens")
        check_offsets(cu_q, "cu_seqlens", device=q.device)
        check_offsets(cu_k, "cu_seqlens (keys)", device=q.device)
        if cu_q.shape != cu_k.shape:
            raise ValueError(f"the query and key cu_seqlens must have the same length, got {cu_q.shape[0]} and "
                             f"{cu_k.shape[0]}")
        batch = cu_q.shape[0] - 1
        if max_seqlen is None:  # the sync that finds it also checks the offsets (the op then finds them checked)
            max_q = longest_segment(cu_q, "cu_seqlens_q", q.shape[0], "q.shape[0]")
            max_k = max_q if cu_k is cu_q else longest_segment(cu_k, "cu_seqlens_k", k.shape[0], "k.shape[0]")
        else:
            max_q, max_k = _as_pair(max_seqlen, "max_seqlen")
            for m in (max_q, max_k):
                if isinstance(m, bool) or not isinstance(m, int) or m < 0:
                    raise ValueError(f"max_seqlen must be an int >= 0 (the longest sequence), got {max_seqlen!r}")
        q3, k3, v3 = q, k, v
    if prefix_lens is not None:
        check_tensor(prefix_lens, "prefix_lens", ndim=1, dtypes=(torch.int32, torch.int64), device=q.device,
                     shape_doc="(B,)")
        if prefix_lens.shape[0] != batch:
            raise ValueError(f"prefix_lens must have one entry per sequence ({batch}), got {prefix_lens.shape[0]}")
        if not causal:
            raise ValueError("prefix_lens needs causal=True (without a causal mask every key is visible anyway)")
    if softmax_scale is None:
        scale = d ** -0.5  # symbolic under torch.compile(dynamic=True): not inspected
    else:
        check_number(softmax_scale, "softmax_scale", "a finite number or None")
        scale = float(softmax_scale)
    out, lse = torch.ops.mdus.attention_fwd(_row_major(q3), _row_major(k3), _row_major(v3), cu_q, cu_k,
                                            prefix_lens, int(max_q), int(max_k), causal, scale, deterministic)
    if padded:
        out = out.view(q.shape)
        lse = lse.view(hq, batch, q.shape[1]).transpose(0, 1)
    return (out, lse) if return_lse else out


def _row_major(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any token and head strides but need unit stride along D.
    return t if t.stride(-1) == 1 else t.contiguous()
