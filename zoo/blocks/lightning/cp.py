"""Context parallel for `lightning`: state passing. Each chunk of the sequence maps the state entering it to
e^{-s len} H + S_c (a diagonal decay per head, as a Mamba-2 chunk's); the chunks' (decay, end state) pairs are
all-gathered and combined in order (zoo.blocks.mamba.cp.incoming_states), and each chunk runs the scan again from
its incoming state, which gives its outputs exactly. Two scans per chunk; no projection needs anything but the
shard (no convolution, no positions)."""
from __future__ import annotations

import torch

from zoo.blocks.mamba.cp import incoming_states
from zoo.distributed.halo import refuse_cache
from zoo.distributed.layout import ContextParallel

__all__ = ["lightning_cp"]


def lightning_cp(block, x, cp: ContextParallel, cache=None):
    refuse_cache(cache, "lightning")
    q, k, v = block.heads(x)
    chunks = cp.chunks()
    ends, log_decay = [], []
    for c in chunks:
        _, end = block.scan(q[:, c.local], k[:, c.local], v[:, c.local], final=True)
        ends.append(end)
        log_decay.append((-block.slope.to(end.dtype) * (c.end - c.start))[None, :, None, None].expand(
            x.shape[0], -1, 1, 1))
    H = incoming_states(torch.stack(log_decay), torch.stack(ends), cp)
    o = torch.cat([block.scan(q[:, c.local], k[:, c.local], v[:, c.local], initial_state=state)
                   for c, state in zip(chunks, H)], 1)
    return block.output(o, x)
