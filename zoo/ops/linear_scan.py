"""A diagonal linear recurrence, h_t = a_t * h_{t-1} + b_t per channel: the scan under RG-LRU (Griffin, arXiv
2402.19427) and other gated linear RNNs.

    h = linear_scan(a, b)                          # a, b [batch, length, channels]; a in [0, 1]
    h, last = linear_scan(a, b, initial_state=h0, return_final_state=True, seq_idx=seq_idx)

`linear_scan_ref` is the loop. `linear_scan` works by chunks of C steps: inside a chunk, with c_i the cumulative
log of a from the chunk's start, h_i = e^{c_i} h_0 + sum_{j <= i} e^{c_i - c_j} b_j; the pairwise factors have
j <= i, so they never overflow. A step with a = 0 (a reset) starts a new segment: the cumulative log restarts
there and pairs across it are zero, so no log 0 enters a sum. One short loop over chunks carries h_0. Documents
(`seq_idx`): the state is zeroed at each document's start, an a = 0 there; `initial_state` belongs to the first
document.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.ops.documents import check_seq_idx, document_number
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["linear_scan", "linear_scan_ref"]

def linear_scan_ref(a, b, initial_state=None, return_final_state=False, seq_idx=None):
    """The loop (the twin every fast path is tested against); h in the accumulation dtype."""
    a, b, h = _prepare(a, b, initial_state, seq_idx)
    doc = None if seq_idx is None else document_number(seq_idx)
    out = []
    for t in range(a.shape[1]):
        if doc is not None and t > 0:
            h = h * (doc[:, t] == doc[:, t - 1]).to(h.dtype)[:, None]
        h = a[:, t] * h + b[:, t]
        out.append(h)
    hs = torch.stack(out, 1)
    return (hs, h) if return_final_state else hs


def linear_scan(a, b, initial_state=None, return_final_state=False, seq_idx=None, chunk_size: int = 16):
    """`linear_scan_ref` by chunks of `chunk_size` steps (any length)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    a, b, h = _prepare(a, b, initial_state, seq_idx)
    bsz, t, d = a.shape
    C = min(chunk_size, t)
    n = math.ceil(t / C)
    pad = n * C - t
    if seq_idx is not None:   # a document's first step forgets what came before: a = 0 there
        doc = document_number(seq_idx)
        start = F.pad(doc[:, 1:] != doc[:, :-1], (1, 0))
        a = a.masked_fill(start[..., None], 0.0)
    # padded steps keep the state (a = 1, b = 0), so the final state is the last real step's
    a, b = F.pad(a, (0, 0, 0, pad), value=1.0), F.pad(b, (0, 0, 0, pad))
    a = a.view(bsz, n, C, d)
    reset = a <= 0
    c = torch.where(reset, torch.zeros_like(a), a.clamp_min(torch.finfo(a.dtype).tiny).log()).cumsum(2)
    segment = reset.to(torch.int32).cumsum(2)                             # [b, n, C, d]: resets so far in the chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=a.device).tril()
    valid = (segment[:, :, :, None] == segment[:, :, None, :]) & causal[..., None]            # [b, n, i, j, d]
    decay = (c[:, :, :, None] - c[:, :, None, :]).clamp(max=0).exp() * valid
    within = torch.einsum("bnijd,bnjd->bnid", decay, b.view(bsz, n, C, d))   # from a zero start
    from_start = c.exp() * (segment == 0)                                 # e^{c_i}: what h_0 still weighs
    outs = []
    for w, f in zip(within.unbind(1), from_start.unbind(1)):
        chunk = w + f * h[:, None]
        outs.append(chunk)
        h = chunk[:, -1]
    hs = torch.cat(outs, 1)[:, :t]
    return (hs, h) if return_final_state else hs


def _prepare(a, b, initial_state, seq_idx):
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"a, b: expected equal shapes [batch, length, channels], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (a.shape[0], a.shape[2]):
        raise ValueError(f"initial_state: expected [batch, channels] = {[a.shape[0], a.shape[2]]}, got "
                         f"{tuple(initial_state.shape)}")
    if seq_idx is not None:
        check_seq_idx(seq_idx, a.shape[0], a.shape[1])
    acc = accumulation_dtype(a.dtype)
    h = (torch.zeros(a.shape[0], a.shape[2], dtype=acc, device=a.device) if initial_state is None
         else initial_state.to(acc))
    return a.to(acc), b.to(acc), h
