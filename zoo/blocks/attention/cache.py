"""The attention blocks' cache: rotated K and V."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from zoo.blocks.base import BlockCache, left_padded_cat


@dataclass
class AttentionCache(BlockCache):
    """Rotated K and V [batch, cached, kv_heads, head_dim] (swa: the last window - 1), `pos` the tokens
    seen. `row_start` [batch] (a left-padded batch, zoo.hf): where each row's own tokens begin on the
    shared timeline of `pos` positions; the keys before it are padding, masked."""
    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0
    row_start: Optional[torch.Tensor] = None

    @classmethod
    def left_padded(cls, caches: Sequence["AttentionCache"], row_start: torch.Tensor, length: int) -> "AttentionCache":
        """The left-padding merge (`Block.merge_left_padded`): K and V left-padded with zeros to the longest
        row, `pos` the shared timeline's length, `row_start` where each row's own tokens begin."""
        return cls(left_padded_cat([c.k for c in caches]), left_padded_cat([c.v for c in caches]),
                   pos=length, row_start=row_start)
