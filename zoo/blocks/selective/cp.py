"""Context parallel for `selective` (Leviathan et al., arXiv 2410.02703): causal attention minus F, the
running column sums of head 0's selection scores S[i, j] = ReLU(scale q0_i . k0_j) (0 < j < i).

A query i reads every key j <= i and F[i, j] = sum over earlier queries i' < i of S[i', j], so a chunk
[s, e) needs (1) the keys and values of [0, e) and (2) for keys j < s, the carry
F[s, j] = sum over the queries of all earlier chunks of S[., j]. S does not depend on F, so every chunk
computes the column sums of its own queries' S against the keys it sees, independently; one
all-gather of those sums and an exclusive sum over chunks gives each chunk its carry. The chunk then
runs `selective_attention(q, k[:e], v[:e], scores=carry)`, the op's own hand-over for keys that
earlier queries have already selected, exactly as the single process does.

(1) uses `halo.fetch`: each rank receives, point to point, the K and V of [0, end of its last chunk)
it does not hold. That is the simple exact choice, not the memory-optimal one: a rank holds up to the
whole sequence's K and V (under zigzag every rank's second chunk is in the second half), O(L) per
rank instead of the ring's O(L / W) visiting block, and it receives up to (L - L / W) 2 kv_heads d
values. A ring would also need each visiting block's carry slice; not done. (2) costs one extra
head-0 logit pass over the chunk's keys (1 / heads of the attention's logits; checkpointed per query
block, so no [queries, keys] matrix is kept) and an all-gather of batch x L column sums per chunk.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from zoo.distributed.halo import fetch, gather_chunks, refuse_cache
from zoo.distributed.layout import ContextParallel
from zoo.ops.selective import selective_attention

__all__ = ["selective_cp", "selective_attention_cp", "selection_column_sums"]


def selective_cp(block, x, cp: ContextParallel, cache=None):
    """`SelectiveAttention.forward` on this rank's shard."""
    refuse_cache(cache, "selective")
    b, t, _ = x.shape
    q, k, v = block._project_rotated(x, cp.positions(x.device))
    impl = block.kernels.get("selective_attention", "auto")
    out = selective_attention_cp(q, k, v, cp, block.cfg.block_size, impl)
    return block.out_proj(out.reshape(b, t, -1))


def selective_attention_cp(q, k, v, cp: ContextParallel, block_size: int, impl: str = "auto"):
    """Selective attention of this rank's shard; q [b, local, heads, d], k, v [b, local, kv_heads, d],
    rotated at their global positions. Returns out like q.

    Under autograd the whole exchange is checkpointed: the fetched K and V of the prefix (up to the
    whole sequence's) would otherwise be kept for the backward, which under zigzag leaves a rank nearly
    the single process's attention memory whatever W. Kept instead: the local q, k, v; the backward
    fetches and recomputes once more (every rank reaches it in the same layer order)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return checkpoint(_attention, q, k, v, cp, block_size, impl, use_reentrant=False)
    return _attention(q, k, v, cp, block_size, impl)


def _attention(q, k, v, cp: ContextParallel, block_size: int, impl: str):
    d = k.shape[-1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    ends = lambda rank: [(0, max(c.end for c in cp.chunks(rank)))]
    kv, _ = fetch(torch.cat([k, v], -1), cp, ends)                      # keys and values of [0, last end)
    keys, values = kv[..., :d], kv[..., d:]
    chunks = cp.chunks()
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sums = torch.stack([_padded(selection_column_sums(q[:, c.local, 0], keys[:, :c.end, 0], c.start, scale,
                                                      block_size).to(acc), cp.seq_len) for c in chunks])
    every = gather_chunks(sums, cp)                                     # [n_chunks, b, L]
    outs = []
    for c in chunks:
        # times 0: chunk 0's empty carry still comes from the gather, whose backward every rank must run
        carry = every[0] * 0
        for earlier in range(c.index):
            carry = carry + every[earlier]
        outs.append(selective_attention(q[:, c.local], keys[:, :c.end], values[:, :c.end], scores=carry[:, :c.start],
                                        block_size=block_size, impl=impl))
    return torch.cat(outs, 1)


def selection_column_sums(q0, k0, first: int, scale: float, block_size: int) -> torch.Tensor:
    """sum_i S[i, j] over the queries q0 [b, n, d] at positions first.. against the keys k0 [b, first + n, d]
    at positions 0..: [b, first + n] (in the accumulation dtype). Head 0 only: the selection's head."""
    acc = torch.float64 if q0.dtype == torch.float64 else torch.float32
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
    return torch.nn.functional.pad(t, (0, length - t.shape[-1]))
