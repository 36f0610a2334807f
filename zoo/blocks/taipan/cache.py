"""The taipan block's cache: K, V and selection flags of the window, a ring buffer written in place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from zoo.blocks.attention.cache import SlotCache
from zoo.blocks.base import left_padded_cat


@dataclass
class TaipanCache(SlotCache):
    """K, V in buffers `keys`, `values` [batch, heads, window, head_dim] and the selection flags
    `key_selected` [batch, window]: a ring of `window` slots, position p in slot p % window
    (`zoo.blocks.attention.cache`); zeros and False for unselected positions. `pos` the tokens seen,
    `row_start` as `AttentionCache`'s.

    `k`, `v` [batch, kept, heads, head_dim] and `selected` [batch, kept]: the state (the last window - 1
    positions) in time order."""
    keys: torch.Tensor
    values: torch.Tensor
    key_selected: torch.Tensor
    pos: int = 0
    row_start: Optional[torch.Tensor] = None
    held: int = 0
    ring: Optional[int] = None

    BUFFERS: ClassVar[dict[str, int]] = {"keys": 2, "values": 2, "key_selected": 1}

    @classmethod
    def empty(cls, batch_size: int, heads: int, head_dim: int, window: int, device=None, dtype=torch.float32):
        keys = torch.empty(batch_size, heads, 0, head_dim, device=device, dtype=dtype)
        selected = torch.empty(batch_size, 0, dtype=torch.bool, device=device)
        return cls(keys, torch.empty_like(keys), selected, ring=window)

    @property
    def k(self) -> torch.Tensor:
        return self.in_order("keys").transpose(1, 2)

    @property
    def v(self) -> torch.Tensor:
        return self.in_order("values").transpose(1, 2)

    @property
    def selected(self) -> torch.Tensor:
        return self.in_order("key_selected")

    def append(self, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor) -> None:
        """Write positions [pos, pos + t) (k, v [batch, t, heads, head_dim], selected [batch, t]); pos += t."""
        self.write(k.shape[1], keys=k.transpose(1, 2), values=v.transpose(1, 2), key_selected=selected)
        self.pos += k.shape[1]

    @classmethod
    def left_padded(cls, caches: Sequence["TaipanCache"], row_start: torch.Tensor, length: int) -> "TaipanCache":
        """The left-padding merge (`Block.merge_left_padded`): K, V and the flags left-padded with unselected
        slots, which the attention never shows to another token; RoPE (when enabled) reads `row_start`."""
        k, v = left_padded_cat([c.k for c in caches]), left_padded_cat([c.v for c in caches])
        selected = left_padded_cat([c.selected for c in caches], False)
        first = caches[0]
        out = cls.empty(len(caches), first.keys.shape[1], first.keys.shape[3], first.ring, first.keys.device,
                        first.keys.dtype)
        out.pos, out.row_start = length - k.shape[1], row_start
        out.append(k, v, selected)
        return out
