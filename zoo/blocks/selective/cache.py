"""The selective block's cache: K, V and each key's accumulated selection, preallocated and written in place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from zoo.blocks.attention.cache import SlotCache
from zoo.blocks.base import left_padded_cat
from zoo.ops.dtypes import accumulation_dtype


@dataclass
class SelectiveCache(SlotCache):
    """Rotated K, V in buffers `keys`, `values` [batch, kv_heads, capacity, head_dim] and each key's
    accumulated selection F in `key_scores` [batch, capacity] (float32, float64 for a float64 model): the
    kept keys in order in slots [0, held) (`zoo.blocks.attention.cache`, linear; under a KV budget the
    capacity stops at budget + 1). `pos` the tokens seen, `row_start` as `AttentionCache`'s. The first key
    is the row's first token (never selected against, never evicted).

    `k`, `v` [batch, held, kv_heads, head_dim] and `scores` [batch, held]: the state, as views."""
    keys: torch.Tensor
    values: torch.Tensor
    key_scores: torch.Tensor
    pos: int = 0
    row_start: Optional[torch.Tensor] = None
    held: int = 0
    ring: Optional[int] = None

    BUFFERS: ClassVar[dict[str, int]] = {"keys": 2, "values": 2, "key_scores": 1}

    @classmethod
    def empty(cls, batch_size: int, kv_heads: int, head_dim: int, device=None, dtype=torch.float32):
        keys = torch.empty(batch_size, kv_heads, 0, head_dim, device=device, dtype=dtype)
        scores = torch.empty(batch_size, 0, device=device, dtype=accumulation_dtype(dtype))
        return cls(keys, torch.empty_like(keys), scores)

    @property
    def k(self) -> torch.Tensor:
        return self.slots("keys").transpose(1, 2)

    @property
    def v(self) -> torch.Tensor:
        return self.slots("values").transpose(1, 2)

    @property
    def scores(self) -> torch.Tensor:
        return self.slots("key_scores")

    @classmethod
    def left_padded(cls, caches: Sequence["SelectiveCache"], row_start: torch.Tensor, length: int) -> "SelectiveCache":
        """The left-padding merge (`Block.merge_left_padded`). The op recognises the first (BOS) key by its
        index 0, so each row keeps its first key there and the padding goes after it: [first, padding,
        rest]. Padding keys carry an infinite accumulated selection F: their softmax weight is exp(-inf) = 0,
        their column stays infinite, and under a KV budget eviction (largest F first) drops them before any
        real key, so the real keys kept are the row's own. RoPE reads `row_start`."""
        def merged(name, value):
            return left_padded_cat([getattr(c, name) for c in caches], value, first=1)

        k, v, scores = merged("k", 0), merged("v", 0), merged("scores", float("inf"))
        first = caches[0]
        out = cls.empty(len(caches), first.keys.shape[1], first.keys.shape[3], first.keys.device, first.keys.dtype)
        out.write(k.shape[1], keys=k.transpose(1, 2), values=v.transpose(1, 2), key_scores=scores)
        out.pos, out.row_start = length, row_start
        return out


