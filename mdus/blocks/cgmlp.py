"""ESPnet's ConvolutionalGatingMLP (cgMLP), with its gate on the fused, segment-aware ``mdus_kernels.cgmlp_gate``.

Parameter names and shapes are ESPnet's (``espnet2/asr/layers/cgmlp.py``), so its checkpoints load with
``strict=True``::

    channel_proj1.0.weight (U, d), channel_proj1.0.bias (U,)      Linear(d, U) + GELU
    csgu.norm.weight, csgu.norm.bias (U/2,)                        LayerNorm(U/2), ESPnet's eps 1e-12
    csgu.conv.weight (U/2, 1, k), csgu.conv.bias (U/2,)            depthwise Conv1d(U/2, U/2, k, groups=U/2)
    csgu.linear.weight/bias (U/2, U/2), (U/2,)                     only with use_linear_after_conv
    channel_proj2.weight (d, U/2), channel_proj2.bias (d,)         Linear(U/2, d)

What differs from ESPnet's eager module: the conv runs per sequence of a packed batch (``cu_seqlens``) and, with a
``speech_mask``, per run of speech tokens, text positions giving 0 (see ``mdus_kernels.reference.cgmlp``); it may be
causal; and LayerNorm, conv, bias and gate run as one fused op. ``use_linear_after_conv`` or a gate activation other
than ``"identity"`` falls back to a composition of LayerNorm, ``mdus_kernels.depthwise_conv1d`` (segment-aware
too) and the linear/activation, with the same semantics.
"""

import torch
from torch import nn

import mdus_kernels

GATE_ACTIVATIONS = {
    "identity": nn.Identity,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "hardtanh": nn.Hardtanh,
    "selu": nn.SELU,
    "swish": nn.SiLU,
}


def _speech_only(x: torch.Tensor, speech_mask: torch.Tensor | None) -> torch.Tensor:
    return x if speech_mask is None else torch.where(speech_mask.unsqueeze(-1), x, 0)


class ConvolutionalSpatialGatingUnit(nn.Module):
    """``x_r * act(linear(conv(norm(x_g))))`` with ``x_r, x_g = x.chunk(2, -1)``: ``(..., U)`` -> ``(..., U/2)``."""

    def __init__(self, size: int, kernel_size: int, dropout_rate: float = 0.0, use_linear_after_conv: bool = False,
                 gate_activation: str = "identity", causal: bool = False, norm_eps: float = 1e-12):
        super().__init__()
        channels = size // 2
        self.causal = causal
        self.norm = nn.LayerNorm(channels, eps=norm_eps)
        # ESPnet's centered padding; the module never calls it (the kernels pad per segment), it keeps the layout.
        self.conv = nn.Conv1d(channels, channels, kernel_size, 1, (kernel_size - 1) // 2, groups=channels)
        self.linear = nn.Linear(channels, channels) if use_linear_after_conv else None
        self.act = GATE_ACTIVATIONS[gate_activation]()
        self.fused = self.linear is None and gate_activation == "identity"
        self.dropout = nn.Dropout(dropout_rate)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ESPnet's ``espnet_initialization_fn``: a conv weight near 0 and bias 1, so the gate starts near 1."""
        nn.init.normal_(self.conv.weight, std=1e-6)
        nn.init.ones_(self.conv.bias)
        if self.linear is not None:
            nn.init.normal_(self.linear.weight, std=1e-6)
            nn.init.ones_(self.linear.bias)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                speech_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused:
            out = mdus_kernels.cgmlp_gate(x, self.norm.weight, self.norm.bias, self.conv.weight, self.conv.bias,
                                          cu_seqlens=cu_seqlens, speech_mask=speech_mask, causal=self.causal,
                                          eps=self.norm.eps)
        else:
            x_r, x_g = x.chunk(2, dim=-1)
            z = mdus_kernels.depthwise_conv1d(self.norm(x_g), self.conv.weight, self.conv.bias,
                                              cu_seqlens=cu_seqlens, speech_mask=speech_mask, causal=self.causal)
            if self.linear is not None:
                z = self.linear(z)
            # The linear's bias and the activation can make z non-zero at text positions: mask the product.
            out = _speech_only(x_r * self.act(z), speech_mask)
        return self.dropout(out)


class ConvolutionalGatingMLP(nn.Module):
    """ESPnet's cgMLP: ``channel_proj2(csgu(channel_proj1(x)))``, ``(..., size)`` -> ``(..., size)``.

    Args:
        size: model width d.
        linear_units: U, the width after ``channel_proj1``; even (the gate splits it in halves).
        kernel_size: the depthwise conv width k, 1 to 63 (ESPnet's default 31).
        dropout_rate: dropout on the gate's output, as in ESPnet.
        use_linear_after_conv, gate_activation: ESPnet's CSGU options (defaults: none and ``"identity"``, which
            run the fused kernel).
        causal: a token's conv window is itself and the k - 1 tokens before it (ESPnet: centered).
        norm_eps: the gate's LayerNorm epsilon (ESPnet's LayerNorm uses 1e-12).

    ``forward(x, *, cu_seqlens=None, speech_mask=None)``: ``x`` is ``(B, T, size)`` (each row one sequence) or
    packed ``(total, size)`` with ``cu_seqlens``. With ``speech_mask`` (``(B, T)`` / ``(total,)`` bool) the block
    acts on speech tokens only: its output is 0 at text positions, so a residual connection leaves them unchanged.

    Example:
        >>> mlp = ConvolutionalGatingMLP(16, 64, 31)
        >>> mlp(torch.randn(2, 10, 16)).shape
        torch.Size([2, 10, 16])
    """

    def __init__(self, size: int, linear_units: int, kernel_size: int, dropout_rate: float = 0.0,
                 use_linear_after_conv: bool = False, gate_activation: str = "identity", causal: bool = False,
                 norm_eps: float = 1e-12):
        super().__init__()
        if linear_units < 2 or linear_units % 2:
            raise ValueError(f"linear_units must be even and >= 2 (the gate splits it in halves), got {linear_units}")
        if not 1 <= kernel_size <= 63:
            raise ValueError(f"kernel_size must be in [1, 63], got {kernel_size}")
        if gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be one of {', '.join(map(repr, GATE_ACTIVATIONS))}, "
                             f"got {gate_activation!r}")
        self.channel_proj1 = nn.Sequential(nn.Linear(size, linear_units), nn.GELU())
        self.csgu = ConvolutionalSpatialGatingUnit(linear_units, kernel_size, dropout_rate, use_linear_after_conv,
                                                   gate_activation, causal, norm_eps)
        self.channel_proj2 = nn.Linear(linear_units // 2, size)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                speech_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.csgu(self.channel_proj1(x), cu_seqlens=cu_seqlens, speech_mask=speech_mask)
        return _speech_only(self.channel_proj2(h), speech_mask)
