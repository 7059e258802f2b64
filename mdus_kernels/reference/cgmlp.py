"""The cgMLP gate (ESPnet's ConvolutionalSpatialGatingUnit) and the segment-aware depthwise conv: the specification.

Layouts
    * **packed**: ``x`` is ``(N, ...)`` with ``cu_seqlens`` ``(B + 1,)`` int32/int64, ``cu_seqlens[0] == 0``,
      ``cu_seqlens[-1] == N``, non-decreasing; sequence ``b`` is the rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` and may
      be empty (or one token long).
    * **padded**: ``x`` is ``(B, T, ...)`` and ``cu_seqlens`` is None; every batch row is one sequence of T tokens.
      It is exactly the packed layout with ``cu_seqlens = [0, T, 2T, ..., BT]``.

Segments and the speech mask
    The conv never mixes tokens of different *segments*. Without a speech mask a segment is a sequence. With
    ``speech_mask`` (``(N,)`` bool packed, ``(B, T)`` padded; True = speech token) a segment is a **maximal run of
    consecutive speech tokens of one sequence**: a change of modality acts like a sequence boundary. Precisely:

    * for a speech token ``t`` with segment ``[lo, hi)``, the conv reads ``h[p]`` for ``p`` in its window only where
      ``lo <= p < hi``; every other tap (outside the sequence, or on a text token, or beyond a text token) reads 0,
      as zero padding at the segment's edges does;
    * a text token's output is 0, and it receives zero gradient for every input (both halves of ``x`` for the
      gate), since it neither produces an output nor is read by a speech token's window;
    * so a text token between two speech runs separates them completely, and an all-text batch gives all zeros.

Depthwise conv ``depthwise_conv1d(x, weight, bias)``: ``x`` ``(N, C)``, ``weight`` ``(C, 1, k)`` or ``(C, k)``,
``bias`` ``(C,)`` or None, ``1 <= k <= 63``, output ``(N, C)``::

    y[t, c] = bias[c] + sum_{j=0}^{k-1} weight[c, j] * x[t + j - L, c]      (x read as 0 outside t's segment)

with ``L = k - 1`` (causal: left padding only, ``y[t]`` sees ``x[t-k+1..t]``) or ``L = (k - 1) // 2`` (centered,
"same": left padding ``(k-1)//2``, right padding ``k-1-(k-1)//2``, so the output is as long as the input; for odd k
this is ``torch.nn.Conv1d(C, C, k, padding=(k-1)//2, groups=C)`` applied to each segment separately).

cgMLP gate ``cgmlp_gate(x, norm_weight, norm_bias, conv_weight, conv_bias)``: ``x`` ``(N, U)``, U even, C = U/2,
output ``(N, C)``::

    x_r, x_g = x[:, :C], x[:, C:]                              # ESPnet's chunk(2): the first half is the multiplier
    h   = LayerNorm(x_g; norm_weight, norm_bias, eps)          # over the C channels of each token, biased variance
    out = x_r * depthwise_conv1d(h, conv_weight, conv_bias)    # segment-aware, as above

and ``out[t] = 0`` for text tokens.

Edge cases
    * Empty sequences (``cu_seqlens[b] == cu_seqlens[b + 1]``) have no tokens and contribute nothing; ``N == 0``
      (including ``cu_seqlens == [0]``) gives ``(0, C)`` outputs and empty gradients.
    * A one-token segment sees only itself: ``y[t] = bias + weight[:, L] * x[t]`` (the middle tap centered, the last
      tap causal); the LayerNorm of a single token is its own normalization over channels, unaffected.
    * An all-text batch gives an all-zero output and zero gradients for x; parameter gradients are then 0 too.
    * ``k = 1`` is a per-channel scale; an even k centered looks one token further right than left.

Numerics
    Computed in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64), returned in ``x.dtype``. Parameters may have any
    float dtype; they are used in the computation dtype and their gradients are returned in their own dtype. The
    LayerNorm uses the biased variance, as ``torch.nn.LayerNorm`` does.

This module gives differentiable functions (``cgmlp_gate``, ``depthwise_conv1d``, both layouts, autograd through
plain torch ops) and, for the packed layout, the explicit forward/backward pair the ``reference`` backend runs
(``cgmlp_gate_fwd``/``cgmlp_gate_bwd``, ``depthwise_conv1d_fwd``/``depthwise_conv1d_bwd``). The conv is written
tap by tap, ``y = sum_j w[:, j] * shift(x, j - L)`` with ``shift`` zeroing reads outside the token's segment, which
is the formula above and nothing more. Argument checking lives in ``mdus_kernels.ops.cgmlp``.
"""

import torch
import torch.nn.functional as F

MAX_KERNEL_SIZE = 63


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The computation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def left_pad(kernel_size: int, causal: bool) -> int:
    """L: how many taps of the window lie before the output token."""
    return kernel_size - 1 if causal else (kernel_size - 1) // 2


def segment_bounds(num_tokens: int, cu_seqlens: torch.Tensor,
                   speech_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``, both ``(N,)`` int64: token ``t``'s segment is ``[lo[t], hi[t])`` (see the module docstring).

    Text tokens get ``lo == hi == t`` (an empty segment: they read nothing and are read by nobody).
    """
    device = cu_seqlens.device
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    t = torch.arange(num_tokens, device=device)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=num_tokens)
    seq_lo, seq_hi = cu[:-1][seq], cu[1:][seq]
    if speech_mask is None:
        return seq_lo, seq_hi
    # A segment starts at every sequence start and at every change of modality inside a sequence.
    starts = t == seq_lo
    starts[1:] |= speech_mask[1:] != speech_mask[:-1]
    run = torch.cumsum(starts.long(), 0) - 1
    run_start = t[starts]
    run_end = torch.cat([run_start[1:], run_start.new_full((1,), num_tokens)])
    lo, hi = run_start[run], run_end[run]
    return torch.where(speech_mask, lo, t), torch.where(speech_mask, hi, t)


def _shift(v: torch.Tensor, offset: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``u[t] = v[t + offset]`` where ``lo[t] <= t + offset < hi[t]``, else 0."""
    n = v.shape[0]
    p = torch.arange(n, device=v.device) + offset
    valid = (p >= lo) & (p < hi)
    return torch.where(valid.unsqueeze(1), v[p.clamp(0, max(n - 1, 0))], 0)


def _segment_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lo: torch.Tensor,
                  hi: torch.Tensor, causal: bool) -> torch.Tensor:
    k = weight.shape[1]
    left = left_pad(k, causal)
    y = torch.zeros_like(h)
    for j in range(k):
        y = y + weight[:, j] * _shift(h, j - left, lo, hi)
    return y if bias is None else y + bias


def _conv_transpose(g: torch.Tensor, weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    causal: bool) -> torch.Tensor:
    """The vector-Jacobian product of ``_segment_conv`` w.r.t. its input: ``dh[p] = sum_j w[:, j] * g[p + L - j]``
    over the ``p + L - j`` in ``p``'s segment (being in the same segment is symmetric)."""
    k = weight.shape[1]
    left = left_pad(k, causal)
    dh = torch.zeros_like(g)
    for j in range(k):
        dh = dh + weight[:, j] * _shift(g, left - j, lo, hi)
    return dh


def _weight_grad(g: torch.Tensor, h: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, k: int,
                 causal: bool) -> torch.Tensor:
    left = left_pad(k, causal)
    return torch.stack([(g * _shift(h, j - left, lo, hi)).sum(0) for j in range(k)], dim=1)


def _to_packed(x: torch.Tensor, cu_seqlens: torch.Tensor | None, speech_mask: torch.Tensor | None):
    """(B, T, F) padded -> (BT, F) packed with its cu_seqlens; packed inputs pass through."""
    if cu_seqlens is not None:
        return x, cu_seqlens, speech_mask
    b, t = x.shape[:2]
    cu = torch.arange(b + 1, device=x.device, dtype=torch.int64) * t
    mask = None if speech_mask is None else speech_mask.reshape(b * t)
    return x.reshape(b * t, *x.shape[2:]), cu, mask


def _mask_rows(v: torch.Tensor, speech_mask: torch.Tensor | None) -> torch.Tensor:
    return v if speech_mask is None else torch.where(speech_mask.unsqueeze(1), v, 0)


def _layer_norm_stats(xg: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = xg.mean(dim=1)
    var = (xg - mean.unsqueeze(1)).square().mean(dim=1)  # biased, as LayerNorm's
    return mean, torch.rsqrt(var + eps)


# ----------------------------------------------------------------------------------- differentiable, both layouts


def depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     cu_seqlens: torch.Tensor | None = None, speech_mask: torch.Tensor | None = None,
                     causal: bool = False, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Segment-aware depthwise conv over time: ``(N, C)`` packed or ``(B, T, C)`` padded -> same shape.

    ``compute_dtype`` overrides the computation dtype (tests use it to measure what PyTorch's own rounding in a
    low-precision dtype costs). See the module docstring.
    """
    acc = compute_dtype or acc_dtype(x.dtype)
    xp, cu, mask = _to_packed(x, cu_seqlens, speech_mask)
    lo, hi = segment_bounds(xp.shape[0], cu, mask)
    w = weight.reshape(weight.shape[0], weight.shape[-1]).to(acc)
    y = _segment_conv(xp.to(acc), w, None if bias is None else bias.to(acc), lo, hi, causal)
    return _mask_rows(y, mask).to(x.dtype).reshape(x.shape)


def cgmlp_gate(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, conv_weight: torch.Tensor,
               conv_bias: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
               speech_mask: torch.Tensor | None = None, causal: bool = False, eps: float = 1e-5,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x_r * (DWConv(LayerNorm(x_g)) + conv_bias)``: ``(N, U)`` packed or ``(B, T, U)`` padded -> ``(..., U/2)``.

    See the module docstring; ``compute_dtype`` as in :func:`depthwise_conv1d`.
    """
    acc = compute_dtype or acc_dtype(x.dtype)
    xp, cu, mask = _to_packed(x, cu_seqlens, speech_mask)
    c = xp.shape[1] // 2
    xr, xg = xp.to(acc).chunk(2, dim=1)
    h = F.layer_norm(xg, (c,), norm_weight.to(acc), norm_bias.to(acc), eps)
    lo, hi = segment_bounds(xp.shape[0], cu, mask)
    z = _segment_conv(h, conv_weight.reshape(c, conv_weight.shape[-1]).to(acc), conv_bias.to(acc), lo, hi, causal)
    out = _mask_rows(xr * z, mask).to(x.dtype)
    return out.reshape(*x.shape[:-1], c)


# ----------------------------------------------------------------- explicit forward/backward (the reference backend)


def depthwise_conv1d_fwd(x, weight, bias, cu_seqlens, speech_mask, causal):
    """Packed forward: x (N, C), weight (C, k), bias (C,) or None -> (N, C)."""
    return depthwise_conv1d(x, weight, bias, cu_seqlens=cu_seqlens, speech_mask=speech_mask, causal=causal)


def depthwise_conv1d_bwd(grad, x, weight, cu_seqlens, speech_mask, causal):
    """Packed backward: (dx (N, C), dweight (C, k), dbias (C,)), dweight/dbias in the computation dtype."""
    acc = acc_dtype(x.dtype)
    lo, hi = segment_bounds(x.shape[0], cu_seqlens, speech_mask)
    g = _mask_rows(grad.to(acc), speech_mask)
    w = weight.to(acc)
    dx = _conv_transpose(g, w, lo, hi, causal)
    dw = _weight_grad(g, x.to(acc), lo, hi, w.shape[1], causal)
    return dx.to(x.dtype), dw, g.sum(0)


def cgmlp_gate_fwd(x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, causal, eps):
    """Packed forward: x (N, U), conv_weight (C, k) -> (out (N, C), mean (N,), rstd (N,)).

    mean/rstd are the LayerNorm statistics of each token's x_g in the computation dtype, 0 for text tokens; the
    backward reuses them.
    """
    acc = acc_dtype(x.dtype)
    xr, xg = x.to(acc).chunk(2, dim=1)
    mean, rstd = _layer_norm_stats(xg, eps)
    if speech_mask is not None:  # (where, not a product: a text token's x_g is never read, even if inf or NaN)
        mean, rstd = torch.where(speech_mask, mean, 0), torch.where(speech_mask, rstd, 0)
    h = _mask_rows((xg - mean.unsqueeze(1)) * rstd.unsqueeze(1) * norm_weight.to(acc) + norm_bias.to(acc),
                   speech_mask)
    lo, hi = segment_bounds(x.shape[0], cu_seqlens, speech_mask)
    z = _segment_conv(h, conv_weight.to(acc), conv_bias.to(acc), lo, hi, causal)
    return _mask_rows(xr * z, speech_mask).to(x.dtype), mean, rstd


def cgmlp_gate_bwd(grad, x, norm_weight, norm_bias, conv_weight, conv_bias, cu_seqlens, speech_mask, mean, rstd,
                   causal):
    """Packed backward: (dx (N, U), dnorm_weight, dnorm_bias, dconv_weight (C, k), dconv_bias), the parameter
    gradients in the computation dtype.

    With ``dz = grad * x_r`` on speech tokens (0 on text), ``xhat = (x_g - mean) * rstd`` and ``h = xhat * w + b``:
    ``dx_r = grad * z``, ``dconv_bias = sum_t dz``, ``dconv_weight[:, j] = sum_t dz[t] * h[t + j - L]``,
    ``dh = conv_transpose(dz)``, ``dnorm_weight = sum dh * xhat``, ``dnorm_bias = sum dh`` and LayerNorm's
    ``dx_g = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat))`` with ``dxhat = dh * norm_weight``.
    """
    acc = acc_dtype(x.dtype)
    xr, xg = x.to(acc).chunk(2, dim=1)
    nw, cw = norm_weight.to(acc), conv_weight.to(acc)
    xhat = _mask_rows((xg - mean.unsqueeze(1)) * rstd.unsqueeze(1), speech_mask)
    h = _mask_rows(xhat * nw + norm_bias.to(acc), speech_mask)
    lo, hi = segment_bounds(x.shape[0], cu_seqlens, speech_mask)
    g = _mask_rows(grad.to(acc), speech_mask)
    z = _segment_conv(h, cw, conv_bias.to(acc), lo, hi, causal)
    dz = _mask_rows(g * xr, speech_mask)
    dh = _conv_transpose(dz, cw, lo, hi, causal)
    dxhat = dh * nw
    dxg = rstd.unsqueeze(1) * (dxhat - dxhat.mean(1, keepdim=True) - xhat * (dxhat * xhat).mean(1, keepdim=True))
    dx = torch.cat([g * z, _mask_rows(dxg, speech_mask)], dim=1)
    return (dx.to(x.dtype), (dh * xhat).sum(0), dh.sum(0), _weight_grad(dz, h, lo, hi, cw.shape[1], causal),
            dz.sum(0))
