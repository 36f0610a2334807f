"""The selective block's cache: K, V and each key's accumulated selection."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from zoo.blocks.base import BlockCache, left_padded_cat


@dataclass
class SelectiveCache(BlockCache):
    """Rotated K, V [batch, kept, kv_heads, head_dim] and each key's accumulated selection F, `scores`
    [batch, kept] (float32, float64 for a float64 model); `pos` the tokens seen, `row_start` as
    `AttentionCache`'s. The first key is the row's first token (never selected against, never evicted)."""
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor
    pos: int = 0
    row_start: Optional[torch.Tensor] = None

    @classmethod
    def left_padded(cls, caches: Sequence["SelectiveCache"], row_start: torch.Tensor, length: int) -> "SelectiveCache":
        """The left-padding merge (`Block.merge_left_padded`). The op recognises the first (BOS) key by its
        index 0, so each row keeps its first key there and the padding goes after it: [first, padding,
        rest]. Padding keys carry an infinite accumulated selection F: their softmax weight is exp(-inf) = 0,
        their column stays infinite, and under a KV budget eviction (largest F first) drops them before any
        real key, so the real keys kept are the row's own. RoPE reads `row_start`."""
        def merged(name, value):
            return left_padded_cat([getattr(c, name) for c in caches], value, first=1)

        return cls(merged("k", 0), merged("v", 0), merged("scores", float("inf")), pos=length, row_start=row_start)


def scores_dtype(dtype: torch.dtype) -> torch.dtype:
    # The op accumulates F in float64 for float64 inputs and in float32 otherwise.
    return torch.float64 if dtype == torch.float64 else torch.float32
