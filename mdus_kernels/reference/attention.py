"""Insert-layer attention over packed (varlen) or padded sequences: the specification.

Layouts
    * Packed: ``q`` is ``(total_q, Hq, D)``, ``k`` and ``v`` are ``(total_k, Hkv, D)``. ``cu_seqlens_q`` and
      ``cu_seqlens_k`` are ``(B + 1,)`` int32/int64 cumulative lengths; sequence ``b`` is the query rows
      ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and the key rows ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``. For
      self-attention over one pack both are the same tensor. A sequence may be empty.
    * Padded ``(B, S, H, D)`` tensors are the packed layout with ``cu_seqlens = [0, S, 2S, ...]``.

Heads
    ``Hq`` is a multiple of ``Hkv``; query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (GQA; MQA when
    ``Hkv == 1``).

Mask (per sequence, with ``Lq``/``Lk`` its query/key lengths and ``P = prefix_lens[b]``, 0 when absent)
    Query ``i`` may attend key ``j`` iff ``j < Lk`` and, when causal, ``j <= i + (Lk - Lq)`` or ``j < P``.
    * Causal masks are aligned to the bottom-right, as in flash-attn: the last query sees every key. With
      ``Lq == Lk`` this is the usual ``j <= i``; with ``Lq < Lk`` (a KV cache) the queries are the last ones.
    * Prefix-LM: the first ``P`` keys are visible to every query, so the first ``P`` tokens of a self-attention
      sequence attend each other bidirectionally and causal attention applies after them (ASR with a
      bidirectional speech prefix). ``P >= Lk`` gives full attention. ``prefix_lens`` has no effect when not
      causal.
    * Sequences never see each other.

Values
    ``out[i] = softmax(scale * q[i] . K^T)[masked] @ V`` with ``scale = softmax_scale or D ** -0.5``, computed in
    fp32 for fp16/bf16/fp32 inputs (fp64 for fp64) and returned in ``q.dtype``. ``lse[i]`` is the natural-log
    sum of ``exp(scale * q[i] . k_j)`` over the visible keys, in fp32 (fp64 for fp64), laid out ``(Hq, total_q)``.
    A query row that sees no key (``i + Lk - Lq < 0`` with no prefix) gives ``out = 0`` and ``lse = -inf``, never
    NaN, and passes no gradient.

These functions assume valid arguments; checking lives in ``mdus_kernels.ops.attention``.
"""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible(lq: int, lk: int, causal: bool, prefix_len: int, device=None) -> torch.Tensor:
    """(Lq, Lk) bool: which keys each query of one sequence may attend. See the module docstring."""
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    if not causal:
        return torch.ones(lq, lk, dtype=torch.bool, device=device)
    return (j <= i + (lk - lq)) | (j < prefix_len)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
              cu_seqlens_k: torch.Tensor, *, causal: bool = True, prefix_lens: torch.Tensor | None = None,
              softmax_scale: float | None = None,
              compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed attention, one sequence at a time with explicit scores. Returns ``(out, lse)``: ``out`` is
    ``(total_q, Hq, D)`` in ``q.dtype`` and ``lse`` is ``(Hq, total_q)``. Differentiable by autograd.

    ``compute_dtype`` overrides the fp32 (fp64) computation, e.g. ``q.dtype`` to measure the error that plain
    PyTorch makes in low precision (the yardstick of the tests' tolerance rule)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    acc = compute_dtype or acc_dtype(q.dtype)
    out = q.new_zeros(total_q, hq, v.shape[-1], dtype=acc)
    lse = q.new_full((total_q, hq), float("-inf"), dtype=acc)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    prefixes = [0] * (len(cq) - 1) if prefix_lens is None else prefix_lens.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].to(acc).transpose(0, 1)  # (Hq, Lq, D)
        ks = k[ck[b]:ck[b + 1]].to(acc).transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        vs = v[ck[b]:ck[b + 1]].to(acc).transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        lq, lk = qs.shape[1], ks.shape[1]
        if lq == 0:
            continue
        scores = scale * (qs @ ks.transpose(1, 2))
        scores = scores.masked_fill(~visible(lq, lk, causal, prefixes[b], q.device), float("-inf"))
        seq_lse = torch.logsumexp(scores, dim=-1)  # -inf for rows that see nothing
        # exp(s - lse) with lse = -inf would be NaN; such rows have every s = -inf, so use 0 as their shift.
        probs = torch.exp(scores - torch.where(torch.isinf(seq_lse), 0.0, seq_lse).unsqueeze(-1))
        outs.append((cq[b], (probs @ vs).transpose(0, 1)))
        lses.append(seq_lse.transpose(0, 1))
    # Out-of-place assembly keeps autograd simple (no in-place writes into a leaf-derived buffer).
    if outs:
        index = torch.cat([torch.arange(s, s + o.shape[0], device=q.device) for s, o in outs])
        out = out.index_put((index,), torch.cat([o for _, o in outs]))
        lse = lse.index_put((index,), torch.cat(lses))
    return out.to(q.dtype), lse.t().contiguous()


def attention_backward(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *,
                       causal: bool = True, prefix_lens: torch.Tensor | None = None,
                       softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of ``attention`` written out, without autograd (so that it can run inside a
    registered op): with ``P`` the probabilities, ``dV = P^T dO``, ``dS = P * (dO V^T - delta)`` where
    ``delta = rowsum(dO * O) - dlse``, ``dQ = scale dS K`` and ``dK = scale dS^T Q``; GQA heads sum into their
    shared KV head. Returns ``(dq, dk, dv)`` in the inputs' dtypes."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    prefixes = [0] * (len(cq) - 1) if prefix_lens is None else prefix_lens.tolist()
    for b in range(len(cq) - 1):
        rows, keys = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        qs = q[rows].to(acc).transpose(0, 1)
        ks = k[keys].to(acc).transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[keys].to(acc).transpose(0, 1).repeat_interleave(group, dim=0)
        dos = dout[rows].to(acc).transpose(0, 1)
        lq, lk = qs.shape[1], ks.shape[1]
        if lq == 0 or lk == 0:
            continue
        scores = (scale * (qs @ ks.transpose(1, 2))).masked_fill(~visible(lq, lk, causal, prefixes[b], q.device),
                                                                 float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse))  # rows that see nothing: all 0
        delta = ((probs @ vs) * dos).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse[:, rows].to(acc).unsqueeze(-1)
        ds = probs * (dos @ vs.transpose(1, 2) - delta)
        dq[rows] = (scale * ds @ ks).transpose(0, 1)
        dk[keys] = (scale * ds.transpose(1, 2) @ qs).view(hkv, group, lk, d).sum(1).transpose(0, 1)
        dv[keys] = (probs.transpose(1, 2) @ dos).view(hkv, group, lk, -1).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
