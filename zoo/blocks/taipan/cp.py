"""Context parallel for `taipan`: a halo exchange.

A query at position p reads keys in (p - window, p], so each chunk needs the keys, values and selection
flags of the window - 1 positions before its start (fewer at the sequence start), whichever chunks and
ranks hold them (`halo.preceding`: a window longer than a chunk reaches back over several). Keys arrive
rotated at their global positions, so RoPE is applied once, by the owner; their gradients go back to
it. Each chunk then attends exactly as the single process does, with the halo as a cache in front.

Cost per chunk: window - 1 positions of K, V and a selection flag received (the halo is dense:
unselected positions are sent too, as zeros at evaluation) and the same volume of gradient sent back;
memory is the chunk's own activations plus that halo.
"""
from __future__ import annotations

import torch

from zoo.distributed.comm import all_reduce_sum
from zoo.distributed.halo import preceding, refuse_cache
from zoo.distributed.layout import ContextParallel
from zoo.ops.dtypes import accumulation_dtype
from zoo.ops.rope import apply_rope, rope_cos_sin
from zoo.ops.taipan import selective_window_attention

__all__ = ["taipan_cp"]


def taipan_cp(block, x, cp: ContextParallel, cache=None):
    """`TaipanBlock.forward` on this rank's shard. Two things are global besides the halo:

    - the Gumbel noise of training is drawn for the whole sequence from the (shared) RNG and read at
      this rank's positions, so every rank's RNG must be in the same state (seed them alike) and the
      selection equals the single process's draw;
    - the capacity term averages the selection over the whole sequence (an all-reduce of the local
      sums; `all_reduce_sum` so that each rank's backward counts its own tokens once).
    """
    refuse_cache(cache, "taipan")
    cfg = block.cfg
    b, t, _ = x.shape
    acc = accumulation_dtype(x.dtype)
    positions = cp.positions(x.device)
    alpha, mask, hard, aux, rows = block.route(
        x, noise=lambda shape: -torch.empty(b, cp.seq_len, 2, device=x.device, dtype=acc).exponential_().log()[
            :, positions],
        share=lambda mask: all_reduce_sum(mask.sum(1), cp.group) / cp.seq_len)

    q, k, v = block.project(x, rows)
    if cfg.rope_base is not None:
        cos, sin = rope_cos_sin(positions, block.head_dim, cfg.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    d = k.shape[-1]
    flag = hard[:, :, None, None].expand(b, t, k.shape[2], 1).to(k.dtype)
    halos, kvf = preceding(torch.cat([k, v, flag], -1), cp, lambda start, end: cfg.window - 1)
    k, v = kvf[..., :d], kvf[..., d:2 * d]
    outs = []
    for c, halo in zip(cp.chunks(), halos):
        kc = torch.cat([halo[..., :d], k[:, c.local]], 1)
        vc = torch.cat([halo[..., d:2 * d], v[:, c.local]], 1)
        sel = torch.cat([halo[:, :, 0, -1] > 0.5, hard[:, c.local]], 1)
        outs.append(selective_window_attention(q[:, c.local], kc, vc, sel, cfg.window, block_size=cfg.block_size,
                                               rows=None if rows is None else rows[:, c.local]))
    o = torch.cat(outs, 1)
    y = block.output(o.reshape(b, t, -1), rows)
    out = ((mask * alpha)[..., None] * (y.to(acc) - x.to(acc))).to(x.dtype)
    return out if aux is None else (out, aux)
