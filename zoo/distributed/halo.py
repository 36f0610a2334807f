"""Fetching other ranks' tokens: the halo exchange of windowed blocks, the conv and segment halos of the
recurrent ones, and the whole prefix selective attention reads.

`fetch(x, cp, spans)` gives every rank the tokens at global positions it names, gathered from whichever
ranks hold them, point to point: a rank receives exactly the tokens it asked for, once, and a window
that reaches back over several (short) chunks is served from all of them. Tokens the rank holds itself
are copied locally. The backward is the adjoint: each fetched token's gradient is sent back to its
owner and added to that token's gradient there, so halo gradients land on the rank that owns them.

Every rank evaluates `spans` for every rank (it is a function of the layout and the block's settings,
never of data), so all ranks agree on who sends what to whom without a handshake.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from zoo.distributed.comm import all_gather
from zoo.distributed.layout import ContextParallel

__all__ = ["fetch", "preceding", "gather_chunks", "refuse_cache"]

Spans = Callable[[int], Sequence[tuple[int, int]]]


class _Piece(NamedTuple):
    """`length` tokens at [src, src + length) of rank `owner`'s shard go to [dst, dst + length) of the
    fetched tensor of rank `reader`."""
    reader: int
    owner: int
    src: int
    dst: int
    length: int


def _plan(cp: ContextParallel, spans: Spans) -> list[_Piece]:
    pieces = []
    chunks = cp.all_chunks()
    for reader in range(cp.world_size):
        dst = 0
        for a, b in spans(reader):
            if not 0 <= a <= b <= cp.seq_len:
                raise ValueError(f"spans: rank {reader} asks for positions [{a}, {b}) outside [0, {cp.seq_len})")
            for c in chunks:
                lo, hi = max(a, c.start), min(b, c.end)
                if lo < hi:
                    pieces.append(_Piece(reader, c.rank, c.local_start + lo - c.start, dst + lo - a, hi - lo))
            dst += b - a
    return pieces


def _exchange(cp: ContextParallel, outgoing: dict, incoming: dict) -> None:
    """Send outgoing[rank] and receive into incoming[rank] (pre-allocated), all at once."""
    ops = [dist.P2POp(dist.isend, t, cp.global_rank(r), cp.group) for r, t in outgoing.items()]
    ops += [dist.P2POp(dist.irecv, t, cp.global_rank(r), cp.group) for r, t in incoming.items()]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _Fetch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp, pieces, total):
        me = cp.rank
        out = x.new_empty(x.shape[0], total, *x.shape[2:])
        outgoing, incoming = {}, {}
        for r in range(cp.world_size):
            sent = [p for p in pieces if p.owner == me and p.reader == r and r != me]
            if sent:
                outgoing[r] = torch.cat([x[:, p.src:p.src + p.length] for p in sent], 1).contiguous()
            got = [p for p in pieces if p.reader == me and p.owner == r and r != me]
            if got:
                incoming[r] = x.new_empty(x.shape[0], sum(p.length for p in got), *x.shape[2:])
        for p in pieces:
            if p.reader == me and p.owner == me:
                out[:, p.dst:p.dst + p.length] = x[:, p.src:p.src + p.length]
        _exchange(cp, outgoing, incoming)
        for r, buf in incoming.items():
            offset = 0
            for p in (p for p in pieces if p.reader == me and p.owner == r):
                out[:, p.dst:p.dst + p.length] = buf[:, offset:offset + p.length]
                offset += p.length
        ctx.cp, ctx.pieces = cp, pieces
        return out, x.view_as(x)

    @staticmethod
    def backward(ctx, grad, grad_through):
        cp, pieces, me = ctx.cp, ctx.pieces, ctx.cp.rank
        grad_x = grad_through.clone()
        outgoing, incoming = {}, {}
        for r in range(cp.world_size):
            back = [p for p in pieces if p.reader == me and p.owner == r and r != me]
            if back:
                outgoing[r] = torch.cat([grad[:, p.dst:p.dst + p.length] for p in back], 1).contiguous()
            mine = [p for p in pieces if p.owner == me and p.reader == r and r != me]
            if mine:
                incoming[r] = grad.new_empty(grad.shape[0], sum(p.length for p in mine), *grad.shape[2:])
        for p in pieces:
            if p.reader == me and p.owner == me:
                grad_x[:, p.src:p.src + p.length] += grad[:, p.dst:p.dst + p.length]
        _exchange(cp, outgoing, incoming)
        for r, buf in incoming.items():
            offset = 0
            for p in (p for p in pieces if p.owner == me and p.reader == r):
                # the same token may have gone to several readers (or twice to one): gradients add
                grad_x[:, p.src:p.src + p.length] += buf[:, offset:offset + p.length]
                offset += p.length
        return grad_x, None, None, None


def fetch(x: torch.Tensor, cp: ContextParallel, spans: Spans) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens at the global positions `spans(cp.rank)` (a list of [start, end) intervals), concatenated.

    x: this rank's shard [batch, local_len, ...] (any trailing shape, equal on every rank). `spans(r)`
    must give the same answer on every rank for every r. Returns (fetched [batch, sum of span lengths,
    ...], x): use the x returned, not the one passed, for everything after. The backward is point to
    point, so each rank must run it, also one that fetched nothing but owns tokens others fetched;
    routing the rank's own tokens through the exchange puts it in every rank's graph.
    """
    if x.shape[1] != cp.local_len:
        raise ValueError(f"x: rank {cp.rank} holds {x.shape[1]} tokens, the layout gives it {cp.local_len}")
    pieces = _plan(cp, spans)
    total = sum(b - a for a, b in spans(cp.rank))
    return _Fetch.apply(x, cp, pieces, total)


def preceding(x: torch.Tensor, cp: ContextParallel,
              need: Callable[[int, int], int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """For each of this rank's chunks (shard order), the `need(start, end)` tokens just before it (fewer
    at the sequence start): ([batch, min(need, start), ...] per chunk, x), fetched with `fetch`."""
    def spans(rank):
        return [(max(0, c.start - need(c.start, c.end)), c.start) for c in cp.chunks(rank)]

    mine = spans(cp.rank)
    out, x = fetch(x, cp, spans)
    return list(out.split([b - a for a, b in mine], 1)), x


def gather_chunks(t: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """Per-chunk values of every chunk in global chunk order: t [chunks of this rank (shard order), ...]
    -> [n_chunks, ...]. Equal shapes on every rank; differentiable (the all-gather's adjoint)."""
    gathered = all_gather(t, cp.group)                            # [W, chunks per rank, ...]
    order = {c: (r, i) for r in range(cp.world_size) for i, c in enumerate(cp.chunk_ids(r))}
    return torch.stack([gathered[order[c][0], order[c][1]] for c in range(cp.n_chunks)])


def refuse_cache(cache, block: str) -> None:
    """Context parallel runs whole sequences (training, evaluation); streaming through a cache is per rank."""
    if cache is not None:
        raise ValueError(f"cache: {block} got both a cache and a context-parallel handle; context parallel runs "
                         f"whole sequences (pass cache=None)")
