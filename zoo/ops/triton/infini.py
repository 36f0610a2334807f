"""Infini-attention's compressive memory (Munkhdalai et al., arXiv 2404.07143, section 2.1) as Triton
kernels: per segment, the retrieval from the memory and the memory update fused in one sequential
pass, forward and backward. The local softmax attention stays with SDPA (`zoo.ops.infini`).

Per (batch, kv head), sigma = ELU + 1, segments of T tokens starting at token 0, (M, z) the memory
before segment s (M [d_k, d_v] and z [d_k], float32, float64 for float64 inputs):

    retrieval:  R_t = n_t / d_t,  n_t = sigma(q_t) M,  d_t = sigma(q_t) . z     (0 where d_t = 0)
    update:     u_t = v_t                                       (linear)
                u_t = v_t - c_t,  c_t = sigma(k_t) M / (sigma(k_t) . z)         (delta rule; 0 where z = 0)
                M' = M + sum_t sigma(k_t)^T u_t,   z' = z + sum_t sigma(k_t)   (complete segments only)

Every query head of a kv head's group reads that kv head's memory. The forward kernel, one program per
(d_v block, batch x kv head), holds M's d_v block and z in registers, walks the segments in order,
writes R and saves (M, z) before each segment (segments x d_k x d_v per kv head, the only saved
state besides the inputs).

Backward, walking the segments in reverse with dM = dL/dM', dz = dL/dz' after the segment:

    fold:       du_t = sigma(k_t) dM,  dv_t = du_t,  dsigma(k_t) = dM u_t + dz,  dM_before = dM, dz_before = dz
    delta rule: dc_t = -du_t,  dn_t = dc_t / d_t,  dd_t = -(dc_t . c_t) / d_t
                dsigma(k_t) += M dn_t + dd_t z,  dM_before += sigma(k_t)^T dn_t,  dz_before += dd_t sigma(k_t)
    retrieval:  dn_t = dR_t / d_t,  dd_t = -(dR_t . R_t) / d_t
                dsigma(q_t) = M dn_t + dd_t z,  dM_before += sigma(q_t)^T dn_t,  dz_before += dd_t sigma(q_t)
    sigma'(x) = 1 for x > 0, exp(x) otherwise.

A program owns a block of d_v columns. dM's columns are its own, but dd_t, dz and dsigma(.) sum over
all of d_v: each program computes its block's share of them, and since nothing downstream of dz or
dd_t is nonlinear (dz only adds into dsigma(k) and into itself), the shares are written per block and
summed in torch. Products run as IEEE float32 (float64 for float64 inputs): the memory sums many
segments and the retrieval divides two of its products.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["infini_memory_triton"]


def infini_memory_triton(q, k, v, M, z, segment_len: int, delta_rule: bool, block_t: int = 32):
    """Retrieval of every token and the memory after every complete segment, segments from token 0.

    q [batch, L, heads, d_k], k [batch, L, kv_heads, d_k], v [batch, L, kv_heads, d_v]; M [batch,
    kv_heads, d_k, d_v], z [batch, kv_heads, d_k] in the accumulation dtype. Returns (R [batch, L,
    heads, d_v] in the accumulation dtype, M, z after the last complete segment), differentiable in
    q, k, v, M, z. block_t: tokens per tile, a power of two >= 16.
    """
    if isinstance(block_t, bool) or not isinstance(block_t, int) or block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t: must be a power of two >= 16 (a Triton dot tile), got {block_t!r}")
    return _InfiniMemory.apply(q, k, v, M, z, segment_len, bool(delta_rule), block_t)


class _InfiniMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, M, z, segment_len, delta_rule, block_t):
        acc = M.dtype
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, length, h, dk = q.shape
        hk, dv = k.shape[2], v.shape[3]
        n_seg = triton.cdiv(length, segment_len)
        meta = _meta(q, k, v, segment_len, delta_rule, block_t)
        mem = torch.empty(b, length, h, dv, dtype=acc, device=q.device)
        m_before = torch.empty(b, hk, max(n_seg, 1), dk, dv, dtype=acc, device=q.device)
        z_before = torch.empty(b, hk, max(n_seg, 1), dk, dtype=acc, device=q.device)
        m_out, z_out = torch.empty_like(M), torch.empty_like(z)
        grid = (triton.cdiv(dv, meta["BLOCK_DV"]), b * hk)
        _fwd_kernel[grid](q, k, v, M.contiguous(), z.contiguous(), mem, m_before, z_before, m_out, z_out,
                          n_seg, **meta)
        ctx.save_for_backward(q, k, v, m_before, z_before)
        ctx.meta, ctx.n_seg, ctx.input_dtypes = meta, n_seg, (q.dtype, k.dtype, v.dtype)
        return mem, m_out, z_out

    @staticmethod
    def backward(ctx, dmem, dM, dz):
        q, k, v, m_before, z_before = ctx.saved_tensors
        meta = ctx.meta
        b, length, h, dk = q.shape
        hk, dv = k.shape[2], v.shape[3]
        acc = m_before.dtype
        dmem = torch.zeros(b, length, h, dv, dtype=acc, device=q.device) if dmem is None else dmem.to(acc).contiguous()
        dM = torch.zeros(b, hk, dk, dv, dtype=acc, device=q.device) if dM is None else dM.to(acc).contiguous()
        dz = torch.zeros(b, hk, dk, dtype=acc, device=q.device) if dz is None else dz.to(acc).contiguous()
        n_dvb = triton.cdiv(dv, meta["BLOCK_DV"])
        dq = torch.empty(n_dvb, b, length, h, dk, dtype=acc, device=q.device)
        dkk = torch.empty(n_dvb, b, length, hk, dk, dtype=acc, device=q.device)
        dvv = torch.empty(b, length, hk, dv, dtype=acc, device=q.device)
        dM0 = torch.empty(b, hk, dk, dv, dtype=acc, device=q.device)
        dz0 = torch.empty(n_dvb, b, hk, dk, dtype=acc, device=q.device)
        _bwd_kernel[(n_dvb, b * hk)](q, k, v, m_before, z_before, dmem, dM, dz, dq, dkk, dvv, dM0, dz0,
                                     ctx.n_seg, **meta)
        qd, kd, vd = ctx.input_dtypes
        return dq.sum(0).to(qd), dkk.sum(0).to(kd), dvv.to(vd), dM0, dz0.sum(0), None, None, None


def _meta(q, k, v, segment_len, delta_rule, block_t):
    b, length, h, dk = q.shape
    hk, dv = k.shape[2], v.shape[3]
    # the length is a runtime argument (a new length must not compile a new kernel), shapes are not
    return dict(L=length, H=h, HK=hk, DK=dk, DV=dv, SEG=segment_len, DELTA=delta_rule, BLOCK_T=block_t,
                BLOCK_DK=max(16, triton.next_power_of_2(dk)), BLOCK_DV=min(64, max(16, triton.next_power_of_2(dv))))


@triton.jit
def _sigma(x):
    return tl.where(x > 0, x + 1.0, tl.exp(x))


@triton.jit
def _sigma_grad(x):
    return tl.where(x > 0, 1.0, tl.exp(x))


@triton.jit
def _read(s, M, z):
    """(n, d, filled, R) of rows s [T, d_k] against the memory; R = n / d, 0 where d = 0."""
    num = tl.dot(s, M, input_precision="ieee")
    den = tl.sum(s * z[None, :], 1)
    filled = den > 0
    safe = tl.where(filled, den, 1.0)
    return num, safe, filled, tl.where(filled[:, None], num / safe[:, None], 0.0)


@triton.jit
def _fwd_kernel(Q, K, V, M0, Z0, MEM, MB, ZB, MF, ZF, n_seg,
                L, H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                SEG: tl.constexpr, DELTA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    vb, bn = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: b * L * H * D may pass 2^31
    b, n = bn // HK, bn % HK
    G: tl.constexpr = H // HK
    dd = tl.arange(0, BLOCK_DK)
    ee = vb * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dd < DK, ee < DV
    mmask = dk_ok[:, None] & dv_ok[None, :]
    acc_dt = M0.dtype.element_ty
    M = tl.load(M0 + (bn * DK + dd[:, None]) * DV + ee[None, :], mask=mmask, other=0.0)
    z = tl.load(Z0 + bn * DK + dd, mask=dk_ok, other=0.0)
    for s in range(0, n_seg):
        tl.store(MB + ((bn * n_seg + s) * DK + dd[:, None]) * DV + ee[None, :], M, mask=mmask)
        tl.store(ZB + (bn * n_seg + s) * DK + dd, z, mask=dk_ok)
        start = s * SEG
        end = tl.minimum(start + SEG, L)
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            qmask = (rows[:, None] < end) & dk_ok[None, :]
            for g in range(0, G):
                hq = n * G + g
                x = tl.load(Q + ((b * L + rows[:, None]) * H + hq) * DK + dd[None, :], mask=qmask, other=0.0)
                sq = tl.where(qmask, _sigma(x.to(acc_dt)), 0.0)
                _, _, _, r = _read(sq, M, z)
                tl.store(MEM + ((b * L + rows[:, None]) * H + hq) * DV + ee[None, :], r,
                         mask=(rows[:, None] < end) & dv_ok[None, :])
        if end - start == SEG:
            dM = tl.zeros([BLOCK_DK, BLOCK_DV], acc_dt)
            dz = tl.zeros([BLOCK_DK], acc_dt)
            for t0 in range(start, end, BLOCK_T):
                rows = t0 + tl.arange(0, BLOCK_T)
                kmask = (rows[:, None] < end) & dk_ok[None, :]
                x = tl.load(K + ((b * L + rows[:, None]) * HK + n) * DK + dd[None, :], mask=kmask, other=0.0)
                sk = tl.where(kmask, _sigma(x.to(acc_dt)), 0.0)
                u = tl.load(V + ((b * L + rows[:, None]) * HK + n) * DV + ee[None, :],
                            mask=(rows[:, None] < end) & dv_ok[None, :], other=0.0).to(acc_dt)
                if DELTA:
                    _, _, _, c = _read(sk, M, z)
                    u = u - c
                dM += tl.dot(tl.trans(sk), u, input_precision="ieee")
                dz += tl.sum(sk, 0)
            M += dM
            z += dz
    tl.store(MF + (bn * DK + dd[:, None]) * DV + ee[None, :], M, mask=mmask)
    tl.store(ZF + bn * DK + dd, z, mask=dk_ok)


@triton.jit
def _bwd_kernel(Q, K, V, MB, ZB, DMEM, DMF, DZF, DQ, DKK, DVV, DM0, DZ0, n_seg,
                L, H: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                SEG: tl.constexpr, DELTA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    vb, bn = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: b * L * H * D may pass 2^31
    b, n = bn // HK, bn % HK
    B = tl.num_programs(1) // HK
    G: tl.constexpr = H // HK
    dd = tl.arange(0, BLOCK_DK)
    ee = vb * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dd < DK, ee < DV
    mmask = dk_ok[:, None] & dv_ok[None, :]
    acc_dt = MB.dtype.element_ty
    dM = tl.load(DMF + (bn * DK + dd[:, None]) * DV + ee[None, :], mask=mmask, other=0.0)
    dz = tl.load(DZF + bn * DK + dd, mask=dk_ok, other=0.0)
    dz = tl.where(vb == 0, dz, 0.0)  # the upstream dz enters once; every block adds its own share
    for t in range(0, n_seg):
        s = n_seg - 1 - t
        M = tl.load(MB + ((bn * n_seg + s) * DK + dd[:, None]) * DV + ee[None, :], mask=mmask, other=0.0)
        z = tl.load(ZB + (bn * n_seg + s) * DK + dd, mask=dk_ok, other=0.0)
        start = s * SEG
        end = tl.minimum(start + SEG, L)
        dM_before, dz_before = dM, dz
        if end - start == SEG:
            for t0 in range(start, end, BLOCK_T):
                rows = t0 + tl.arange(0, BLOCK_T)
                kmask = (rows[:, None] < end) & dk_ok[None, :]
                vmask = (rows[:, None] < end) & dv_ok[None, :]
                x = tl.load(K + ((b * L + rows[:, None]) * HK + n) * DK + dd[None, :], mask=kmask, other=0.0).to(acc_dt)
                sk = tl.where(kmask, _sigma(x), 0.0)
                u = tl.load(V + ((b * L + rows[:, None]) * HK + n) * DV + ee[None, :], mask=vmask, other=0.0).to(acc_dt)
                du = tl.dot(sk, dM, input_precision="ieee")
                if DELTA:
                    _, den, filled, c = _read(sk, M, z)
                    u = u - c
                    dn = tl.where(filled[:, None], -du / den[:, None], 0.0)
                    dden = tl.where(filled, tl.sum(du * c, 1) / den, 0.0)
                    dsk = (tl.dot(u, tl.trans(dM), input_precision="ieee") + dz[None, :]
                           + tl.dot(dn, tl.trans(M), input_precision="ieee") + dden[:, None] * z[None, :])
                    dM_before += tl.dot(tl.trans(sk), dn, input_precision="ieee")
                    dz_before += tl.sum(dden[:, None] * sk, 0)
                else:
                    dsk = tl.dot(u, tl.trans(dM), input_precision="ieee") + dz[None, :]
                tl.store(DVV + ((b * L + rows[:, None]) * HK + n) * DV + ee[None, :], du, mask=vmask)
                tl.store(DKK + (((vb * B + b) * L + rows[:, None]) * HK + n) * DK + dd[None, :], dsk * _sigma_grad(x),
                         mask=kmask)
        else:
            # an unfolded tail: its keys and values never reach the memory
            for t0 in range(start, end, BLOCK_T):
                rows = t0 + tl.arange(0, BLOCK_T)
                tl.store(DVV + ((b * L + rows[:, None]) * HK + n) * DV + ee[None, :],
                         tl.zeros([BLOCK_T, BLOCK_DV], acc_dt), mask=(rows[:, None] < end) & dv_ok[None, :])
                tl.store(DKK + (((vb * B + b) * L + rows[:, None]) * HK + n) * DK + dd[None, :],
                         tl.zeros([BLOCK_T, BLOCK_DK], acc_dt), mask=(rows[:, None] < end) & dk_ok[None, :])
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            qmask = (rows[:, None] < end) & dk_ok[None, :]
            for g in range(0, G):
                hq = n * G + g
                x = tl.load(Q + ((b * L + rows[:, None]) * H + hq) * DK + dd[None, :], mask=qmask, other=0.0).to(acc_dt)
                sq = tl.where(qmask, _sigma(x), 0.0)
                dr = tl.load(DMEM + ((b * L + rows[:, None]) * H + hq) * DV + ee[None, :],
                             mask=(rows[:, None] < end) & dv_ok[None, :], other=0.0)
                _, den, filled, r = _read(sq, M, z)
                dn = tl.where(filled[:, None], dr / den[:, None], 0.0)
                dden = tl.where(filled, -tl.sum(dr * r, 1) / den, 0.0)
                dsq = tl.dot(dn, tl.trans(M), input_precision="ieee") + dden[:, None] * z[None, :]
                dM_before += tl.dot(tl.trans(sq), dn, input_precision="ieee")
                dz_before += tl.sum(dden[:, None] * sq, 0)
                tl.store(DQ + (((vb * B + b) * L + rows[:, None]) * H + hq) * DK + dd[None, :], dsq * _sigma_grad(x),
                         mask=qmask)
        dM, dz = dM_before, dz_before
    tl.store(DM0 + (bn * DK + dd[:, None]) * DV + ee[None, :], dM, mask=mmask)
    tl.store(DZ0 + ((vb * B + b) * HK + n) * DK + dd, dz, mask=dk_ok)
