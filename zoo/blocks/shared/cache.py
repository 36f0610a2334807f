"""The cache of a layer that uses a shared block: its mixer's cache and this use's K/V of the shared attention."""
from __future__ import annotations

from dataclasses import dataclass

from zoo.blocks.parallel.cache import ParallelCache


@dataclass
class SharedLayerCache(ParallelCache):
    """branches = [the mixer's cache, the shared attention's cache for this use] (each use attends over its own
    keys: the block's weights are shared, its inputs at each depth are not)."""

    @property
    def mixer(self):
        return self.branches[0]

    @property
    def attention(self):
        return self.branches[1]
