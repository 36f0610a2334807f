"""Context parallel for `rglru`: the conv halo (zoo.blocks.mamba.cp.conv_cp, in the block), then state passing.

The recurrence is diagonal, h_t = a_t h_{t-1} + b_t, so a chunk maps the state H entering it to P_c H + S_c with
P_c = prod a over the chunk (per channel) and S_c its end state from zero; the pairs of all chunks are all-gathered
and combined in order (zoo.blocks.mamba.cp.incoming_states, as for Mamba-1's diagonal decay), and each position
adds cumprod(a)_t H_c to what the chunk computed from zero. The sequence's first token (in the chunk starting at 0)
is a reset: a = 0 there, so nothing enters chunk 0. One scan per chunk; exact, no approximation.
"""
from __future__ import annotations

import torch

from zoo.blocks.mamba.cp import incoming_states
from zoo.distributed.layout import ContextParallel
from zoo.ops.linear_scan import linear_scan
from zoo.ops.rglru import rg_lru_inputs

__all__ = ["rglru_cp"]


def rglru_cp(block, u, cp: ContextParallel):
    """h [b, local, width] (accumulation dtype) of this rank's shard of the conv output u [b, local, width]."""
    gate_x, gate_a = block.gates(u)
    starts = torch.zeros(u.shape[:2], dtype=torch.bool, device=u.device)
    for c in cp.chunks():
        starts[:, c.local_start] = c.start == 0
    a, b = rg_lru_inputs(u, gate_x, gate_a, block.recurrent_param, block.cfg.c, starts)
    chunks = cp.chunks()
    from_zero, log_decay, ends = [], [], []
    for c in chunks:
        h, end = linear_scan(a[:, c.local], b[:, c.local], return_final_state=True, chunk_size=block.cfg.chunk_size)
        from_zero.append(h)
        ends.append(end)
        # the product as a sum of logs in float64 (long chunks); a = 0 (a reset) clamps to the smallest normal
        tiny = torch.finfo(a.dtype).tiny
        log_decay.append(a[:, c.local].double().clamp_min(tiny).log().sum(1).to(a.dtype))
    H = incoming_states(torch.stack(log_decay), torch.stack(ends), cp)
    return torch.cat([h + torch.cumprod(a[:, c.local], 1) * state[:, None]
                      for c, h, state in zip(chunks, from_zero, H)], 1)
