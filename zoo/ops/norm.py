"""RMSNorm (Zhang & Sennrich, arXiv 1910.07467) and Mamba-2's gated RMSNorm.

    rms_norm(x, weight) = x / sqrt(mean(x^2) + eps) * weight          over the last dimension

`rms_norm` has a hand-written backward for training: one statistic per row kept, the backward in four
passes over x where the autograd of F.rms_norm's CPU kernel (pow, mean, rsqrt, mul, mul) takes about
eight. Measured at [16, 256, 192] float32, one thread, forward + backward: 3.1-3.4 ms against 5.2 ms.

Mamba-2's gated RMSNorm (Dao & Gu, arXiv 2405.21060, section 7.1; mamba_ssm's RMSNormGated with
norm_before_gate=False):

    out = rmsnorm(y * silu(z)) * weight,   the mean square taken per group of `group_size` channels

y, z [..., d], weight [d]; d a multiple of group_size (one group per B/C group, so the norm is
unchanged under tensor parallel over groups). Statistics in float32 (float64 for float64 inputs);
out in y's dtype.

The fast path (`_GatedRMSNorm`) runs forward and backward over blocks of rows small enough that a
block's few temporaries stay in the core's cache: at 16K tokens x 512 channels a whole-tensor
elementwise pass reads and writes main memory (about 20 ms each on this CPU, and the chain takes ~15
of them), a block's pass stays in L2. It keeps y, z and the per-row 1/rms between the passes, and
recomputes y * silu(z) in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["RMSNorm", "gated_rms_norm", "gated_rms_norm_ref", "rms_norm", "rms_norm_ref"]

# Elements of one row block (per tensor): 64 Ki float32 = 256 KiB, so the handful of block tensors
# a step touches fit a 1 MiB L2. Measured at 16K x 512, float32, one thread, forward + backward:
# 16 Ki, 64 Ki and 256 Ki elements take about the same; whole tensors take ~4x as long.
_BLOCK_ELEMENTS = 1 << 16


def rms_norm(x, weight, eps: float):
    """x / rms(x) * weight over the last dimension; x [..., d], weight [d]. Statistics in float32 (float64
    for float64 inputs); the result in x's dtype."""
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight: expected [{x.shape[-1]}] (x's last dimension), got {tuple(weight.shape)}")
    return _RMSNorm.apply(x, weight, eps)


def rms_norm_ref(x, weight, eps: float):
    """The twin: the formula as written, in the accumulation dtype."""
    acc = accumulation_dtype(x)
    xa = x.to(acc)
    return (xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """With r = 1 / rms(x) per row and n = x r: dweight = sum over rows of dout n;
    dx = r (dn - n mean(dn n)), dn = dout weight."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        d = x.shape[-1]
        acc = accumulation_dtype(x)
        x2 = x.reshape(-1, d).to(acc)
        r = torch.linalg.vector_norm(x2, dim=-1, keepdim=True).pow_(2).div_(d).add_(eps).rsqrt_()
        out = torch.mul(x2, r).mul_(weight.to(acc))
        ctx.save_for_backward(x, weight, r)
        return out.to(x.dtype).view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x, weight, r = ctx.saved_tensors
        d = x.shape[-1]
        acc = r.dtype
        x2, do = x.reshape(-1, d).to(acc), dout.reshape(-1, d).to(acc)
        n = x2 * r
        dw = (do * n).sum(0)
        dn = do * weight.to(acc)
        mean = torch.linalg.vecdot(dn, n).unsqueeze_(-1).div_(d)
        dx = dn.sub_(n.mul_(mean)).mul_(r)
        return dx.to(x.dtype).view(x.shape), dw.to(weight.dtype), None


def gated_rms_norm(y, z, weight, group_size: int, eps: float = 1e-5):
    """rmsnorm(y * silu(z)) * weight over groups of `group_size` channels; y, z [..., d], weight [d]."""
    _check(y, z, weight, group_size)
    if torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or weight.requires_grad):
        return _GatedRMSNorm.apply(y, z, weight, group_size, eps)
    if y.numel() <= _BLOCK_ELEMENTS:
        # one block without gradients (a decoding step): three ops, see _gated_small
        return _gated_small(y, z, weight, group_size, eps)
    return _gated_forward(y, z, weight, group_size, eps)[0]


def gated_rms_norm_ref(y, z, weight, group_size: int, eps: float = 1e-5):
    """The twin: the formula as written, in the accumulation dtype."""
    _check(y, z, weight, group_size)
    return _gated_formula(y, z, weight, group_size, eps)


def _gated_formula(y, z, weight, group_size, eps):
    acc = accumulation_dtype(y)
    gated = (y.to(acc) * F.silu(z.to(acc))).unflatten(-1, (-1, group_size))
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.flatten(-2) * weight.to(acc)).to(y.dtype)


def _gated_small(y, z, weight, group_size, eps):
    """The no-grad path for one block of rows: silu, a multiply and F.rms_norm's fused kernel (with the
    weight inside it when there is one group). Measured on a decoding step's [1, 1, 512], one thread:
    33 us with one group, 50 us with four, against 72 us for `_gated_formula`'s chain of eight ops
    (the same values: F.rms_norm takes the same mean of squares in the same dtype)."""
    acc = accumulation_dtype(y)
    gated = F.silu(z.to(acc)).mul_(y)
    if group_size == y.shape[-1]:
        return F.rms_norm(gated, (group_size,), weight.to(acc), eps).to(y.dtype)
    normed = F.rms_norm(gated.unflatten(-1, (-1, group_size)), (group_size,), None, eps)
    return normed.flatten(-2).mul_(weight.to(acc)).to(y.dtype)


class _GatedRMSNorm(torch.autograd.Function):
    """Forward and backward block of rows by block of rows (module docstring). With g = y silu(z),
    r = 1 / rms(g) per group and n = g r: d weight = sum over rows of dout n; dn = dout weight;
    dg = r (dn - n mean(dn n)) per group; dy = dg silu(z); dz = dg y silu'(z)."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):
        out, rstd = _gated_forward(y, z, weight, group_size, eps)
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, dout):
        y, z, weight, rstd = ctx.saved_tensors
        group_size = ctx.group_size
        d = y.shape[-1]
        acc = accumulation_dtype(y)
        y2, z2, dout2 = y.reshape(-1, d), z.reshape(-1, d), dout.reshape(-1, d)
        w = weight.to(acc)
        wg = w.view(-1, group_size, 1)
        dy = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
        dz = torch.empty(z2.shape, dtype=z.dtype, device=z.device)
        dw = torch.zeros(d, dtype=acc, device=y.device)
        for rows in _row_blocks(y2):
            ya, za, do = y2[rows].to(acc), z2[rows].to(acc), dout2[rows].to(acc)
            r = rstd[rows]
            s = F.silu(za)
            n = (s * ya).view(-1, d // group_size, group_size).mul_(r)
            p = do.view_as(n) * n                                   # dout n
            dw += p.sum(0).view(-1)
            # mean(dn n) per group, dn n = dout n weight: one matrix-vector product per group
            mean = torch.matmul(p.transpose(0, 1), wg).transpose(0, 1).div_(group_size)
            dg = (do * w).view_as(n).sub_(n.mul_(mean)).mul_(r).view(-1, d)
            dy[rows] = dg * s
            dz[rows] = torch.ops.aten.silu_backward(dg.mul_(ya), za)
        return dy.view(y.shape), dz.view(z.shape), dw.to(weight.dtype), None, None


def _gated_forward(y, z, weight, group_size, eps):
    """(out, 1/rms [rows, groups, 1]) of the gated norm, block of rows by block of rows."""
    shape, d = y.shape, y.shape[-1]
    acc = accumulation_dtype(y)
    y2, z2 = y.reshape(-1, d), z.reshape(-1, d)
    w = weight.to(acc).view(-1, group_size)
    out = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    rstd = torch.empty(y2.shape[0], d // group_size, 1, dtype=acc, device=y.device)
    for rows in _row_blocks(y2):
        g = F.silu(z2[rows].to(acc)).mul_(y2[rows]).view(-1, d // group_size, group_size)
        r = rstd[rows]
        torch.linalg.vector_norm(g, dim=-1, keepdim=True, out=r)
        r.pow_(2).div_(group_size).add_(eps).rsqrt_()
        out[rows] = g.mul_(r).mul_(w).view(-1, d)
    return out.view(shape), rstd


def _row_blocks(t2):
    """Slices of the rows of a [rows, d] tensor, each about _BLOCK_ELEMENTS elements."""
    rows = max(1, _BLOCK_ELEMENTS // max(1, t2.shape[1]))
    return [slice(i, min(i + rows, t2.shape[0])) for i in range(0, t2.shape[0], rows)]


def _check(y, z, weight, group_size):
    if tuple(z.shape) != tuple(y.shape):
        raise ValueError(f"z: expected the shape of y {tuple(y.shape)}, got {tuple(z.shape)}")
    d = y.shape[-1]
    if tuple(weight.shape) != (d,):
        raise ValueError(f"weight: expected [{d}] (y's last dimension), got {tuple(weight.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or d % group_size:
        raise ValueError(f"group_size: expected a positive divisor of {d}, got {group_size!r}")


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same state dict) whose training path is `zoo.ops.norm.rms_norm`, with a
    hand-written backward (3.1 ms against 5.2 ms forward + backward at [16, 256, 192]); without gradients
    (evaluation, decoding) torch's fused kernel, one call where a decoding step cannot afford seven.

    zero_centred: the scale is 1 + weight, weight starting at 0 (Qwen3-Next, Gemma): weight decay then pulls
    the scale toward 1, not 0."""

    def __init__(self, dim: int, eps: Optional[float] = None, zero_centred: bool = False):
        super().__init__(dim, eps=eps)
        self.zero_centred = zero_centred
        if zero_centred:
            nn.init.zeros_(self.weight)

    def forward(self, x):
        weight = self.weight + 1 if self.zero_centred else self.weight
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return rms_norm(x, weight, eps)
        return F.rms_norm(x, self.normalized_shape, weight, eps)
