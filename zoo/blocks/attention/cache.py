"""The attention blocks' cache: rotated K and V, preallocated in the layout the attention kernel reads.

K and V live in buffers [batch, kv_heads, capacity, head_dim] (SDPA's [batch, heads, length, head_dim]),
written in place; the attention reads a view of the filled slots, so a decoding step copies nothing that
grows with the context. Two ways to place a position's key in its slot:

  * linear (attn, blockwise, ring; selective): keys are appended at slot `held`, the buffer's capacity
    doubling when full (one copy of the cache per doubling: O(1) amortised per token, against a copy of
    the whole cache per token for a concatenation);
  * ring (swa, taipan: `ring` = window): position p lives in slot p % window. A query sees the window - 1
    keys before it and itself, so the ring has one slot more than the state (window - 1 keys): the new key
    is written over the one the window has just left, and the query reads all `window` slots, in ring
    order (softmax does not care about the order of its keys; RoPE already put the positions in them).
    A chunk of several tokens reads the state in time order first (its tokens would overwrite keys its
    first queries still need), then writes its last `window` keys.

`SlotCache` holds this bookkeeping for any cache of per-key buffers (K and V, selective's per-key
scores, taipan's selection flags); `AttentionCache` is the attention blocks' own.

Being written in place, a cache is for inference: a step's backward would find the buffers it read
overwritten by the next step (autograd's in-place check raises), so no gradient flows across steps.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from zoo.blocks.base import BlockCache, left_padded_cat

__all__ = ["AttentionCache", "SlotCache", "grown_capacity"]

# The first allocation holds at least this many keys, so a short prompt decoded token by token does not
# double its way up from one slot.
_MIN_CAPACITY = 16


def grown_capacity(capacity: int, needed: int, limit: Optional[int] = None) -> int:
    """The capacity after growing to hold `needed` keys: doubled (at least `needed`, at least 16), capped
    at `limit` (a ring's size, a KV budget's)."""
    new = max(needed, 2 * capacity, _MIN_CAPACITY)
    return new if limit is None else min(new, limit)


class SlotCache(BlockCache):
    """Per-key buffers written in place: the mechanics shared by the attention, selective and taipan caches.

    A subclass is a dataclass whose `BUFFERS` fields (name -> the buffer's time dimension; a field left
    None is skipped) hold `capacity` slots along that dimension, and which has the fields `pos` (tokens
    seen), `held` (slots written: linear, the keys kept, in order in slots [0, held); ring, the slots
    written so far, at most `ring`) and `ring` (None: linear; an int: the ring's size).
    Invariant of a ring: after a write either every slot is written or the held positions are
    [0, pos) in slots [0, pos), so the slots [0, held) are the keys a query at pos - 1 reads."""

    BUFFERS: ClassVar[dict[str, int]] = {}

    @property
    def capacity(self) -> int:
        name, dim = next(iter(self.BUFFERS.items()))
        return getattr(self, name).shape[dim]

    @property
    def kept(self) -> int:
        """Keys the state holds between steps: linear, `held`; a ring, the window - 1 before `pos`."""
        return self.held if self.ring is None else min(self.held, self.ring - 1)

    def _buffers(self):
        for name, dim in self.BUFFERS.items():
            t = getattr(self, name)
            if t is not None:
                yield name, dim, t

    def reserve(self, needed: int, limit: Optional[int] = None) -> None:
        """Grow every buffer to hold `needed` slots (doubling; slots [0, capacity) keep their contents)."""
        capacity = self.capacity
        if needed <= capacity:
            return
        limit = self.ring if limit is None else limit
        new = grown_capacity(capacity, needed, limit)
        for name, dim, t in self._buffers():
            shape = list(t.shape)
            shape[dim] = new
            grown = t.new_empty(shape)
            grown.narrow(dim, 0, capacity).copy_(t)
            setattr(self, name, grown)

    def write(self, t: int, **new: torch.Tensor) -> None:
        """Write the buffers' entries for the `t` positions [pos, pos + t) (new[name]: t entries along the
        buffer's time dimension; a ring keeps the last `ring` of them). Leaves `pos` to the caller."""
        if self.ring is None:
            self.reserve(self.held + t)
            for name, dim, buf in self._buffers():
                buf.narrow(dim, self.held, t).copy_(new[name])
            self.held += t
            return
        self.reserve(min(self.pos + t, self.ring))
        m = min(t, self.ring)
        first = self.pos + t - m
        if m == 1:
            slot = first % self.ring
            for name, dim, buf in self._buffers():
                buf.select(dim, slot).copy_(new[name].select(dim, t - 1))
        else:
            slots = torch.arange(first, first + m, device=self._device()) % self.ring
            for name, dim, buf in self._buffers():
                buf.index_copy_(dim, slots, new[name].narrow(dim, t - m, m).to(buf.dtype))
        self.held = min(self.held + m, self.capacity)

    def in_order(self, name: str) -> torch.Tensor:
        """Buffer `name`'s state (the `kept` keys before `pos`) in time order: a view for a linear cache,
        a gather (at most window - 1 keys) for a ring."""
        dim = self.BUFFERS[name]
        buf = getattr(self, name)
        if self.ring is None:
            return buf.narrow(dim, 0, self.held)
        m = self.kept
        slots = torch.arange(self.pos - m, self.pos, device=buf.device) % self.ring
        return buf.index_select(dim, slots)

    def slots(self, name: str) -> torch.Tensor:
        """Buffer `name`'s written slots [0, held), in slot order (a view): what a query at pos - 1 reads."""
        return getattr(self, name).narrow(self.BUFFERS[name], 0, self.held)

    def _device(self):
        return getattr(self, next(iter(self.BUFFERS))).device

    def nbytes(self) -> int:
        """Bytes of the state (`kept` keys of every buffer, bookkeeping left out): what `state_bytes`
        predicts. The spare capacity is allocation, counted by `allocated_nbytes`."""
        total = 0
        for name, dim, t in self._buffers():
            if name not in self.BOOKKEEPING and t.shape[dim]:
                total += t.numel() // t.shape[dim] * self.kept * t.element_size()
        return total

    @classmethod
    def stack(cls, caches: Sequence["SlotCache"]):
        """The caches' rows one after another. They must have seen the same positions and hold the same keys
        (`pos`, `held`, `ring`); their capacities may differ."""
        first = caches[0]
        for c in caches[1:]:
            if (c.pos, c.held, c.ring) != (first.pos, first.held, first.ring):
                raise ValueError(f"{cls.__name__}.stack: caches at different positions (pos, held, ring) "
                                 f"{(first.pos, first.held, first.ring)} and {(c.pos, c.held, c.ring)}; merge "
                                 f"them with the block's merge_left_padded")
        capacity = max(c.capacity for c in caches)
        fields = {}
        for name, value in first.tensors().items():
            if name in cls.BUFFERS:
                dim = cls.BUFFERS[name]
                fields[name] = torch.cat([_fit(getattr(c, name), dim, capacity) for c in caches])
            else:
                fields[name] = torch.cat([c.tensors()[name] for c in caches])
        return dataclasses.replace(first, **fields)


def _fit(t: torch.Tensor, dim: int, capacity: int) -> torch.Tensor:
    if t.shape[dim] == capacity:
        return t
    shape = list(t.shape)
    shape[dim] = capacity
    out = t.new_empty(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


@dataclass
class AttentionCache(SlotCache):
    """Rotated K and V in buffers `keys`, `values` [batch, kv_heads, capacity, head_dim] (see the module
    docstring; swa: a ring of `window` slots), `pos` the tokens seen, `held` the slots written.
    `row_start` [batch] (a left-padded batch, zoo.hf): where each row's own tokens begin on the shared
    timeline of `pos` positions; `key_mask` [batch, capacity] (with `row_start`): False at the slots of
    padding keys, which the attention masks.

    `k`, `v`: the state in time order, [batch, kept, kv_heads, head_dim] (the flash-attn layout; a
    transposed view for a linear cache, a copy of at most window - 1 keys for a ring)."""
    keys: torch.Tensor
    values: torch.Tensor
    pos: int = 0
    row_start: Optional[torch.Tensor] = None
    held: int = 0
    ring: Optional[int] = None
    key_mask: Optional[torch.Tensor] = None

    BUFFERS: ClassVar[dict[str, int]] = {"keys": 2, "values": 2, "key_mask": 1}
    BOOKKEEPING: ClassVar[tuple[str, ...]] = ("row_start", "key_mask")

    @classmethod
    def empty(cls, batch_size: int, kv_heads: int, head_dim: int, device=None, dtype=torch.float32,
              ring: Optional[int] = None) -> "AttentionCache":
        keys = torch.empty(batch_size, kv_heads, 0, head_dim, device=device, dtype=dtype)
        return cls(keys, torch.empty_like(keys), ring=ring)

    @property
    def k(self) -> torch.Tensor:
        return self.in_order("keys").transpose(1, 2)

    @property
    def v(self) -> torch.Tensor:
        return self.in_order("values").transpose(1, 2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the keys and values [batch, t, kv_heads, head_dim] of positions [pos, pos + t); pos += t."""
        t = k.shape[1]
        new = {"keys": k.transpose(1, 2), "values": v.transpose(1, 2)}
        if self.row_start is not None:
            if self.key_mask is None:
                self.key_mask = torch.zeros(k.shape[0], self.capacity, dtype=torch.bool, device=k.device)
            positions = torch.arange(self.pos, self.pos + t, device=k.device)
            new["key_mask"] = positions[None] >= self.row_start[:, None]
        self.write(t, **new)
        self.pos += t

    @classmethod
    def left_padded(cls, caches: Sequence["AttentionCache"], row_start: torch.Tensor, length: int) -> "AttentionCache":
        """The left-padding merge (`Block.merge_left_padded`): each row's kept K and V left-padded to the
        longest row's, written as the keys of the shared timeline's last positions (before `length`);
        `row_start` says where each row's own tokens begin and `key_mask` hides the padding slots."""
        k = left_padded_cat([c.k for c in caches])
        v = left_padded_cat([c.v for c in caches])
        first = caches[0]
        merged = cls.empty(len(caches), first.keys.shape[1], first.keys.shape[3], first.keys.device,
                           first.keys.dtype, ring=first.ring)
        merged.row_start, merged.pos = row_start, length - k.shape[1]
        merged.append(k, v)
        return merged
