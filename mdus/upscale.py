"""Multimodal depth up-scaling of a Hugging Face decoder LLM, and the baselines on the same API.

``upscale(model, ...)`` freezes every weight of a transformers causal LM (LLaMA family: Llama/SmolLM2, Qwen2/3,
Mistral), inserts new blocks among its layers and adds a speech vocabulary above the text one. Only the new blocks
and the speech rows train. ``full_finetune`` and ``lora`` wrap the same model the same way without inserted blocks.

The wrapper runs the host's own modules (embedding, rotary embedding, decoder layers, final norm, head) in the
host's order, with the inserted blocks spliced in, so with the blocks at their identity initialization it computes
exactly what the host computes; ``without_inserted()`` is the host model itself, whose weights training never
touches. Every attention call goes through ``mdus_kernels.attention`` (``attn_implementation="mdus"``), and the
training loss is ``mdus_kernels.linear_cross_entropy`` over (frozen text rows, trainable speech rows): the
(tokens x vocab) logits are never formed when labels are given.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mdus_kernels
from mdus.attention import NAME as ATTN_NAME
from mdus.attention import cu_seqlens_from_position_ids
from mdus.gated_mlp import lean_gated_mlp
from mdus_kernels._checks import check_number, check_offsets, longest_segment

PLACEMENTS = ("interleaved", "sandwich", "top", "middle", "bottom")
ROUTES = ("all", "speech_only")
BLOCKS = ("transformer", "ebranchformer")
IGNORE = -100


def _is_int(value) -> bool:
    """An integer (Python or numpy, not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def insertion_positions(n_layers: int, n_insert: int | None, placement: str | list[int]) -> list[int]:
    """Where the new blocks go, as the number of original layers that run before each block (0..n_layers).
    ``n_insert`` None: 25% of the depth for a named placement, the count of a list.

    * ``interleaved``: one block after every ``n_layers / n_insert`` layers (after layers 4, 8, ... for 32 + 8;
      with more blocks than layers, spread as evenly as they go after the layers, never before the first);
    * ``top`` / ``bottom`` / ``middle``: all blocks after the last layer / before the first / after layer L // 2;
    * ``sandwich``: half before the first layer, half after the last;
    * a list of ints: those positions.

    Example:
        >>> insertion_positions(8, 2, "interleaved"), insertion_positions(8, 3, "sandwich")
        ([4, 8], [0, 8, 8])
    """
    if n_insert is not None and not _is_int(n_insert):
        raise TypeError(f"n_insert must be an int or None, got {n_insert!r}")
    if isinstance(placement, (list, tuple)):
        if not all(_is_int(p) for p in placement):
            raise TypeError(f"placement positions must be ints (the number of original layers before each block), "
                            f"got {list(placement)}")
        positions = [int(p) for p in placement]
        if any(p < 0 or p > n_layers for p in positions):
            raise ValueError(f"placement positions must be in [0, {n_layers}] (the number of original layers "
                             f"before the block), got {list(placement)}")
        if n_insert is not None and n_insert != len(positions):
            raise ValueError(f"n_insert={n_insert} does not match the {len(positions)} positions given")
        return sorted(positions)
    if n_insert is None:
        n_insert = max(1, round(n_layers / 4))
    if n_insert < 0:
        raise ValueError(f"n_insert must be >= 0, got {n_insert}")
    if placement == "interleaved":
        if n_insert > n_layers:  # more blocks than layers: rounded up, so every block still follows a layer
            return [-(-(i + 1) * n_layers // n_insert) for i in range(n_insert)]
        return [(i + 1) * n_layers // n_insert for i in range(n_insert)]
    if placement == "top":
        return [n_layers] * n_insert
    if placement == "bottom":
        return [0] * n_insert
    if placement == "middle":
        return [n_layers // 2] * n_insert
    if placement == "sandwich":
        return [0] * (n_insert // 2) + [n_layers] * (n_insert - n_insert // 2)
    raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)} or a list of positions, got {placement!r}")


@dataclass
class SpeechLMConfig:
    """Everything needed to rebuild a wrapper around a separately loaded base model (saved with the weights)."""

    method: str = "dus"                     # "dus", "full_finetune" or "lora"
    positions: list[int] = field(default_factory=list)
    block: str = "transformer"
    block_config: dict = field(default_factory=dict)
    speech_vocab_size: int = 0
    route: str = "all"
    train_text_embeddings: bool = False
    lora: dict = field(default_factory=dict)  # rank, alpha, target_modules for method="lora"
    # Continuous speech input: mdus.speech.subsampler.build_speech_encoder's config (ConvSubsampler options n_mels,
    # stride; or {"type": "symbols", "token_ids": ...}); empty = discrete speech units.
    speech_encoder: dict = field(default_factory=dict)


@dataclass
class SpeechLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    past_key_values: object = None


@functools.cache
def cache_kwarg(module_cls: type) -> str:
    """The name ``module_cls.forward`` gives the KV cache: ``cache`` from transformers 5.24 on (which deprecates
    ``past_key_values`` there), ``past_key_values`` before and in our own blocks."""
    return "cache" if "cache" in inspect.signature(module_cls.forward).parameters else "past_key_values"


# Config fields a transformer block must share with its host: it lives in the host's residual stream (width) and
# receives the host's rotary embeddings (head dim, RoPE); the rest do not describe one layer.
HOST_FIELDS = ("hidden_size", "head_dim", "rope_parameters", "rope_theta", "rope_scaling", "vocab_size",
               "num_hidden_layers", "tie_word_embeddings", "model_type")


def _transformer_block(base, layer_idx: int, block_config: dict) -> nn.Module:
    """A decoder layer of the host's own class (LLaMA-style), built from its config with ``block_config``'s
    overrides, with the attention output and MLP down projections zeroed (LLaMA Pro): an exact identity."""
    config = copy.deepcopy(base.config)
    known = config.to_dict()
    for key in block_config:
        if key not in known:
            raise ValueError(f"block_config: {key!r} is not a field of the host's {type(config).__name__} (fields "
                             "such as intermediate_size, num_attention_heads, num_key_value_heads)")
        if key in HOST_FIELDS:
            raise ValueError(f"block_config: {key!r} must stay the host's ({known[key]!r}): the block runs in its "
                             "residual stream with its rotary embeddings")
    for key, value in block_config.items():
        setattr(config, key, value)
    layer_cls = type(base.get_decoder().layers[0])
    # Qwen2-style layers read config.layer_types[layer_idx]; build as layer 0, then give the block its own KV slot.
    layer = layer_cls(config, 0)
    layer.self_attn.layer_idx = layer_idx
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            if proj.bias is not None:
                proj.bias.zero_()
    return layer


class SpeechLM(nn.Module):
    """A transformers causal LM with inserted blocks and a speech vocabulary. Build it with ``upscale``,
    ``full_finetune`` or ``lora``; ``base`` is the wrapped model.

    ``forward`` takes a padded batch (``input_ids`` (B, T), optional ``attention_mask``) or a packed one
    (``input_ids`` (T,) with ``cu_seqlens`` (B + 1,) int32). Token ids ``>= text_vocab_size`` are speech tokens.
    ``labels`` (aligned with ``input_ids``, shifted inside, ``-100`` = ignore) or ``loss_mask`` (True where the
    token is a prediction target) give the mean next-token loss, computed by the fused loss without logits; a
    packed sequence's last token never predicts the next sequence's first.

    **Continuous speech input** (``config.speech_encoder``, e.g. ``{"n_mels": 80, "stride": 4}``): the model owns a
    trainable ``mdus.speech.ConvSubsampler``; ``speech_features`` (a padded (B, F, n_mels) batch of log-mel frames
    with ``speech_feature_lengths`` (B,), or one utterance (F, n_mels)) become ``ceil(F / stride)`` embeddings per
    utterance, which replace the embeddings of the speech positions of ``input_ids`` (placeholder id
    ``text_vocab_size``) in order: utterance by utterance, position by position. With ``{"type": "symbols",
    "token_ids": ...}`` it owns a ``SymbolProjection`` instead, started from the text embeddings of ``token_ids``,
    and each row of ``speech_features`` (a distribution over the symbols) is one position.
    """

    def __init__(self, base: nn.Module, config: SpeechLMConfig):
        super().__init__()
        if config.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {config.route!r}")
        if config.block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {config.block!r}")
        if not _is_int(config.speech_vocab_size):
            raise TypeError(f"speech_vocab_size must be an int, got {config.speech_vocab_size!r}")
        if config.speech_vocab_size < 0:
            raise ValueError(f"speech_vocab_size must be >= 0, got {config.speech_vocab_size}")
        if config.route == "speech_only" and not config.speech_vocab_size:
            raise ValueError("route='speech_only' needs speech_vocab_size >= 1: without speech positions the "
                             "inserted blocks would never run on anything")
        if config.route == "speech_only" and config.train_text_embeddings:
            raise ValueError("route='speech_only' keeps text outputs exactly the base model's; "
                             "train_text_embeddings=True would change them: choose one")
        head = base.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise ValueError("the base model needs a bias-free linear output head (a causal LM)")
        self.base, self.config = base, config
        base.set_attn_implementation(ATTN_NAME)
        decoder = base.get_decoder()
        n_layers = len(decoder.layers)
        bad = [p for p in config.positions if not 0 <= p <= n_layers]
        if bad:
            raise ValueError(f"insertion positions must be in [0, {n_layers}] (the base model has {n_layers} layers), "
                             f"got {bad}")
        embed = base.get_input_embeddings()
        self.text_vocab_size, d = embed.weight.shape
        if head.weight.shape[0] != self.text_vocab_size:
            raise ValueError(f"the input embedding ({self.text_vocab_size} rows) and the output head "
                             f"({head.weight.shape[0]} rows) must cover the same text vocabulary")

        # Layer i of the up-scaled stack: original layers keep their KV-cache slot i < n_layers; blocks get the
        # slots after them.
        if config.block == "transformer":
            make = lambda i: _transformer_block(base, n_layers + i, config.block_config)  # noqa: E731
        else:
            from mdus.blocks.ebranchformer import EBranchformerBlock

            make = lambda i: EBranchformerBlock(base.config, n_layers + i, **config.block_config)  # noqa: E731
        self.blocks = nn.ModuleList(make(i) for i in range(len(config.positions)))
        self.blocks.to(device=embed.weight.device, dtype=embed.weight.dtype)
        for _, layer in self.stack():  # the host's SwiGLU MLPs keep 2 of their 3 activations (same results)
            lean_gated_mlp(getattr(layer, "mlp", None))

        self.speech_embed = None
        self.speech_out = None  # untied speech output rows; tied ones are speech_embed.weight
        if config.speech_vocab_size:
            # (A skeleton on the meta device, which ``load`` builds to check a checkpoint, has no values.)
            std = (lambda w: 1.0 if w.is_meta else float(w.detach().float().std()))  # noqa: E731
            self.speech_embed = nn.Embedding(config.speech_vocab_size, d, device=embed.weight.device,
                                             dtype=embed.weight.dtype)
            nn.init.normal_(self.speech_embed.weight, std=std(embed.weight))
            if head.weight is not embed.weight:  # the host unties its head: so do the speech rows
                self.speech_out = nn.Parameter(torch.empty_like(self.speech_embed.weight).normal_(
                    std=std(head.weight)))
        self.speech_encoder = None
        if config.speech_encoder:
            from mdus.speech.subsampler import build_speech_encoder

            if not config.speech_vocab_size:
                raise ValueError("a speech encoder needs speech_vocab_size >= 1 (its placeholder id marks the speech "
                                 "positions)")
            self.speech_encoder = build_speech_encoder(d, config.speech_encoder, embed.weight.detach()).to(
                device=embed.weight.device, dtype=embed.weight.dtype)
        self._set_trainable()

    @property
    def speech_head(self) -> torch.Tensor | None:
        """The (speech_vocab, d) output rows of the speech tokens (the speech embedding when the host ties)."""
        if self.speech_out is not None:
            return self.speech_out
        return None if self.speech_embed is None else self.speech_embed.weight

    def speech_input_parameters(self) -> list[nn.Parameter]:
        """The speech rows and front end every method trains from scratch: the speech embeddings, their untied
        output rows and the conv subsampler (whichever exist)."""
        params = [p for m in (self.speech_embed, self.speech_encoder) if m is not None for p in m.parameters()]
        return params + ([self.speech_out] if self.speech_out is not None else [])

    # ----------------------------------------------------------------------------------------------- structure

    def _set_trainable(self) -> None:
        method = self.config.method
        if method == "full_finetune":
            self.base.requires_grad_(True)
        elif method == "dus":
            self.base.requires_grad_(False)
            if self.config.train_text_embeddings:
                self.base.get_input_embeddings().requires_grad_(True)
                self.base.get_output_embeddings().requires_grad_(True)
        # method == "lora": peft has already frozen the base and made the adapters trainable
        for module in (self.blocks, self.speech_embed, self.speech_encoder):
            if module is not None:
                module.requires_grad_(True)
        if self.speech_out is not None:
            self.speech_out.requires_grad_(True)

    def without_inserted(self) -> nn.Module:
        """The base model without the inserted blocks (and without the speech rows): the host model object itself,
        whose weights are frozen, so it reproduces the base model exactly at any point of training. Only depth
        up-scaling with frozen text embeddings keeps that promise: full fine-tuning and ``train_text_embeddings``
        train the host's own weights and LoRA injects its adapters into them, so for those this raises."""
        if self._trains_host() or self.config.method == "lora":
            what = "train_text_embeddings=True" if self.config.method == "dus" else f"method={self.config.method!r}"
            raise ValueError(f"without_inserted() is the untouched base only for depth up-scaling with frozen text "
                             f"embeddings; this model ({what}) trains the host's own weights")
        return self.base

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Activation checkpointing for every layer of the up-scaled stack: the host's layers through the host's
        own switch (``kwargs`` go to it: ``activation_checkpointing_kwargs``, ``every_n_layers`` ...), and every
        inserted block, which trains and so holds most of what a step saves."""
        host = self.base
        (getattr(host, "activation_checkpointing_enable", None) or host.gradient_checkpointing_enable)(**kwargs)
        func = next(m._gradient_checkpointing_func for m in host.modules()
                    if getattr(m, "_gradient_checkpointing_func", None) is not None)
        for block in self.blocks:
            block.gradient_checkpointing, block._gradient_checkpointing_func = True, func

    def gradient_checkpointing_disable(self) -> None:
        host = self.base
        (getattr(host, "activation_checkpointing_disable", None) or host.gradient_checkpointing_disable)()
        for block in self.blocks:
            block.gradient_checkpointing = False

    def _trains_host(self) -> bool:
        """Whether training changes the host's own weights (full fine-tuning, ``train_text_embeddings``)."""
        return self.config.method == "full_finetune" or self.config.train_text_embeddings

    def stack(self) -> list[tuple[str, nn.Module]]:
        """The up-scaled layer stack in execution order, as ("base"|"inserted", module) pairs."""
        layers = list(self.base.get_decoder().layers)
        out = []
        for i in range(len(layers) + 1):
            out += [("inserted", b) for b, p in zip(self.blocks, self.config.positions, strict=True) if p == i]
            if i < len(layers):
                out.append(("base", layers[i]))
        return out

    def output_weights(self) -> tuple[torch.Tensor, ...]:
        text = self.base.get_output_embeddings().weight
        return (text,) if self.speech_head is None else (text, self.speech_head)

    # ------------------------------------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        text = self.base.get_input_embeddings()
        vt = self.text_vocab_size
        out = text(input_ids.clamp(max=vt - 1))
        if self.speech_embed is None:
            return out
        speech = input_ids >= vt
        # Both lookups run for every token, but autograd only reaches the speech table (the text one is frozen).
        return torch.where(speech.unsqueeze(-1), self.speech_embed((input_ids - vt).clamp(min=0)), out)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, return_logits: bool | None = None, past_key_values=None,
                use_cache: bool = False, speech_features: torch.Tensor | None = None,
                speech_feature_lengths: torch.Tensor | None = None) -> SpeechLMOutput:
        packed = cu_seqlens is not None
        ids, attention_mask, position_ids, layer_kwargs = self._prepare(input_ids, attention_mask, position_ids,
                                                                        cu_seqlens, max_seqlen, past_key_values)
        speech = ids >= self.text_vocab_size
        hidden = self.embed(ids)
        if speech_features is not None or (self.speech_encoder is not None and bool(speech.any())):
            hidden = self._splice_features(hidden, speech, speech_features, speech_feature_lengths)
        decoder = self.base.get_decoder()
        position_embeddings = decoder.rotary_emb(hidden, position_ids)
        common = dict(attention_mask=attention_mask, position_ids=position_ids,
                      position_embeddings=position_embeddings, use_cache=use_cache, **layer_kwargs)
        for kind, layer in self.stack():
            kw = {**common, cache_kwarg(type(layer)): past_key_values}
            if kind == "base":
                hidden = layer(hidden, **kw)
                continue
            if getattr(layer, "takes_speech_mask", False):
                new = layer(hidden, speech_mask=speech, **kw)
            else:
                new = layer(hidden, **kw)
            # speech_only: text positions pass through the inserted blocks unchanged.
            hidden = torch.where(speech.unsqueeze(-1), new, hidden) if self.config.route == "speech_only" else new
        hidden = decoder.norm(hidden)

        loss = None
        targets = self._targets(ids, labels, loss_mask, attention_mask, layer_kwargs.get("cu_seq_lens_q"))
        if targets is not None:
            # Only the rows with a target enter the loss (in ASR training the speech rows have none, and they are
            # most of the tokens): the head GEMMs then cost what the targets need. The mean is unchanged.
            rows = torch.nonzero(targets.reshape(-1) != IGNORE).squeeze(1)
            loss = mdus_kernels.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1])[rows], self.output_weights(),
                                                     targets.reshape(-1)[rows], ignore_index=IGNORE)
        logits = None
        if return_logits or (return_logits is None and targets is None):
            # Per head, then joined: joining the weights instead would copy the whole text head on every call
            # (60 ms per decoding step for SmolLM2-135M on CPU).
            logits = torch.cat([F.linear(hidden, w) for w in self.output_weights()], dim=-1)
            if packed:
                logits = logits[0]
        return SpeechLMOutput(loss=loss, logits=logits, hidden_states=hidden[0] if packed else hidden,
                              past_key_values=past_key_values)

    def _splice_features(self, hidden, speech, features, lengths):
        """``hidden`` with the speech positions' embeddings replaced by the speech encoder's outputs."""
        if self.speech_encoder is None:
            raise ValueError("speech_features given, but this model reads speech units (it has no speech encoder)")
        if features is None:
            raise ValueError("input_ids hold speech positions and this model reads speech as features: pass "
                             "speech_features (and speech_feature_lengths for a padded batch)")
        if not isinstance(features, torch.Tensor) or features.dim() not in (2, 3):
            raise ValueError(f"speech_features must be (frames, n_mels) or (batch, frames, n_mels), got "
                             f"{getattr(features, 'shape', type(features).__name__)}")
        if features.dim() == 2:
            if lengths is not None:
                raise ValueError("speech_feature_lengths goes with a padded (batch, frames, n_mels) speech_features")
            features, lengths = features[None], torch.tensor([features.shape[0]], device=features.device)
        elif lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[1], device=features.device)
        emb, out_lengths = self.speech_encoder(features.to(hidden.dtype), lengths)
        valid = torch.arange(emb.shape[1], device=emb.device) < out_lengths[:, None]
        rows = emb[valid]
        n_speech = int(speech.sum())
        if rows.shape[0] != n_speech:
            raise ValueError(f"speech_features give {rows.shape[0]} speech positions (ceil(frames / "
                             f"{self.speech_encoder.stride}) per utterance) but input_ids hold {n_speech} speech "
                             "tokens")
        return hidden.masked_scatter(speech.unsqueeze(-1), rows.to(hidden.dtype))

    def _prepare(self, input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen, past_key_values):
        """Validates the batch; returns (ids (B, T), 2-D bool mask or None, position_ids, kwargs for the layers)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("input_ids must be an int64/int32 tensor of token ids")
        vocab = self.text_vocab_size + self.config.speech_vocab_size
        lo, hi = torch.stack([input_ids.min(), input_ids.max()]).tolist() if input_ids.numel() else (0, 0)
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids must be in [0, {vocab}) (text vocabulary {self.text_vocab_size} + speech "
                             f"{self.config.speech_vocab_size}), got values in [{lo}, {hi}]")
        kwargs = {}
        if cu_seqlens is not None:
            if input_ids.dim() != 1:
                raise ValueError(f"packed input_ids must be 1-D (total_tokens,) with cu_seqlens, got shape "
                                 f"{tuple(input_ids.shape)}")
            if attention_mask is not None:
                raise ValueError("a packed batch (cu_seqlens) has no padding: attention_mask must be None")
            check_offsets(cu_seqlens, "cu_seqlens", device=input_ids.device)
            longest = longest_segment(cu_seqlens, "cu_seqlens", input_ids.shape[0], "input_ids.shape[0]")
            cu = cu_seqlens.to(torch.int32)
            lengths = (cu[1:] - cu[:-1]).long()
            if max_seqlen is None:
                max_seqlen = longest
            if position_ids is None:
                starts = torch.repeat_interleave(cu[:-1].long(), lengths, output_size=input_ids.shape[0])
                position_ids = torch.arange(input_ids.shape[0], device=input_ids.device) - starts
            kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen)
            return input_ids.unsqueeze(0), None, position_ids.reshape(1, -1), kwargs
        if input_ids.dim() != 2:
            raise ValueError(f"padded input_ids must be 2-D (batch, tokens), got shape {tuple(input_ids.shape)}")
        past = self._fit_cache(past_key_values).get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None:
            expected = (input_ids.shape[0], past + input_ids.shape[1])
            if tuple(attention_mask.shape) != expected:
                raise ValueError(f"attention_mask must be (batch, past + tokens) = {expected} (the KV cache holds "
                                 f"{past} tokens), got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.bool()
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: plain causal attention
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            else:
                position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        elif input_ids.shape[0] == 1 and input_ids.shape[1] > 1 and attention_mask is None and not past:
            # One row packed by restarting position_ids (transformers' convention): its sequences, as cu_seqlens
            # for every layer and for the targets, so none predicts the next one's first token.
            cu, longest = cu_seqlens_from_position_ids(position_ids)
            if cu.numel() > 2:
                kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return input_ids, attention_mask, position_ids, kwargs

    def _fit_cache(self, cache):
        """``cache`` with a slot for every layer of the up-scaled stack. Inserted blocks use the slots after the
        host's layers; a cache built for the host (``DynamicCache(config=...)``, as ``generate`` builds it) has
        only the host's slots, so full-attention slots are added for the blocks."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        need = len(self.base.get_decoder().layers) + len(self.blocks)
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) >= need or getattr(cache, "layer_class_to_replicate", None) is not None:
            return cache
        if not isinstance(cache, DynamicCache):
            raise ValueError(f"past_key_values ({type(cache).__name__}) has {len(layers)} layer slots, the up-scaled "
                             f"model needs {need} (its inserted blocks have their own): pass a DynamicCache")
        layers.extend(DynamicLayer() for _ in range(need - len(layers)))
        return cache

    @staticmethod
    def _targets(ids, labels, loss_mask, attention_mask, cu_seqlens):
        """Next-token targets aligned with the hidden states ((B, T), -100 = no loss), or None."""
        if labels is None and loss_mask is None:
            return None
        if labels is not None and loss_mask is not None:
            raise ValueError("give labels or loss_mask, not both")
        if labels is None:
            if loss_mask.shape != ids.shape[-1:] and loss_mask.shape != ids.shape:
                raise ValueError(f"loss_mask must have input_ids' shape, got {tuple(loss_mask.shape)}")
            labels = torch.where(loss_mask.reshape(ids.shape).bool(), ids, IGNORE)
        elif labels.numel() != ids.numel():
            raise ValueError(f"labels must have input_ids' shape, got {tuple(labels.shape)}")
        labels = labels.reshape(ids.shape)
        targets = torch.full_like(labels, IGNORE)
        targets[:, :-1] = labels[:, 1:]
        if attention_mask is not None:  # a padding position neither is a target nor predicts one (left padding)
            valid = attention_mask[:, -ids.shape[1]:]
            targets[:, :-1].masked_fill_(~valid[:, 1:], IGNORE)
            targets.masked_fill_(~valid, IGNORE)
        if cu_seqlens is not None:
            ends = cu_seqlens[1:].long() - 1
            targets[0, ends[ends >= 0]] = IGNORE  # the last token of a sequence has nothing to predict
        return targets

    # ----------------------------------------------------------------------------------------------- save/load

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def save_trainable(self, path: str | Path) -> Path:
        """Saves only the trainable tensors plus the wrapper config, as one safetensors file (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.trainable_state_dict().items()}
        meta = {"mdus_config": json.dumps(asdict(self.config)),
                "base_model": str(getattr(self.base.config, "_name_or_path", "")),
                "base_shape": json.dumps(_base_shape(self.base))}
        if not self._trains_host():  # the host's weights are the ones the run started from: fingerprint them
            meta["base_fingerprint"] = json.dumps(_base_fingerprint(self.base))
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path



# ------------------------------------------------------------------------------------------------- constructors


def upscale(model: nn.Module, *, n_insert: int | None = None, placement: str | list[int] = "interleaved",
            block: str = "transformer", block_config: dict | None = None, speech_vocab_size: int = 0,
            route: str = "all", train_text_embeddings: bool = False, speech_encoder: dict | None = None) -> SpeechLM:
    """Depth up-scaling: freezes ``model`` (a transformers causal LM) and inserts ``n_insert`` new blocks.

    Args:
        model: e.g. ``LlamaForCausalLM`` (SmolLM2), Qwen2/Qwen3 or Mistral. It is wrapped, not copied.
        n_insert: number of new blocks; default 25% of the depth (32 -> 40 layers).
        placement: "interleaved" (default, best ASR), "sandwich", "top" (keeps most text ability), "middle",
            "bottom", or a list of positions (the number of original layers before each block).
        block: "transformer" (a decoder layer of the host's class, output projections zeroed) or "ebranchformer"
            (``mdus.blocks.EBranchformerBlock``). Both start as an exact identity.
        block_config: for "transformer", config fields to override (e.g. ``intermediate_size``; not those in
            ``HOST_FIELDS``, such as the width, head dim and RoPE the block shares with the host); for
            "ebranchformer", ``EBranchformerBlock``'s keyword arguments.
        speech_vocab_size: speech ids are ``text_vocab + [0, speech_vocab_size)``, with their own trainable
            embedding and output rows (tied when the host ties its head to its embedding).
        route: "all", or "speech_only": the blocks update speech positions only, so text-only inputs give exactly
            the base model's outputs, whatever the training did (so not with ``train_text_embeddings``).
        train_text_embeddings: also train the text embedding and head (off: they get no gradient at all).
        speech_encoder: continuous speech input instead of units: ``ConvSubsampler`` options (``n_mels``,
            ``stride``) or ``{"type": "symbols", "token_ids": ...}`` (``SymbolProjection``); then
            ``speech_vocab_size`` is 1, the placeholder id (see ``SpeechLM``).

    Example:
        >>> lm = upscale(AutoModelForCausalLM.from_pretrained(path), block="ebranchformer",  # doctest: +SKIP
        ...              speech_vocab_size=5000)
        >>> print(describe(lm))                                                            # doctest: +SKIP
    """
    positions = insertion_positions(len(model.get_decoder().layers), n_insert, placement)
    config = SpeechLMConfig(method="dus", positions=positions, block=block, block_config=dict(block_config or {}),
                            speech_vocab_size=speech_vocab_size, route=route,
                            train_text_embeddings=train_text_embeddings, speech_encoder=dict(speech_encoder or {}))
    return SpeechLM(model, config)


def full_finetune(model: nn.Module, *, speech_vocab_size: int = 0, speech_encoder: dict | None = None) -> SpeechLM:
    """The full fine-tuning baseline: every weight trains, plus the speech rows; no inserted block."""
    return SpeechLM(model, SpeechLMConfig(method="full_finetune", speech_vocab_size=speech_vocab_size,
                                          speech_encoder=dict(speech_encoder or {})))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_params_per_rank(model: nn.Module, targets) -> int:
    """Trainable LoRA parameters per unit of rank: r * (in + out) for every targeted Linear."""
    return sum(m.in_features + m.out_features for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def lora(model: nn.Module, *, rank: int | None = None, match_params: int | None = None, speech_vocab_size: int = 0,
         alpha: float | None = None, target_modules=LORA_TARGETS, dropout: float = 0.0,
         speech_encoder: dict | None = None) -> SpeechLM:
    """The LoRA baseline (via peft) on the attention and MLP projections, plus trainable speech rows.

    ``match_params=N`` picks the rank whose trainable-parameter count (adapters + speech rows) is closest to N, so
    that it can be set from an up-scaled model as the paper does: ``lora(m, match_params=count_trainable(dus))``.
    ``describe`` reports the count reached.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if (rank is None) == (match_params is None):
        raise ValueError("give exactly one of rank and match_params")
    for name, value in (("rank", rank), ("match_params", match_params)):
        if value is not None:
            check_number(value, name, "an int >= 1", integer=True, ok=lambda v: v >= 1)
    per_rank = _lora_params_per_rank(model, target_modules)
    if per_rank == 0:
        raise ValueError(f"no nn.Linear named {', '.join(target_modules)} in the model")
    d = model.get_input_embeddings().weight.shape[1]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    speech = speech_vocab_size * d * (1 if tied else 2)
    if speech_encoder:
        from mdus.speech.subsampler import build_speech_encoder

        with torch.device("meta"):
            speech += sum(p.numel() for p in build_speech_encoder(d, speech_encoder).parameters())
    if rank is None:
        rank = max(1, round((match_params - speech) / per_rank))
    cfg = dict(rank=rank, alpha=float(alpha if alpha is not None else rank), target_modules=list(target_modules),
               dropout=dropout)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=cfg["alpha"], target_modules=cfg["target_modules"],
                                       lora_dropout=dropout), model)
    return SpeechLM(model, SpeechLMConfig(method="lora", speech_vocab_size=speech_vocab_size, lora=cfg,
                                          speech_encoder=dict(speech_encoder or {})))


# The host config fields a checkpoint's blocks were trained against beyond the tensor shapes: the attention layout
# and RoPE the blocks share with the host, and the host's kind.
_BASE_FIELDS = ("model_type", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_parameters",
                "rope_theta", "rope_scaling", "rms_norm_eps")


def _base_shape(model: nn.Module) -> dict:
    """What a checkpoint's trainable tensors assume of the base beyond their own shapes: the depth the insertion
    positions count in, the width, the text vocabulary the speech ids sit above, and ``_BASE_FIELDS`` (as JSON
    gives them back)."""
    cfg = model.config.to_dict()
    fields = json.loads(json.dumps({k: cfg[k] for k in _BASE_FIELDS if cfg.get(k) is not None}))
    return {"layers": len(model.get_decoder().layers), "text_vocab": model.get_input_embeddings().weight.shape[0],
            "hidden": model.get_input_embeddings().weight.shape[1], **fields}


def _base_fingerprint(model: nn.Module) -> list[float]:
    """16 fixed, evenly spaced values of each of a few frozen host tensors (the input embedding, the first and last
    layer's first weight, the final norm) in fp32: enough to tell another base apart (another fine-tune or seed),
    while the same base in another dtype matches within its rounding."""
    decoder = model.get_decoder()
    frozen = lambda m: next(p for n, p in m.named_parameters() if "lora_" not in n)  # noqa: E731
    values = []
    for t in (model.get_input_embeddings().weight, frozen(decoder.layers[0]), frozen(decoder.layers[-1]),
              frozen(decoder.norm)):
        flat = t.detach().reshape(-1)
        values += flat[_spread(flat.numel(), 16, flat.device)].float().tolist()
    return values


def _spread(n: int, k: int, device=None) -> torch.Tensor:
    """``k`` evenly spaced indices into ``n`` items, first and last included, in exact integer arithmetic (a float32
    ``linspace`` rounds past 2^24 elements: SmolLM2's embedding has 28 M)."""
    return torch.tensor([i * (n - 1) // (k - 1) for i in range(k)], dtype=torch.long, device=device)


def _rebuild(model: nn.Module, config: SpeechLMConfig) -> SpeechLM:
    if config.method == "lora":
        lo = config.lora
        return lora(model, rank=lo["rank"], speech_vocab_size=config.speech_vocab_size, alpha=lo["alpha"],
                    target_modules=tuple(lo["target_modules"]), dropout=lo["dropout"],
                    speech_encoder=config.speech_encoder)
    return SpeechLM(model, config)


def load(path: str | Path, model: nn.Module, *, check_weights: bool = True) -> SpeechLM:
    """Rebuilds a saved wrapper (``SpeechLM.save_trainable``) around a separately loaded base model and loads its
    trainable tensors. Raises if the file does not match the model (depth, width, text vocabulary, attention and
    RoPE settings, missing or unexpected tensors, shapes) and, with ``check_weights``, if the model's frozen
    weights are not the ones the checkpoint was trained on (a fingerprint of a few of them, in any dtype; kept for
    methods that leave the host frozen); it then leaves ``model`` as it was."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if isinstance(model, SpeechLM):
        raise TypeError("load(path, model): model must be the freshly loaded base model (a transformers causal LM), "
                        "not a SpeechLM wrapper")
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if "mdus_config" not in meta:
        raise ValueError(f"{path} is not an mdus checkpoint (no mdus_config metadata)")
    config = SpeechLMConfig(**json.loads(meta["mdus_config"]))
    saved, have = json.loads(meta.get("base_shape", "{}")), _base_shape(model)
    wrong = [f"{k}: checkpoint {saved[k]}, model {have[k]}" for k in saved if saved[k] != have.get(k)]
    if wrong:
        raise ValueError(f"{path} was saved from a different base model ({'; '.join(wrong)})")
    # Names and shapes are checked on a skeleton (meta device) first, so a mismatch leaves ``model`` untouched.
    with torch.device("meta"):
        try:
            skeleton = type(model)(copy.deepcopy(model.config))  # its own config: the wrapper edits it
        except Exception:  # a host that cannot be rebuilt from its config: checked on the model itself below
            skeleton = None
        if skeleton is not None:
            _check_shapes(path, _rebuild(skeleton, config), shapes)
    if check_weights and "base_fingerprint" in meta:
        saved_w = torch.tensor(json.loads(meta["base_fingerprint"]))
        have_w = torch.tensor(_base_fingerprint(model))
        # bf16 keeps 8 significant bits: the same weights in any dtype agree within 2^-8 of their size.
        if saved_w.shape != have_w.shape or not torch.allclose(have_w, saved_w, rtol=2 ** -7, atol=1e-6):
            raise ValueError(f"{path} was trained on other base weights than the model's (saved from "
                             f"{meta.get('base_model') or 'an unnamed model'!r}; the model is "
                             f"{getattr(model.config, '_name_or_path', '') or 'unnamed'!r}): load the base it was "
                             "trained on, or pass check_weights=False")
    wrapper = _rebuild(model, config)
    _check_shapes(path, wrapper, shapes)
    params = dict(wrapper.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(path), device=str(model.get_input_embeddings().weight.device)).items():
            params[name].copy_(value)
    return wrapper


def _check_shapes(path: Path, wrapper: SpeechLM, shapes: dict) -> None:
    """Raises unless ``shapes`` (a checkpoint's tensor names and shapes) are exactly ``wrapper``'s trainables'."""
    expected = {k: tuple(v.shape) for k, v in wrapper.trainable_state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise ValueError(f"{path}: {name} has shape {shape}, the model expects {expected[name]}")


# ------------------------------------------------------------------------------------------------------ report


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)


def describe(model: SpeechLM) -> str:
    """Trainable and frozen parameters per component, as a table (shared tensors counted once)."""
    seen, rows = set(), {}
    decoder = model.base.get_decoder()
    components = [("text embedding", model.base.get_input_embeddings()),
                  ("base layers", decoder.layers),
                  ("final norm", decoder.norm),
                  ("text head", model.base.get_output_embeddings()),
                  ("inserted blocks", model.blocks),
                  ("speech embedding", model.speech_embed),
                  ("speech encoder", model.speech_encoder)]
    for name, module in components:
        if module is None:
            continue
        for pname, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = "LoRA adapters" if "lora_" in pname else name
            train, frozen = rows.get(key, (0, 0))
            rows[key] = (train + p.numel(), frozen) if p.requires_grad else (train, frozen + p.numel())
    if model.speech_out is not None:
        seen.add(id(model.speech_out))
        n = model.speech_out.numel()
        rows["speech head"] = (n, 0) if model.speech_out.requires_grad else (0, n)
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        rows["other"] = (sum(p.numel() for p in rest if p.requires_grad),
                         sum(p.numel() for p in rest if not p.requires_grad))
    total_t, total_f = sum(t for t, _ in rows.values()), sum(f for _, f in rows.values())
    lines = [f"method={model.config.method} blocks={model.config.block if model.blocks else '-'} "
             f"inserted={len(model.blocks)} at {model.config.positions} route={model.config.route}",
             f"{'component':<18}{'trainable':>14}{'frozen':>14}"]
    lines += [f"{k:<18}{t:>14,}{f:>14,}" for k, (t, f) in rows.items()]
    lines.append(f"{'total':<18}{total_t:>14,}{total_f:>14,}")
    return "\n".join(lines)
