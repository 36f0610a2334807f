"""Context parallel for the attention blocks: the ring (`attn`, `blockwise`, `ring`) and, for `swa`, a
halo exchange.

Ring (zoo.distributed.ring): each rank keeps its queries and passes its K/V shard around the ring,
merging the partial results by log-sum-exp; exact causal attention over the whole sequence.

Halo (swa): a query at position p reads keys in (p - window, p], so each chunk needs the keys and
values of the window - 1 positions before its start (fewer at the sequence start), whichever chunks
and ranks hold them (`halo.preceding`: a window longer than a chunk reaches back over several). Keys
arrive rotated at their global positions, so RoPE is applied once, by the owner; their gradients go
back to it. Each chunk then attends exactly as the single process does, with the halo as a cache in
front. Cost per chunk: window - 1 positions of K and V received and the same volume of gradient sent
back; memory is the chunk's own activations plus that halo.
"""
from __future__ import annotations

import torch

from zoo.distributed.halo import preceding, refuse_cache
from zoo.distributed.layout import ContextParallel
from zoo.distributed.ring import ring_attention
from zoo.ops.attention import blockwise_attention

__all__ = ["attention_cp", "sliding_window_attention_cp", "swa_cp"]


def attention_cp(block, x, cp: ContextParallel, cache=None):
    """`CausalSelfAttention.forward` on this rank's shard: RoPE at the shard's global positions, the ring."""
    if cache is not None:
        raise ValueError("cache: a cache continues one sequence on one process; pass either cache or cp")
    b, t, _ = x.shape
    q, k, v = block.project_rotated(x, cp.positions(x.device))
    out = ring_attention(q, k, v, cp, causal=True, scale=block.cfg.scale,
                         block_size=getattr(block.cfg, "block_size", 512))
    return block.output(out.reshape(b, t, block.n_heads, block.head_dim), x)


def sliding_window_attention_cp(q, k, v, cp: ContextParallel, window: int, block_size: int, scale=None):
    """Sliding-window causal attention of this rank's shard. q [b, local, heads, d], k, v [b, local,
    kv_heads, d], all rotated at their global positions; scale None: 1 / sqrt(d). Returns out like q."""
    d = k.shape[-1]
    halos, kv = preceding(torch.cat([k, v], -1), cp, lambda start, end: window - 1)
    k, v = kv[..., :d], kv[..., d:]
    outs = []
    for c, halo in zip(cp.chunks(), halos):
        kc, vc = torch.cat([halo[..., :d], k[:, c.local]], 1), torch.cat([halo[..., d:], v[:, c.local]], 1)
        outs.append(blockwise_attention(q[:, c.local], kc, vc, causal=True, window=window, scale=scale,
                                        block_size=block_size))
    return torch.cat(outs, 1)


def swa_cp(block, x, cp: ContextParallel, cache=None):
    """`SlidingWindowAttention.forward` on this rank's shard: projections, RoPE at global positions,
    `sliding_window_attention_cp`, output projection."""
    refuse_cache(cache, "swa")
    b, t, _ = x.shape
    q, k, v = block.project_rotated(x, cp.positions(x.device))
    out = sliding_window_attention_cp(q, k, v, cp, block.cfg.window, block.cfg.block_size, block.cfg.scale)
    return block.output(out.reshape(b, t, block.n_heads, block.head_dim), x)
