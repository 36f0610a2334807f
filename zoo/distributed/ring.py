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
adds its contribution to the accumulator it received from rank r - 1 and passes it on; after W steps
every accumulator has visited every rank and one last hop brings it home. The accumulator of step s
travels during step s + 1's compute.

Communication per rank and step: one K/V shard forward; K/V plus the dK/dV accumulator (in the
accumulation dtype) backward. Memory: q, k, v, out, lse of the local shard plus two K/V shards in
flight; never an L x L matrix.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from zoo.distributed.layout import ContextParallel
from zoo.ops.attention import _acc_dtype, _blockwise_backward, _blockwise_forward, _check_inputs

__all__ = ["ring_attention"]

_K_TAG, _V_TAG, _GRAD_TAG = 0, 1, 2


def ring_attention(q, k, v, cp: ContextParallel, causal: bool = True, scale: Optional[float] = None,
                   block_size: int = 512, return_lse: bool = False):
    """Exact attention of this rank's queries over the whole sequence's keys.

    q [batch, local_len, heads, head_dim], k and v [batch, local_len, kv_heads, head_dim] are this
    rank's shards in `cp`'s layout (kv_heads dividing heads: GQA). Returns out like q (the matching
    shard of single-process attention) and with `return_lse` also lse [batch, heads, local_len]
    (differentiable) in the accumulation dtype.
    """
    _check_inputs(q, k, v, causal, None)
    for name, t in (("q", q), ("k", k)):
        if t.shape[1] != cp.local_len:
            raise ValueError(f"{name}: rank {cp.rank} holds {cp.local_len} tokens of {cp.seq_len} in layout "
                             f"{cp.layout!r} over W={cp.world_size}, got length {t.shape[1]}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: must be an integer >= 1, got {block_size!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _RingAttention.apply(q, k, v, cp, causal, scale, block_size)
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


def _pairs(cp: ContextParallel, owner: int, causal: bool):
    """(query chunk, key chunk, diagonal) pairs this rank computes against `owner`'s K/V shard."""
    for kc in cp.chunks(owner):
        for qc in cp.chunks():
            if causal and kc.index > qc.index:
                continue  # every key of a later chunk is in every query's future
            yield qc, kc, causal and kc.index == qc.index


def _merge_into(out, lse, o, l):
    """out, lse (views, accumulation dtype) := the log-sum-exp merge of themselves with (o, l), in place:
    one temporary of the chunk's size instead of merge_attention's three. Every row here has seen a key
    (the diagonal block comes first for causal rows), so `l` is finite and no both-empty row occurs."""
    m = torch.maximum(lse, l)
    w_old, w_new = torch.exp(lse - m), torch.exp(l - m)
    total = w_old + w_new
    out.mul_((w_old / total).transpose(1, 2)[..., None])
    out.add_(o.to(out.dtype) * (w_new / total).transpose(1, 2)[..., None])
    lse.copy_(m + torch.log(total))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp, causal, scale, block_size):
        w = cp.world_size
        acc = _acc_dtype(q.dtype)
        b, length, h, d = q.shape
        out = torch.zeros(b, length, h, d, dtype=acc, device=q.device)
        lse = torch.full((b, h, length), -math.inf, dtype=acc, device=q.device)
        kv = (k.contiguous(), v.contiguous())  # sent as they are (no copy when contiguous), not stacked
        for step in range(w):
            owner = (cp.rank - step) % w
            works, incoming = [], None
            if step < w - 1:
                n = cp.shard_len((owner - 1) % w)
                incoming = (k.new_empty(b, n, *k.shape[2:]), v.new_empty(b, n, *v.shape[2:]))
                works = _exchange(cp, [(kv[0], _K_TAG), (kv[1], _V_TAG)],
                                  [(incoming[0], _K_TAG), (incoming[1], _V_TAG)])
            for qc, kc, diagonal in _pairs(cp, owner, causal):
                o, l = _blockwise_forward(q[:, qc.local], kv[0][:, kc.local], kv[1][:, kc.local],
                                          diagonal, None, scale, block_size)
                _merge_into(out[:, qc.local], lse[..., qc.local], o, l)
            _wait(works)
            if incoming is not None:
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cp, causal, scale, block_size)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        cp, causal, scale, block_size = ctx.args
        w = cp.world_size
        acc = _acc_dtype(q.dtype)
        b, _, hk, d = k.shape
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = (k.contiguous(), v.contiguous())
        done = None  # the dK/dV accumulator finished in the previous step, sent along during this one
        for step in range(w):
            owner = (cp.rank - step) % w
            sends, recvs, incoming, arriving = [], [], None, None
            if step < w - 1:
                n = cp.shard_len((owner - 1) % w)
                incoming = (k.new_empty(b, n, hk, d), v.new_empty(b, n, hk, d))
                sends += [(kv[0], _K_TAG), (kv[1], _V_TAG)]
                recvs += [(incoming[0], _K_TAG), (incoming[1], _V_TAG)]
            if done is not None:
                # what rank - 1 accumulated for `owner` over steps 0..step-1
                arriving = torch.empty(2, b, cp.shard_len(owner), hk, d, dtype=acc, device=q.device)
                sends.append((done, _GRAD_TAG))
                recvs.append((arriving, _GRAD_TAG))
            works = _exchange(cp, sends, recvs)
            mine = torch.zeros(2, b, cp.shard_len(owner), hk, d, dtype=acc, device=q.device)
            for qc, kc, diagonal in _pairs(cp, owner, causal):
                dq_c, dk_c, dv_c = _blockwise_backward(
                    q[:, qc.local], kv[0][:, kc.local], kv[1][:, kc.local], out[:, qc.local],
                    lse[..., qc.local].contiguous(), None if dout is None else dout[:, qc.local],
                    None if dlse is None else dlse[..., qc.local].contiguous(), diagonal, None, scale, block_size)
                dq[:, qc.local] += dq_c
                mine[0][:, kc.local] += dk_c
                mine[1][:, kc.local] += dv_c
            _wait(works)
            if arriving is not None:
                mine += arriving
            done = mine
            if incoming is not None:
                kv = incoming
        if w > 1:
            # `done` belongs to rank + 1 now; this rank's own accumulator arrives from rank - 1
            home = torch.empty(2, b, cp.local_len, hk, d, dtype=acc, device=q.device)
            _wait(_exchange(cp, [(done, _GRAD_TAG)], [(home, _GRAD_TAG)]))
            done = home
        return dq.to(q.dtype), done[0].to(k.dtype), done[1].to(v.dtype), None, None, None, None
