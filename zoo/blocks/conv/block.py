"""`short_conv`: the gated short convolution of LFM2 (Liquid AI, 2025):

    B, C, x = split(W_in h)          each [d_model]
    y = W_out (C * causal_depthwise_conv(B * x))       kernel `d_conv` (LFM2's conv_L_cache), no activation

A mixer with a fixed, tiny state (the conv's last d_conv - 1 inputs); packed documents through the conv op's
seq_idx; context parallel by the conv halo (zoo.blocks.mamba.cp.conv_cp, the d_conv - 1 inputs before each chunk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from zoo.blocks.base import Block, BlockCache
from zoo.blocks.mamba.cp import conv_cp
from zoo.distributed.halo import refuse_cache
from zoo.ops.conv import causal_conv1d, causal_conv1d_update
from zoo.ops.documents import check_block_documents
from zoo.registry import register_block

__all__ = ["ShortConvBlock", "ShortConvCache", "ShortConvConfig"]


@dataclass
class ShortConvConfig:
    d_conv: int = 3        # inputs each output reads, its own included (LFM2's conv_L_cache)
    bias: bool = False     # on the projections and the convolution (LFM2's conv_bias)

    def __post_init__(self):
        if isinstance(self.d_conv, bool) or not isinstance(self.d_conv, int) or self.d_conv < 1:
            raise ValueError(f"d_conv: must be an integer >= 1, got {self.d_conv!r}")

    def width_step(self) -> int:
        return 1   # one filter per channel: any d_model


@dataclass
class ShortConvCache(BlockCache):
    """conv [batch, d_model, d_conv - 1]: the gated inputs B * x of the last d_conv - 1 tokens."""
    conv: torch.Tensor


@register_block("short_conv", config=ShortConvConfig)
class ShortConvBlock(Block):
    supports_seq_idx = True
    supports_cp = True

    def __init__(self, d_model: int, cfg: ShortConvConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=cfg.bias)
        self.conv1d = nn.Conv1d(d_model, d_model, cfg.d_conv, groups=d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=cfg.bias)

    def forward(self, x, *, cache: Optional[ShortConvCache] = None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        B, C, h = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)          # [b, d, t] each
        gated = B * h
        weight, bias, impl = self.conv1d.weight[:, 0], self.conv1d.bias, self.kernels.get("causal_conv1d", "auto")
        if cp is not None:
            refuse_cache(cache, "short_conv")
            y = conv_cp(gated, weight, bias, cp, impl, activation=None)
        elif cache is None:
            y = causal_conv1d(gated, weight, bias, seq_idx=seq_idx, impl=impl)
        elif gated.shape[-1] == 1 and not torch.is_grad_enabled() and self.cfg.d_conv > 1:
            y = causal_conv1d_update(gated[..., 0], cache.conv, weight, bias)[..., None]   # tail shifted in place
        else:
            y, tail = causal_conv1d(gated, weight, bias, initial_states=cache.conv, return_final_states=True,
                                    impl=impl)
            cache.conv = tail.to(cache.conv.dtype)
        return self.out_proj((C * y).transpose(1, 2))

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> ShortConvCache:
        return ShortConvCache(torch.zeros(batch_size, self.d_model, self.cfg.d_conv - 1, device=device, dtype=dtype))

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        return batch_size * self.d_model * (self.cfg.d_conv - 1) * torch.empty((), dtype=dtype).element_size()

    def merge_left_padded(self, caches: Sequence[ShortConvCache], row_start, length: int) -> ShortConvCache:
        return ShortConvCache.stack(caches)   # a fixed-size tail per row, no position: rows never mix
