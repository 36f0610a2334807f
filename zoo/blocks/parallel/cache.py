"""The joint cache of a `parallel` block: one cache per branch, in branch order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from zoo.blocks.base import BlockCache


@dataclass
class ParallelCache(BlockCache):
    branches: list = field(default_factory=list)   # each branch's own cache (a RowGroups after some merges)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.branches)

    def allocated_nbytes(self) -> int:
        return sum(c.allocated_nbytes() for c in self.branches)

    @property
    def batch_size(self) -> int:
        return self.branches[0].batch_size

    def index_rows(self, indices: torch.Tensor) -> "ParallelCache":
        return type(self)([c.index_rows(indices) for c in self.branches])

    @classmethod
    def stack(cls, caches: Sequence["ParallelCache"]) -> "ParallelCache":
        return cls([type(parts[0]).stack(parts) for parts in zip(*(c.branches for c in caches))])
