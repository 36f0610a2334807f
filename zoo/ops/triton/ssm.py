"""Mamba-1 selective scan (arXiv 2312.00752, section 3.2, algorithm 2) as Triton kernels, forward and
backward, chunked.

The math is `zoo.ops.ssm`'s: per channel c and state index k, with dt = softplus(delta + bias) when
asked,

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,     y_t = (C_t . h_t + D u_t) * silu(z_t)

One program owns a batch row and a block of channels of one group (B and C are then shared by its
channels) with their whole [channels, d_state] state, and walks the sequence chunk by chunk, carrying
the state: inside a chunk of T steps every state comes at once from `tl.associative_scan` over the
(decay, input) pairs, whose combination (a1, x1) . (a2, x2) = (a1 a2, a2 x1 + x2) only ever
multiplies decays in [0, 1] (no cumulative sums to exponentiate, nothing to overflow). The
channels x batch rows give the parallelism (d_inner is in the thousands); time is sequential
across chunks, as in mamba-ssm's CUDA kernel. D, the z gate, delta_bias and softplus are fused.
The forward keeps the state entering every chunk, [b, chunks, d, n], for the backward.

Backward, the chunks in reverse order carrying the adjoint: with gy the gradient of C . h + D u,
lam_t = dL/dh_t is itself a scan run backwards,

    lam_t = C_t gy_t + exp(dt_{t+1} A) lam_{t+1},   lam after the last step = d last state,

(`tl.associative_scan(reverse=True)`, the next step's decay loaded shifted by one), and then

    du_t  = dt_t sum_k lam_tk B_tk + D gy_t         dB_tk = sum_c dt_t u_t lam_tk
    ddt_t = u_t sum_k lam_tk B_tk + sum_k g_tk A_k  dC_tk = sum_c gy_t h_tk
    dA_k  = sum_t g_tk dt_t,  g_tk = lam_tk exp(dt_t A_k) h_{t-1,k} = lam_tk (h_t - dt_t B_tk u_t)_k

where the last identity saves a shifted copy of the states. The forward states of a chunk are
recomputed from its saved entering state. dB and dC sum over the channels of a group, which
several programs share: each program sums its own channels and adds the result to a float32
buffer atomically (so their order, and the last bits of dB and dC, vary from run to run on GPUs).

Documents (seq_idx): `keep` [b, l], 1 where a step continues the previous step's document and 0
where one starts, multiplies the step's decay, so the state restarts from the step's own input and
the adjoint does not flow back across the boundary (as in the torch path). The initial state
belongs to the first document, the last state to the last.
Arithmetic in float32 (float64 for float64 inputs). Untuned: no GPU was lent when these were
written; T and the channel block are chosen to keep one [channels, d_state, T] tile near 4K
elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 32            # steps per chunk of the in-register scan
TILE_ELEMENTS = 4096  # elements of one [channels, d_state, T] tile


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None, keep=None):
    """`zoo.ops.ssm.selective_scan` on Triton kernels (arguments checked by the caller); keep [b, l]:
    the step continues the previous step's document (see the module docstring), or None."""
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    keep = None if keep is None else keep.to(torch.int8).contiguous()
    out, last = _ScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), keep)
    return (out, last.to(u.dtype)) if return_last_state else out


def _meta(u, B):
    d, n, g = u.shape[1], B.shape[2], B.shape[1]
    per_group = d // g
    block_n = max(2, triton.next_power_of_2(n))
    block_d = 1
    # channels of a block share one group, so the block divides the group's channels
    while block_d < 16 and per_group % (2 * block_d) == 0 and 2 * block_d * block_n * CHUNK <= TILE_ELEMENTS:
        block_d *= 2
    acc = tl.float64 if u.dtype == torch.float64 else tl.float32
    return dict(T=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n, ACC=acc)


class _ScanTriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, h0, softplus, keep):
        b, d, length = u.shape
        g, n = B.shape[1], B.shape[2]
        acc = torch.promote_types(u.dtype, torch.float32)
        meta = _meta(u, B)
        nc = triton.cdiv(length, meta["T"])
        out = torch.empty_like(u)
        entering = u.new_empty(b, nc, d, n, dtype=acc)
        last = u.new_empty(b, d, n, dtype=acc)
        A_ = A.to(acc).contiguous()
        opt = _optional(u, D, z, bias, h0, acc)
        grid = (d // meta["BLOCK_D"], b)
        _scan_fwd[grid](u, *u.stride(), delta, *delta.stride(), A_, B, *B.stride(), C, *C.stride(),
                        opt["D"], opt["z"], *opt["z"].stride(), opt["bias"], opt["h0"], out, *out.stride(),
                        entering, last, keep if keep is not None else u, length, d, n, d // g, nc,
                        SOFTPLUS=softplus, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
                        HAS_H0=h0 is not None, HAS_KEEP=keep is not None, **meta)
        ctx.save_for_backward(u, delta, A_, B, C, D, z, bias, entering, keep)
        ctx.softplus, ctx.has_h0, ctx.A_dtype = softplus, h0 is not None, A.dtype
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A_, B, C, D, z, bias, entering, keep = ctx.saved_tensors
        b, d, length = u.shape
        g, n = B.shape[1], B.shape[2]
        acc = A_.dtype
        meta = _meta(u, B)
        nc = entering.shape[1]
        opt = _optional(u, D, z, bias, None, acc)
        # written contiguous by the kernel, whatever the inputs' strides
        du = u.new_empty(u.shape, dtype=acc)
        ddelta = u.new_empty(u.shape, dtype=acc)
        dz = u.new_empty(u.shape, dtype=acc) if z is not None else du
        dA = u.new_empty(b, d, n, dtype=acc)
        dD = u.new_empty(b, d, dtype=acc)
        dB = torch.zeros(B.shape, dtype=acc, device=u.device)
        dC = torch.zeros(C.shape, dtype=acc, device=u.device)
        dh0 = u.new_empty(b, d, n, dtype=acc)
        dlast_ = dlast.to(acc).contiguous() if dlast is not None else dh0
        dout_ = dout.to(acc).contiguous()
        grid = (d // meta["BLOCK_D"], b)
        _scan_bwd[grid](u, *u.stride(), delta, *delta.stride(), A_, B, *B.stride(), C, *C.stride(),
                        opt["D"], opt["z"], *opt["z"].stride(), opt["bias"], entering, dout_, *dout_.stride(),
                        dlast_, du, ddelta, dz, dA, dD, dB, *dB.stride(), dC, *dC.stride(), dh0,
                        keep if keep is not None else u, length, d, n, d // g, nc,
                        SOFTPLUS=ctx.softplus, HAS_D=D is not None, HAS_Z=z is not None,
                        HAS_BIAS=bias is not None, HAS_DLAST=dlast is not None, HAS_KEEP=keep is not None, **meta)
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(ctx.A_dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if D is None else dD.sum(0).to(D.dtype), None if z is None else dz.to(z.dtype),
                None if bias is None else ddelta.sum((0, 2)).to(bias.dtype),
                dh0.to(ctx.h0_dtype) if ctx.has_h0 else None, None, None)


def _optional(u, D, z, bias, h0, acc):
    """Stand-ins for absent optional tensors (never read: the kernels' HAS_* flags are False)."""
    return {"D": D.contiguous() if D is not None else u, "z": z if z is not None else u,
            "bias": bias.contiguous() if bias is not None else u,
            "h0": h0.to(acc).contiguous() if h0 is not None else u}


@triton.jit
def _combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _continues(keep_ptr, bi, pos, length):
    """[1, 1, T]: 1 where step pos continues the previous step's document, 0 where one starts
    (1 past the end, where the steps are padding)."""
    keep = tl.load(keep_ptr + bi * length + pos, mask=pos < length, other=1)
    return keep.to(tl.float32)[None, None, :]


@triton.jit
def _step_size(delta_ptr, sd_b, sd_d, sd_l, bias_ptr, bi, rd, pos, ok,
               SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """dt [BLOCK_D, T] (0 where not ok: decay 1, no input) and the softplus derivative."""
    raw = tl.load(delta_ptr + bi * sd_b + rd[:, None] * sd_d + pos[None, :] * sd_l, mask=ok, other=0.0)
    raw = raw.to(ACC)
    if HAS_BIAS:
        raw = raw + tl.load(bias_ptr + rd).to(ACC)[:, None]
    if SOFTPLUS:
        # log1p(exp(x)) without overflow: x + log1p(exp(-x)) for x > 0
        dt = tl.where(raw > 0, raw + tl.log(1 + tl.exp(-raw)), tl.log(1 + tl.exp(raw)))
        slope = tl.sigmoid(raw)
    else:
        dt = raw
        slope = tl.full(raw.shape, 1.0, raw.dtype)
    return tl.where(ok, dt, 0.0), slope


@triton.jit
def _scan_fwd(u_ptr, su_b, su_d, su_l, delta_ptr, sd_b, sd_d, sd_l, A_ptr,
              B_ptr, sB_b, sB_g, sB_n, sB_l, C_ptr, sC_b, sC_g, sC_n, sC_l,
              D_ptr, z_ptr, sz_b, sz_d, sz_l, bias_ptr, h0_ptr, out_ptr, so_b, so_d, so_l,
              entering_ptr, last_ptr, keep_ptr, length, Dm, N, DPG, nc,
              SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_H0: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr, T: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    bi = tl.program_id(1).to(tl.int64)
    rd = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    gi = (tl.program_id(0).to(tl.int64) * BLOCK_D) // DPG
    rn = tl.arange(0, BLOCK_N)
    mn = rn < N
    rt = tl.arange(0, T)
    A = tl.load(A_ptr + rd[:, None] * N + rn[None, :], mask=mn[None, :], other=0.0)
    state_offs = rd[:, None] * N + rn[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + bi * Dm * N + state_offs, mask=mn[None, :], other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=A.dtype)
    for c in range(nc):
        pos = c * T + rt
        ok = (pos < length)[None, :] & (rd < Dm)[:, None]
        dt, _ = _step_size(delta_ptr, sd_b, sd_d, sd_l, bias_ptr, bi, rd, pos, ok, SOFTPLUS, HAS_BIAS, ACC)
        u = tl.load(u_ptr + bi * su_b + rd[:, None] * su_d + pos[None, :] * su_l, mask=ok, other=0.0).to(A.dtype)
        okn = mn[:, None] & (pos < length)[None, :]
        Bm = tl.load(B_ptr + bi * sB_b + gi * sB_g + rn[:, None] * sB_n + pos[None, :] * sB_l, mask=okn, other=0.0)
        Cm = tl.load(C_ptr + bi * sC_b + gi * sC_g + rn[:, None] * sC_n + pos[None, :] * sC_l, mask=okn, other=0.0)
        a = tl.exp(dt[:, None, :] * A[:, :, None])                              # [BLOCK_D, BLOCK_N, T]
        if HAS_KEEP:
            a = a * _continues(keep_ptr, bi, pos, length)
        x = (dt * u)[:, None, :] * Bm.to(A.dtype)[None, :, :]
        tl.store(entering_ptr + (bi * nc + c) * Dm * N + state_offs, h, mask=mn[None, :])
        decay, local = tl.associative_scan((a, x), 2, _combine)
        states = local + decay * h[:, :, None]
        y = tl.sum(states * Cm.to(A.dtype)[None, :, :], 1)
        if HAS_D:
            y += tl.load(D_ptr + rd).to(A.dtype)[:, None] * u
        if HAS_Z:
            zv = tl.load(z_ptr + bi * sz_b + rd[:, None] * sz_d + pos[None, :] * sz_l, mask=ok, other=0.0)
            zv = zv.to(A.dtype)
            y = y * zv * tl.sigmoid(zv)
        tl.store(out_ptr + bi * so_b + rd[:, None] * so_d + pos[None, :] * so_l, y.to(out_ptr.dtype.element_ty),
                 mask=ok)
        # padded steps decay by 1 and add nothing: the last column is the state after the last real step
        h = tl.sum(tl.where(rt == T - 1, states, 0.0), 2)
    tl.store(last_ptr + bi * Dm * N + state_offs, h, mask=mn[None, :])


@triton.jit
def _scan_bwd(u_ptr, su_b, su_d, su_l, delta_ptr, sd_b, sd_d, sd_l, A_ptr,
              B_ptr, sB_b, sB_g, sB_n, sB_l, C_ptr, sC_b, sC_g, sC_n, sC_l,
              D_ptr, z_ptr, sz_b, sz_d, sz_l, bias_ptr, entering_ptr, dout_ptr, sg_b, sg_d, sg_l,
              dlast_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, sdB_b, sdB_g, sdB_n, sdB_l,
              dC_ptr, sdC_b, sdC_g, sdC_n, sdC_l, dh0_ptr, keep_ptr, length, Dm, N, DPG, nc,
              SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_DLAST: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr, T: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    bi = tl.program_id(1).to(tl.int64)
    rd = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    gi = (tl.program_id(0).to(tl.int64) * BLOCK_D) // DPG
    rn = tl.arange(0, BLOCK_N)
    mn = rn < N
    rt = tl.arange(0, T)
    A = tl.load(A_ptr + rd[:, None] * N + rn[None, :], mask=mn[None, :], other=0.0)
    state_offs = rd[:, None] * N + rn[None, :]
    flat = bi * Dm * N + state_offs
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + flat, mask=mn[None, :], other=0.0)    # dL/d(state after the chunk)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=A.dtype)
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=A.dtype)
    dD = tl.zeros((BLOCK_D,), dtype=A.dtype)
    for k in range(nc):
        c = nc - 1 - k
        pos = c * T + rt
        ok = (pos < length)[None, :] & (rd < Dm)[:, None]
        dt, slope = _step_size(delta_ptr, sd_b, sd_d, sd_l, bias_ptr, bi, rd, pos, ok, SOFTPLUS, HAS_BIAS, ACC)
        ok_next = ((pos + 1 < length) & (rt + 1 < T))[None, :] & (rd < Dm)[:, None]
        dt_next, _ = _step_size(delta_ptr, sd_b, sd_d, sd_l, bias_ptr, bi, rd, pos + 1, ok_next,
                                SOFTPLUS, HAS_BIAS, ACC)
        u = tl.load(u_ptr + bi * su_b + rd[:, None] * su_d + pos[None, :] * su_l, mask=ok, other=0.0).to(A.dtype)
        okn = mn[:, None] & (pos < length)[None, :]
        Bm = tl.load(B_ptr + bi * sB_b + gi * sB_g + rn[:, None] * sB_n + pos[None, :] * sB_l, mask=okn, other=0.0)
        Cm = tl.load(C_ptr + bi * sC_b + gi * sC_g + rn[:, None] * sC_n + pos[None, :] * sC_l, mask=okn, other=0.0)
        Bm = Bm.to(A.dtype)
        Cm = Cm.to(A.dtype)
        a = tl.exp(dt[:, None, :] * A[:, :, None])
        if HAS_KEEP:
            a = a * _continues(keep_ptr, bi, pos, length)
        x = (dt * u)[:, None, :] * Bm[None, :, :]
        h_in = tl.load(entering_ptr + (bi * nc + c) * Dm * N + state_offs, mask=mn[None, :], other=0.0)
        decay, local = tl.associative_scan((a, x), 2, _combine)
        states = local + decay * h_in[:, :, None]
        gy = tl.load(dout_ptr + bi * sg_b + rd[:, None] * sg_d + pos[None, :] * sg_l, mask=ok, other=0.0)
        if HAS_Z:
            y = tl.sum(states * Cm[None, :, :], 1)
            if HAS_D:
                y += tl.load(D_ptr + rd).to(A.dtype)[:, None] * u
            zv = tl.load(z_ptr + bi * sz_b + rd[:, None] * sz_d + pos[None, :] * sz_l, mask=ok, other=0.0)
            zv = zv.to(A.dtype)
            sig = tl.sigmoid(zv)
            tl.store(dz_ptr + bi * Dm * length + rd[:, None] * length + pos[None, :],
                     gy * y * sig * (1 + zv * (1 - sig)), mask=ok)
            gy = gy * zv * sig
        # the adjoint, backwards in time from the gradient of the state after the chunk
        a_next = tl.exp(dt_next[:, None, :] * A[:, :, None])
        if HAS_KEEP:
            # a document starting at t + 1 takes nothing from h_t: no gradient flows back across it
            a_next = a_next * _continues(keep_ptr, bi, tl.where(rt + 1 < T, pos + 1, length), length)
        v = gy[:, None, :] * Cm[None, :, :] + tl.where(rt == T - 1, carry[:, :, None], 0.0)
        _, lam = tl.associative_scan((a_next, v), 2, _combine, reverse=True)
        lam_B = tl.sum(lam * Bm[None, :, :], 1)
        g = lam * (states - x)                                               # lam_t a_t h_{t-1}
        du = dt * lam_B
        if HAS_D:
            du += tl.load(D_ptr + rd).to(A.dtype)[:, None] * gy
            dD += tl.sum(gy * u, 1)
        ddt = u * lam_B + tl.sum(g * A[:, :, None], 1)
        dA += tl.sum(g * dt[:, None, :], 2)
        flat_l = bi * Dm * length + rd[:, None] * length + pos[None, :]
        tl.store(du_ptr + flat_l, du, mask=ok)
        tl.store(ddelta_ptr + flat_l, ddt * slope, mask=ok)
        dBc = tl.sum(lam * (dt * u)[:, None, :], 0)                           # summed over the block's channels
        dCc = tl.sum(states * gy[:, None, :], 0)
        tl.atomic_add(dB_ptr + bi * sdB_b + gi * sdB_g + rn[:, None] * sdB_n + pos[None, :] * sdB_l, dBc, mask=okn)
        tl.atomic_add(dC_ptr + bi * sdC_b + gi * sdC_g + rn[:, None] * sdC_n + pos[None, :] * sdC_l, dCc, mask=okn)
        carry = tl.sum(tl.where(rt == 0, a * lam, 0.0), 2)                   # dL/d(state entering the chunk)
    tl.store(dA_ptr + flat, dA, mask=mn[None, :])
    tl.store(dD_ptr + bi * Dm + rd, dD)
    tl.store(dh0_ptr + flat, carry, mask=mn[None, :])
