"""Mamba-1 selective scan, S6 (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", arXiv 2312.00752, section 3.2 and algorithm 2).

For every channel c and state index k (A is diagonal), with the zero-order hold of eq. 4:

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t
    y_t = C_t . h_t + D u_t,       out = y * silu(z)

where delta is first shifted by delta_bias and passed through softplus when asked.

Shapes as mamba_ssm's selective_scan_fn: u, delta, z [b, d, l]; A [d, n]; B, C [b, n, l] or
[b, g, n, l] with g groups dividing d (channel c reads group c // (d / g)); D, delta_bias [d];
states [b, d, n].

The fast path never steps through time in Python. Two levels, as in the chunked SSD algorithm of
Mamba-2 (arXiv 2405.21060, section 6), but per state index, because Mamba-1's A is a full [d, n]
diagonal rather than one scalar per head, so the T x T decay matrices of SSD would cost T times
the scan itself:
  1. inside chunks of `CHUNK` steps, all states from a zero start by a doubling scan over
     (decay, state) pairs, whose decays are the segment sums of delta A of SSD taken in log space
     and exponentiated step by step: log2(CHUNK) passes, each over every position at once;
  2. the state entering each chunk of a block, by the same scan over the chunks' total decays and
     end states; each chunk then adds its entering state, decayed.
A block of steps is computed at a time, as many chunks as keep one [b, d, n, block] tensor within
`BLOCK_ELEMENTS`, so memory is bounded whatever the length, and buffers this small are reused by
the allocator rather than page-faulted in afresh each pass; blocks are chained by their end
state. The backward recomputes one block at a time from its entering state (saved by the
forward), so training memory is O(b d l + b d n l / block).

Packed documents: with `seq_idx` [batch, length] (see `zoo.ops.documents`) the state is zeroed where
a document starts, i.e. that step's decay exp(delta A) is replaced by 0, so no state crosses a
boundary; the initial state belongs to the first document and the last state to the last one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from zoo.ops.dispatch import choose, cuda_kernel
from zoo.ops.documents import check_seq_idx
from zoo.ops.dtypes import accumulation_dtype

CHUNK = 16                # steps per chunk of the inner doubling scan
BLOCK_ELEMENTS = 1 << 19  # elements of one [b, d, n, block] tensor in a pass of the outer loop


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, seq_idx=None, impl: str = "auto"):
    """out [b, d, l] in u's dtype, or (out, last_state [b, d, n]) with return_last_state.
    seq_idx [b, l]: state resets at document starts (module docstring).
    impl: "auto" | "torch" | "triton" (zoo.ops.triton.ssm) | "cuda" (mamba-ssm's selective_scan_fn),
    see `zoo.ops.dispatch`."""
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    unsupported = {}
    if initial_state is not None or seq_idx is not None or u.dtype == torch.float64:
        unsupported["cuda"] = "selective_scan_fn takes no initial_state, seq_idx or float64"
    impl = choose("selective_scan", impl, u, unsupported)
    if impl == "cuda":
        return cuda_kernel("selective_scan")(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if impl == "triton":
        from zoo.ops.triton.ssm import selective_scan_triton
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state, keep=None if seq_idx is None else _continues(seq_idx))
    b, d, length = u.shape
    n = A.shape[1]
    acc = accumulation_dtype(u)
    dt = _discretisation_step(delta, delta_bias, delta_softplus, acc)
    B, C = _grouped(B, 3), _grouped(C, 3)
    g = B.shape[1]
    grouped = lambda t: t.reshape(b, g, d // g, *t.shape[2:])
    h0 = (torch.zeros(b, d, n, device=u.device, dtype=acc) if initial_state is None
          else initial_state.to(acc))
    keep = None if seq_idx is None else _continues(seq_idx).to(acc)
    y, last = _ChunkedScan.apply(grouped(u.to(acc)), grouped(dt), A.to(acc).reshape(g, d // g, n),
                                 B.to(acc), C.to(acc), grouped(h0), CHUNK, _block_len(b * d * n, CHUNK), keep)
    out = _skip_and_gate(y.reshape(b, d, length), u, D, z, acc)
    return (out, last.reshape(b, d, n).to(u.dtype)) if return_last_state else out


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, seq_idx=None):
    """The twin: the recurrence one step at a time, the state zeroed where the document id changes."""
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    b, d, length = u.shape
    acc = accumulation_dtype(u)
    dt = _discretisation_step(delta, delta_bias, delta_softplus, acc)
    B, C = _per_channel(_grouped(B, 3), d), _per_channel(_grouped(C, 3), d)
    h = torch.zeros(b, d, A.shape[1], device=u.device, dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).to(acc)[:, None, None]
        h = torch.exp(dt[:, :, t, None] * A.to(acc)) * h + (dt[:, :, t] * u[:, :, t].to(acc))[..., None] * B[..., t].to(acc)
        ys.append((h * C[..., t].to(acc)).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else torch.zeros(b, d, 0, device=u.device, dtype=acc)
    out = _skip_and_gate(y, u, D, z, acc)
    return (out, h.to(u.dtype)) if return_last_state else out


def selective_scan_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step of the recurrence: (out [b, d], new_state [b, d, n]), both in x's dtype.

    state [b, d, n]; x, dt, z [b, d]; A [d, n]; B, C [b, n] or [b, g, n]; D, dt_bias [d].
    Mamba-2 heads fit by flattening (head, head_dim) into d and repeating A, dt per head.
    """
    _check_step(state, x, dt, A, B, C, D, z, dt_bias)
    acc = accumulation_dtype(x)
    d = x.shape[1]
    step = _discretisation_step(dt, dt_bias, dt_softplus, acc)
    B, C = _per_channel(_grouped(B, 2), d).to(acc), _per_channel(_grouped(C, 2), d).to(acc)
    h = torch.exp(step[..., None] * A.to(acc)) * state.to(acc) + (step * x.to(acc))[..., None] * B
    y = (h * C).sum(-1)
    return _skip_and_gate(y, x, D, z, acc), h.to(x.dtype)


def _continues(seq_idx):
    """[b, l] bool: the step continues the previous step's document (the first step continues the
    initial state's)."""
    keep = torch.ones_like(seq_idx, dtype=torch.bool)
    keep[:, 1:] = seq_idx[:, 1:] == seq_idx[:, :-1]
    return keep


def _block_len(states: int, chunk: int) -> int:
    return chunk * max(1, BLOCK_ELEMENTS // (states * chunk))


class _ChunkedScan(torch.autograd.Function):
    """(u, dt, A, B, C, h0) -> (y, h_last) without D and z, on the grouped layout
    u, dt [b, g, e, l]; A [g, e, n]; B, C [b, g, n, l]; h [b, g, e, n].

    Inside a block everything is time-major, [l, b, g, e, n]: the doubling scan then shifts whole
    contiguous slabs of b g e n elements, and its elementwise passes vectorise fully.

    The backward is the adjoint recurrence, itself a scan of the same form run backwards in time
    (the gradient of h_t is lam_t = C_t gy_t + exp(delta_{t+1} A) lam_{t+1}), so it reuses
    `_block_states`; the forward states it needs are recomputed block by block."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk, block, keep):
        y = u.new_empty(u.shape)
        entering = []
        h = h0
        for part in _blocks(u.shape[-1], block):
            entering.append(h)
            u_, dt_, B_, C_ = (_time_major(t[..., part]) for t in (u, dt, B, C))
            states = _block_states(_decay(dt_, A, keep, part), _inputs(u_, dt_, B_), h, chunk)
            y[..., part] = _outputs(states, C_).permute(1, 2, 3, 0)
            h = states[-1].clone()  # not a view: it would keep the block's states alive
        ctx.save_for_backward(u, dt, A, B, C, torch.stack(entering) if entering else h0[None])
        ctx.chunk, ctx.block, ctx.keep = chunk, block, keep
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last):
        u, dt, A, B, C, entering = ctx.saved_tensors
        grad_u, grad_dt, grad_B, grad_C = (torch.empty_like(t) for t in (u, dt, B, C))
        grad_A = torch.zeros_like(A)
        lam_next = grad_last  # gradient of the state that ends the block being processed
        for i, part in reversed(list(enumerate(_blocks(u.shape[-1], ctx.block)))):
            u_, dt_, B_, C_, gy = (_time_major(t[..., part]) for t in (u, dt, B, C, grad_y))
            h0 = entering[i]
            a = _decay(dt_, A, ctx.keep, part)
            states = _block_states(a.clone(), _inputs(u_, dt_, B_), h0, ctx.chunk)
            # The adjoint runs from the block's end: its decay at t is the forward decay at t + 1,
            # and 1 where it takes over the gradient of the block's last state.
            a_next = torch.cat([a[1:], torch.ones_like(a[:1])])
            lam = _block_states(a_next.flip(0), (gy[..., None] * C_[:, :, :, None]).flip(0),
                                lam_next, ctx.chunk).flip(0)                   # dL/dh_t, [l, b, g, e, n]
            grad_log_a = lam * a                                               # dL/d(delta_t A) ...
            grad_log_a[1:] *= states[:-1]                                      # ... = lam_t a_t h_{t-1}
            grad_log_a[0] *= h0
            lam_B = (lam @ B_[..., None])[..., 0]                              # sum_n lam B, [l, b, g, e]
            grad_u[..., part] = (dt_ * lam_B).permute(1, 2, 3, 0)
            grad_dt[..., part] = (u_ * lam_B + (grad_log_a * A).sum(-1)).permute(1, 2, 3, 0)
            grad_A += (grad_log_a * dt_[..., None]).sum((0, 1))
            grad_B[..., part] = ((dt_ * u_)[:, :, :, None] @ lam)[:, :, :, 0].permute(1, 2, 3, 0)
            grad_C[..., part] = (gy[:, :, :, None] @ states)[:, :, :, 0].permute(1, 2, 3, 0)
            lam_next = a[0] * lam[0]
        return grad_u, grad_dt, grad_A, grad_B, grad_C, lam_next, None, None, None


def _blocks(length: int, block: int):
    return [slice(start, start + block) for start in range(0, length, block)]


def _time_major(t):
    """[b, g, x, l] -> [l, b, g, x]; contiguous, so the batched products below are single GEMMs
    (the copy is 1/n of the [l, b, g, e, n] tensors built from it)."""
    return t.permute(3, 0, 1, 2).contiguous()


def _decay(dt, A, keep=None, part=None):
    """exp(delta A), [l, b, g, e, n]: in [0, 1] for the A <= 0 that Mamba uses; 0 where a document
    starts (keep [b, l], sliced by `part`), which both resets the forward state and stops the
    adjoint, and gives d(delta A) = lam a h = 0 there, as the reset state does not depend on it."""
    out = dt.new_empty(*dt.shape, A.shape[-1])
    out = torch.mul(dt[..., None], A, out=out).exp_()
    if keep is not None:
        out.mul_(keep[:, part].t()[:, :, None, None, None])
    return out


def _inputs(u, dt, B):
    """delta B u, [l, b, g, e, n]."""
    out = u.new_empty(*u.shape, B.shape[-1])
    return torch.mul((dt * u)[..., None], B[:, :, :, None], out=out)


def _outputs(states, C):
    """y_t = C_t . h_t, [l, b, g, e]."""
    return (states @ C[..., None])[..., 0]


def _block_states(a, x, h0, chunk):
    """Every state h_t = a_t h_{t-1} + x_t of a block from h_{-1} = h0, time on the first axis
    ([l, b, g, e, n]). May overwrite a and x.

    Two levels: inside chunks of `chunk` steps from a zero state, then, by the same doubling scan
    over the chunks' total decays and end states, the state entering each chunk, which each chunk
    adds decayed to every step."""
    length = x.shape[0]
    pad = -length % chunk
    if pad:
        # decay 1 and input 0 leave the state untouched, so padding is exact.
        a = torch.cat([a, a.new_ones(pad, *a.shape[1:])])
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    a, x = a.unflatten(0, (-1, chunk)), x.unflatten(0, (-1, chunk))   # [m, T, b, g, e, n]
    decay, states = (t.transpose(0, 1) for t in _doubling_scan(a.transpose(0, 1), x.transpose(0, 1)))
    chunk_decay, ends = _doubling_scan(decay[:, -1].clone(), states[:, -1].clone())
    ends.addcmul_(chunk_decay, h0)
    entering = torch.cat([h0[None], ends[:-1]])
    states.addcmul_(decay, entering[:, None])
    return states.flatten(0, 1)[:length]


def _doubling_scan(a, x):
    """The inclusive scan h_t = a_t h_{t-1} + x_t along the first axis from h = 0, in
    ceil(log2 T) passes over all positions at once (Hillis & Steele's doubling). Returns the
    cumulative decays prod_{r <= t} a_r and the states. May overwrite a and x.

    After the pass with stride k, x_t holds the inputs of the 2k steps ending at t decayed to t, and
    a_t the decay over those steps; a pass adds the neighbour k steps back, decayed by a_t.
    Stability: only products of per-step decays exp(delta A) in [0, 1] are formed, the log-space
    segment sums of SSD exponentiated one step at a time, so nothing can overflow (unlike
    exp(S_t) * exp(-S_s) from one cumulative sum, which gives inf * 0 once -S_s passes ~88 in
    float32), and a product that underflows to 0 is a state that has decayed below float range."""
    T = x.shape[0]
    a_next, x_next = torch.empty_like(a), torch.empty_like(x)  # the shifted operand overlaps the output
    k = 1
    while k < T:
        # Steps before k are final; the buffer written now already holds those before k // 2,
        # final two passes ago, so only [k // 2, k) is carried over.
        x_next[k // 2:k] = x[k // 2:k]
        torch.addcmul(x[k:], a[k:], x[:-k], out=x_next[k:])
        a_next[k // 2:k] = a[k // 2:k]
        torch.mul(a[k:], a[:-k], out=a_next[k:])
        a, a_next, x, x_next = a_next, a, x_next, x
        k *= 2
    return a, x


def _discretisation_step(delta, bias, softplus, acc):
    delta = delta.to(acc)
    if bias is not None:
        delta = delta + bias.to(acc).reshape(-1, *([1] * (delta.dim() - 2)))
    return F.softplus(delta) if softplus else delta


def _skip_and_gate(y, u, D, z, acc):
    if D is not None:
        y = y + u.to(acc) * D.to(acc).reshape(-1, *([1] * (u.dim() - 2)))
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype)


def _grouped(t, ungrouped_dim):
    """B or C without a groups axis gets one group."""
    return t.unsqueeze(1) if t.dim() == ungrouped_dim else t


def _per_channel(t, d):
    """[b, g, n, ...] -> [b, d, n, ...]: channel c reads group c // (d / g)."""
    return t.repeat_interleave(d // t.shape[1], dim=1)


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx=None):
    if u.dim() != 3:
        raise ValueError(f"u: expected [batch, dim, length], got shape {tuple(u.shape)}")
    b, d, length = u.shape
    if tuple(delta.shape) != (b, d, length):
        raise ValueError(f"delta: expected the shape of u {list(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and tuple(z.shape) != (b, d, length):
        raise ValueError(f"z: expected the shape of u {list(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A: expected [dim={d}, d_state], got shape {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3 and tuple(t.shape) == (b, n, length):
            continue
        if t.dim() == 4 and t.shape[0] == b and t.shape[2:] == (n, length) and t.shape[1] >= 1 and d % t.shape[1] == 0:
            continue
        raise ValueError(f"{name}: expected [batch, d_state, length] = {[b, n, length]} or [batch, groups, "
                         f"d_state, length] with groups dividing dim {d}, got shape {tuple(t.shape)}")
    if B.dim() != C.dim() or B.shape != C.shape:
        raise ValueError(f"C: expected the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"{name}: expected [dim={d}], got shape {tuple(t.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, d, n):
        raise ValueError(f"initial_state: expected [batch, dim, d_state] = {[b, d, n]}, "
                         f"got shape {tuple(initial_state.shape)}")
    if seq_idx is not None:
        check_seq_idx(seq_idx, b, length)


def _check_step(state, x, dt, A, B, C, D, z, dt_bias):
    if x.dim() != 2:
        raise ValueError(f"x: expected [batch, dim], got shape {tuple(x.shape)}")
    b, d = x.shape
    for name, t in (("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (b, d):
            raise ValueError(f"{name}: expected the shape of x {list(x.shape)}, got {tuple(t.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A: expected [dim={d}, d_state], got shape {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if not (tuple(t.shape) == (b, n) or (t.dim() == 3 and t.shape[0] == b and t.shape[2] == n
                                             and d % t.shape[1] == 0)):
            raise ValueError(f"{name}: expected [batch, d_state] = {[b, n]} or [batch, groups, d_state] with "
                             f"groups dividing dim {d}, got shape {tuple(t.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"{name}: expected [dim={d}], got shape {tuple(t.shape)}")
    if tuple(state.shape) != (b, d, n):
        raise ValueError(f"state: expected [batch, dim, d_state] = {[b, d, n]}, got shape {tuple(state.shape)}")
