"""Patch pooling (LST / Byte Latent Transformer): the specification.

Layout
    ``x`` is a packed ``(N, D)`` tensor of token states. ``offsets`` is ``(P + 1,)`` int32 or int64 with
    ``offsets[0] == 0``, ``offsets[-1] == N`` and ``offsets[p] <= offsets[p + 1]``; patch ``p`` is the rows
    ``offsets[p]:offsets[p + 1]``. Patches tile the tokens exactly; a patch may be empty.

``patch_pool(x, offsets, reduce)`` -> ``(P, D)``
    ``reduce`` is ``"sum"``, ``"mean"``, ``"max"`` or ``"min"`` over each patch's rows, computed in fp32 for
    fp16/bf16/fp32 inputs (fp64 for fp64) and returned in ``x.dtype``.
    * An empty patch gives 0.
    * ``max``/``min`` propagate NaN: a NaN in a patch column makes that output NaN.

``patch_unpool(p, offsets, num_tokens, reduce, x=None, pooled=None)`` -> ``(N, D)``
    The transpose (vector-Jacobian product) of ``patch_pool`` with the same ``reduce``: for an upstream gradient
    ``p`` of the pooled output, it returns the gradient with respect to ``x``.
    * ``sum``: ``out[t] = p[patch(t)]``, a plain broadcast. This is the public ``patch_unpool``.
    * ``mean``: ``out[t] = p[patch(t)] / len(patch(t))``.
    * ``max``/``min``: ``out[t, d] = p[patch(t), d]`` at the *first* token ``t`` of the patch whose ``x[t, d]``
      equals ``pooled[patch(t), d]`` (the forward's output), and 0 at every other token. Deterministic, unlike
      ``scatter_reduce``'s gradient, which splits among ties. A NaN column routes its gradient nowhere.
    * Tokens of empty patches do not exist, so empty patches contribute nothing; their gradient is 0.

These functions assume valid offsets; argument checking lives in ``mdus_kernels.ops.patch_pool``.
"""

import torch

REDUCES = ("mean", "max", "min", "sum")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(offsets: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch id of each token (N,), length of each patch (P,)), both int64."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=num_tokens)
    return seg, lengths


def patch_pool(x: torch.Tensor, offsets: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Pools each patch's rows of ``x`` (N, D) into one row of the (P, D) result. See the module docstring."""
    n, d = x.shape
    seg, lengths = _segments(offsets, n)
    xa = x.to(acc_dtype(x.dtype))
    out = xa.new_zeros(lengths.numel(), d)
    if reduce in ("sum", "mean"):
        out.index_add_(0, seg, xa)
        if reduce == "mean":
            out /= lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
    else:
        out.scatter_reduce_(0, seg.unsqueeze(1).expand(n, d), xa, "amax" if reduce == "max" else "amin",
                            include_self=False)
    return out.to(x.dtype)


def patch_unpool(p: torch.Tensor, offsets: torch.Tensor, num_tokens: int, reduce: str = "sum",
                 x: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The transpose of ``patch_pool``: (P, D) -> (N, D). See the module docstring."""
    seg, lengths = _segments(offsets, num_tokens)
    pa = p.to(acc_dtype(p.dtype))
    if reduce == "sum":
        return pa[seg].to(p.dtype)
    if reduce == "mean":
        return (pa / lengths.clamp(min=1).unsqueeze(1).to(pa.dtype))[seg].to(p.dtype)
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    hit = x.to(acc) == pooled.to(acc)[seg]
    token = torch.arange(n, device=x.device).unsqueeze(1).expand(n, d)
    # First hit per (patch, column); n (no token) where nothing matches, e.g. a NaN column.
    first = torch.full_like(pa, n, dtype=torch.long).scatter_reduce_(
        0, seg.unsqueeze(1).expand(n, d), torch.where(hit, token, n), "amin", include_self=True)
    return torch.where(token == first[seg], pa[seg], 0).to(p.dtype)
