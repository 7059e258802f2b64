"""The host's SwiGLU MLP, ``down(silu(gate(x)) * up(x))``, with a leaner backward.

Autograd keeps three (tokens x intermediate) tensors of every such MLP for the backward: ``gate(x)`` for the SiLU,
and ``silu(gate(x))`` and ``up(x)`` for the product. The backward needs only the first and the last: ``SiluMul``
keeps those two and recomputes the SiLU, one elementwise pass. In depth up-scaling every frozen host layer above
the lowest inserted block keeps its activations (the gradient flows through it), so this saves a third of what the
MLPs keep: a sixth of everything an up-scaled SmolLM2-135M saves for its backward under bf16 autocast, weights'
casts aside (935 vs 1,055 MB at 1,024 tokens, 326 MB of it the autocast copies of the weights). The forward and
both input gradients are bitwise those of autograd on the original expression, since the backward runs the same
ATen ops (``silu_backward`` on ``grad * up``, and ``grad * silu(gate)``).

``lean_gated_mlp(mlp)`` installs it on a transformers MLP module of a known class (the LLaMA family's); the
module's parameters, state dict and outputs are unchanged. ``restore_gated_mlps(model)`` puts every such module of
``model`` back on its class's forward (for an A/B of the two).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# transformers MLP classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
KNOWN_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


def _lean_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(SiluMul.apply(mlp.gate_proj(x), mlp.up_proj(x)))


def _is_silu(act) -> bool:
    # transformers' SiLUActivation (and nn.SiLU) compute F.silu.
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def lean_gated_mlp(mlp: nn.Module | None) -> bool:
    """Installs the leaner backward on ``mlp`` when it is a SwiGLU MLP of a known class (``KNOWN_CLASSES``, SiLU
    activation); returns whether it did. Other modules (None, another activation or structure) are left as they
    are, and so is a module whose forward something else has replaced already (accelerate's device hooks do). The
    forward becomes an instance attribute (a ``functools.partial``, so the module still deep-copies and pickles)."""
    if (mlp is None or type(mlp).__name__ not in KNOWN_CLASSES or not _is_silu(getattr(mlp, "act_fn", None))
            or "forward" in vars(mlp)):
        return False
    mlp.forward = functools.partial(_lean_forward, mlp)
    return True


def _is_lean(forward) -> bool:
    return isinstance(forward, functools.partial) and forward.func is _lean_forward


def restore_gated_mlps(model: nn.Module) -> int:
    """Puts every MLP of ``model`` that ``lean_gated_mlp`` changed back on its class's own forward; returns how
    many. Forwards installed by anything else stay."""
    lean = [m for m in model.modules() if _is_lean(vars(m).get("forward"))]
    for m in lean:
        del m.forward
    return len(lean)
