"""The mdus attention kernel as a transformers attention implementation: ``attn_implementation="mdus"``.

``import mdus`` registers it in transformers' ``AttentionInterface``, together with a mask function in
``AttentionMaskInterface``. Without the latter, transformers hands a newly registered attention function
``attention_mask=None`` for a padded batch and padding would silently be attended to. The mask function is
transformers' own flash-attention one: it passes the 2-D padding mask through (or None when there is no padding),
and this module unpads with it, exactly like the ``flash_attention_2`` path.

Batches it handles, in order of precedence:

* **packed with cu_seqlens**: ``cu_seq_lens_q``/``cu_seq_lens_k`` (and ``max_length_q``/``max_length_k``) kwargs,
  as produced by ``DataCollatorWithFlattening``, on a batch of one row;
* **padded**: a 2-D padding mask; the valid tokens are gathered into the varlen layout, run, and scattered back
  (padding rows of the output are 0). With a KV cache the queries are the last ``q_len`` mask columns, and the
  causal mask is bottom-right aligned, so generation works;
* **packed by position_ids**: a batch of one row whose ``position_ids`` restart (a new sequence starts wherever a
  position is not the previous one plus one, the rule transformers' own mask code uses);
* otherwise one causal sequence per batch row.
"""

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import mdus_kernels

NAME = "mdus"


def _cu_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of the sequences packed in one row of ``position_ids``: a sequence starts at
    the first token and wherever a position is not the previous position plus one.

    Example:
        >>> cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0]]))
        (tensor([0, 3, 5, 6], dtype=torch.int32), 3)
    """
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    first = torch.nonzero(starts).flatten()
    cu = torch.cat([first, first.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _unpad(t: torch.Tensor, mask: torch.Tensor):
    """(B, S, H, D) and a (B, S) bool mask -> (valid tokens (N, H, D), flat indices, cu_seqlens, max_seqlen)."""
    lengths = mask.sum(1, dtype=torch.int32)
    index = torch.nonzero(mask.reshape(-1)).flatten()
    return t.reshape(-1, *t.shape[2:])[index], index, _cu_from_lengths(lengths), int(lengths.max())


def mdus_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           sliding_window: int | None = None, softcap: float | None = None,
                           is_causal: bool | None = None, position_ids: torch.Tensor | None = None,
                           cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                           max_length_q: int | None = None, max_length_k: int | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` is (B, Hq, Sq, D), ``key``/``value`` (B, Hkv, Sk, D);
    returns ``((B, Sq, Hq, D), None)``."""
    if dropout and module.training:
        raise NotImplementedError(f"attn_implementation='mdus' has no attention dropout; got dropout={dropout} "
                                  "(set the config's attention_dropout to 0)")
    if softcap:
        raise NotImplementedError(f"attn_implementation='mdus' does not support attention logit softcapping "
                                  f"(softcap={softcap})")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("attn_implementation='mdus' never forms the attention weights; use 'eager' to "
                                  "get output_attentions")
    if not query.dtype == key.dtype == value.dtype:
        # Under autocast the rotary embedding hands back fp32 q/k while v comes from a low-precision projection: run
        # the kernel in the autocast dtype (as transformers' flash-attention path does).
        device_type = query.device.type
        target = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else value.dtype)
        query, key, value = query.to(target), key.to(target), value.to(target)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if sliding_window is not None and sk > sliding_window:
        raise NotImplementedError(f"attn_implementation='mdus' has no sliding window; this call attends {sk} keys "
                                  f"with sliding_window={sliding_window}")
    run = dict(causal=causal, softmax_scale=scaling)

    if cu_seq_lens_q is not None and cu_seq_lens_k is not None and batch == 1:
        max_q = int(max_length_q) if max_length_q is not None else None
        max_k = int(max_length_k) if max_length_k is not None else None
        out = mdus_kernels.attention(q[0], k[0], v[0], cu_seqlens=(cu_seq_lens_q.int(), cu_seq_lens_k.int()),
                                     max_seqlen=None if max_q is None or max_k is None else (max_q, max_k), **run)
        return out.unsqueeze(0), None

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attn_implementation='mdus' expects a 2-D padding mask, got shape "
                             f"{tuple(attention_mask.shape)}")
        mask_k = attention_mask[:, -sk:].bool()
        k_flat, index_k, cu_k, max_k = _unpad(k, mask_k)
        v_flat = v.reshape(-1, *v.shape[2:])[index_k]
        q_flat, index_q, cu_q, max_q = _unpad(q, mask_k[:, -sq:])
        out_flat = mdus_kernels.attention(q_flat, k_flat, v_flat, cu_seqlens=(cu_q, cu_k), max_seqlen=(max_q, max_k),
                                          **run)
        out = q.new_zeros(batch * sq, *out_flat.shape[1:]).index_copy(0, index_q, out_flat)
        return out.view(batch, sq, *out.shape[1:]), None

    if position_ids is not None and batch == 1 and sq == sk and sq > 1:
        cu, max_len = cu_seqlens_from_position_ids(position_ids[:1])
        if cu.numel() > 2:
            out = mdus_kernels.attention(q[0], k[0], v[0], cu_seqlens=cu, max_seqlen=max_len, **run)
            return out.unsqueeze(0), None

    return mdus_kernels.attention(q, k, v, **run), None


def register() -> None:
    """Registers ``"mdus"`` with transformers (idempotent; ``import mdus`` does it)."""
    AttentionInterface.register(NAME, mdus_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
