"""The delta rule's chunk-to-chunk pass (`zoo.ops.delta`) as Triton kernels, forward and backward.

`delta_rule` prepares every chunk's parallel part at once in torch (the pair products, the triangular solve of
the WY / UT form: batched matmuls a GPU runs well). What is left is sequential: per (batch, head), chunks
c = 0 .. n-1 of C tokens, the state S [d_k, d_v] entering each,

    U_c = Wv_c - Wk_c S                  the corrected writes            [C, d_v]
    O_c = Q_c S + P_c U_c                the chunk's output              [C, d_v]
    S  <- E_c * S + K_c^T U_c            E_c a factor per key channel    [d_k] (rows of S)

with Wv, Wk = T (beta V), T (beta e^c K); Q = e^c q; P the decayed, masked q.k pairs; K = e^{c_C - c_j} k; E the
decay to the chunk's end (zero where a document starts). In torch that is a Python loop of small matmuls, one
launch each; here one program per (d_v block, batch x head) holds its columns of S and walks the chunks, saving
S before each chunk (n x d_k x d_v per head, the only state kept for the backward besides the inputs).

Every column of S, U and O depends only on the same columns, so d_v blocks are independent going forward.
Backward, walking the chunks in reverse with dS = dL/dS after chunk c (U recomputed from the saved S):

    dU  = P^T dO + K dS                  dWv = dU
    dWk = -dU S^T     dQ = dO S^T     dP = dO U^T     dK = U dS^T     dE = rowsum(S * dS)
    dS <- Q^T dO - Wk^T dU + E * dS      (the gradient of the state entering the chunk)

dWk, dQ, dP, dK and dE sum over all of d_v: each program writes its block's share and torch adds the shares.
Products run as IEEE float32 (float64 for float64 inputs): the state carries thousands of tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["delta_chunk_scan_triton"]


def delta_chunk_scan_triton(Wv, Wk, Q, P, K, E, state):
    """The chunk pass: Wv [b, n, h, C, d_v]; Wk, Q, K [b, n, h, C, d_k]; P [b, n, h, C, C]; E [b, n, h, d_k];
    state [b, h, d_k, d_v], all in one accumulation dtype (float32 or float64). Returns (O [b, n, h, C, d_v], the
    state after the last chunk), differentiable in every input."""
    return _DeltaChunkScan.apply(Wv, Wk, Q, P, K, E, state)


def _heads_first(x):
    """[b, n, h, ...] -> [b, h, n, ...] contiguous: one program reads its head's chunks in order."""
    return x.transpose(1, 2).contiguous()


def _chunks_first(x):
    return x.transpose(1, 2)


class _DeltaChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Wv, Wk, Q, P, K, E, state):
        b, n, h, C, dv = Wv.shape
        dk = Wk.shape[-1]
        acc = state.dtype
        Wv, Wk, Q, P, K, E = (_heads_first(x) for x in (Wv, Wk, Q, P, K, E))
        meta = _meta(n, C, dk, dv)
        O = torch.empty(b, h, n, C, dv, dtype=acc, device=Wv.device)
        before = torch.empty(b, h, max(n, 1), dk, dv, dtype=acc, device=Wv.device)
        final = torch.empty(b, h, dk, dv, dtype=acc, device=Wv.device)
        grid = (triton.cdiv(dv, meta["BLOCK_DV"]), b * h)
        _fwd_kernel[grid](Wv, Wk, Q, P, K, E, state.contiguous(), O, before, final, n, **meta)
        ctx.save_for_backward(Wv, Wk, Q, P, K, E, before)
        ctx.meta = meta
        return _chunks_first(O), final

    @staticmethod
    def backward(ctx, dO, dfinal):
        Wv, Wk, Q, P, K, E, before = ctx.saved_tensors
        meta = ctx.meta
        b, h, n, C, dv = Wv.shape
        dk, acc = Wk.shape[-1], before.dtype
        dO = (torch.zeros(b, h, n, C, dv, dtype=acc, device=Wv.device) if dO is None
              else _heads_first(dO.to(acc)))
        dfinal = (torch.zeros(b, h, dk, dv, dtype=acc, device=Wv.device) if dfinal is None
                  else dfinal.to(acc).contiguous())
        n_dvb = triton.cdiv(dv, meta["BLOCK_DV"])
        dWv = torch.empty_like(Wv)
        shares = {name: torch.empty(n_dvb, *x.shape, dtype=acc, device=Wv.device)
                  for name, x in (("Wk", Wk), ("Q", Q), ("P", P), ("K", K), ("E", E))}
        dstate = torch.empty(b, h, dk, dv, dtype=acc, device=Wv.device)
        _bwd_kernel[(n_dvb, b * h)](Wv, Wk, Q, P, K, E, before, dO, dfinal, dWv, shares["Wk"], shares["Q"],
                                    shares["P"], shares["K"], shares["E"], dstate, n, **meta)
        dWk, dQ, dP, dK, dE = (_chunks_first(shares[name].sum(0)) for name in ("Wk", "Q", "P", "K", "E"))
        return _chunks_first(dWv), dWk, dQ, dP, dK, dE, dstate


def _meta(n, C, dk, dv):
    # the number of chunks is a runtime argument (a new length must not compile a new kernel), tile sizes are not
    return dict(C=C, DK=dk, DV=dv, BLOCK_C=max(16, triton.next_power_of_2(C)),
                BLOCK_DK=max(16, triton.next_power_of_2(dk)), BLOCK_DV=min(64, max(16, triton.next_power_of_2(dv))))


@triton.jit
def _tile(ptr, rows, cols, n_rows, n_cols, stride):
    """rows x cols of a row-major [n_rows, n_cols] matrix at ptr, zero outside it."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _put(ptr, x, rows, cols, n_rows, n_cols, stride):
    tl.store(ptr + rows[:, None] * stride + cols[None, :], x,
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _chunk(WV, WK, Q, P, K, E, at, cc, dd, ee, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    """Chunk `at`'s tiles: Wv (this program's d_v columns), Wk, Q, P, K and the decay E."""
    return (_tile(WV + at * C * DV, cc, ee, C, DV, DV), _tile(WK + at * C * DK, cc, dd, C, DK, DK),
            _tile(Q + at * C * DK, cc, dd, C, DK, DK), _tile(P + at * C * C, cc, cc, C, C, C),
            _tile(K + at * C * DK, cc, dd, C, DK, DK), tl.load(E + at * DK + dd, mask=dd < DK, other=0.0))


@triton.jit
def _fwd_kernel(WV, WK, Q, P, K, E, S0, O, SB, SF, n_chunks,
                C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    vb, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: b * h * t * d may pass 2^31
    cc = tl.arange(0, BLOCK_C)
    dd = tl.arange(0, BLOCK_DK)
    ee = vb * BLOCK_DV + tl.arange(0, BLOCK_DV)
    S = _tile(S0 + bh * DK * DV, dd, ee, DK, DV, DV)
    for c in range(0, n_chunks):
        at = bh * n_chunks + c                      # the chunk's index in [b * h, n]
        _put(SB + at * DK * DV, S, dd, ee, DK, DV, DV)
        wv, wk, q, p, k, e = _chunk(WV, WK, Q, P, K, E, at, cc, dd, ee, C, DK, DV)
        u = wv - tl.dot(wk, S, input_precision="ieee")
        o = tl.dot(q, S, input_precision="ieee") + tl.dot(p, u, input_precision="ieee")
        _put(O + at * C * DV, o, cc, ee, C, DV, DV)
        S = e[:, None] * S + tl.dot(tl.trans(k), u, input_precision="ieee")
    _put(SF + bh * DK * DV, S, dd, ee, DK, DV, DV)


@triton.jit
def _bwd_kernel(WV, WK, Q, P, K, E, SB, DO, DSF, DWV, DWK, DQ, DP, DKK, DE, DS0, n_chunks,
                C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    vb, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    share = (vb * tl.num_programs(1) + bh) * n_chunks    # this block's slice of the [n_dvb, b * h, n] shares
    cc = tl.arange(0, BLOCK_C)
    dd = tl.arange(0, BLOCK_DK)
    ee = vb * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dS = _tile(DSF + bh * DK * DV, dd, ee, DK, DV, DV)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        at = bh * n_chunks + c
        S = _tile(SB + at * DK * DV, dd, ee, DK, DV, DV)
        wv, wk, q, p, k, e = _chunk(WV, WK, Q, P, K, E, at, cc, dd, ee, C, DK, DV)
        do = _tile(DO + at * C * DV, cc, ee, C, DV, DV)
        u = wv - tl.dot(wk, S, input_precision="ieee")
        du = tl.dot(tl.trans(p), do, input_precision="ieee") + tl.dot(k, dS, input_precision="ieee")
        _put(DWV + at * C * DV, du, cc, ee, C, DV, DV)
        _put(DWK + (share + c) * C * DK, -tl.dot(du, tl.trans(S), input_precision="ieee"), cc, dd, C, DK, DK)
        _put(DQ + (share + c) * C * DK, tl.dot(do, tl.trans(S), input_precision="ieee"), cc, dd, C, DK, DK)
        _put(DP + (share + c) * C * C, tl.dot(do, tl.trans(u), input_precision="ieee"), cc, cc, C, C, C)
        _put(DKK + (share + c) * C * DK, tl.dot(u, tl.trans(dS), input_precision="ieee"), cc, dd, C, DK, DK)
        tl.store(DE + (share + c) * DK + dd, tl.sum(S * dS, 1), mask=dd < DK)
        dS = (tl.dot(tl.trans(q), do, input_precision="ieee") - tl.dot(tl.trans(wk), du, input_precision="ieee")
              + e[:, None] * dS)
    _put(DS0 + bh * DK * DV, dS, dd, ee, DK, DV, DV)
