"""The Real-Gated Linear Recurrent Unit (RG-LRU) of Griffin and Hawk (De et al., arXiv 2402.19427, section 2.4;
RecurrentGemma), per channel of x [batch, length, width]:

    r_t = sigmoid(gate_a_t),  i_t = sigmoid(gate_x_t)       the recurrence and input gates (the block's
                                                            block-diagonal projections of x, as logits)
    log a_t = -c r_t softplus(lam)                          a_t = a^(c r_t), a = e^{-softplus(lam)} in (0, 1)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)           the input scaled to keep h's variance bounded

where a sequence or a document starts, h_t = i_t x_t: a = 0 and the input unscaled (RecurrentGemma's reset at
position 0). `lam` is RecurrentGemma's `recurrent_param` (the paper's Lambda with its sign flipped), c = 8.
The square root's derivative is clipped at 1000 as in Griffin's reference code (1 - a^2 near 0 when a -> 1 would
otherwise blow the gradient up in low precision); its value is the plain square root.

`rg_lru` scans with the chunked `zoo.ops.linear_scan.linear_scan`, `rg_lru_ref` with its token loop; the gates
are the same elementwise code in both (`rg_lru_inputs`), so the twins differ exactly where the fast path is.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from zoo.ops.documents import check_seq_idx, document_number
from zoo.ops.dtypes import accumulation_dtype
from zoo.ops.linear_scan import linear_scan, linear_scan_ref

__all__ = ["rg_lru", "rg_lru_inputs", "rg_lru_ref"]

MAX_SQRT_GRADIENT = 1000.0


class _SqrtBoundedGradient(torch.autograd.Function):
    """sqrt(x), whose derivative 1 / (2 sqrt(x)) is capped at MAX_SQRT_GRADIENT."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sqrt()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (4 * x).clamp_min(MAX_SQRT_GRADIENT ** -2).sqrt()


def rg_lru_inputs(x, gate_x, gate_a, lam, c: float = 8.0, starts: Optional[torch.Tensor] = None):
    """(a, b) of the linear recurrence h_t = a_t h_{t-1} + b_t, both [batch, length, width] in the accumulation
    dtype; `starts` [batch, length] bool marks where a sequence or document starts (a = 0, b unscaled)."""
    acc = accumulation_dtype(x.dtype)
    x, gate_x, gate_a = (t.to(acc) for t in (x, gate_x, gate_a))
    log_a = -c * torch.sigmoid(gate_a) * F.softplus(lam.to(acc))
    a = log_a.exp()
    scale = _SqrtBoundedGradient.apply(1 - (2 * log_a).exp())
    gated = torch.sigmoid(gate_x) * x
    if starts is None:
        return a, scale * gated
    s = starts[..., None]
    return a.masked_fill(s, 0.0), torch.where(s, gated, scale * gated)


def _starts(x, initial_state, first, seq_idx):
    """[batch, length] bool: position 0 where `first` (default: no initial state, a fresh sequence), and every
    document's first position."""
    b, t = x.shape[:2]
    if first is None:
        first = initial_state is None
    starts = torch.zeros(b, t, dtype=torch.bool, device=x.device)
    starts[:, 0] = torch.as_tensor(first, device=x.device)
    if seq_idx is not None:
        check_seq_idx(seq_idx, b, t)
        doc = document_number(seq_idx)
        starts[:, 1:] |= doc[:, 1:] != doc[:, :-1]
    return starts


def _check(x, gate_x, gate_a, lam, initial_state):
    if x.dim() != 3 or x.shape != gate_x.shape or x.shape != gate_a.shape:
        raise ValueError(f"x, gate_x, gate_a: expected equal shapes [batch, length, width], got {tuple(x.shape)}, "
                         f"{tuple(gate_x.shape)} and {tuple(gate_a.shape)}")
    if tuple(lam.shape) != (x.shape[-1],):
        raise ValueError(f"lam: expected [width] = [{x.shape[-1]}], got {tuple(lam.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"initial_state: expected [batch, width] = {[x.shape[0], x.shape[2]]}, got "
                         f"{tuple(initial_state.shape)}")


def rg_lru(x, gate_x, gate_a, lam, c: float = 8.0, initial_state=None, return_final_state: bool = False,
           seq_idx=None, first: Union[None, bool, torch.Tensor] = None, chunk_size: int = 16):
    """h [batch, length, width] in the accumulation dtype (and the last state with `return_final_state`).

    initial_state [batch, width]: the state before x (streaming); first: whether position 0 starts a sequence
    (bool or [batch] bool; default: when there is no initial state); seq_idx [batch, length]: packed documents."""
    _check(x, gate_x, gate_a, lam, initial_state)
    a, b = rg_lru_inputs(x, gate_x, gate_a, lam, c, _starts(x, initial_state, first, seq_idx))
    if x.shape[1] == 1 and initial_state is not None:   # a decoding step: the recurrence, not the chunked scan
        h = a[:, 0] * initial_state.to(a.dtype) + b[:, 0]
        return (h[:, None], h) if return_final_state else h[:, None]
    return linear_scan(a, b, initial_state=initial_state, return_final_state=return_final_state,
                       chunk_size=chunk_size)


def rg_lru_ref(x, gate_x, gate_a, lam, c: float = 8.0, initial_state=None, return_final_state: bool = False,
               seq_idx=None, first: Union[None, bool, torch.Tensor] = None):
    """`rg_lru` token by token (the twin the chunked path is tested against)."""
    _check(x, gate_x, gate_a, lam, initial_state)
    a, b = rg_lru_inputs(x, gate_x, gate_a, lam, c, _starts(x, initial_state, first, seq_idx))
    return linear_scan_ref(a, b, initial_state=initial_state, return_final_state=return_final_state)
