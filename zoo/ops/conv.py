"""Depthwise causal 1-D convolution, the short convolution in front of the Mamba scans
(Gu & Dao, arXiv 2312.00752, section 3.4; Mamba-2, arXiv 2405.21060, section 7).

    x [batch, dim, length], weight [dim, width], bias [dim]
    states [batch, dim, width - 1]: the last width - 1 inputs, so a sequence can continue in pieces
    out[:, c, t] = act(bias[c] + sum_k weight[c, k] * x_padded[:, c, t + k]),  x_padded = states ++ x

Same arguments and layout as `causal_conv1d_fn` of the causal-conv1d package, which this module calls
on CUDA when it is installed.

Layout. x may be channel-last in memory (a transposed view of [batch, length, dim], which is how a
Mamba block's in_proj produces it): then the convolution runs as `width` shifted multiply-adds along
the length, in that layout, with a hand-written backward (`_ChannelLastConv`); no transposed copy is
made and the output comes back channel-last too. A channel-first x goes to F.conv1d.

Packed documents: with `seq_idx` [batch, length] (see `zoo.ops.documents`) no output reads an input of
another document: inputs before a document's first token count as zeros, as they would for the document
alone. The initial states belong to the first document; the final states keep only the last
document's inputs (zeros before its start), so a stream continues that document.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.ops.dispatch import choose, cuda_kernel
from zoo.ops.documents import check_seq_idx, document_number
from zoo.ops.dtypes import accumulation_dtype

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None,
                  seq_idx=None, impl: str = "auto"):
    """Returns out [b, d, l] in x's dtype, or (out, final_states [b, d, width - 1]) when asked.
    impl: "auto" | "torch" | "cuda" (causal-conv1d's kernel), see `zoo.ops.dispatch`."""
    _check(x, weight, bias, initial_states, activation, seq_idx)
    if choose("causal_conv1d", impl, x, _unsupported(x, weight, initial_states, return_final_states, seq_idx)) == "cuda":
        return cuda_kernel("causal_conv1d")(x, weight, bias, activation=activation)
    if seq_idx is not None:
        return _document_conv(x, weight, bias, initial_states, return_final_states, activation, seq_idx)
    if _channel_last(x) and initial_states is None and not return_final_states:
        out = _ChannelLastConv.apply(x.transpose(1, 2), weight, bias, activation is not None)
        return out.transpose(1, 2)
    b, d, length = x.shape
    width = weight.shape[1]
    acc = accumulation_dtype(x)
    w, bias = weight.to(acc).unsqueeze(1), None if bias is None else bias.to(acc)
    if initial_states is None:
        # zero history: the convolution's own padding, whose extra right-hand outputs are dropped,
        # saves a padded copy of x (and its gradient) on long inputs
        padded = None
        out = F.conv1d(x.to(acc), w, bias, padding=width - 1, groups=d)[..., :length]
    else:
        padded = torch.cat([initial_states.to(acc), x.to(acc)], dim=-1)
        out = F.conv1d(padded, w, bias, groups=d)
    if activation is not None:
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    if padded is None:
        padded = F.pad(x[..., max(0, length - (width - 1)):], (max(0, width - 1 - length), 0))
    return out, _last_inputs(padded, width).to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One decoding step, as causal-conv1d's `causal_conv1d_update`: out [b, d] in x's dtype for x [b, d];
    conv_state [b, d, width - 1] (the last inputs, oldest first) is shifted by one input IN PLACE, so this
    is for inference (no autograd through the state).

    Per step a width-4 window over a few hundred channels: F.conv1d's setup costs ~140 us where one
    multiply-and-sum over the [b, d, width] window costs ~15 us (one thread, d = 640)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected [batch, dim], got shape {tuple(x.shape)}")
    _check(x[..., None], weight, bias, conv_state, activation)
    acc = accumulation_dtype(x)
    window = torch.cat([conv_state.to(acc), x.to(acc)[..., None]], dim=-1)
    out = torch.linalg.vecdot(window, weight.to(acc))
    if bias is not None:
        out.add_(bias.to(acc))
    if activation is not None:
        out = F.silu(out, inplace=True)
    conv_state.copy_(window[..., 1:])
    return out.to(x.dtype)


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None,
                      seq_idx=None):
    """The twin: a loop over time keeping a window of the last `width` inputs, emptied where a document starts."""
    _check(x, weight, bias, initial_states, activation, seq_idx)
    b, d, length = x.shape
    width = weight.shape[1]
    acc = accumulation_dtype(x)
    w = weight.to(acc)
    window = (torch.zeros(b, d, width - 1, device=x.device, dtype=acc) if initial_states is None
              else initial_states.to(acc))
    outs = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            window = window * (seq_idx[:, t] == seq_idx[:, t - 1]).to(acc)[:, None, None]
        window = torch.cat([window, x[:, :, t:t + 1].to(acc)], dim=-1)
        y = (window * w).sum(-1)
        if bias is not None:
            y = y + bias.to(acc)
        outs.append(F.silu(y) if activation is not None else y)
        window = window[:, :, 1:]
    out = torch.stack(outs, dim=-1).to(x.dtype) if outs else x.new_empty(b, d, 0)
    return (out, window.to(x.dtype)) if return_final_states else out


def _document_conv(x, weight, bias, initial_states, return_final_states, activation, seq_idx):
    """The plain convolution, then the few outputs whose window reaches into an earlier document
    recomputed with those taps dropped. Document numbers never decrease, so the window of output t
    crosses a boundary exactly when its oldest input (t - width + 1) lies in another document: at
    most width - 1 outputs after each document start, gathered at once (no loop over time)."""
    b, d, length = x.shape
    width = weight.shape[1]
    acc = accumulation_dtype(x)
    history = x.new_zeros(b, d, width - 1, dtype=acc) if initial_states is None else initial_states.to(acc)
    padded = torch.cat([history, x.to(acc)], dim=-1)
    w = weight.to(acc)
    out = F.conv1d(padded, w.unsqueeze(1), None if bias is None else bias.to(acc), groups=d)
    doc = document_number(seq_idx)
    # the initial states are the first document's history: document number 0
    doc_padded = F.pad(doc, (width - 1, 0))
    rows, cols = (doc_padded[:, :length] != doc).nonzero(as_tuple=True)
    if rows.numel():
        taps = cols[:, None] + torch.arange(width, device=x.device)                      # [m, width]
        windows = padded[rows[:, None], :, taps]                                         # [m, width, d]
        same = doc_padded[rows[:, None], taps] == doc[rows, cols][:, None]               # [m, width]
        fixed = (windows * same[..., None] * w.t()).sum(1)
        if bias is not None:
            fixed = fixed + bias.to(acc)
        out = out.transpose(1, 2).index_put((rows, cols), fixed).transpose(1, 2)
    if activation is not None:
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    tail = _last_inputs(padded, width)
    keep = _last_inputs(doc_padded[:, None, :], width) == doc[:, None, -1:]
    return out, tail.masked_fill(~keep, 0.0).to(x.dtype)


def _channel_last(x) -> bool:
    """x [b, d, l] laid out as [b, l, d] with unit stride along d (rows may be wider: a slice)."""
    return x.stride(1) == 1 and x.shape[1] > 1 and x.shape[2] > 1


class _ChannelLastConv(torch.autograd.Function):
    """The convolution of x [b, l, d] (unit stride along d) as width shifted multiply-adds,
    out[t] = act(bias + sum_k w[:, k] x[t - (width - 1) + k]), returned [b, l, d] contiguous.

    Forward and backward run over blocks of positions (`_BLOCK_ELEMENTS` per tensor), so that the
    few passes over a block stay in the core's cache instead of streaming whole [l, d] tensors
    through memory once per tap. Measured at d = 640, float32, one thread, forward + backward:
    4K positions 35 ms (F.conv1d on the same data, made channel-first, 87 ms with the transposed
    copies); 16K about 0.2 s, where whole-tensor passes take twice that. Keeps only the input (a
    view: no copy); backward recomputes the pre-activation block by block, which costs less than
    writing it out and reading it back (and a fresh [l, d] tensor costs page faults, ~0.5 ms per MiB
    here)."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        acc = accumulation_dtype(x)
        w = weight.to(acc)
        b = None if bias is None else bias.to(acc)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for t0, t1 in _position_blocks(x, w.shape[1]):
            if silu:
                out[:, t0:t1] = F.silu(_taps(x, w, b, t0, t1))
            else:
                out[:, t0:t1] = _taps(x, w, b, t0, t1)
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        acc = accumulation_dtype(x)
        w = weight.to(acc)
        b = None if bias is None else bias.to(acc)
        width, length = w.shape[1], x.shape[1]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dw = torch.zeros(w.shape, dtype=acc, device=x.device)
        db = None if bias is None else torch.zeros(w.shape[0], dtype=acc, device=x.device)
        for t0, t1 in _position_blocks(x, width):
            # dpre of the block and of the width - 1 positions after it, whose taps reach into it
            t2 = min(t1 + width - 1, length)
            do = dout[:, t0:t2].to(acc)
            dpre = torch.ops.aten.silu_backward(do, _taps(x, w, b, t0, t2)) if ctx.silu else do
            n = t1 - t0
            dxb = torch.mul(dpre[:, :n], w[:, -1])
            for k in range(width - 1):
                shift = width - 1 - k
                if t2 - t0 > shift:   # dx[t] += w_k dpre[t + shift]
                    m = min(n, t2 - t0 - shift)
                    dxb[:, :m].addcmul_(dpre[:, shift:shift + m], w[:, k])
            dx[:, t0:t1] = dxb
            own = dpre[:, :n]
            for k in range(width):
                shift = width - 1 - k   # dw_k += sum_t dpre[t] x[t - shift], t - shift >= 0
                s0 = max(t0, shift)
                if s0 < t1:
                    dw[:, k] += torch.linalg.vecdot(own[:, s0 - t0:], x[:, s0 - shift:t1 - shift].to(acc),
                                                    dim=1).sum(0)
            if db is not None:
                db += own.sum((0, 1))
        return dx, dw.to(weight.dtype), None if db is None else db.to(weight.dtype), None


# Elements of one block of positions (per tensor), 128 Ki float32 = 512 KiB: a block's input, output
# and pre-activation mostly stay in a 1 MiB L2.
_BLOCK_ELEMENTS = 1 << 17


def _position_blocks(x, width):
    """(t0, t1) blocks of the positions of x [b, l, d], at least `width` positions each."""
    b, length, d = x.shape
    step = max(width, _BLOCK_ELEMENTS // max(1, b * d))
    return [(t, min(t + step, length)) for t in range(0, length, step)]


def _taps(x, w, bias, t0, t1):
    """bias + sum_k w[:, k] x[t - (width - 1) + k] for t in [t0, t1) (zero before position 0)."""
    width = w.shape[1]
    xb = x[:, t0:t1]
    out = torch.mul(xb, w[:, -1]) if bias is None else torch.addcmul(bias, xb, w[:, -1])
    for k in range(width - 1):
        shift = width - 1 - k
        s0 = max(t0, shift)   # output positions whose tap t - shift exists
        if s0 < t1:
            out[:, s0 - t0:].addcmul_(x[:, s0 - shift:t1 - shift], w[:, k])
    return out


def _last_inputs(padded: torch.Tensor, width: int) -> torch.Tensor:
    # padded starts with width - 1 earlier inputs (zeros if none), so a short x still yields a full state.
    return padded[:, :, padded.shape[-1] - (width - 1):]


def _check(x, weight, bias, initial_states, activation, seq_idx=None):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: must be one of None, 'silu', 'swish', got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x: expected [batch, dim, length], got shape {tuple(x.shape)}")
    b, d, _ = x.shape
    if weight.dim() != 2 or weight.shape[0] != d or weight.shape[1] < 1:
        raise ValueError(f"weight: expected [dim={d}, width >= 1], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"bias: expected [dim={d}], got shape {tuple(bias.shape)}")
    want = (b, d, weight.shape[1] - 1)
    if initial_states is not None and tuple(initial_states.shape) != want:
        raise ValueError(f"initial_states: expected [batch, dim, width - 1] = {list(want)}, "
                         f"got shape {tuple(initial_states.shape)}")
    if seq_idx is not None:
        check_seq_idx(seq_idx, b, x.shape[2])


def _unsupported(x, weight, initial_states, return_final_states, seq_idx) -> dict:
    # The kernel's state and seq_idx arguments need a channel-last x; those calls stay on the
    # F.conv1d path, which is exact and fast on GPUs too.
    if initial_states is not None or return_final_states or seq_idx is not None:
        return {"cuda": "initial_states, return_final_states and seq_idx need a channel-last x"}
    if not 2 <= weight.shape[1] <= 4:
        return {"cuda": f"width {weight.shape[1]} outside the kernel's 2..4"}
    return {}
