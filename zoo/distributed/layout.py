"""Context-parallel layouts: which tokens of one sequence each of W ranks holds.

The sequence of length L is cut into n chunks whose boundaries are `c * L // n` (sizes differ by at
most one token, so any L >= n splits exactly: no padding, nothing to mask out of the loss).

- `contiguous`: n = W chunks; rank r holds chunk r.
- `zigzag`: n = 2W chunks; rank r holds chunks r and 2W-1-r, in that order. Under causal masking
  chunk c costs ~c units of attention, so every rank gets ~(2W-1) units: balanced work.

A rank's shard is its chunks concatenated in the order above. `ContextParallel` is the handle a
block receives as `cp`; `shard` / `unshard` move whole tensors between the layouts and one process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist

__all__ = ["LAYOUTS", "Chunk", "ContextParallel", "shard", "unshard", "chunk_bounds"]

LAYOUTS = ("contiguous", "zigzag")


class Chunk(NamedTuple):
    """One chunk of the sequence: global chunk `index`, global tokens [start, end), held by `rank`
    at [local_start, local_end) of its shard."""
    index: int
    start: int
    end: int
    rank: int
    local_start: int
    local_end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def local(self) -> slice:
        return slice(self.local_start, self.local_end)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: unknown context-parallel layout {layout!r} (known: {', '.join(LAYOUTS)})")


def chunk_bounds(seq_len: int, n_chunks: int) -> list[int]:
    """n_chunks + 1 boundaries; chunk c is [bounds[c], bounds[c + 1])."""
    return [c * seq_len // n_chunks for c in range(n_chunks + 1)]


@dataclass(frozen=True)
class ContextParallel:
    """The context-parallel handle passed to blocks as `cp`: process group, layout, this rank and the
    global length. Everything else (chunks, positions, shard lengths) is derived from those."""
    group: Any
    layout: str
    rank: int
    world_size: int
    seq_len: int

    def __post_init__(self):
        _check_layout(self.layout)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.seq_len < self.n_chunks:
            raise ValueError(f"seq_len: {self.seq_len} tokens cannot fill the {self.n_chunks} chunks of layout "
                             f"{self.layout!r} over W={self.world_size} ranks (every chunk needs >= 1 token)")

    @classmethod
    def for_length(cls, group, seq_len: int, layout: str = "zigzag") -> "ContextParallel":
        """The handle of this process in `group` (None: the default group) for a sequence of `seq_len`."""
        return cls(group, layout, dist.get_rank(group), dist.get_world_size(group), int(seq_len))

    @classmethod
    def from_shard(cls, group, local_len: int, layout: str = "zigzag") -> "ContextParallel":
        """The handle for a shard of `local_len` tokens; the global length is summed over the group
        (one small all-reduce) and the shard's length checked against the layout's split."""
        _check_layout(layout)
        total = torch.tensor([local_len], dtype=torch.int64)
        dist.all_reduce(total, group=group)
        cp = cls.for_length(group, int(total.item()), layout)
        if cp.local_len != local_len:
            raise ValueError(f"input_ids: rank {cp.rank} holds {local_len} tokens but layout {layout!r} over "
                             f"W={cp.world_size} gives it {cp.local_len} of the {cp.seq_len}; shard with "
                             f"zoo.distributed.shard(x, group, layout={layout!r})")
        return cp

    @property
    def n_chunks(self) -> int:
        return self.world_size * (2 if self.layout == "zigzag" else 1)

    def chunk_ids(self, rank: Optional[int] = None) -> tuple[int, ...]:
        """Global chunk indices held by `rank` (default this rank), in shard order."""
        r = self.rank if rank is None else rank
        return (r,) if self.layout == "contiguous" else (r, 2 * self.world_size - 1 - r)

    def chunks(self, rank: Optional[int] = None) -> tuple[Chunk, ...]:
        """The chunks of `rank` (default this rank) in shard order, with global and local bounds."""
        r = self.rank if rank is None else rank
        bounds = chunk_bounds(self.seq_len, self.n_chunks)
        out, local = [], 0
        for c in self.chunk_ids(r):
            n = bounds[c + 1] - bounds[c]
            out.append(Chunk(c, bounds[c], bounds[c + 1], r, local, local + n))
            local += n
        return tuple(out)

    def all_chunks(self) -> tuple[Chunk, ...]:
        """Every chunk of the sequence in global order, each with its owner and place in the owner's shard:
        what state passing and halo exchange walk through."""
        found = [c for r in range(self.world_size) for c in self.chunks(r)]
        return tuple(sorted(found, key=lambda c: c.index))

    def shard_len(self, rank: Optional[int] = None) -> int:
        return sum(c.length for c in self.chunks(rank))

    @property
    def local_len(self) -> int:
        return self.shard_len(self.rank)

    def positions(self, device=None) -> torch.Tensor:
        """Global token positions of this rank's shard, LongTensor [local_len] (for RoPE)."""
        return torch.cat([torch.arange(c.start, c.end, device=device) for c in self.chunks()])

    def global_rank(self, rank: int) -> int:
        """The default-group rank of group rank `rank` (point-to-point ops address those)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """This rank's shard of the whole sequence `x` (every rank passes the same x). Differentiable
    (slicing); needs no communication."""
    cp = ContextParallel.for_length(group, x.shape[dim], layout)
    return take_chunks(x, cp, dim)


def take_chunks(x: torch.Tensor, cp: ContextParallel, dim: int = 1) -> torch.Tensor:
    """This rank's chunks of the whole-sequence `x` along `dim`, in order: its shard."""
    parts = [x.narrow(dim, c.start, c.length) for c in cp.chunks()]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1,
            seq_len: Optional[int] = None) -> torch.Tensor:
    """The whole sequence from every rank's shard (an all-gather; every rank gets the result).

    Differentiable with the all-gather's adjoint: a shard's gradient is the sum of the gradients
    every rank's copy receives. So if every rank computes the same loss from the gathered tensor,
    the shard's gradient is W times that loss's gradient; compute the loss on one rank's share or
    divide by W. `seq_len` (the global length) saves an all-reduce when known.
    """
    cp = (ContextParallel.from_shard(group, x.shape[dim], layout) if seq_len is None
          else ContextParallel.for_length(group, seq_len, layout))
    if x.shape[dim] != cp.local_len:
        raise ValueError(f"x: rank {cp.rank} holds {x.shape[dim]} tokens along dim {dim}, layout {layout!r} over "
                         f"W={cp.world_size} of seq_len {cp.seq_len} gives it {cp.local_len}")
    from zoo.distributed.comm import all_gather  # comm imports this module
    longest = max(cp.shard_len(r) for r in range(cp.world_size))
    pad = longest - x.shape[dim]
    if pad:
        # all-gather needs equal shapes; uneven splits pad the shorter shards, trimmed below
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim)
    gathered = all_gather(x, group)  # [W, ...]
    pieces = {}
    for r in range(cp.world_size):
        for c in cp.chunks(r):
            pieces[c.index] = gathered[r].narrow(dim, c.local_start, c.length)
    return torch.cat([pieces[i] for i in range(cp.n_chunks)], dim)
