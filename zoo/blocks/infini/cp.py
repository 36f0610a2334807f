"""Context parallel for `infini`: the compressive memory (M, z) carried across chunk boundaries.

Segments are global: they start at multiples of segment_len from position 0, wherever the chunks
cut. A chunk starting at s inside the segment that began at s0 = s - s % segment_len continues that
segment: it fetches the k, v and rotated k of [s0, s) (`halo.preceding`, up to segment_len - 1
tokens), which its queries see locally and which complete the segment's fold, and it needs the
memory M(s0) of every segment before s0. Then `infini_attention(..., memory=M(s0), prefix=halo)`
computes the chunk exactly as the single process does.

M(s0), two ways:
- linear update: M(s0) = sum over tokens t < s0 of sigma(k_t)^T v_t (z: of sigma(k_t)). Each chunk
  reports two partial sums, over its tokens before its last segment boundary and over the rest; one
  all-gather, then for chunk c the sum over earlier chunks of the first part, plus the second where
  the earlier chunk ends by s0 (an earlier chunk ending after s0 ends inside s0's segment, whose
  tokens are not folded yet). Parallel: one all-gather of 2 (d_k d_v + d_k) kv_heads values per chunk.
- delta rule: each fold reads the memory before it (the write is v minus what M already returns),
  so the memory is passed along the chunks in global order, point to point (`_MemoryChain`): chunk
  c receives M(s0_c), folds the segments it completes and sends the result on. What waits in line is
  only the folds (d_k d_v work per token); the local attention and retrieval run in parallel after.
  Backward: the same chain in reverse, each chunk recomputing its folds' vector-Jacobian product.
  Latency: n_chunks sequential hops of (d_k d_v + d_k) kv_heads values each way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from zoo.distributed.halo import gather_chunks, preceding, refuse_cache
from zoo.distributed.layout import ContextParallel
from zoo.ops.infini import fold_segment, elu_plus_one, infini_attention
from zoo.ops.rope import apply_rope, rope_cos_sin
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["infini_cp"]


def infini_cp(block, x, cp: ContextParallel, cache=None):
    """`InfiniAttention.forward` on this rank's shard."""
    refuse_cache(cache, "infini")
    seg, delta = block.cfg.segment_len, block.cfg.delta_rule
    b, t, _ = x.shape
    q, k, v = block.project(x)
    cos, sin = rope_cos_sin(cp.positions(x.device), block.head_dim, block.cfg.rope_base)
    q_local, k_local = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    d = k.shape[-1]
    halos, kvk = preceding(torch.cat([k, v, k_local], -1), cp, lambda start, end: start % seg)
    k, v, k_local = kvk[..., :d], kvk[..., d:2 * d], kvk[..., 2 * d:]
    acc = accumulation_dtype(x.dtype)
    chunks = cp.chunks()
    if delta:
        # the tokens each chunk folds: [s0, last boundary <= end), the halo's and then its own
        folded = []
        for c, halo in zip(chunks, halos):
            s0, last = c.start - c.start % seg, (c.end // seg) * seg
            # nothing when no segment ends in the chunk; else the whole halo and the chunk up to `last`
            keep, own = (0, 0) if last <= s0 else (halo.shape[1], last - c.start)
            folded.append((torch.cat([halo[:, :keep, :, :d], k[:, c.local][:, :own]], 1),
                           torch.cat([halo[:, :keep, :, d:2 * d], v[:, c.local][:, :own]], 1)))
        memories = _memory_chain(folded, cp, seg, acc)
    else:
        memories = _memory_prefix_sums(k, v, cp, seg, acc)
    outs = []
    for c, halo, memory in zip(chunks, halos, memories):
        sl = c.local
        prefix = (halo[..., :d], halo[..., d:2 * d], halo[..., 2 * d:])
        outs.append(infini_attention(q[:, sl], k[:, sl], v[:, sl], block.gate, seg, memory=memory, delta_rule=delta,
                                     q_local=q_local[:, sl], k_local=k_local[:, sl], prefix=prefix,
                                     impl=block.kernels.get("infini", "auto")))
    return block.out_proj(torch.cat(outs, 1).reshape(b, t, -1))


def _memory_prefix_sums(k, v, cp: ContextParallel, seg: int, acc):
    """Linear update: (M(s0), z(s0)) for each local chunk, from one all-gather of per-chunk partial sums."""
    parts = []
    for c in cp.chunks():
        sk, vc = elu_plus_one(k[:, c.local].to(acc)), v[:, c.local].to(acc)
        split = min(max(0, (c.end // seg) * seg - c.start), c.length)
        for sl in (slice(0, split), slice(split, None)):
            M = torch.einsum("btnk,btnv->bnkv", sk[:, sl], vc[:, sl])
            parts.append(torch.cat([M.flatten(1), sk[:, sl].sum(1).flatten(1)], 1))
    n = len(cp.chunks())
    packed = torch.stack(parts).view(n, 2, *parts[0].shape)               # [local chunks, (before, after), b, m]
    every = gather_chunks(packed, cp)                                     # [n_chunks, 2, b, m]
    all_chunks = cp.all_chunks()
    b, hk, dk, dv = k.shape[0], k.shape[2], k.shape[3], v.shape[3]
    out = []
    for c in cp.chunks():
        s0 = c.start - c.start % seg
        # times 0: chunk 0's empty memory still comes from the gather, whose backward every rank must run
        total = every[0, 0] * 0
        for e in all_chunks[:c.index]:
            total = total + every[e.index, 0] + (every[e.index, 1] if e.end <= s0 else 0)
        out.append((total[:, :hk * dk * dv].view(b, hk, dk, dv), total[:, hk * dk * dv:].view(b, hk, dk)))
    return out


def _fold_segments(k, v, M, z, seg):
    """The delta-rule memory after folding the whole segments of k, v [b, n * seg, kv_heads, *]."""
    for s0 in range(0, k.shape[1], seg):
        M, z = fold_segment(elu_plus_one(k[:, s0:s0 + seg]), v[:, s0:s0 + seg], M, z, delta_rule=True)
    return M, z


def _memory_chain(folded, cp: ContextParallel, seg: int, acc):
    """Delta rule: (M, z) entering each local chunk, passed along the chunks in global order."""
    kv = [t.to(acc) for pair in folded for t in pair]
    b, hk, dk, dv = kv[0].shape[0], kv[0].shape[2], kv[0].shape[3], kv[1].shape[3]
    outs = _MemoryChain.apply(cp, seg, (b, hk, dk, dv), *kv)
    return [(outs[2 * i], outs[2 * i + 1]) for i in range(len(folded))]


def _pack(M, z):
    return torch.cat([M.flatten(1), z.flatten(1)], 1).contiguous()


def _unpack(buf, shape):
    b, hk, dk, dv = shape
    return buf[:, :hk * dk * dv].view(b, hk, dk, dv), buf[:, hk * dk * dv:].view(b, hk, dk)


class _MemoryChain(torch.autograd.Function):
    """(k, v of the segments each local chunk folds) -> (M, z) entering each local chunk.

    Every rank walks all chunks in global order, forward and backward, acting on its own: a receive
    from the previous chunk's owner (or the carry when it owns that too), the fold, a send to the next
    chunk's owner. Blocking receives in that order cannot deadlock: a chunk's input depends only on
    earlier chunks. Messages carry the chunk index as tag."""

    @staticmethod
    def forward(ctx, cp, seg, shape, *kv):
        me, chunks = cp.rank, cp.all_chunks()
        b, hk, dk, dv = shape
        local = {c.index: i for i, c in enumerate(cp.chunks())}
        size = hk * dk * dv + hk * dk
        carry, entering, sends = None, {}, []
        for c in chunks:
            if c.rank != me:
                continue
            if c.index == 0:
                buf = kv[0].new_zeros(b, size)
            elif chunks[c.index - 1].rank == me:
                buf = carry
            else:
                buf = kv[0].new_empty(b, size)
                dist.recv(buf, cp.global_rank(chunks[c.index - 1].rank), cp.group, tag=c.index)
            entering[c.index] = buf
            i = local[c.index]
            M, z = _unpack(buf, shape)
            carry = _pack(*_fold_segments(kv[2 * i], kv[2 * i + 1], M, z, seg))
            if c.index + 1 < len(chunks) and chunks[c.index + 1].rank != me:
                sends.append(dist.isend(carry, cp.global_rank(chunks[c.index + 1].rank), cp.group, tag=c.index + 1))
        for work in sends:
            work.wait()
        ctx.cp, ctx.seg, ctx.shape = cp, seg, shape
        ctx.order = [c.index for c in cp.chunks()]
        ctx.save_for_backward(*kv, *[entering[c] for c in ctx.order])
        outs = []
        for c in ctx.order:
            outs.extend(t.clone() for t in _unpack(entering[c], shape))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        cp, seg, shape, order = ctx.cp, ctx.seg, ctx.shape, ctx.order
        me, chunks = cp.rank, cp.all_chunks()
        n = len(order)
        saved = ctx.saved_tensors
        kv, entering = saved[:2 * n], saved[2 * n:]
        local = {c: i for i, c in enumerate(order)}
        grad_kv = [None] * (2 * n)
        carry, sends = None, []
        for c in reversed(chunks):
            if c.rank != me:
                continue
            i = local[c.index]
            if c.index + 1 == len(chunks):
                grad_out = entering[i].new_zeros(entering[i].shape)
            elif chunks[c.index + 1].rank == me:
                grad_out = carry
            else:
                grad_out = entering[i].new_empty(entering[i].shape)
                dist.recv(grad_out, cp.global_rank(chunks[c.index + 1].rank), cp.group, tag=c.index)
            with torch.enable_grad():
                buf = entering[i].detach().requires_grad_(True)
                k, v = (t.detach().requires_grad_(True) for t in kv[2 * i:2 * i + 2])
                out = _pack(*_fold_segments(k, v, *_unpack(buf, shape), seg))
                g_buf, g_k, g_v = torch.autograd.grad(out, (buf, k, v), grad_out, allow_unused=True)
            g_buf = g_buf if g_buf is not None else torch.zeros_like(buf)
            # this chunk's own use of its entering memory, beside what later chunks sent back
            gM, gz = grads[2 * i], grads[2 * i + 1]
            carry = (g_buf + _pack(gM if gM is not None else torch.zeros(shape, dtype=buf.dtype, device=buf.device),
                                   gz if gz is not None else torch.zeros(shape[:3], dtype=buf.dtype,
                                                                         device=buf.device))).contiguous()
            grad_kv[2 * i] = g_k if g_k is not None else torch.zeros_like(k)
            grad_kv[2 * i + 1] = g_v if g_v is not None else torch.zeros_like(v)
            if c.index > 0 and chunks[c.index - 1].rank != me:
                sends.append(dist.isend(carry, cp.global_rank(chunks[c.index - 1].rank), cp.group, tag=c.index - 1))
        for work in sends:
            work.wait()
        return (None, None, None, *grad_kv)
