"""Context parallel for the Mamba blocks, `mamba` and `mamba2`: conv halo, then state passing. The
projections are the block's own public steps (`split_input`, `ssm_inputs` / `split_heads`, `output`); only
the conv and the scan differ from the single process.

1. Conv halo: each chunk's causal convolution continues from the d_conv - 1 inputs before it
   (`halo.preceding`, from whichever chunks hold them), passed as the conv's initial state.
2. Each chunk scans from a zero state and reports its end state S_c and its total log-decay
   a_c = A * sum_t dt_t (Mamba-1: per (channel, state) element, Mamba-2: per head). The pairs of all
   chunks are all-gathered in global chunk order and combined by the exclusive scan
   H_0 = 0, H_{c+1} = exp(a_c) H_c + S_c (the recurrence of the scan itself, one step per chunk; a
   few tiny tensors, so every rank runs it for all chunks rather than communicating again).
3. Each chunk adds what its incoming state H_c contributes:
   - Mamba-2: analytically, y_t += exp(A cs_t) C_t . H_c with cs the chunk's cumulative dt
     (arXiv 2405.21060, section 6, step 4): a [batch, len, heads, head_dim] term, the size of y,
     recomputed in the backward rather than kept;
   - Mamba-1: its decay exp(A cs_t) is per (channel, state) element, so the same term would need a
     [batch, d_inner, d_state, len] tensor; instead the chunk's scan runs a second time from H_c,
     which gives y exactly and keeps memory at the scan's own (compute: two scans per chunk).

The backward is autograd's through the all-gather (its adjoint sums every rank's gradient of a
chunk's (a, S) back onto the owner) and through the conv halo's fetch. Exact, no approximation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zoo.distributed.halo import gather_chunks, preceding, refuse_cache
from zoo.distributed.layout import ContextParallel
from zoo.ops.conv import causal_conv1d
from zoo.ops.ssd import ssd_scan
from zoo.ops.ssm import selective_scan
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["conv_cp", "incoming_states", "mamba_cp", "mamba2_cp"]


def conv_cp(x, weight, bias, cp: ContextParallel, impl: str = "auto", activation: str | None = "silu"):
    """Depthwise causal conv (+ SiLU by default; `activation=None` for none) of this rank's shard x [b, channels,
    local] (chunks in shard order): each chunk continues from the width - 1 inputs before it."""
    width = weight.shape[1]
    halos, x = preceding(x.transpose(1, 2), cp, lambda start, end: width - 1)
    x = x.transpose(1, 2)
    outs = []
    for c, halo in zip(cp.chunks(), halos):
        # fewer than width - 1 tokens before the sequence start: the zeros of the conv's own padding
        state = F.pad(halo.transpose(1, 2), (width - 1 - halo.shape[1], 0))
        outs.append(causal_conv1d(x[..., c.local], weight, bias, initial_states=state, activation=activation,
                                  impl=impl))
    return torch.cat(outs, -1)


def incoming_states(log_decay, end_state, cp: ContextParallel) -> list[torch.Tensor]:
    """The state entering each of this rank's chunks (shard order).

    log_decay [chunks of this rank, *s]: a_c, broadcastable against end_state [chunks of this rank, *S];
    end_state: the chunk's end state from a zero start. Returns H_c for each local chunk.

    One all-gather carries both (two would let ranks reach their backwards in different orders). Its
    backward is collective, so every rank must run it: the zero state entering chunk 0 is taken from
    the gathered tensor (times 0), which keeps the gather in the graph of a rank whose only chunk is 0.
    """
    n = len(cp.chunk_ids())
    S_shape = end_state.shape[1:]
    a_shape = log_decay.shape[1:]
    packed = torch.cat([log_decay.reshape(n, -1), end_state.reshape(n, -1)], 1)
    gathered = gather_chunks(packed, cp)
    a = gathered[:, :log_decay[0].numel()].reshape(-1, *a_shape)
    S = gathered[:, log_decay[0].numel():].reshape(-1, *S_shape)
    H, entering = S[0] * 0, []
    for c in range(cp.n_chunks):
        entering.append(H)
        H = torch.exp(a[c]) * H + S[c]
    return [entering[c] for c in cp.chunk_ids()]


def _incoming_contribution(C, cs, H):
    """y_t = exp(cs_t) C_t . H per head: C [b, len, g, n], cs = A * cumulative dt [b, len, h], H [b, h, p, n];
    head i reads group i // (h / g). Returns [b, len, h, p] in H's dtype."""
    b, length, g, n = C.shape
    h, p = H.shape[1], H.shape[2]
    per_group = torch.einsum("blgn,bgjpn->blgjp", C.to(H.dtype), H.view(b, g, h // g, p, n)).reshape(b, length, h, p)
    return torch.exp(cs)[..., None] * per_group


def mamba_cp(block, x, cp: ContextParallel, cache=None):
    """`MambaBlock.forward` on this rank's shard (the block's own projections around steps 1-3)."""
    refuse_cache(cache, "mamba")
    scan = block.kernels.get("selective_scan", "auto")
    xs, z = block.split_input(x)
    xs = conv_cp(xs, block.conv1d.weight[:, 0], block.conv1d.bias, cp, block.kernels.get("causal_conv1d", "auto"))
    dt, B, C = block.ssm_inputs(xs)
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    acc = accumulation_dtype(x.dtype)
    A = -torch.exp(block.A_log.to(acc))
    # the step sizes once, shared by both scans of a chunk (each would otherwise keep its own copy)
    steps = F.softplus(dt.to(acc) + block.dt_proj.bias.to(acc)[:, None])                 # [b, d_inner, local]
    chunks = cp.chunks()
    log_decay, ends = [], []
    for c in chunks:
        sl = c.local
        _, end = selective_scan(xs[..., sl], steps[..., sl], A, B[..., sl], C[..., sl], return_last_state=True,
                                impl=scan)
        # sums of dt in float64: long chunks add thousands of steps, and exp() magnifies their rounding
        log_decay.append(A * steps[..., sl].double().sum(-1).to(acc)[..., None])       # [b, d_inner, n]
        ends.append(end.to(acc))
    H = incoming_states(torch.stack(log_decay), torch.stack(ends), cp)
    ys = []
    for c, h in zip(chunks, H):
        sl = c.local
        ys.append(selective_scan(xs[..., sl], steps[..., sl], A, B[..., sl], C[..., sl], block.D, z[..., sl],
                                 initial_state=h, impl=scan))
    return block.out_proj(torch.cat(ys, -1).transpose(1, 2))


def mamba2_cp(block, x, cp: ContextParallel, cache=None):
    """`Mamba2Block.forward` on this rank's shard (the block's own projections around steps 1-3)."""
    refuse_cache(cache, "mamba2")
    b, length, _ = x.shape
    z, xBC, dt = block.split_input(x)
    xBC = conv_cp(xBC.transpose(1, 2), block.conv1d.weight[:, 0], block.conv1d.bias, cp,
                  block.kernels.get("causal_conv1d", "auto")).transpose(1, 2)
    xs, B, C = block.split_heads(xBC)
    acc = accumulation_dtype(x.dtype)
    A = -torch.exp(block.A_log.to(acc))
    chunks = cp.chunks()
    scan_dt, dt_bias, dt_softplus = block.scan_dt(dt)
    ys, log_decay, ends, cums = [], [], [], []
    for c in chunks:
        sl = c.local
        y, end = ssd_scan(xs[:, sl], scan_dt[:, sl], A, B[:, sl], C[:, sl], block.cfg.chunk_size, D=block.D,
                          dt_bias=dt_bias, dt_softplus=dt_softplus, return_final_states=True,
                          impl=block.kernels.get("ssd", "auto"))
        steps = block.step_sizes(dt[:, sl].to(acc))
        cs = (steps.double().cumsum(1) * A.double()).to(acc)                           # [b, len, h], <= 0
        ys.append(y)
        cums.append(cs)
        log_decay.append(cs[:, -1, :, None, None])                                    # [b, h, 1, 1]
        ends.append(end.to(acc))                                                      # [b, h, p, n]
    H = incoming_states(torch.stack(log_decay), torch.stack(ends), cp)
    out = []
    for c, y, cs, state in zip(chunks, ys, cums, H):
        # zero for chunk 0, kept so that the gather stays in every rank's graph; checkpointed, so that
        # the backward keeps only its small inputs, not a [b, len, heads, head_dim] product
        correction = checkpoint(_incoming_contribution, C[:, c.local], cs, state, use_reentrant=False)
        out.append(y + correction.to(y.dtype))
    y = torch.cat(out, 1).reshape(b, length, block.d_inner)
    return block.output(y, z)
