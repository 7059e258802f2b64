"""The E-Branchformer block, built to be inserted between the frozen layers of a decoder LLM.

Data flow (ESPnet's E-Branchformer, with the changes an insertion into a frozen causal LM needs)::

    x = x + 1/2 FFN_macaron(norm(x))                                   (optional)
    a = MHSA(norm(x))           causal, the host's RoPE and GQA layout, through mdus_kernels.attention
    g = cgMLP(norm(x))          restricted to speech positions (0 at text positions)
    c = [a, g]                  (.., 2d)
    x = x + Linear_2d->d(c + DWConv(c))                                  the merge module
    x = x + 1/2 FFN(norm(x))                                            (optional)
    x = norm_final(x)                                                   (optional, off: it would break identity)

**Exact identity at initialization**: the attention output projection, the merge DWConv and the FFNs' output
layers start at zero and the merge projection starts as ``W = [I; 0]``, so the block adds exactly 0 to its input,
and the up-scaled model reproduces the frozen model bit for bit. The attention branch receives gradient from the
first step (through the identity half of the merge); the cgMLP branch as soon as the merge's zero half moves.

**Causal by default**: a speech LM predicts the next token, so both depthwise convs only look back
(``causal=False`` gives ESPnet's centered convs, for bidirectional encoders).

**Layouts** follow the host model's attention call: a padded batch with a 2-D ``attention_mask`` (padding is
excluded: it is zeroed before the convs and is never speech), or a packed row (``cu_seq_lens_q`` kwargs, or
``position_ids`` that restart) whose sequences never mix, in the attention or in the convs.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import mdus_kernels
from mdus.attention import cu_seqlens_from_position_ids, mdus_attention_forward
from mdus.blocks.cgmlp import ConvolutionalGatingMLP


class ConvStateLayer(DynamicLayer):
    """The KV-cache slot of an E-Branchformer block: a ``DynamicLayer`` that also keeps the block's conv history
    (``conv_state``) and applies the cache's batch edits to it (beam-search ``reorder_cache``,
    ``batch_select_indices``, ``batch_repeat_interleave``; ``reset`` drops it). A ``crop`` cannot bring back rows
    the history no longer holds: the block raises on its next call instead."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv_state = None  # (cache length it was saved at, x rows, speech flags, c rows), batch first

    def _edit_batch(self, edit) -> None:
        if self.conv_state is not None:
            seen, *rows = self.conv_state
            self.conv_state = (seen, *(edit(r) for r in rows))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        super().reorder_cache(beam_idx)
        self._edit_batch(lambda r: r.index_select(0, beam_idx.to(r.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._edit_batch(lambda r: r[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._edit_batch(lambda r: r.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        super().reset()
        self.conv_state = None


def make_norm(norm: str | Callable[[int], nn.Module], size: int, eps: float) -> nn.Module:
    """``"rms"`` (LLaMA-family hosts), ``"layer"`` (ESPnet), or a factory ``size -> module`` (e.g. the host's own
    norm class)."""
    if callable(norm):
        return norm(size)
    if norm == "rms":
        return nn.RMSNorm(size, eps=eps)
    if norm == "layer":
        return nn.LayerNorm(size, eps=eps)
    raise ValueError(f"norm must be 'rms', 'layer' or a callable size -> module, got {norm!r}")


class FeedForward(nn.Sequential):
    """Linear -> SiLU -> Linear, the output layer zero-initialized so that a new block starts as the identity."""

    def __init__(self, size: int, units: int):
        super().__init__(nn.Linear(size, units), nn.SiLU(), nn.Linear(units, size))
        nn.init.zeros_(self[2].weight)
        nn.init.zeros_(self[2].bias)


class EBranchformerBlock(GradientCheckpointingLayer):
    """An E-Branchformer layer with a decoder layer's call signature (``hidden_states (B, T, d)`` plus the host's
    ``attention_mask``, ``position_ids``, ``position_embeddings``, ``past_key_values`` and kwargs), returning the
    new ``hidden_states``.

    Args:
        config: the host's transformers config (hidden size, heads, KV heads, head dim, RMSNorm eps, bias).
        layer_idx: the block's index in the up-scaled stack (its KV-cache slot).
        cgmlp_units: cgMLP width U (the gate convolves U/2 channels). Default ``4 * hidden_size``.
        cgmlp_kernel: cgMLP depthwise conv width (3-63). merge_kernel: the merge DWConv's width.
        causal: causal (default) or centered convs.
        macaron_ffn, ffn: add the half-step FFNs before / after the branches (width ``ffn_units``, default the host's
            ``intermediate_size``).
        norm: the pre-norms' type: ``"rms"``, ``"layer"`` or a factory ``size -> module``.
        final_norm: ESPnet's final LayerNorm (off: it breaks the identity at initialization).

    Forward kwargs: ``speech_mask`` ((B, T) bool, True at speech tokens) restricts the cgMLP branch to speech
    positions; without it every token is treated as speech.
    """

    is_causal = True  # read by mdus_attention_forward
    takes_speech_mask = True  # SpeechLM passes speech_mask to blocks that say so

    def __init__(self, config, layer_idx: int | None = None, *, cgmlp_units: int | None = None,
                 cgmlp_kernel: int = 31, merge_kernel: int = 31, causal: bool = True, macaron_ffn: bool = False,
                 ffn: bool = False, ffn_units: int | None = None, norm: str | Callable = "rms",
                 final_norm: bool = False):
        super().__init__()
        d = config.hidden_size
        self.config, self.layer_idx, self.causal = config, layer_idx, causal
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or d // self.num_heads
        eps = getattr(config, "rms_norm_eps", 1e-5)
        bias = bool(getattr(config, "attention_bias", False))
        ffn_units = ffn_units or getattr(config, "intermediate_size", 4 * d)

        self.ffn_macaron = FeedForward(d, ffn_units) if macaron_ffn else None
        self.norm_ffn_macaron = make_norm(norm, d, eps) if macaron_ffn else None
        self.norm_mha = make_norm(norm, d, eps)
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.norm_mlp = make_norm(norm, d, eps)
        self.cgmlp = ConvolutionalGatingMLP(d, cgmlp_units or 4 * d, cgmlp_kernel, causal=causal)
        self.fusion_weight = nn.Parameter(torch.zeros(2 * d, 1, merge_kernel))  # depthwise over the 2d channels
        self.fusion_bias = nn.Parameter(torch.zeros(2 * d))
        self.merge_proj = nn.Linear(2 * d, d)
        self.ffn = FeedForward(d, ffn_units) if ffn else None
        self.norm_ffn = make_norm(norm, d, eps) if ffn else None
        self.norm_final = nn.LayerNorm(d) if final_norm else None
        self.reset_identity()

    @torch.no_grad()
    def reset_identity(self) -> None:
        """Sets the parameters that make the block the identity: zero attention output, zero merge DWConv, merge
        projection ``[I; 0]`` (the attention half passes through, the cgMLP half is closed)."""
        d = self.config.hidden_size
        nn.init.zeros_(self.o_proj.weight)
        nn.init.zeros_(self.fusion_weight)
        nn.init.zeros_(self.fusion_bias)
        self.merge_proj.weight.zero_()
        self.merge_proj.weight[:, :d] = torch.eye(d)
        self.merge_proj.bias.zero_()

    def _layout(self, hidden, attention_mask, position_ids, cu_seq_lens_q):
        """(cu_seqlens for a packed row or None, (B, T) bool mask of real tokens or None)."""
        batch, t = hidden.shape[:2]
        if cu_seq_lens_q is not None and batch == 1:
            return cu_seq_lens_q.int(), None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("EBranchformerBlock needs the 2-D padding mask of attn_implementation='mdus', got "
                                 f"an attention_mask of shape {tuple(attention_mask.shape)}")
            return None, attention_mask[:, -t:].bool()
        if position_ids is not None and batch == 1 and t > 1:
            cu, _ = cu_seqlens_from_position_ids(position_ids[:1])
            if cu.numel() > 2:
                return cu, None
        return None, None

    def _attend(self, h, attention_mask, position_ids, position_embeddings, past_key_values, **kwargs):
        batch, t, _ = h.shape
        q = self.q_proj(h).view(batch, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, t, -1, self.head_dim).transpose(1, 2)
        if position_embeddings is None:
            raise ValueError("EBranchformerBlock needs the host's rotary position_embeddings (cos, sin)")
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out, _ = mdus_attention_forward(self, q, k, v, attention_mask, scaling=self.head_dim ** -0.5,
                                        position_ids=position_ids, **kwargs)
        return self.o_proj(out.reshape(batch, t, -1))

    def _cgmlp_branch(self, x, gate, cu):
        """The cgMLP of the branch input x (B, T, d), 0 at positions where ``gate`` is False."""
        batch, t, d = x.shape
        h = self.norm_mlp(x)
        if cu is not None:
            g = self.cgmlp(h.view(t, d), cu_seqlens=cu,
                           speech_mask=None if gate is None else gate.view(t)).view(batch, t, d)
        else:
            g = self.cgmlp(h, speech_mask=gate)
        if gate is not None:
            g = g * gate.unsqueeze(-1).to(g.dtype)  # channel_proj2's bias would otherwise reach text positions
        return g

    @staticmethod
    def _masked(c, valid):
        """``c`` with padding rows zeroed: the merge conv reads them as the zero padding of a segment edge."""
        return c if valid is None else c * valid.unsqueeze(-1).to(c.dtype)

    def _merge_conv(self, c, cu):
        if cu is not None:
            t = c.shape[1]
            return mdus_kernels.depthwise_conv1d(c.view(t, -1), self.fusion_weight, self.fusion_bias, cu_seqlens=cu,
                                                 causal=self.causal).view(c.shape)
        return mdus_kernels.depthwise_conv1d(c, self.fusion_weight, self.fusion_bias, causal=self.causal)

    def _claim_slot(self, cache) -> None:
        """Makes the block's KV-cache slot a ``ConvStateLayer`` (before the attention fills it), creating the slots
        up to it in a lazily grown cache."""
        layers = getattr(cache, "layers", None)
        if layers is None or self.layer_idx is None:
            raise ValueError("cached decoding of an E-Branchformer block needs a transformers Cache with per-layer "
                             "slots (DynamicCache) and the block's layer_idx")
        grow = getattr(cache, "layer_class_to_replicate", None)
        while grow is not None and len(layers) < self.layer_idx:
            layers.append(grow())
        if len(layers) == self.layer_idx:
            layers.append(ConvStateLayer())
        elif not isinstance(layers[self.layer_idx], ConvStateLayer):
            slot = layers[self.layer_idx]
            if type(slot) is not DynamicLayer or slot.get_seq_length() > 0:
                raise ValueError(f"KV-cache slot {self.layer_idx} (this E-Branchformer block's) is a "
                                 f"{type(slot).__name__} holding {slot.get_seq_length()} tokens: decode with a "
                                 "DynamicCache filled only by this model")
            layers[self.layer_idx] = ConvStateLayer()

    def _cached_convs(self, cache, x, a, gate, cu, valid):
        """(c, merge DWConv(c)) for the new rows of incremental decoding. A KV cache holds no conv inputs, so the
        block keeps, in its cache slot (``ConvStateLayer``), the last k_cgmlp - 1 branch inputs (with their speech
        flags) and the last k_merge - 1 rows of c: the new rows depend on nothing older, so they equal a full
        recomputation."""
        if not self.causal:
            raise NotImplementedError("cached decoding needs causal convs (EBranchformerBlock(causal=True))")
        if cu is not None:
            raise NotImplementedError("cached decoding of an E-Branchformer block takes one sequence per row "
                                      "(padded, not packed)")
        batch, t, _ = x.shape
        speech = gate if gate is not None else torch.ones(batch, t, dtype=torch.bool, device=x.device)
        slot = cache.layers[self.layer_idx]
        # The attention has already added the new rows to the cache: it held ``past`` tokens before this call. The
        # conv state must be the one saved when the cache held that many; a cache cropped or rewound since then
        # (``DynamicCache.crop``) would pair the new rows with the wrong history.
        past = cache.get_seq_length(self.layer_idx) - t
        empty = (0, x[:, :0], speech[:, :0], x.new_zeros(batch, 0, 2 * x.shape[-1]))
        seen, x_hist, s_hist, c_hist = (slot.conv_state or empty) if past else empty
        if seen != past:
            raise ValueError(f"the KV cache holds {past} tokens but this E-Branchformer block's conv state was saved "
                             f"at {seen} (the cache was cropped or rewound, or filled without this model): decode "
                             "again from the prompt with a fresh cache")
        x_all, s_all = torch.cat([x_hist, x], 1), torch.cat([s_hist, speech], 1)
        c = self._masked(torch.cat([a, self._cgmlp_branch(x_all, s_all, None)[:, -t:]], dim=-1), valid)
        c_all = torch.cat([c_hist, c], 1)
        fused = self._merge_conv(c_all, None)[:, -t:]
        k_gate, k_merge = self.cgmlp.csgu.conv.weight.shape[-1], self.fusion_weight.shape[-1]
        keep = lambda v, n: v[:, v.shape[1] - min(n, v.shape[1]):]  # noqa: E731
        slot.conv_state = (past + t, keep(x_all, k_gate - 1), keep(s_all, k_gate - 1), keep(c_all, k_merge - 1))
        return c, fused

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                speech_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        x = hidden_states
        batch, t, d = x.shape
        cu, valid = self._layout(x, attention_mask, position_ids, kwargs.get("cu_seq_lens_q"))
        if speech_mask is not None:
            if speech_mask.shape != (batch, t) or speech_mask.dtype != torch.bool:
                raise ValueError(f"speech_mask must be a ({batch}, {t}) bool tensor (batch, tokens), got "
                                 f"{tuple(speech_mask.shape)} {speech_mask.dtype}")
        gate = speech_mask if valid is None else (valid if speech_mask is None else speech_mask & valid)

        if self.ffn_macaron is not None:
            x = x + 0.5 * self.ffn_macaron(self.norm_ffn_macaron(x))
        if past_key_values is not None:
            self._claim_slot(past_key_values)
        a = self._attend(self.norm_mha(x), attention_mask, position_ids, position_embeddings, past_key_values,
                         **kwargs)
        if past_key_values is not None:
            c, fused = self._cached_convs(past_key_values, x, a, gate, cu, valid)
        else:
            c = self._masked(torch.cat([a, self._cgmlp_branch(x, gate, cu)], dim=-1), valid)
            fused = self._merge_conv(c, cu)
        x = x + self.merge_proj(c + fused)
        if self.ffn is not None:
            x = x + 0.5 * self.ffn(self.norm_ffn(x))
        if self.norm_final is not None:
            x = self.norm_final(x)
        return x
