"""Selective attention (Leviathan, Kalman & Matias, arXiv 2410.02703) as fused Triton kernels, forward
and backward, flash-attention style: no length x length tensor exists at any point.

The math is `zoo.ops.selective`'s (read its docstring first). Per batch row, with p_i = Lk - Lq + i the
key position of query i, scale s and C_j the carried scores of cached keys (0 for the new ones):

    l^h_ij = s q^h_i . k^h_j                        (every head h; kv head by GQA)
    S_ij   = ReLU(l^0_ij) [0 < j < p_i]              (head 0, BOS column and diagonal zeroed)
    F_ij   = C_j + sum_{i' < i} S_i'j                (exclusive running column sums)
    x^h_ij = l^h_ij - F_ij,  P^h = softmax_j(x^h) over j <= p_i,  O^h_i = sum_j P^h_ij v_j
    final_j = C_j + sum_i S_ij                       (the scores a cache keeps)

Forward, two kernels:
  1. `_colsum_kernel`, one program per (key block, batch row), walks the query blocks in order and
     writes F at the first row of every query block, Fblk[b, query block, j] (Lq / BLOCK_M rows of Lk,
     the only quadratic-in-blocks buffer: length^2 / BLOCK_M floats), then final_j.
  2. `_fwd_kernel`, one program per (query block, batch x head): for each key block it recomputes
     head 0's tile S, F = Fblk + the exclusive cumulative sum of S down the block's rows, and runs
     the online softmax on x = l^h - F; it writes out and lse = log sum_j exp(x^h_ij).

Backward. With dO the upstream gradient, D^h_i = dO^h_i . O^h_i and the usual softmax backward

    dx^h_ij = P^h_ij (dO^h_i . v_j - D^h_i),   dl^h_ij = dx^h_ij   (the direct path),

F enters every head's x with a minus sign, so dF_ij = -sum_h dx^h_ij. F_ij sums S over the strictly
earlier queries, hence S_i'j reaches F_ij of every later query i > i' and final_j:

    dS_i'j = G_i'j = dfinal_j + sum_{i > i'} dF_ij    (a reverse exclusive cumulative sum over queries)
    dC_j   = dfinal_j + sum_i dF_ij
    dl^0_ij += G_ij [l^0_ij > 0] [0 < j < p_i]          (the ReLU and the mask of S)

and dq^h_i = s sum_j dl^h_ij k_j, dk_j = s sum_{i,h} dl^h_ij q^h_i (summed into kv heads), dv_j =
sum_{i,h} P^h_ij dO^h_i. The coupling dF -> G runs along queries for a fixed key, so the backward
kernel `_bwd_kernel` is key-block parallel, one program per (key block, batch x head), and walks the
query blocks from the last to the first carrying the running column sum of dF for its keys. Every
step after G is linear in dF, and dF is a sum over heads, so each head's program carries its own
sum_i dF^h (head 0's starting at dfinal) and adds its share of the extra head-0 term: extra^h =
G^h [l^0 > 0][0 < j < p_i] goes into dk of kv head 0 (s extra^T q^0) and into dq of query head 0
(s extra k^0). The shares sum to the exact gradient. dq reaches a query block from many key-block
programs, so it is accumulated with atomic adds in the accumulation dtype; dk, dv and the head-0
extra are written per query head and summed over the group in torch, which keeps them deterministic.

Cost per tile against FlashAttention's 2 forward / 5 backward tile products: 3 forward (head 0's
logits for S, head h's logits, P V) and 8 backward (head 0's and head h's logits, dO V^T, P^T dO,
dx^T q, dx k, extra^T q^0, extra k^0), plus kernel 1 (one head's logits over half the tiles).

Arithmetic: tiles are loaded in the input dtype, products accumulate in float32 (float64 for float64
inputs, where Triton's dot runs in float64, also under TRITON_INTERPRET=1); float32 inputs use IEEE
products, not TF32, since F sums many rounded logits. Output in q's dtype; lse and scores in the
accumulation dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from zoo.ops.dtypes import accumulation_dtype

__all__ = ["selective_attention_triton"]


def selective_attention_triton(q, k, v, scale: Optional[float] = None, *, scores: Optional[torch.Tensor] = None,
                               return_scores: bool = False, return_lse: bool = False,
                               block_m: Optional[int] = None, block_n: Optional[int] = None):
    """`zoo.ops.selective.selective_attention` by the fused kernels (inputs are checked by the caller).

    q [batch, Lq, heads, d], k [batch, Lk, kv_heads, d], v [batch, Lk, kv_heads, dv], Lq <= Lk, the
    queries being the last Lq keys; scores [batch, Lk - Lq] for the cached keys (None when Lk = Lq).
    Returns out, then (with `return_scores`) final scores [batch, Lk], then (with `return_lse`)
    lse [batch, heads, Lq], which carries no gradient. block_m, block_n: query / key tile sizes,
    powers of two >= 16; by default the largest of 64, 32, 16 that fits an H100's shared memory
    (`_default_tile`).
    """
    tile = _default_tile(q.dtype, max(q.shape[-1], v.shape[-1]))
    block_m, block_n = (tile if blk is None else blk for blk in (block_m, block_n))
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(blk, bool) or not isinstance(blk, int) or blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name}: must be a power of two >= 16 (a Triton dot tile), got {blk!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, final, lse = _SelectiveAttention.apply(q, k, v, scores, scale, block_m, block_n)
    res = (out,) + ((final,) if return_scores else ()) + ((lse,) if return_lse else ())
    return res[0] if len(res) == 1 else res


class _SelectiveAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scores, scale, block_m, block_n):
        acc = accumulation_dtype(q.dtype)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, lq, h, d = q.shape
        lk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
        off = lk - lq
        carried = scores.to(acc).contiguous() if scores is not None else q.new_zeros(b, 1, dtype=acc)
        n_qb, n_kb = triton.cdiv(lq, block_m), triton.cdiv(lk, block_n)
        fblk = torch.empty(b, max(n_qb, 1), lk, dtype=acc, device=q.device)
        final = torch.empty(b, lk, dtype=acc, device=q.device)
        out = torch.empty(b, lq, h, dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h, lq, dtype=acc, device=q.device)
        # Lengths are runtime arguments: a decode step (Lk + 1 each time) must not compile a new kernel.
        common = dict(LQ=lq, LK=lk, H=h, HK=hk, D=d, DV=dv, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), IEEE=q.dtype != torch.bfloat16 and q.dtype != torch.float16)
        if lq:
            _colsum_kernel[(n_kb, b)](q, k, carried, fblk, final, scale, off, carried.shape[1], **common)
            _fwd_kernel[(n_qb, b * h)](q, k, v, fblk, out, lse, scale, off, **common)
        else:
            final.copy_(carried[:, :lk])
        ctx.save_for_backward(q, k, v, out, lse, fblk)
        ctx.scale, ctx.common, ctx.has_scores = scale, common, scores is not None
        ctx.mark_non_differentiable(lse)
        return out, final, lse

    @staticmethod
    def backward(ctx, dout, dfinal, _dlse):
        q, k, v, out, lse, fblk = ctx.saved_tensors
        common = ctx.common
        b, lq, h, d = q.shape
        lk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
        acc = lse.dtype
        if dout is None:
            dout = torch.zeros_like(out)
        if dfinal is None:
            dfinal = torch.zeros(b, lk, dtype=acc, device=q.device)
        dout, dfinal = dout.contiguous(), dfinal.to(acc).contiguous()
        # D^h_i = dO^h_i . O^h_i, the row term of the softmax backward.
        delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()
        dq = torch.zeros(b, lq, h, d, dtype=acc, device=q.device)
        dk_h = torch.empty(b, lk, h, d, dtype=acc, device=q.device)
        dk0_h = torch.empty(b, lk, h, d, dtype=acc, device=q.device)
        dv_h = torch.empty(b, lk, h, dv, dtype=acc, device=q.device)
        dcarry = torch.empty(b, h, lk, dtype=acc, device=q.device)
        if lq:
            n_kb = triton.cdiv(lk, common["BLOCK_N"])
            _bwd_kernel[(n_kb, b * h)](q, k, v, dout, lse, delta, fblk, dfinal, dq, dk_h, dk0_h, dv_h, dcarry,
                                       ctx.scale, lk - lq, **common)
        else:
            dk_h.zero_(), dk0_h.zero_(), dv_h.zero_()
            dcarry.zero_()
            dcarry[:, 0] = dfinal
        g = h // hk
        dk = dk_h.view(b, lk, hk, g, d).sum(3)
        dk[:, :, 0] += dk0_h.sum(2)
        dvv = dv_h.view(b, lk, hk, g, dv).sum(3)
        dscores = dcarry.sum(1)[:, :lk - lq] if ctx.has_scores else None
        return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), dscores, None, None, None


def _default_tile(dtype: torch.dtype, head_dim: int) -> int:
    """64-wide tiles while an element row of a tile (bytes x padded head_dim) is at most 256 bytes,
    32 up to 512, else 16. Shared memory per block compiled for sm_90 (benchmarks/compile_kernels.py),
    forward / backward: bf16 d128 at 64: 81 / 98 KiB; fp32 d64 at 64: 145 / 146 KiB; fp32 d128 at 64:
    273 / 290 KiB, at 32: 132 / 145 KiB; fp64 d64 at 64: 273 / 403 KiB, at 32: 137 / 190 KiB. An H100
    allows 227 KiB."""
    row = torch.empty((), dtype=dtype).element_size() * _pow2(head_dim)
    return 64 if row <= 256 else 32 if row <= 512 else 16


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _head0_scores(q0, k0, rows, cols, p, scale, LQ, IEEE: tl.constexpr):
    """Head 0's logits of one tile and S = ReLU(logits) where 0 < j < p_i on a real query row."""
    if IEEE:
        l0 = tl.dot(q0, tl.trans(k0), input_precision="ieee") * scale
    else:
        l0 = tl.dot(q0, tl.trans(k0)) * scale
    selected = (cols[None, :] > 0) & (cols[None, :] < p[:, None]) & (rows[:, None] < LQ)
    return l0, selected, tl.where(selected, tl.maximum(l0, 0.0), 0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _colsum_kernel(Q, K, C, FBLK, FINAL, scale, off, n_carried,
                   LQ, LK, H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                   DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    kb, b = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: b * L * H * D may pass 2^31
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    k0 = tl.load(K + ((b * LK + cols[:, None]) * HK) * D + dd[None, :], mask=(cols[:, None] < LK) & (dd[None, :] < D),
                 other=0.0)
    run = tl.load(C + b * n_carried + cols, mask=cols < off, other=0.0)
    n_qb = tl.cdiv(LQ, BLOCK_M)
    # The first query block holding a query that sees key kb * BLOCK_N; earlier blocks never read F here.
    first = tl.maximum(kb * BLOCK_N - off, 0) // BLOCK_M
    for qb in range(first, n_qb):
        tl.store(FBLK + (b * n_qb + qb) * LK + cols, run, mask=cols < LK)
        rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        q0 = tl.load(Q + ((b * LQ + rows[:, None]) * H) * D + dd[None, :], mask=(rows[:, None] < LQ) & (dd[None, :] < D),
                     other=0.0)
        _, _, s = _head0_scores(q0, k0, rows, cols, off + rows, scale, LQ, IEEE)
        run += tl.sum(s, 0)
    tl.store(FINAL + b * LK + cols, run, mask=cols < LK)


@triton.jit
def _fwd_kernel(Q, K, V, FBLK, OUT, LSE, scale, off,
                LQ, LK, H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    qb, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    hk = h // (H // HK)
    n_qb = tl.cdiv(LQ, BLOCK_M)
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    p = off + rows
    dd, de = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    row_ok = rows < LQ
    qmask = row_ok[:, None] & (dd[None, :] < D)
    qh = tl.load(Q + ((b * LQ + rows[:, None]) * H + h) * D + dd[None, :], mask=qmask, other=0.0)
    q0 = tl.load(Q + ((b * LQ + rows[:, None]) * H) * D + dd[None, :], mask=qmask, other=0.0)
    acc_dt = FBLK.dtype.element_ty
    m = tl.full([BLOCK_M], float("-inf"), acc_dt)
    l = tl.zeros([BLOCK_M], acc_dt)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], acc_dt)
    kend = tl.minimum(off + (qb + 1) * BLOCK_M, LK)  # keys the block's last query sees, itself included
    for kb in range(0, tl.cdiv(kend, BLOCK_N)):
        cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = (cols[:, None] < LK) & (dd[None, :] < D)
        k0 = tl.load(K + ((b * LK + cols[:, None]) * HK) * D + dd[None, :], mask=kmask, other=0.0)
        kh = tl.load(K + ((b * LK + cols[:, None]) * HK + hk) * D + dd[None, :], mask=kmask, other=0.0)
        vh = tl.load(V + ((b * LK + cols[:, None]) * HK + hk) * DV + de[None, :],
                     mask=(cols[:, None] < LK) & (de[None, :] < DV), other=0.0)
        _, _, s = _head0_scores(q0, k0, rows, cols, p, scale, LQ, IEEE)
        f0 = tl.load(FBLK + (b * n_qb + qb) * LK + cols, mask=cols < LK, other=0.0)
        f = f0[None, :] + tl.cumsum(s, 0) - s
        x = _dot(qh, tl.trans(kh), IEEE) * scale - f
        x = tl.where((cols[None, :] <= p[:, None]) & (cols[None, :] < LK), x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        # A row can meet a tile it sees nothing of before any key it sees (keys with infinite carried F,
        # the left-padded cache of zoo.hf): shift by 0 then, not by -inf, which would give NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        pexp = tl.exp(x - shift[:, None])
        l = l * alpha + tl.sum(pexp, 1)
        acc = acc * alpha[:, None] + _dot(pexp.to(vh.dtype), vh, IEEE)
        m = m_new
    out = acc / l[:, None]
    tl.store(OUT + ((b * LQ + rows[:, None]) * H + h) * DV + de[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (de[None, :] < DV))
    tl.store(LSE + (b * H + h) * LQ + rows, m + tl.log(l), mask=row_ok)


@triton.jit
def _bwd_kernel(Q, K, V, DO, LSE, DELTA, FBLK, DFINAL, DQ, DK, DK0, DVH, DCARRY, scale, off,
                LQ, LK, H: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    kb, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    hk = h // (H // HK)
    n_qb = tl.cdiv(LQ, BLOCK_M)
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    dd, de = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    col_ok = cols < LK
    kmask = col_ok[:, None] & (dd[None, :] < D)
    vmask = col_ok[:, None] & (de[None, :] < DV)
    k0 = tl.load(K + ((b * LK + cols[:, None]) * HK) * D + dd[None, :], mask=kmask, other=0.0)
    kh = tl.load(K + ((b * LK + cols[:, None]) * HK + hk) * D + dd[None, :], mask=kmask, other=0.0)
    vh = tl.load(V + ((b * LK + cols[:, None]) * HK + hk) * DV + de[None, :], mask=vmask, other=0.0)
    acc_dt = FBLK.dtype.element_ty
    dk = tl.zeros([BLOCK_N, BLOCK_D], acc_dt)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D], acc_dt)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], acc_dt)
    # sum over the later queries of this head's dF, head 0 also carrying d final (see the docstring)
    run = tl.load(DFINAL + b * LK + cols, mask=col_ok, other=0.0)
    run = tl.where(h == 0, run, 0.0)
    first = tl.maximum(kb * BLOCK_N - off, 0) // BLOCK_M
    for t in range(0, n_qb - first):
        qb = n_qb - 1 - t
        rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        p = off + rows
        row_ok = rows < LQ
        qmask = row_ok[:, None] & (dd[None, :] < D)
        qh = tl.load(Q + ((b * LQ + rows[:, None]) * H + h) * D + dd[None, :], mask=qmask, other=0.0)
        q0 = tl.load(Q + ((b * LQ + rows[:, None]) * H) * D + dd[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + ((b * LQ + rows[:, None]) * H + h) * DV + de[None, :],
                     mask=row_ok[:, None] & (de[None, :] < DV), other=0.0)
        lse = tl.load(LSE + (b * H + h) * LQ + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + (b * H + h) * LQ + rows, mask=row_ok, other=0.0)
        l0, selected, s = _head0_scores(q0, k0, rows, cols, p, scale, LQ, IEEE)
        f0 = tl.load(FBLK + (b * n_qb + qb) * LK + cols, mask=col_ok, other=0.0)
        f = f0[None, :] + tl.cumsum(s, 0) - s
        x = _dot(qh, tl.trans(kh), IEEE) * scale - f
        seen = (cols[None, :] <= p[:, None]) & col_ok[None, :] & row_ok[:, None]
        prob = tl.where(seen, tl.exp(x - lse[:, None]), 0.0)
        dv += _dot(tl.trans(prob).to(do.dtype), do, IEEE)
        dx = prob * (_dot(do, tl.trans(vh), IEEE) - delta[:, None])
        dk += _dot(tl.trans(dx).to(qh.dtype), qh, IEEE) * scale
        dq_rows = DQ + (b * LQ + rows[:, None]) * H * D + dd[None, :]
        tl.atomic_add(dq_rows + h * D, _dot(dx.to(kh.dtype), kh, IEEE) * scale, mask=qmask)
        # G = later blocks' sum + the rows below within this block; dF = -dx.
        g = run[None, :] - (tl.cumsum(dx, 0, reverse=True) - dx)
        extra = tl.where(selected & (l0 > 0), g, 0.0)
        dk0 += _dot(tl.trans(extra).to(q0.dtype), q0, IEEE) * scale
        tl.atomic_add(dq_rows, _dot(extra.to(k0.dtype), k0, IEEE) * scale, mask=qmask)
        run -= tl.sum(dx, 0)
    tl.store(DK + ((b * LK + cols[:, None]) * H + h) * D + dd[None, :], dk, mask=kmask)
    tl.store(DK0 + ((b * LK + cols[:, None]) * H + h) * D + dd[None, :], dk0, mask=kmask)
    tl.store(DVH + ((b * LK + cols[:, None]) * H + h) * DV + de[None, :], dv, mask=vmask)
    tl.store(DCARRY + (b * H + h) * LK + cols, run, mask=col_ok)
