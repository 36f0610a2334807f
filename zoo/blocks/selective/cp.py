"""Context parallel for `selective` (Leviathan et al., arXiv 2410.02703): causal attention minus F, the
running column sums of head 0's selection scores S[i, j] = ReLU(scale q0_i . k0_j) (0 < j < i).

A query i reads every key j <= i and F[i, j] = sum over earlier queries i' < i of S[i', j], so a chunk
[s, e) needs (1) for keys j < s, the carry F[s, j] = sum over the queries of all earlier chunks of
S[., j], and (2) the keys and values of [0, e). S does not depend on F, so every chunk computes the
column sums of its own queries' S against the keys it sees, independently, and the carries follow
from them; then the attention proper, exactly as the single process computes it.

Both parts run as rings over the key shards (`zoo.distributed.ring`), so no rank holds more than
two key shards and no query block sees more than one shard's keys at a time:
(1) the column sums: head 0's keys alone travel around the ring (the selection reads head 0); each
    rank adds, for each of its query chunks, the column sums of S against every key chunk at or before
    it (`_ColumnSums`); one all-gather of [chunks, batch, L] sums and an exclusive sum over chunks give
    each chunk its carry. The backward is the same ring with head 0's key gradients travelling along.
(2) the attention: K and V travel around the ring as in ring attention (`_SelectiveRing`); a query
    chunk against a key chunk is selective attention with F = the chunk's carry at those keys plus
    the running column sums of the chunk's own earlier queries, computed by query blocks (one
    [batch, heads, block, key chunk] logit tile at a time), merged across key chunks by online
    softmax. The backward passes K/V around again with the dK/dV accumulator of the visiting shard,
    recomputes each query block's probabilities from the global log-sum-exp (FA-2's backward, through
    autograd on the block), walks a chunk's query blocks last to first so that the gradient of the
    running column sums reaches the earlier blocks, and returns the carry's gradient, which flows back
    through the all-gather into (1).
Per rank: the local q, k, v, out, lse, dq, two K/V shards and their accumulators, and one query
block's tile; O(L / W) whatever the rank. Communication: per ring step one K/V shard (and, in the
backward, one accumulator), plus head 0's keys twice; the all-gather of batch x L sums per chunk.
The pairs run the torch path (a Triton `impl` of the single-process op is not used here).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zoo.distributed.halo import gather_chunks, refuse_cache
from zoo.distributed.layout import ContextParallel
from zoo.distributed.ring import ring_pairs, ring_pass, ring_pass_grads
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["selective_cp", "selective_attention_cp", "selection_column_sums"]


def selective_cp(block, x, cp: ContextParallel, cache=None):
    """`SelectiveAttention.forward` on this rank's shard."""
    refuse_cache(cache, "selective")
    b, t, _ = x.shape
    q, k, v = block.project_rotated(x, cp.positions(x.device))
    impl = block.kernels.get("selective_attention", "auto")
    out = selective_attention_cp(q, k, v, cp, block.cfg.block_size, impl)
    return block.out_proj(out.reshape(b, t, -1))


def selective_attention_cp(q, k, v, cp: ContextParallel, block_size: int, impl: str = "auto"):
    """Selective attention of this rank's shard; q [b, local, heads, d], k, v [b, local, kv_heads, d],
    rotated at their global positions. Returns out like q. `impl` is accepted for the block's sake;
    the rings run the torch path."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    sums = _ColumnSums.apply(q[:, :, 0], k[:, :, 0], cp, scale, block_size)     # [local chunks, b, L]
    every = gather_chunks(sums, cp)                                            # [n_chunks, b, L]
    # an empty carry (chunk 0) still reads the gather, whose backward every rank must run
    carries = torch.stack([every[:c.index].sum(0) for c in cp.chunks()])
    return _SelectiveRing.apply(q, k, v, carries, cp, scale, block_size)


def _positions(start, n, device):
    return torch.arange(start, start + n, device=device)


def _selection_mask(qpos, kpos):
    """Where S may be nonzero: key after position 0 and strictly before the query."""
    return (kpos[None, :] < qpos[:, None]) & (kpos[None, :] > 0)


class _ColumnSums(torch.autograd.Function):
    """(q0 [b, local, d], k0 [b, local, d]: head 0's queries and keys) -> [local chunks, b, L]: for each
    local query chunk, sum_i S[i, j] over its queries at every key position j (0 past the chunk)."""

    @staticmethod
    def forward(ctx, q0, k0, cp, scale, block_size):
        acc, dtypes = accumulation_dtype(q0.dtype), (q0.dtype, k0.dtype)
        q0, k0 = q0.to(acc).contiguous(), k0.to(acc).contiguous()
        chunks = cp.chunks()
        sums = q0.new_zeros(len(chunks), q0.shape[0], cp.seq_len)

        def visit(owner, keys):
            for qc, kc, _ in ring_pairs(cp, owner, True):
                i = chunks.index(qc)
                kpos = _positions(kc.start, kc.length, q0.device)
                for qs, qe, qpos in _blocks(qc, block_size, q0.device):
                    s = (q0[:, qc.local][:, qs:qe] @ keys[:, kc.local].transpose(1, 2)).mul_(scale).relu_()
                    s.masked_fill_(~_selection_mask(qpos, kpos), 0.0)
                    sums[i, :, kc.start:kc.end] += s.sum(1)

        ring_pass(cp, k0, 1, visit)
        ctx.save_for_backward(q0, k0)
        ctx.args = (cp, scale, block_size, dtypes)
        return sums

    @staticmethod
    def backward(ctx, dsums):
        q0, k0 = ctx.saved_tensors
        cp, scale, block_size, dtypes = ctx.args
        chunks = cp.chunks()
        dq0 = torch.zeros_like(q0)

        def visit(owner, keys, dkeys):
            for qc, kc, _ in ring_pairs(cp, owner, True):
                i = chunks.index(qc)
                kpos = _positions(kc.start, kc.length, q0.device)
                kb, dkb = keys[:, kc.local], dkeys[:, kc.local]
                for qs, qe, qpos in _blocks(qc, block_size, q0.device):
                    qb = q0[:, qc.local][:, qs:qe]
                    live = (qb @ kb.transpose(1, 2)) > 0          # ReLU's derivative (scale > 0)
                    live &= _selection_mask(qpos, kpos)
                    # S's column sums: every live S[i, j] gets d sums[j]
                    ds = dsums[i, :, kc.start:kc.end][:, None, :] * live
                    dq0[:, qc.local][:, qs:qe].baddbmm_(ds, kb, alpha=scale)
                    dkb.baddbmm_(ds.transpose(1, 2), qb, alpha=scale)

        dk0 = ring_pass_grads(cp, k0, 1, torch.zeros_like(k0), visit)   # k0 is saved anyway: small
        return dq0.to(dtypes[0]), dk0.to(dtypes[1]), None, None, None


# Keys per tile of a query chunk against a key chunk: each query block's logits are [batch, heads, block,
# tile], a constant in the per-rank memory (a whole key chunk would grow it with L / W).
_KEY_TILE = 256


def _key_tiles(chunk, device):
    """(start, end, global key positions) of a key chunk's tiles, in offsets from the chunk start."""
    for ks in range(0, chunk.length, _KEY_TILE):
        ke = min(ks + _KEY_TILE, chunk.length)
        yield ks, ke, _positions(chunk.start + ks, ke - ks, device)


def _blocks(chunk, block_size, device):
    """(start, end, global query positions) of the query blocks of a chunk, in local offsets."""
    for qs in range(0, chunk.length, block_size):
        qe = min(qs + block_size, chunk.length)
        yield qs, qe, _positions(chunk.start + qs, qe - qs, device)


def _block_logits(q, k, scale):
    """q [b, n, h, d], k [b, m, hk, d] -> scaled logits [b, hk, g, n, m]."""
    b, n, h, d = q.shape
    hk = k.shape[2]
    return torch.einsum("bingd,bjnd->bngij", q.reshape(b, n, hk, h // hk, d), k) * scale


def _block_scores(logits, carry_in, qpos, kpos, diagonal):
    """Selective logits of a query block: logits - F, F = carry_in + the S of the block's earlier rows;
    the future masked on the diagonal. Returns (logits - F, column sums of the block's S)."""
    s = logits[:, 0, 0].relu().masked_fill(~_selection_mask(qpos, kpos), 0.0)
    f = carry_in[:, None, :] + F.pad(s.cumsum(1), (0, 0, 1, 0))[:, :s.shape[1]]
    z = logits - f[:, None, None]
    if diagonal:
        z = z.masked_fill(kpos[None, :] > qpos[:, None], -math.inf)
    return z, s.sum(1)


class _SelectiveRing(torch.autograd.Function):
    """(q, k, v of this rank's shard, carries [local chunks, b, L]) -> out like q (see the module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, carries, cp, scale, block_size):
        acc = accumulation_dtype(q.dtype)
        b, length, h, d = q.shape
        hk = k.shape[2]
        g = h // hk
        qa = q.to(acc)
        chunks = cp.chunks()
        # online-softmax state of every local query: running max, sum and unnormalised output
        o = qa.new_zeros(b, hk, g, length, v.shape[3])
        mx = qa.new_full((b, hk, g, length), torch.finfo(acc).min)
        l = qa.new_zeros(b, hk, g, length)
        carry_ins = {}

        def visit(owner, kv):
            for qc, kc, diagonal in ring_pairs(cp, owner, True):
                for ks, ke, kpos in _key_tiles(kc, q.device):
                    tile = kv[:, kc.local_start + ks:kc.local_start + ke]
                    kb, vb = tile[..., :d], tile[..., d:]
                    run = carries[chunks.index(qc), :, kc.start + ks:kc.start + ke]
                    ins = carry_ins[(qc.index, kc.index, ks)] = []
                    for qs, qe, qpos in _blocks(qc, block_size, q.device):
                        ins.append(run)
                        if diagonal and ks >= qe:
                            continue   # keys all in these queries' future
                        z, colsum = _block_scores(_block_logits(qa[:, qc.local][:, qs:qe], kb, scale), run, qpos,
                                                  kpos, diagonal)
                        run = run + colsum
                        sl = slice(qc.local_start + qs, qc.local_start + qe)
                        m_new = torch.maximum(mx[..., sl], z.amax(-1))
                        p = z.sub_(m_new[..., None]).exp_()
                        alpha = (mx[..., sl] - m_new).exp_()
                        l[..., sl] = l[..., sl] * alpha + p.sum(-1)
                        o[..., sl, :] = o[..., sl, :] * alpha[..., None] + torch.einsum("bngij,bjnd->bngid", p, vb)
                        mx[..., sl] = m_new

        ring_pass(cp, torch.cat([k, v], -1).to(acc), 1, visit)
        out = o.div_(l[..., None])                    # every query sees at least itself: l > 0
        lse = mx.add_(l.log())
        ctx.save_for_backward(qa, k, v, carries, out, lse)
        ctx.args = (cp, scale, block_size, carry_ins, q.dtype)
        return out.permute(0, 3, 1, 2, 4).reshape(b, length, h, -1).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        qa, k, v, carries, out, lse = ctx.saved_tensors
        cp, scale, block_size, carry_ins, q_dtype = ctx.args
        b, length, h, d = qa.shape
        hk = k.shape[2]
        g = h // hk
        chunks = cp.chunks()
        do = dout.to(qa.dtype).reshape(b, length, hk, g, -1).permute(0, 2, 3, 1, 4)   # [b, hk, g, L, dv]
        dq, dcarries = torch.zeros_like(qa), torch.zeros_like(carries)

        def visit(owner, kv, dkv):
            for qc, kc, diagonal in ring_pairs(cp, owner, True):
                for ks, ke, kpos in _key_tiles(kc, qa.device):
                    keys = slice(kc.local_start + ks, kc.local_start + ke)
                    suffix = _pair_backward(qa, kv[:, keys], dkv[:, keys], do, out, lse, dq, qc, kpos, kc.start + ks,
                                            diagonal, d, scale, block_size, carry_ins[(qc.index, kc.index, ks)])
                    dcarries[chunks.index(qc), :, kc.start + ks:kc.start + ke] += suffix

        dkv = ring_pass_grads(cp, torch.cat([k, v], -1).to(qa.dtype), 1,
                              qa.new_zeros(b, length, hk, d + v.shape[3]), visit)
        return (dq.to(q_dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype), dcarries, None, None, None)


def _pair_backward(qa, kv, dkv, do, out, lse, dq, qc, kpos, k_first, diagonal, d, scale, block_size, carry_ins):
    """One query chunk against one key tile: adds into dq and dkv (views) in place; returns the gradient
    of the carry at these keys. Query blocks last to first: the gradient of a block's column sums is
    the sum of the carry gradients of the blocks after it."""
    b = qa.shape[0]
    with torch.enable_grad():
        kb = kv[..., :d].detach().requires_grad_(True)
        vb = kv[..., d:].detach().requires_grad_(True)
        suffix = qa.new_zeros(b, kv.shape[1])   # d of the column sums of later blocks
        for (qs, qe, qpos), run in reversed(list(zip(_blocks(qc, block_size, qa.device), carry_ins))):
            if diagonal and k_first >= qc.start + qe:
                continue   # keys all in these queries' future
            sl = slice(qc.local_start + qs, qc.local_start + qe)
            qb = qa[:, sl].detach().requires_grad_(True)
            run = run.detach().requires_grad_(True)
            z, colsum = _block_scores(_block_logits(qb, kb, scale), run, qpos, kpos, diagonal)
            # probabilities under the global lse, out the global output: the gradient of
            # <dout, P V - rowsum(P) out> is FA-2's P * (dout V^T - rowsum(dout * out))
            p = (z - lse[..., sl, None]).exp()
            y = torch.einsum("bngij,bjnd->bngid", p, vb) - p.sum(-1, keepdim=True) * out[..., sl, :]
            dqb, dkb, dvb, drun = torch.autograd.grad((y, colsum), (qb, kb, vb, run), (do[..., sl, :], suffix))
            dq[:, sl] += dqb
            dkv[..., :d] += dkb
            dkv[..., d:] += dvb
            suffix = suffix + drun
    return suffix


def selection_column_sums(q0, k0, first: int, scale: float, block_size: int) -> torch.Tensor:
    """sum_i S[i, j] over the queries q0 [b, n, d] at positions first.. against the keys k0 [b, first + n, d]
    at positions 0..: [b, first + n] (in the accumulation dtype). Head 0 only: the selection's head."""
    acc = accumulation_dtype(q0.dtype)
    q0, k0 = q0.to(acc), k0.to(acc)
    total = q0.new_zeros(q0.shape[0], k0.shape[1])
    track = torch.is_grad_enabled() and (q0.requires_grad or k0.requires_grad)
    for qs in range(0, q0.shape[1], block_size):
        qe = min(qs + block_size, q0.shape[1])
        args = (q0[:, qs:qe], k0[:, :first + qe], first + qs, scale)
        part = checkpoint(_block_column_sums, *args, use_reentrant=False) if track else _block_column_sums(*args)
        total = total + _padded(part, k0.shape[1])
    return total


def _block_column_sums(q0, k0, first, scale):
    qpos = torch.arange(first, first + q0.shape[1], device=q0.device)[:, None]
    kpos = torch.arange(k0.shape[1], device=q0.device)[None, :]
    s = (torch.einsum("bid,bjd->bij", q0, k0) * scale).relu()
    return s.masked_fill((kpos >= qpos) | (kpos == 0), 0.0).sum(1)


def _padded(t, length):
    return F.pad(t, (0, length - t.shape[-1]))
