"""The infini block's cache: the compressive memory and the unfinished segment."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from zoo.blocks.base import BlockCache, RowGroups


@dataclass
class InfiniCache(BlockCache):
    """The compressive memory M [batch, kv_heads, d, d], z [batch, kv_heads, d] (float32, float64 for a
    float64 model) and the un-rotated k, v [batch, n, kv_heads, d] of the unfinished segment
    (n = pos % segment_len); `row_start` as `AttentionCache`'s."""
    M: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0
    row_start: Optional[torch.Tensor] = None

    @classmethod
    def by_phase(cls, caches: Sequence["InfiniCache"], row_start: torch.Tensor, length: int,
                 segment_len: int) -> RowGroups:
        """The left-padding merge (`Block.merge_left_padded`): rows grouped by segment phase. A row's segment
        boundaries (where its unfinished segment is folded into the memory) fall at its own length modulo
        segment_len, and zoo.ops.infini takes one phase per call; a group's unfinished segments have one
        length, so its caches stack exactly, and the groups never change while decoding (every row advances
        one token per step). Each group's cache carries its rows' `row_start` (RoPE at their own positions).
        Prompts of equal length modulo segment_len form one group."""
        groups = {}
        for r in range(len(caches)):
            groups.setdefault(int(length - row_start[r]) % segment_len, []).append(r)
        out = []
        for rows in groups.values():
            stacked = cls.stack([caches[r] for r in rows])
            rows = torch.tensor(rows, device=row_start.device)
            stacked.pos, stacked.row_start = length, row_start[rows]
            out.append((rows, stacked))
        return RowGroups(out)
