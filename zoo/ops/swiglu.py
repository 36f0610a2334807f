"""The SwiGLU gate (Shazeer, arXiv 2002.05202): silu(gate) * up, elementwise; gate, up [..., hidden].

`swiglu` has a hand-written backward that holds gate and up only (autograd of the formula keeps silu(gate)
too) and allocates two hidden-size tensors in backward where the formula's autograd allocates three (and
two in forward where it allocates one here): at training sizes a fresh hidden-size tensor costs a page-
faulting first touch of its memory, and these are the largest activations of a transformer layer. The
same products in the same order as the formula, so values and gradients are equal bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swiglu", "swiglu_ref"]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; gate and up of one shape and dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"up: expected the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate).mul_(up)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The twin: the formula, through autograd."""
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """d up = dout silu(gate); d gate = silu'(gate) (dout up), silu(gate) recomputed in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        act = F.silu(gate)
        dup = dout * act
        torch.mul(dout, up, out=act)
        dgate = torch.ops.aten.silu_backward.grad_input(act, gate, grad_input=act)
        return dgate, dup
