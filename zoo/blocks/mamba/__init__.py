"""Mamba blocks: `mamba`, the Mamba-1 mixer (Gu & Dao, arXiv 2312.00752, section 3.4, figure 3),
and `mamba2`, the Mamba-2 mixer (Dao & Gu, arXiv 2405.21060, section 7.1, figure 6).

    mamba:  x, z = in_proj(u);  x = silu(conv(x));  dt, B, C = x_proj(x);  dt = dt_proj(dt)
            y = selective_scan(x, dt, A, B, C, D, z);  out_proj(y)
    mamba2: z, xBC, dt = in_proj(u);  x, B, C = silu(conv(xBC));  y = ssd_scan(x, dt, A, B, C, D)
            out_proj(rmsnorm(y * silu(z)))              per head of head_dim, B and C per group

Parameter names follow mamba_ssm and transformers (in_proj, conv1d, x_proj, dt_proj, dt_bias, A_log,
D, norm, out_proj). The cache (`MambaCache`) holds two tensors updated in place: `conv`, the last
d_conv - 1 inputs of the convolution, and `ssm`, the recurrent state; its size does not grow with the
length, and it has no notion of position, so a left-padded batch is its rows' caches stacked.

Packed documents (seq_idx): the convolution reads no input of another document and the scan's state
is zeroed where a document starts, both inside the ops (no per-document loop).

    config.py  MambaConfig, Mamba2Config
    cache.py   MambaCache (conv + SSM state) and its left-padding merge (the rows stacked)
    block.py   MambaBlock (`mamba`), Mamba2Block (`mamba2`)
    cp.py      context parallel: conv halo, then state passing
"""
from zoo.blocks.mamba.block import GatedRMSNorm, Mamba2Block, MambaBlock
from zoo.blocks.mamba.cache import MambaCache
from zoo.blocks.mamba.config import Mamba2Config, MambaConfig

__all__ = ["GatedRMSNorm", "Mamba2Block", "Mamba2Config", "MambaBlock", "MambaCache", "MambaConfig"]
