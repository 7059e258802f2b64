"""Continuous speech input: the trainable module of a speech LM that turns a front end's features into LLM input
embeddings, spliced in where the speech positions are. ``build_speech_encoder`` makes one from its config.

* ``ConvSubsampler`` (``{"type": "conv", "n_mels", "stride"}``, the type being the default): ``logmel`` frames
  (100 Hz) through two strided Conv1d layers with GELU and a linear projection, giving ``d_model`` vectors at
  100 / stride Hz (25 Hz for stride 4, 12.5 Hz for stride 8);
* ``SymbolProjection`` (``{"type": "symbols", "token_ids"}``): distributions over S symbols (a
  ``CTCPosteriorFrontEnd``'s character posteriors) -> their expected embedding, one position per row, with each
  symbol's embedding starting at the LLM's own embedding of its text tokens.
"""

from __future__ import annotations

import torch
from torch import nn


def _kernel(stride: int) -> int:
    # Odd (so "same" padding is symmetric) and wider than the stride (so neighbouring outputs overlap).
    return stride + 1 if stride % 2 == 0 else stride + 2


class ConvSubsampler(nn.Module):
    """(B, T, n_mels) or (T, n_mels) features -> (B, ceil(T / stride), d_model) or (ceil(T / stride), d_model).

    Conv1d(n_mels -> d_model, stride 2) + GELU, Conv1d(d_model -> d_model, stride ``stride / 2``) + GELU, then
    Linear(d_model -> d_model): the GELU output is bounded below, while the embeddings it feeds are not, so a linear
    map ends the stack. With ``lengths`` (B,) for a padded batch, frames past each length are zeroed before every
    conv, so each utterance gets exactly what it would get alone, and the output lengths come back too.

    Example:
        >>> sub = ConvSubsampler(80, 576, stride=4)
        >>> sub(torch.randn(2, 101, 80)).shape
        torch.Size([2, 26, 576])
    """

    def __init__(self, n_mels: int, d_model: int, stride: int = 4, dropout: float = 0.0):
        super().__init__()
        if int(n_mels) < 1 or int(d_model) < 1:
            raise ValueError(f"n_mels and d_model must be >= 1, got n_mels={n_mels}, d_model={d_model}")
        if int(stride) < 2 or int(stride) % 2:
            raise ValueError(f"stride must be an even integer >= 2 (4 gives 25 Hz, 8 gives 12.5 Hz), got {stride}")
        self.n_mels, self.d_model, self.stride = int(n_mels), int(d_model), int(stride)
        self.strides = (2, self.stride // 2)
        k1, k2 = (_kernel(s) for s in self.strides)
        self.conv1 = nn.Conv1d(n_mels, d_model, k1, self.strides[0], padding=k1 // 2)
        self.conv2 = nn.Conv1d(d_model, d_model, k2, self.strides[1], padding=k2 // 2)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, d_model)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames for ``lengths`` input frames: ceil(ceil(T / 2) / (stride / 2)) = ceil(T / stride)."""
        for s in self.strides:
            lengths = torch.div(lengths + s - 1, s, rounding_mode="floor")
        return lengths

    @staticmethod
    def _mask(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if lengths is None:
            return x
        keep = torch.arange(x.shape[-1], device=x.device) < lengths[:, None]
        return x * keep[:, None, :].to(x.dtype)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None):
        """Returns the embeddings, and with ``lengths`` also their lengths (B,)."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if not features.dtype.is_floating_point:
            raise ValueError(f"features must be floating point, got dtype {str(features.dtype).removeprefix('torch.')}")
        if features.dim() not in (2, 3) or features.shape[-1] != self.n_mels:
            raise ValueError(f"features must have shape (T, {self.n_mels}) or (B, T, {self.n_mels}), got "
                             f"{tuple(features.shape)}")
        if features.shape[-2] == 0:
            raise ValueError("features has 0 frames: there is no audio to subsample")
        single = features.dim() == 2
        x = features[None] if single else features
        if lengths is not None:
            if single:
                raise ValueError("lengths applies to a padded batch (B, T, n_mels), not to one utterance")
            lengths = torch.as_tensor(lengths, device=x.device)
            if lengths.shape != (x.shape[0],) or lengths.dtype.is_floating_point:
                raise ValueError(f"lengths must be an integer tensor of shape ({x.shape[0]},), got "
                                 f"{tuple(lengths.shape)} {lengths.dtype}")
            if bool((lengths < 1).any()) or bool((lengths > x.shape[1]).any()):
                raise ValueError(f"lengths must be in 1..{x.shape[1]} (the padded length), got {lengths.tolist()}")
        x = self._mask(x.transpose(1, 2), lengths)
        x = self.act(self.conv1(x))
        # conv1's outputs past ceil(length / 2) are GELU(bias), not zeros: clear them before conv2 reads them.
        mid = None if lengths is None else torch.div(lengths + 1, 2, rounding_mode="floor")
        x = self.act(self.conv2(self._mask(x, mid)))
        y = self.out(self.dropout(x.transpose(1, 2)))
        if single:
            return y[0]
        if lengths is None:
            return y
        out_lengths = self.output_lengths(lengths)
        return self._mask(y.transpose(1, 2), out_lengths).transpose(1, 2), out_lengths


class SymbolProjection(nn.Module):
    """(B, N, S) or (N, S) distributions over S symbols -> (B, N, d_model) or (N, d_model): ``features @ W`` with a
    trainable (S, d_model) table ``W`` (no bias), so a one-hot row gives exactly that symbol's embedding and a
    posterior gives the expected one. ``init_from(text_embedding, token_ids)`` starts each symbol at the mean of the
    text embeddings of its tokens. With ``lengths`` (B,), rows past each length are zeroed and the lengths come back
    unchanged (one position per row: ``stride`` is 1).

    Example:
        >>> proj = SymbolProjection(3, 8)
        >>> proj(torch.eye(3)).shape
        torch.Size([3, 8])
    """

    stride = 1

    def __init__(self, n_symbols: int, d_model: int):
        super().__init__()
        if int(n_symbols) < 1 or int(d_model) < 1:
            raise ValueError(f"n_symbols and d_model must be >= 1, got n_symbols={n_symbols}, d_model={d_model}")
        self.n_symbols, self.d_model = int(n_symbols), int(d_model)
        self.weight = nn.Parameter(torch.empty(self.n_symbols, self.d_model).normal_(std=0.02))

    @torch.no_grad()
    def init_from(self, text_embedding: torch.Tensor, token_ids) -> SymbolProjection:
        if len(token_ids) != self.n_symbols or any(len(ids) == 0 for ids in token_ids):
            raise ValueError(f"token_ids must give a non-empty token list for each of the {self.n_symbols} symbols")
        rows = [text_embedding[torch.as_tensor(ids, device=text_embedding.device)].float().mean(0)
                for ids in token_ids]
        self.weight.copy_(torch.stack(rows))
        return self

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None):
        """Returns the embeddings, and with ``lengths`` also their lengths (B,)."""
        if not isinstance(features, torch.Tensor) or not features.dtype.is_floating_point:
            got = getattr(features, "dtype", type(features).__name__)
            raise TypeError(f"features must be a floating-point torch.Tensor, got {got}")
        if features.dim() not in (2, 3) or features.shape[-1] != self.n_symbols:
            raise ValueError(f"features must have shape (N, {self.n_symbols}) or (B, N, {self.n_symbols}), got "
                             f"{tuple(features.shape)}")
        y = features @ self.weight.to(features.dtype)
        if lengths is None:
            return y
        if features.dim() != 3:
            raise ValueError("lengths applies to a padded batch (B, N, S), not to one utterance")
        lengths = torch.as_tensor(lengths, device=y.device)
        keep = torch.arange(y.shape[1], device=y.device) < lengths[:, None]
        return y * keep[..., None].to(y.dtype), lengths


def build_speech_encoder(d_model: int, config: dict, text_embedding: torch.Tensor | None = None) -> nn.Module:
    """The speech encoder a ``SpeechLMConfig.speech_encoder`` describes (see the module docstring); a
    ``SymbolProjection`` is initialized from ``text_embedding`` (V, d_model) when it is given."""
    config = dict(config)
    kind = config.pop("type", "conv")
    if kind == "conv":
        return ConvSubsampler(d_model=d_model, **config)
    if kind == "symbols":
        token_ids = config.pop("token_ids", None)
        if token_ids is None or config:
            raise ValueError(f"a 'symbols' speech encoder takes token_ids only, got {sorted(config) or 'none'}")
        proj = SymbolProjection(len(token_ids), d_model)
        return proj if text_embedding is None else proj.init_from(text_embedding, token_ids)
    raise ValueError(f"speech encoder type must be 'conv' or 'symbols', got {kind!r}")
