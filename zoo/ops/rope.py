"""Rotary position embedding (RoFormer, arXiv 2104.09864), half-split layout as in GPT-NeoX / Llama.

The half-split pairing (dimension i with i + d/2) matches transformers' `rotate_half`, so weights
imported from a Llama checkpoint give the same logits.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """base^(-2i / head_dim), i < head_dim / 2, in float64 (built once per shape: decoding asks every step)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0, dtype=torch.float32):
    """cos, sin of shape [*positions.shape, head_dim] for integer `positions`: [length] for one
    sequence, or [batch, length] when positions differ per row (packed documents restart at 0, see
    `zoo.ops.documents.document_positions`)."""
    cos, sin = rope_cos_sin_half(positions, head_dim, base, dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def rope_cos_sin_half(positions: torch.Tensor, head_dim: int, base: float = 10000.0, dtype=torch.float32):
    """The distinct half of `rope_cos_sin` (its tables repeat: dimension i and i + head_dim / 2 share an
    angle): cos, sin [*positions.shape, head_dim // 2], for `apply_rope_half`."""
    if head_dim % 2:
        raise ValueError(f"head_dim: rotary embedding needs an even head_dim, got {head_dim}")
    # float64 angles: at positions ~1e5 float32 loses the low frequencies' phase.
    angles = positions.to(torch.float64)[..., None] * _inverse_frequencies(head_dim, float(base), positions.device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, length, heads, head_dim]; cos/sin: [length, rope_dim] or [batch, length, rope_dim].
    rope_dim < head_dim is partial RoPE: the first rope_dim dims rotate (half-split pairs within them),
    the rest pass through, as transformers' `partial_rotary_factor` (Bamba, GPT-NeoX)."""
    rope_dim = cos.shape[-1]
    if rope_dim < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rope_dim], cos, sin), x[..., rope_dim:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + rotated * sin


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` from the half tables of `rope_cos_sin_half` (cos, sin [length, rope_dim / 2] or
    [batch, length, rope_dim / 2]): the same values, bit for bit, in fewer operations (what a decoding
    step, one token per layer, pays for, and what training pays in `_RotateHalf`'s backward too)."""
    half = cos.shape[-1]
    if 2 * half > x.shape[-1]:
        raise ValueError(f"cos, sin: {half} angles rotate {2 * half} dims, more than x's last {x.shape[-1]}")
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return _RotateHalf.apply(x, cos, sin)


def _rotate_into(out, x, cos, sin, sign: float):
    """out = x rotated by sign * theta per half-split pair, the rest of x's dims copied: four multiplies
    into out and one half-size temporary, no concatenation. Products and sums are rounded separately
    (an addcmul_ would fuse them into a multiply-add and lose bit-for-bit equality with `apply_rope`)."""
    half = cos.shape[-1]
    x1, x2, o1, o2 = x[..., :half], x[..., half:2 * half], out[..., :half], out[..., half:2 * half]
    term = torch.mul(x2, sin)
    torch.mul(x1, cos, out=o1)
    o1.sub_(term) if sign > 0 else o1.add_(term)                  # x1 cos - sign x2 sin
    torch.mul(x1, sin, out=term)
    torch.mul(x2, cos, out=o2)
    o2.add_(term) if sign > 0 else o2.sub_(term)                  # x2 cos + sign x1 sin
    if 2 * half < x.shape[-1]:
        out[..., 2 * half:] = x[..., 2 * half:]
    return out


class _RotateHalf(torch.autograd.Function):
    """x [b, t, heads, head_dim] rotated by the angles whose cos, sin [(b,) t, 1, rope_dim / 2] are given
    (tables of positions: no gradient). A rotation's adjoint is the rotation by -theta, so the backward is
    the forward's four ops with the sign flipped, into one output: the autograd of the slice-and-cat
    formula zero-fills a full-size gradient for each of its four slices and adds them up (measured on
    transformer-small's training step, see docs)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate_into(torch.empty_like(x, memory_format=torch.contiguous_format), x, cos, sin, 1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        return _rotate_into(torch.empty_like(dout, memory_format=torch.contiguous_format), dout, cos, sin, -1.0), None, None
