"""Patch pooling for LST / Byte Latent Transformer patches: Triton kernels, dispatch and registration.

The specification is ``mdus_kernels.reference.patch_pool``. Two registered ops, each the other's transpose:

* ``mdus::patch_pool(x, offsets, reduce)``: (N, D) -> (P, D). Its backward is ``mdus::patch_unpool``.
* ``mdus::patch_unpool(p, offsets, num_tokens, reduce, x, pooled)``: (P, D) -> (N, D). With ``reduce="sum"`` it
  is the public ``patch_unpool``; its backward (sum/mean) is ``mdus::patch_pool``, which also gives pooling a
  double backward.

Both are memory-bound single passes: every token row is read (pool) or written (unpool) once, accumulating in
fp32 in registers. max/min save nothing extra for backward: the first arg-extreme token is found again by
comparing ``x`` with the pooled output, which costs one read of ``x`` in backward instead of an (P, D) int32
index tensor written in forward and held until backward.
"""

import torch

from mdus_kernels import _backend
from mdus_kernels._checks import FLOAT_DTYPES, check_number, check_offsets, check_offsets_values, check_tensor
from mdus_kernels.reference import patch_pool as ref
from mdus_kernels.reference.patch_pool import REDUCES

_REDUCE_ID = {"sum": 0, "mean": 1, "max": 2, "min": 3}  # matches mdus::Reduce in csrc/patch_pool.h

triton = _backend.triton_module()
if triton is not None:
    import triton.language as tl

    @triton.jit
    def _max_propagate_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _min_propagate_nan(a, b):
        return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _patch_bounds(p_off, i_p, N):
        # Clamped so that unchecked bad offsets stay inside the tensors.
        bos = tl.minimum(tl.maximum(tl.load(p_off + i_p).to(tl.int64), 0), N)
        eos = tl.minimum(tl.maximum(tl.load(p_off + i_p + 1).to(tl.int64), bos), N)
        return bos, eos

    @triton.jit
    def _patch_pool_fwd_kernel(p_x, p_off, p_out, N, D, REDUCE: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        i_p = tl.program_id(0).to(tl.int64)
        i_d = tl.program_id(1)
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        bos, eos = _patch_bounds(p_off, i_p, N)
        if REDUCE == 2:
            fill = float("-inf")
        elif REDUCE == 3:
            fill = float("inf")
        else:
            fill = 0.0
        # A (BLOCK_T, BLOCK_D) accumulator: one cross-row reduction at the end instead of one per tile.
        b_acc = tl.full([BLOCK_T, BLOCK_D], fill, ACC)
        for t0 in range(bos, eos, BLOCK_T):
            o_t = t0 + tl.arange(0, BLOCK_T)
            m_x = (o_t < eos)[:, None] & m_d[None, :]
            b_x = tl.load(p_x + o_t[:, None] * D + o_d[None, :], mask=m_x, other=fill).to(ACC)
            if REDUCE == 2:
                b_acc = tl.maximum(b_acc, b_x, propagate_nan=tl.PropagateNan.ALL)
            elif REDUCE == 3:
                b_acc = tl.minimum(b_acc, b_x, propagate_nan=tl.PropagateNan.ALL)
            else:
                b_acc += b_x
        if REDUCE == 2:
            b_out = tl.reduce(b_acc, 0, _max_propagate_nan)
        elif REDUCE == 3:
            b_out = tl.reduce(b_acc, 0, _min_propagate_nan)
        else:
            b_out = tl.sum(b_acc, axis=0)
        if REDUCE == 1:
            b_out = b_out / tl.maximum(eos - bos, 1).to(ACC)
        b_out = tl.where(eos > bos, b_out, 0.0)  # an empty patch gives 0, not the +-inf fill
        tl.store(p_out + i_p * D + o_d, b_out.to(p_out.dtype.element_ty), mask=m_d)

    @triton.jit
    def _patch_unpool_kernel(p_g, p_off, p_x, p_ref, p_out, N, D, REDUCE: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        i_p = tl.program_id(0).to(tl.int64)
        i_d = tl.program_id(1)
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        bos, eos = _patch_bounds(p_off, i_p, N)
        b_g = tl.load(p_g + i_p * D + o_d, mask=m_d, other=0.0).to(ACC)
        if REDUCE == 1:
            b_g = b_g / tl.maximum(eos - bos, 1).to(ACC)
        b_g = b_g.to(p_out.dtype.element_ty)
        if REDUCE >= 2:
            b_ref = tl.load(p_ref + i_p * D + o_d, mask=m_d, other=0.0).to(ACC)
            b_found = tl.zeros([BLOCK_D], dtype=tl.int32)
        # Tiles go in token order, so "first arg-extreme" needs only a found-flag per column: one pass.
        for t0 in range(bos, eos, BLOCK_T):
            o_t = t0 + tl.arange(0, BLOCK_T)
            m_x = (o_t < eos)[:, None] & m_d[None, :]
            if REDUCE >= 2:
                b_x = tl.load(p_x + o_t[:, None] * D + o_d[None, :], mask=m_x, other=0.0).to(ACC)
                b_hit = (b_x == b_ref[None, :]) & m_x
                b_first = tl.min(tl.where(b_hit, o_t[:, None], eos), axis=0)
                b_sel = (o_t[:, None] == b_first[None, :]) & (b_found == 0)[None, :]
                b_out = tl.where(b_sel, b_g[None, :], 0.0)
                b_found = tl.where(b_first < eos, 1, b_found)
            else:
                b_out = tl.broadcast_to(b_g[None, :], [BLOCK_T, BLOCK_D])
            tl.store(p_out + o_t[:, None] * D + o_d[None, :], b_out.to(p_out.dtype.element_ty), mask=m_x)


def _launch_config(t: torch.Tensor, D: int) -> dict:
    block_d = min(triton.next_power_of_2(max(D, 1)), 1024 if t.is_cuda else 256)
    return dict(
        ACC=tl.float64 if t.dtype == torch.float64 else tl.float32,
        BLOCK_T=8,
        BLOCK_D=block_d,
        num_warps=4 if block_d <= 512 else 8,
    )


def patch_pool_fwd(x: torch.Tensor, offsets: torch.Tensor, reduce: str) -> torch.Tensor:
    """Triton launcher for ``mdus::patch_pool``."""
    x = x.contiguous()
    (n, d), p = x.shape, offsets.numel() - 1
    out = x.new_empty(p, d)
    if out.numel():
        cfg = _launch_config(x, d)
        grid = (p, triton.cdiv(d, cfg["BLOCK_D"]))
        _patch_pool_fwd_kernel[grid](x, offsets.contiguous(), out, n, d, REDUCE=_REDUCE_ID[reduce], **cfg)
    return out


def patch_unpool_fwd(p: torch.Tensor, offsets: torch.Tensor, num_tokens: int, reduce: str,
                     x: torch.Tensor | None, pooled: torch.Tensor | None) -> torch.Tensor:
    """Triton launcher for ``mdus::patch_unpool``."""
    p = p.contiguous()
    d = p.shape[1]
    out = p.new_empty(num_tokens, d)
    if out.numel() and p.shape[0]:
        arg = reduce in ("max", "min")
        cfg = _launch_config(p, d)
        grid = (p.shape[0], triton.cdiv(d, cfg["BLOCK_D"]))
        _patch_unpool_kernel[grid](p, offsets.contiguous(), x.contiguous() if arg else p,
                                   pooled.contiguous() if arg else p, out, num_tokens, d,
                                   REDUCE=_REDUCE_ID[reduce], **cfg)
    return out


# ---------------------------------------------------------------------------------------------------- registration


@torch.library.custom_op("mdus::patch_pool", mutates_args=())
def _patch_pool_op(x: torch.Tensor, offsets: torch.Tensor, reduce: str) -> torch.Tensor:
    check_offsets_values(offsets, "offsets", x.shape[0], "x.shape[0]")
    backend = _backend.choose_backend("patch_pool_kernel", x.device)
    if backend in ("cpp", "cuda"):
        return torch.ops.mdus.patch_pool_kernel(x, offsets, reduce)
    if backend == "triton":
        return patch_pool_fwd(x, offsets, reduce)
    return ref.patch_pool(x, offsets, reduce).contiguous()


@_patch_pool_op.register_fake
def _(x, offsets, reduce):
    return x.new_empty(offsets.shape[0] - 1, x.shape[1])


@torch.library.custom_op("mdus::patch_unpool", mutates_args=())
def _patch_unpool_op(p: torch.Tensor, offsets: torch.Tensor, num_tokens: int, reduce: str,
                     x: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
    check_offsets_values(offsets, "offsets", num_tokens, "num_tokens")
    backend = _backend.choose_backend("patch_unpool_kernel", p.device)
    if backend in ("cpp", "cuda"):
        return torch.ops.mdus.patch_unpool_kernel(p, offsets, num_tokens, reduce, x, pooled)
    if backend == "triton":
        return patch_unpool_fwd(p, offsets, num_tokens, reduce, x, pooled)
    return ref.patch_unpool(p, offsets, num_tokens, reduce, x, pooled).contiguous()


@_patch_unpool_op.register_fake
def _(p, offsets, num_tokens, reduce, x=None, pooled=None):
    return p.new_empty(num_tokens, p.shape[1])


def _pool_setup_context(ctx, inputs, output):
    x, offsets, reduce = inputs
    ctx.reduce, ctx.num_tokens = reduce, x.shape[0]
    # mean/sum backward needs only the offsets; max/min re-find the arg-extreme from x and the output.
    ctx.save_for_backward(offsets, *((x, output) if reduce in ("max", "min") else ()))


def _pool_backward(ctx, grad):
    offsets, *saved = ctx.saved_tensors
    x, pooled = saved if saved else (None, None)
    return torch.ops.mdus.patch_unpool(grad, offsets, ctx.num_tokens, ctx.reduce, x, pooled), None, None


def _unpool_setup_context(ctx, inputs, output):
    _, offsets, _, reduce, _, _ = inputs
    ctx.reduce = reduce
    ctx.save_for_backward(offsets)


def _unpool_backward(ctx, grad):
    if ctx.reduce in ("max", "min"):
        raise NotImplementedError(f"double backward of patch_pool(reduce={ctx.reduce!r}) is not supported")
    (offsets,) = ctx.saved_tensors
    return torch.ops.mdus.patch_pool(grad, offsets, ctx.reduce), None, None, None, None, None


_patch_pool_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)
_patch_unpool_op.register_autograd(_unpool_backward, setup_context=_unpool_setup_context)


# ------------------------------------------------------------------------------------------------------ public API


def patch_pool(x: torch.Tensor, offsets: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Pools variable-length patches of packed tokens: (N, D) -> (P, D).

    Args:
        x: (N, D) float16/bfloat16/float32/float64 token states, packed.
        offsets: (P + 1,) int32/int64 patch boundaries on ``x``'s device: ``offsets[0] == 0``,
            ``offsets[-1] == N``, non-decreasing. Patch ``p`` is ``x[offsets[p]:offsets[p + 1]]``.
        reduce: ``"mean"``, ``"max"``, ``"min"`` or ``"sum"``, accumulated in fp32 (fp64 for fp64 inputs).

    An empty patch gives 0 (and passes no gradient). For max/min the gradient goes to the first arg-extreme
    token, deterministically. Differentiable with respect to ``x``.

    Example:
        >>> x = torch.randn(10, 8)
        >>> offsets = torch.tensor([0, 4, 4, 10])      # patches of 4, 0 and 6 tokens
        >>> patch_pool(x, offsets).shape
        torch.Size([3, 8])
    """
    check_tensor(x, "x", ndim=2, dtypes=FLOAT_DTYPES, shape_doc="(total_tokens, D)")
    check_offsets(offsets, "offsets", device=x.device)
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {', '.join(map(repr, REDUCES))}, got {reduce!r}")
    return torch.ops.mdus.patch_pool(x, offsets, reduce)


def patch_unpool(p: torch.Tensor, offsets: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Broadcasts each patch vector back to its tokens: (P, D) -> (N, D), the transpose of ``patch_pool(...,
    reduce="sum")``. Its backward is sum-pooling.

    Args:
        p: (P, D) float patch vectors.
        offsets: (P + 1,) patch boundaries, as for ``patch_pool``.
        num_tokens: N. Defaults to ``offsets[-1]``, which reads the device; pass it (e.g. ``x.shape[0]``) to
            avoid the sync and to keep ``torch.compile(fullgraph=True)`` graphs whole.

    Example:
        >>> offsets = torch.tensor([0, 2, 5])
        >>> patch_unpool(torch.tensor([[1.0], [2.0]]), offsets, num_tokens=5).flatten().tolist()
        [1.0, 1.0, 2.0, 2.0, 2.0]
    """
    check_tensor(p, "p", ndim=2, dtypes=FLOAT_DTYPES, shape_doc="(num_patches, D)")
    check_offsets(offsets, "offsets", device=p.device)
    if p.shape[0] != offsets.shape[0] - 1:
        raise ValueError(f"p must have one row per patch: expected {offsets.shape[0] - 1} rows "
                         f"(offsets.shape[0] - 1), got {p.shape[0]}")
    if num_tokens is None:
        num_tokens = int(offsets[-1])
    else:
        check_number(num_tokens, "num_tokens", "an int >= 0 (the total token count) or None", integer=True,
                     ok=lambda v: v >= 0)
    return torch.ops.mdus.patch_unpool(p, offsets, num_tokens, "sum", None, None)


# ------------------------------------------------------------------------------------------------- offset builders


def _check_cu_seqlens(cu_seqlens: torch.Tensor) -> None:
    check_offsets(cu_seqlens, "cu_seqlens", device=getattr(cu_seqlens, "device", None))
    check_offsets_values(cu_seqlens, "cu_seqlens", int(cu_seqlens[-1]), "cu_seqlens[-1]")


def static_patch_offsets(cu_seqlens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Offsets of fixed-size patches over a packed batch (LST static patching).

    Each sequence ``cu_seqlens[b]:cu_seqlens[b + 1]`` is cut into patches of ``patch_size`` tokens; a patch never
    crosses a sequence boundary and a sequence's last patch may be shorter. Empty sequences get no patch.

    Args:
        cu_seqlens: (B + 1,) int32/int64 cumulative sequence lengths, starting at 0, non-decreasing.
        patch_size: tokens per patch, >= 1.

    Returns:
        (P + 1,) offsets with ``cu_seqlens``'s dtype and device.

    Example:
        >>> static_patch_offsets(torch.tensor([0, 5, 7], dtype=torch.int32), 2).tolist()
        [0, 2, 4, 5, 7]
    """
    _check_cu_seqlens(cu_seqlens)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    n_patches = (lengths + patch_size - 1) // patch_size
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), n_patches)
    first_patch = torch.cumsum(n_patches, 0) - n_patches
    starts = cu[:-1][seq] + (torch.arange(seq.numel(), device=cu.device) - first_patch[seq]) * patch_size
    return torch.cat([starts, cu[-1:]]).to(cu_seqlens.dtype)


def boundary_patch_offsets(is_patch_start: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Offsets of patches that start where ``is_patch_start`` is True (LST aligned patching: one patch per word
    or silence from a forced alignment), and at every sequence start, so that no patch crosses a sequence.

    Args:
        is_patch_start: (N,) bool, True at the first token of each patch.
        cu_seqlens: (B + 1,) int32/int64 cumulative sequence lengths with ``cu_seqlens[-1] == N``.

    Returns:
        (P + 1,) offsets with ``cu_seqlens``'s dtype and device.

    Example:
        >>> starts = torch.tensor([1, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
        >>> boundary_patch_offsets(starts, torch.tensor([0, 5, 7])).tolist()
        [0, 3, 5, 6, 7]
    """
    _check_cu_seqlens(cu_seqlens)
    check_tensor(is_patch_start, "is_patch_start", ndim=1, dtypes=(torch.bool,), device=cu_seqlens.device)
    n, total = is_patch_start.shape[0], int(cu_seqlens[-1])
    if total != n:
        raise ValueError(f"cu_seqlens[-1] must equal is_patch_start.shape[0]={n}, got {total}")
    cu = cu_seqlens.long()
    starts = is_patch_start.clone()
    starts[cu[:-1][cu[1:] > cu[:-1]]] = True  # every non-empty sequence opens a patch
    return torch.cat([torch.nonzero(starts).flatten(), cu[-1:]]).to(cu_seqlens.dtype)
