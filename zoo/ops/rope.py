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
    step, one token per layer, pays for)."""
    half = cos.shape[-1]
    if 2 * half < x.shape[-1]:
        return torch.cat([apply_rope_half(x[..., :2 * half], cos, sin), x[..., 2 * half:]], dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
