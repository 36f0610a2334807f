"""Context parallel for `mlstm`: state passing. A chunk maps the memory entering it, (C, n, m), to the memory
after it; in unstabilised terms (C e^m, n e^m) that map is linear with the scalar decay e^{F} per head (F the
chunk's summed log forget gate), so each chunk's summary is its total log decay and its memory from an empty
start (m = -inf: nothing carried, no stabiliser of its own). The summaries are all-gathered and combined in order,
m = max(F + m_in, m_c), C = e^{F + m_in - m} C_in + e^{m_c - m} C_c (n alike), and each chunk runs the op again
from its incoming memory, which gives its outputs exactly."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.distributed.halo import gather_chunks, refuse_cache
from zoo.distributed.layout import ContextParallel
from zoo.ops.dtypes import accumulation_dtype
from zoo.ops.mlstm import mlstm

__all__ = ["mlstm_cp"]


def mlstm_cp(block, x, cp: ContextParallel, cache=None):
    refuse_cache(cache, "mlstm")
    q, k, v, i, f = block.inputs(x)
    kw = dict(eps=block.cfg.eps, chunk_size=block.cfg.chunk_size)
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    chunks = cp.chunks()
    acc = accumulation_dtype(q.dtype)
    # nothing carried and no stabiliser of its own (m = -inf): each chunk's memory from an empty start
    start = (q.new_zeros(b, h, dk, dv, dtype=acc), q.new_zeros(b, h, dk, dtype=acc),
             q.new_full((b, h), float("-inf"), dtype=acc))
    summaries = []
    for c in chunks:
        sl = c.local
        _, (C, n, m) = mlstm(q[:, sl], k[:, sl], v[:, sl], i[:, sl], f[:, sl], initial_state=start,
                             return_final_state=True, **kw)
        decay = F.logsigmoid(f[:, sl].to(acc)).sum(1)                                   # [b, h]
        summaries.append(torch.cat([C.flatten(2), n, m[..., None], decay[..., None]], -1))
    gathered = gather_chunks(torch.stack(summaries), cp)                                # [chunks, b, h, ...]
    Cs = gathered[..., :dk * dv].unflatten(-1, (dk, dv))
    ns, ms, decays = gathered[..., dk * dv:dk * dv + dk], gathered[..., -2], gathered[..., -1]
    # the memory entering chunk 0 is empty (zeros, m = 0 as the op starts); taken from the gathered tensor so
    # that the all-gather, whose backward is collective, stays in every rank's graph
    state, entering = (Cs[0] * 0, ns[0] * 0, ms[0] * 0), []
    for c in range(cp.n_chunks):
        entering.append(state)
        C_in, n_in, m_in = state
        m = torch.maximum(decays[c] + m_in, ms[c])
        a, w = torch.exp(decays[c] + m_in - m), torch.exp(ms[c] - m)
        state = (a[..., None, None] * C_in + w[..., None, None] * Cs[c], a[..., None] * n_in + w[..., None] * ns[c], m)
    outs = [mlstm(q[:, c.local], k[:, c.local], v[:, c.local], i[:, c.local], f[:, c.local],
                  initial_state=entering[c.index], **kw) for c in chunks]
    return block.output(torch.cat(outs, 1), x)
