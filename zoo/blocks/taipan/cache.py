"""The taipan block's cache: K, V and selection flags of the last window - 1 positions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from zoo.blocks.base import BlockCache, left_padded_cat


@dataclass
class TaipanCache(BlockCache):
    """K, V [batch, kept, heads, head_dim] and `selected` [batch, kept] of the last window - 1 positions
    (zeros and False for unselected ones), `pos` the tokens seen; `row_start` as `AttentionCache`'s."""
    k: torch.Tensor
    v: torch.Tensor
    selected: torch.Tensor
    pos: int = 0
    row_start: Optional[torch.Tensor] = None

    @classmethod
    def left_padded(cls, caches: Sequence["TaipanCache"], row_start: torch.Tensor, length: int) -> "TaipanCache":
        """The left-padding merge (`Block.merge_left_padded`): K, V and the flags left-padded with unselected
        slots, which the attention never shows to another token; RoPE (when enabled) reads `row_start`."""
        return cls(left_padded_cat([c.k for c in caches]), left_padded_cat([c.v for c in caches]),
                   left_padded_cat([c.selected for c in caches], False), pos=length, row_start=row_start)
