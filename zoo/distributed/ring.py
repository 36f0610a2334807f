"""Ring attention (Liu, Zaharia & Abbeel, arXiv 2310.01889): exact attention over a sequence sharded
across the W ranks of a context-parallel group.

Each rank keeps its queries and passes its K/V shard around the ring: at step s rank r holds the K/V of
rank (r - s) mod W, computes blockwise attention (zoo.ops.attention's FlashAttention-2 kernels) of its
query chunks against the visiting key chunks, and merges the partial results by log-sum-exp, while the
next K/V shard is already in flight (`batch_isend_irecv` posted before the compute). Under causal
masking a key chunk later than a query chunk is skipped, the diagonal chunk is masked causally and
earlier chunks need no mask; with the zigzag layout every rank then does the same work.

The backward recomputes per block from the saved output and the global lse (FA-2 algorithm 2 with
the global row statistics, so each block's contribution is exact on its own), sends the K/V shards
around the ring again, and sends with them the dK/dV accumulator of the shard being visited: rank r
receives the accumulator for the visiting shard from rank r - 1, adds its contribution to it in place
and passes it on during the next step; after W steps every accumulator has visited every rank and one
last hop brings it home.

Layout and memory. Everything runs in the row layout of zoo.ops.attention's blockwise kernels
([batch * kv_heads, length, groups, d]: a kv head's query heads side by side), converted once: the
local q (scaled) and, in the backward, dout; K and V travel as one [2, batch * kv_heads, length, d]
buffer, so no pair of chunks converts anything. The forward keeps the online-softmax state (running
max, sum and unnormalised output) of every local query across the whole ring and updates it in place,
tile by tile; the backward accumulates dq and the visiting shard's dK/dV in place. What a rank holds
beyond its saved q, K/V, out, lse: dq, the visiting and incoming K/V, the accumulator in flight and
the one being filled, and one block x block tile; never an L x L matrix, and no buffer that grows
with the number of chunk pairs. The local K/V is released in the backward once it has been used and
passed on (so a second backward through the same graph is refused).

Communication per rank and step: one K/V shard forward; K/V plus the dK/dV accumulator (in the
accumulation dtype) backward.

The ring itself is generic (`ring_pass`, `ring_pass_grads`: a shard around the ring with the next one in
flight, and in a backward its gradient accumulator one step behind), shared with selective attention's
context-parallel path (zoo.blocks.selective.cp).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from zoo.distributed.layout import ContextParallel
from zoo.ops.attention import check_attention_inputs, from_rows, hidden_keys, key_blocks, mask_tile, to_rows
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["ring_attention", "ring_pairs", "ring_pass", "ring_pass_grads"]

_SHARD_TAG, _GRAD_TAG = 0, 2
# Query and key tiles of at most this many positions: each tile's score and gradient matrices (two of
# [batch * kv_heads, tile * groups, tile] at a time) are a constant in the per-rank peak, which at W = 4
# is a quarter of the one-process peak. Measured (bench_context_parallel.py --length 8192 --cases
# blockwise, 4 heads of 64, block_size 512): W = 4 peak per rank 43.5 MiB with 512-position tiles,
# 34.5 MiB with 256 (one process: 139.0 MiB), at the same step time within noise.
_MAX_TILE = 256


def ring_attention(q, k, v, cp: ContextParallel, causal: bool = True, scale: Optional[float] = None,
                   block_size: int = 512, return_lse: bool = False):
    """Exact attention of this rank's queries over the whole sequence's keys.

    q [batch, local_len, heads, head_dim], k and v [batch, local_len, kv_heads, head_dim] are this
    rank's shards in `cp`'s layout (kv_heads dividing heads: GQA). Returns out like q (the matching
    shard of single-process attention) and with `return_lse` also lse [batch, heads, local_len]
    (differentiable) in the accumulation dtype. block_size: the query / key tile, capped at
    `_MAX_TILE` (the tile is a constant in the per-rank memory).
    """
    check_attention_inputs(q, k, v, causal, None)
    for name, t in (("q", q), ("k", k)):
        if t.shape[1] != cp.local_len:
            raise ValueError(f"{name}: rank {cp.rank} holds {cp.local_len} tokens of {cp.seq_len} in layout "
                             f"{cp.layout!r} over W={cp.world_size}, got length {t.shape[1]}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: must be an integer >= 1, got {block_size!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _RingAttention.apply(q, k, v, cp, causal, scale, min(block_size, _MAX_TILE))
    return (out, lse) if return_lse else out


def _exchange(cp: ContextParallel, sends, recvs):
    """Post sends to the next rank and receives from the previous one; (tensor, tag) pairs, posted in the
    same order on both sides. Returns the requests to wait on."""
    if not sends and not recvs:
        return []
    nxt = cp.global_rank((cp.rank + 1) % cp.world_size)
    prv = cp.global_rank((cp.rank - 1) % cp.world_size)
    ops = [dist.P2POp(dist.isend, t, nxt, cp.group, tag) for t, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, prv, cp.group, tag) for t, tag in recvs]
    return dist.batch_isend_irecv(ops)


def _wait(works):
    for w in works:
        w.wait()


def ring_pairs(cp: ContextParallel, owner: int, causal: bool):
    """(query chunk, key chunk, diagonal) pairs this rank computes against `owner`'s K/V shard."""
    for kc in cp.chunks(owner):
        for qc in cp.chunks():
            if causal and kc.index > qc.index:
                continue  # every key of a later chunk is in every query's future
            yield qc, kc, causal and kc.index == qc.index


def _resized(t, dim, n):
    shape = list(t.shape)
    shape[dim] = n
    return t.new_empty(shape)


def ring_pass(cp: ContextParallel, shard: torch.Tensor, dim: int, visit) -> None:
    """Pass `shard` (this rank's tokens along `dim`) around the ring: at step s, visit(owner, visiting) with
    the shard of rank (rank - s) mod W, the next shard already in flight. At most two shards are held."""
    w = cp.world_size
    for step in range(w):
        owner = (cp.rank - step) % w
        works, incoming = [], None
        if step < w - 1:
            incoming = _resized(shard, dim, cp.shard_len((owner - 1) % w))
            works = _exchange(cp, [(shard, _SHARD_TAG)], [(incoming, _SHARD_TAG)])
        visit(owner, shard)
        _wait(works)
        if incoming is not None:
            shard = incoming


def ring_pass_grads(cp: ContextParallel, shard: torch.Tensor, dim: int, grad: torch.Tensor, visit) -> torch.Tensor:
    """`ring_pass` for a backward: with each visiting shard comes the accumulator of its gradient, which
    visit(owner, visiting, accumulator) adds to in place; the accumulator travels one step behind its
    shard and one last hop brings each rank its own. `grad`: zeros shaped like this rank's gradient (the
    first accumulator). Returns this rank's accumulated gradient. Pass `shard` and `grad` unbound
    (no other reference): the shard is released once passed on."""
    w = cp.world_size
    shape = grad.shape
    done = None
    for step in range(w):
        owner = (cp.rank - step) % w
        sends, recvs, incoming = [], [], None
        if step < w - 1:
            incoming = _resized(shard, dim, cp.shard_len((owner - 1) % w))
            sends.append((shard, _SHARD_TAG))
            recvs.append((incoming, _SHARD_TAG))
        if done is not None:
            acc = _resized(done, dim, cp.shard_len(owner))
            sends.append((done, _GRAD_TAG))
            recvs.append((acc, _GRAD_TAG))
        else:
            acc, grad = grad, None
        works = _exchange(cp, sends, recvs)
        if done is not None:
            works.pop().wait()   # a gloo work is waited on once: a second wait on a finished receive blocks
        visit(owner, shard, acc)
        _wait(works)
        done = acc
        if incoming is not None:
            shard = incoming
    del shard, incoming
    if w > 1:
        home = done.new_empty(shape)
        _wait(_exchange(cp, [(done, _GRAD_TAG)], [(home, _GRAD_TAG)]))
        done = home
    return done


def _kv_rows(k, v, acc):
    """k, v [b, L, kv_heads, d] -> one contiguous [2, b * kv_heads, L, d] buffer in `acc` (one message)."""
    b, length, hk, d = k.shape
    out = torch.empty(2, b, hk, length, d, dtype=acc, device=k.device)
    out[0].copy_(k.transpose(1, 2))
    out[1].copy_(v.transpose(1, 2))
    return out.view(2, b * hk, length, d)


def _stat_rows(x, b, hk, groups):
    """[b, h, L] (lse, its gradient) -> [b * hk, L, groups] rows; a new tensor."""
    length = x.shape[-1]
    return x.view(b, hk, groups, length).transpose(2, 3).reshape(b * hk, length, groups)


def _forward_pair(qr, kv, o, m, l, causal, block_size):
    """Online softmax of queries qr [n, lq, groups, d] (scaled) over keys kv [2, n, lk, d], updating the
    running output o [n, lq, groups, d], max m and sum l [n, lq, groups] (views into the whole shard's)."""
    n, lq, groups, d = qr.shape
    lk = kv.shape[2]
    for qs in range(0, lq, block_size):
        qe = min(qs + block_size, lq)
        rows = (qe - qs) * groups
        qb, ob = qr[:, qs:qe].reshape(n, rows, d), o[:, qs:qe].view(n, rows, d)
        mb, lb = m[:, qs:qe].view(n, rows), l[:, qs:qe].view(n, rows)
        for ks, ke, full in key_blocks(qs, qe, lq, lk, causal, None, block_size):
            s = torch.bmm(qb, kv[0][:, ks:ke].transpose(1, 2))
            if not full:
                mask_tile(s, hidden_keys(qs, qe, ks, ke, lq, lk, causal, None, None, s.device), groups)
            m_new = torch.maximum(mb, s.amax(dim=-1))
            p = s.sub_(m_new[..., None]).exp_()
            alpha = (mb - m_new).exp_()  # FA-2's rescaling of the partial sums so far
            lb.mul_(alpha).add_(p.sum(dim=-1))
            ob.mul_(alpha[..., None]).baddbmm_(p, kv[1][:, ks:ke])
            mb.copy_(m_new)


def _backward_pair(qr, do, lse, delta, kv, dq, dkv, causal, block_size):
    """FA-2 backward of queries qr [n, lq, groups, d] (scaled) against keys kv [2, n, lk, d] with the
    global row statistics lse, delta [n, lq, groups]: adds into dq [n, lq, groups, d] and dkv [2, n, lk, d]
    (views) in place. Each tile's probabilities are recomputed, never stored."""
    n, lq, groups, d = qr.shape
    lk = kv.shape[2]
    for qs in range(0, lq, block_size):
        qe = min(qs + block_size, lq)
        rows = (qe - qs) * groups
        qb, dob, dqb = qr[:, qs:qe].reshape(n, rows, d), do[:, qs:qe].reshape(n, rows, d), dq[:, qs:qe].view(n, rows, d)
        lse_b, delta_b = lse[:, qs:qe].reshape(n, rows, 1), delta[:, qs:qe].reshape(n, rows, 1)
        for ks, ke, full in key_blocks(qs, qe, lq, lk, causal, None, block_size):
            kb, vb = kv[0][:, ks:ke], kv[1][:, ks:ke]
            s = torch.bmm(qb, kb.transpose(1, 2))
            if not full:
                mask_tile(s, hidden_keys(qs, qe, ks, ke, lq, lk, causal, None, None, s.device), groups)
            p = s.sub_(lse_b).exp_()
            dkv[1][:, ks:ke].baddbmm_(p.transpose(1, 2), dob)
            ds = torch.bmm(dob, vb.transpose(1, 2)).sub_(delta_b).mul_(p)
            dqb.baddbmm_(ds, kb)
            dkv[0][:, ks:ke].baddbmm_(ds.transpose(1, 2), qb)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp, causal, scale, block_size):
        w = cp.world_size
        acc = accumulation_dtype(q.dtype)
        b, length, h, d = q.shape
        hk = k.shape[2]
        groups, n = h // hk, b * hk
        qr = to_rows(q, groups, acc).mul_(scale)
        kv_local = _kv_rows(k, v, acc)
        o = torch.zeros(n, length, groups, d, dtype=acc, device=q.device)
        # The running max starts at the most negative finite value, not -inf: a row meeting only masked
        # keys in a tile then gets exp(-inf - min) = 0 rather than NaN.
        m = torch.full((n, length, groups), torch.finfo(acc).min, dtype=acc, device=q.device)
        l = torch.zeros(n, length, groups, dtype=acc, device=q.device)

        def visit(owner, kv):
            for qc, kc, diagonal in ring_pairs(cp, owner, causal):
                _forward_pair(qr[:, qc.local], kv[:, :, kc.local], o[:, qc.local], m[:, qc.local], l[:, qc.local],
                              diagonal, block_size)

        ring_pass(cp, kv_local, 2, visit)
        # Rows with no visible key at all (only without causal and with no keys) have l = 0: their
        # output is 0 and their lse -inf, as merge_attention expects of an empty side.
        lse_r = m.add_(l.log())
        out = from_rows(o.div_(l.clamp_min_(torch.finfo(acc).tiny)[..., None]), b, q.dtype)
        del o, l
        lse = lse_r.view(b, hk, length, groups).permute(0, 1, 3, 2).reshape(b, h, length)
        ctx.save_for_backward(qr, out, lse_r)
        ctx.kv = [kv_local]   # not saved: the backward takes it out and releases it once passed on
        ctx.args = (cp, causal, scale, block_size, (b, h, hk, d), k.dtype)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qr, out, lse_r = ctx.saved_tensors
        cp, causal, scale, block_size, (b, h, hk, d), kv_dtype = ctx.args
        if not ctx.kv:
            raise RuntimeError("ring_attention: its backward runs once per forward (the local K/V is released "
                               "during it); a second backward through the same graph (retain_graph) is not supported")
        acc, groups, n, length = qr.dtype, h // hk, b * hk, qr.shape[1]
        if dout is not None:
            do = to_rows(dout, groups, acc)
            # D_i = rowsum(dO_i * O_i) (FA-2 algorithm 2, line 4), in the input layout: no row copy of out
            delta = _stat_rows((dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2), b, hk, groups)
        else:
            do = torch.zeros_like(qr)
            delta = torch.zeros_like(lse_r)
        if dlse is not None:
            # d lse_i / d s_ij = P_ij, so dS = P * (dP - D + dlse): the lse gradient shifts D.
            delta = delta - _stat_rows(dlse.to(acc), b, hk, groups)
        dq = torch.zeros_like(qr)

        def visit(owner, kv, dkv):
            for qc, kc, diagonal in ring_pairs(cp, owner, causal):
                _backward_pair(qr[:, qc.local], do[:, qc.local], lse_r[:, qc.local], delta[:, qc.local],
                               kv[:, :, kc.local], dq[:, qc.local], dkv[:, :, kc.local], diagonal, block_size)

        # the local K/V's only reference passes into the ring, which drops it once passed on
        done = ring_pass_grads(cp, ctx.kv.pop(), 2, torch.zeros(2, n, length, d, dtype=acc, device=qr.device), visit)
        dkv = done.view(2, b, hk, length, d).transpose(2, 3)
        dq = from_rows(dq.mul_(scale), b, out.dtype)
        return dq, dkv[0].to(kv_dtype), dkv[1].to(kv_dtype), None, None, None, None
