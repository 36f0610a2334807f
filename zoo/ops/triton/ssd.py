"""Mamba-2 SSD chunked scan (arXiv 2405.21060, section 6) as Triton kernels, forward and backward.

The math and notation are `zoo.ops.ssd`'s (read its docstring first): per chunk of Q steps, with
a_t = dt_t A, cs the cumulative sum of a inside the chunk, u_t = dt_t x_t and H_c the state entering
chunk c,

    y_i   = sum_{j <= i} exp(cs_i - cs_j) (C_i . B_j) u_j + exp(cs_i) H_c C_i + D x_i,  then * silu(z_i)
    S_c   = sum_j exp(cs_end - cs_j) u_j B_j^T,      H_{c+1} = exp(cs_end) H_c + S_c

Forward, three kernels: `_chunk_state_fwd` (S_c and the chunk's decay, one program per chunk and
head), `_state_passing_fwd` (the recurrence over chunks, one program per head and block of the
[p, n] state, which overwrites S_c by H_c in place) and `_chunk_scan_fwd` (the outputs, one program
per chunk and head, D and the z gate fused).

Backward, with dy the gradient of y before the gate (the gate and D are elementwise, done in torch):

    dH_c  = sum_i exp(cs_i) dy_i C_i^T + exp(cs_end(c)) dH_{c+1},   dH_{n_chunks} = d final state
    dS_c  = dH_{c+1},   d dec_c = <dH_{c+1}, H_c>
    dC_i  = sum_{j <= i} exp(cs_i - cs_j) (dy_i . u_j) B_j + exp(cs_i) H_c^T dy_i
    dB_j  = sum_{i >= j} exp(cs_i - cs_j) (dy_i . u_j) C_i + exp(cs_end - cs_j) dS_c^T u_j
    du_j  = sum_{i >= j} exp(cs_i - cs_j) (C_i . B_j) dy_i + exp(cs_end - cs_j) dS_c B_j

and a_k, which sits in cs_i - cs_j exactly when j < k <= i, in cs_i for i >= k and in cs_end - cs_j
for j < k, gets, with T_ij = exp(cs_i - cs_j) (C_i . B_j) (dy_i . u_j):

    da_k = sum_{i >= k} sum_{j < k} T_ij + sum_{i >= k} exp(cs_i) dy_i . H_c C_i
           + sum_{j < k} exp(cs_end - cs_j) u_j . dS_c B_j + d dec_c exp(cs_end)

each sum taken directly over its own terms: the first as a suffix sum over rows of T followed by
a masked row sum (no "row sums minus column sums", which cancels catastrophically where the decay
is strong). `_chunk_dstate_bwd` and `_state_passing_bwd` run the state recurrence backwards;
`_chunk_bwd`, one program per chunk and group of heads sharing B and C, computes all the rest and
sums dB and dC over the group's heads in registers (deterministic, no atomics).

Chunks. One chunk is one tile: the kernels run chunks of min(chunk_size, 64) steps (32 for float32
inputs with large state tiles, see `MAX_TILE`) whatever the caller's chunk_size (results agree
across chunk sizes up to rounding, as for the torch path), so every [Q, Q] product is a single
`tl.dot` and the backward's sums over a chunk stay in registers. head_dim x d_state is limited to 64 x 128 (padded to powers of two; `MAX_TILE`), which fits an
H100's shared memory. Should a device still refuse a kernel (OutOfResources), the call warns and
computes through the torch path (the backward by recomputing the forward there).

Documents (seq_idx, as the running document number of `zoo.ops.ssd`): the masks of the torch
path, from the document of the chunk's last position and of the position before the chunk.

Arithmetic: float32 (float64 for float64 inputs); products of float32 inputs in IEEE float32
unless torch.backends.cuda.matmul.allow_tf32, of half-precision inputs in TF32. Decays are exp of differences of float32 cumulative sums inside
one chunk of at most 64 steps (the torch path's float64 care is for its chunks of up to 256).
Untuned: no GPU was lent when these were written; block shapes are the obvious ones.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

MAX_CHUNK = 64       # steps per chunk: one [Q, Q] tile
# The backward kernel keeps [head_dim, d_state] tiles (the state, its gradient and their products)
# in shared memory. Compiled for sm_90 without a GPU (triton.compile, bf16 inputs), of the 227 KiB
# an H100 block may use: head_dim 64, d_state 128: 209 KiB at Q 64, 157 KiB at Q 32; head_dim 64,
# d_state 256 at Q 32: 285 KiB; head_dim 128, d_state 128 at Q 32: 305 KiB. Larger tiles are
# refused (`zoo.ops.ssd` runs the torch path for them) until the kernel splits d_state. float32
# inputs take more (head_dim 64, d_state 128: 273 KiB at Q 64 with TF32 products; at Q 32, 177 KiB
# with TF32, 209 KiB with IEEE products), so they run chunks of 32 once the tile is above 64 x 64.
# Measured by benchmarks/compile_kernels.py.
MAX_TILE = 64 * 128
STATE_BLOCK = 256    # elements of the [p, n] state per program of the state passing


def ssd_scan_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, doc=None,
                    dt_softplus=False, return_final_states=False, torch_path=None):
    """`zoo.ops.ssd.ssd_scan` on Triton kernels (arguments checked by the caller; doc is the running
    document number of seq_idx, or None). `torch_path(x, dt, A, B, C, chunk, D, z, h0, doc) -> (y, final)`
    is the caller's pure path on these discretised arguments, run where a device refuses a kernel (given by
    zoo.ops.ssd, so that this module never imports it back)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    if dt_softplus:
        dt = F.softplus(dt)
    h, p = x.shape[2], x.shape[3]
    D = None if D is None else (D[:, None] if D.dim() == 1 else D).expand(h, p)
    wide = x.element_size() > 2 and _block(p) * _block(B.shape[3]) > 64 * 64
    Q = max(1, min(chunk_size, MAX_CHUNK // 2 if wide else MAX_CHUNK, x.shape[1]))
    try:
        y, final = _SSDTriton.apply(x, dt, A.to(acc), B, C, D, z, initial_states, doc, Q, torch_path)
    except OutOfResources as err:
        _warn_out_of_resources(err)
        y, final = torch_path(x, dt, A.to(acc), B, C, Q, D, z, initial_states, doc)
    return (y, final) if return_final_states else y


def _warn_out_of_resources(err):
    # Untested shapes on a device with less shared memory than the kernels were sized for: correct
    # results through the torch path rather than a failed step.
    warnings.warn(f"ssd: the Triton kernels do not fit this device ({str(err).splitlines()[0]}); this call "
                  "runs the torch path instead", stacklevel=3)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _dot_precision(dtype) -> str:
    """float64: exact; float32: TF32 only where torch's own float32 matmuls use it
    (torch.backends.cuda.matmul.allow_tf32); half precision: TF32, finer than the inputs."""
    if dtype == torch.float64 or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


class _SSDTriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, h0, doc, Q, torch_path):
        b, length, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        acc = dt.dtype
        nc = triton.cdiv(length, Q)
        states = x.new_empty(b, nc, h, p, n, dtype=acc)
        dec = x.new_empty(b, h, nc, dtype=acc)
        final = x.new_empty(b, h, p, n, dtype=acc)
        y = torch.empty_like(x)
        y_pre = None if z is None else x.new_empty(x.shape, dtype=acc)
        meta = _meta(x, B, Q)
        doc_args = _doc_args(doc)
        _chunk_state_fwd[(nc, b * h)](
            x, *x.stride(), dt, *dt.stride(), A, B, *B.stride(), states, dec, *doc_args,
            length, h, h // g, p, n, **meta)
        h0_ = states if h0 is None else h0.to(acc).contiguous()
        grid = (triton.cdiv(p * n, STATE_BLOCK), b * h)
        _state_passing_fwd[grid](states, dec, h0_, final, nc, h, p * n,
                                 HAS_H0=h0 is not None, BLOCK=STATE_BLOCK)
        D_ = D if D is not None else A[:, None]
        z_ = z if z is not None else x
        _chunk_scan_fwd[(nc, b * h)](
            x, *x.stride(), dt, *dt.stride(), A, B, *B.stride(), C, *C.stride(), states, D_, *D_.stride(),
            z_, *z_.stride(), y, *y.stride(), y_pre if y_pre is not None else y, *doc_args,
            length, h, h // g, p, n, HAS_D=D is not None, HAS_Z=z is not None, **meta)
        ctx.save_for_backward(x, dt, A, B, C, D, z, doc, states, dec, y_pre)
        ctx.torch_path = torch_path
        ctx.Q, ctx.has_h0 = Q, h0 is not None
        return y, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, dt, A, B, C, D, z, doc, states, dec, y_pre = ctx.saved_tensors
        Q = ctx.Q
        b, length, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        acc = dt.dtype
        nc = states.shape[1]
        dz = None
        dy = dout.to(acc)
        if z is not None:
            zf = z.to(acc)
            sig = torch.sigmoid(zf)
            dz = (dy * y_pre * sig * (1 + zf * (1 - sig))).to(z.dtype)
            dy = dy * zf * sig
        meta = _meta(x, B, Q)
        doc_args = _doc_args(doc)
        dS = x.new_empty(b, nc, h, p, n, dtype=acc)
        _chunk_dstate_bwd[(nc, b * h)](
            dy, *dy.stride(), dt, *dt.stride(), A, C, *C.stride(), dS, *doc_args,
            length, h, h // g, p, n, **meta)
        n_blocks = triton.cdiv(p * n, STATE_BLOCK)
        ddec = x.new_empty(b, h, nc, n_blocks, dtype=acc)
        dh0 = x.new_empty(b, h, p, n, dtype=acc)
        dfinal_ = dfinal.to(acc).contiguous() if dfinal is not None else dh0
        _state_passing_bwd[(n_blocks, b * h)](dS, states, dec, dfinal_, ddec, dh0, nc, h, p * n, n_blocks,
                                              HAS_DFINAL=dfinal is not None, BLOCK=STATE_BLOCK)
        ddec = ddec.sum(-1).contiguous()
        dx = torch.empty_like(x, dtype=acc)
        ddt = torch.empty_like(dt)
        dB = torch.empty_like(B, dtype=acc)
        dC = torch.empty_like(C, dtype=acc)
        dA = x.new_empty(b, nc, h, dtype=acc)
        try:
            _chunk_bwd[(nc, b * g)](
                x, *x.stride(), dt, *dt.stride(), A, B, *B.stride(), C, *C.stride(), dy, *dy.stride(),
                states, dS, dec, ddec, dx, *dx.stride(), ddt, *ddt.stride(), dB, *dB.stride(), dC, *dC.stride(),
                dA, *doc_args, length, h, g, h // g, p, n, **meta)
        except OutOfResources as err:
            _warn_out_of_resources(err)
            return _torch_backward(ctx, dout, dfinal)
        dD = None
        if D is not None:
            dx += dy * D.to(acc)
            dD = (dy * x.to(acc)).sum((0, 1))   # [h, p]; a D given as [h] was expanded outside
        return (dx.to(x.dtype), ddt, dA.sum((0, 1)), dB.to(B.dtype), dC.to(C.dtype),
                None if D is None else dD.to(D.dtype), dz, dh0 if ctx.has_h0 else None, None, None, None)


def _torch_backward(ctx, dout, dfinal):
    """The gradients by recomputing the forward through the torch path (the initial state is the
    state entering chunk 0)."""
    x, dt, A, B, C, D, z, doc, states, _, _ = ctx.saved_tensors
    wants = list(ctx.needs_input_grad[:8])
    h0 = states[:, 0] if ctx.has_h0 else None
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(w) for t, w in
                  zip((x, dt, A, B, C, D, z, h0), wants)]
        x_, dt_, A_, B_, C_, D_, z_, h0_ = leaves
        y, final = ctx.torch_path(x_, dt_, A_, B_, C_, ctx.Q, D_, z_, h0_, doc)
        outputs, grads = [y], [dout]
        if dfinal is not None:
            outputs.append(final)
            grads.append(dfinal)
        need = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(outputs, need, grads, allow_unused=True))
    return tuple(next(got) if t is not None and t.requires_grad else None for t in leaves) + (None, None, None)


def _meta(x, B, Q):
    return dict(Q=Q, BLOCK_Q=_block(Q), BLOCK_P=_block(x.shape[3]), BLOCK_N=_block(B.shape[3]),
                PRECISION=_dot_precision(x.dtype))


def _doc_args(doc):
    if doc is None:
        return (None, 0, 0, False)
    return (doc, doc.stride(0), doc.stride(1), True)


# ---- kernels -------------------------------------------------------------------------------------

@triton.jit
def _chunk_decays(dt_ptr, sdt_b, sdt_l, sdt_h, A_ptr, bi, hi, c, length, Q: tl.constexpr, BLOCK_Q: tl.constexpr):
    """dt [BLOCK_Q], a valid-position mask and cs, the cumulative sum of dt A in chunk c (0 past the end)."""
    t = tl.arange(0, BLOCK_Q)
    pos = c * Q + t
    valid = (t < Q) & (pos < length)
    dt = tl.load(dt_ptr + bi * sdt_b + pos * sdt_l + hi * sdt_h, mask=valid, other=0.0)
    cs = tl.cumsum(dt * tl.load(A_ptr + hi), 0)
    return dt, pos, valid, cs


@triton.jit
def _documents(doc_ptr, sdoc_b, sdoc_l, bi, c, pos, valid, length, Q: tl.constexpr):
    """Per position its document number; the documents of the chunk's last position and of the
    position before the chunk (0, the first document, before chunk 0)."""
    docs = tl.load(doc_ptr + bi * sdoc_b + pos * sdoc_l, mask=valid, other=-1)
    last = tl.load(doc_ptr + bi * sdoc_b + (tl.minimum(c * Q + Q, length) - 1) * sdoc_l)
    prev = tl.load(doc_ptr + bi * sdoc_b + tl.maximum(c * Q - 1, 0) * sdoc_l)
    prev = tl.where(c > 0, prev, 0)
    return docs, last, prev


@triton.jit
def _chunk_state_fwd(x_ptr, sx_b, sx_l, sx_h, sx_p, dt_ptr, sdt_b, sdt_l, sdt_h, A_ptr,
                     B_ptr, sB_b, sB_l, sB_g, sB_n, S_ptr, dec_ptr, doc_ptr, sdoc_b, sdoc_l, HAS_DOC: tl.constexpr,
                     length, H, HPG, P, N, Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    bi = tl.program_id(1).to(tl.int64) // H
    hi = tl.program_id(1).to(tl.int64) % H
    gi = hi // HPG
    nc = tl.num_programs(0)
    dt, pos, valid, cs = _chunk_decays(dt_ptr, sdt_b, sdt_l, sdt_h, A_ptr, bi, hi, c, length, Q, BLOCK_Q)
    cs_end = tl.sum(tl.where(valid, dt, 0.0) * tl.load(A_ptr + hi), 0)
    w = tl.exp(cs_end - cs)
    dec = tl.exp(cs_end)
    if HAS_DOC:
        docs, last, prev = _documents(doc_ptr, sdoc_b, sdoc_l, bi, c, pos, valid, length, Q)
        w = tl.where(docs == last, w, 0.0)
        dec = tl.where(last == prev, dec, 0.0)
    rp = tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + bi * sx_b + pos[:, None] * sx_l + hi * sx_h + rp[None, :] * sx_p,
                mask=valid[:, None] & (rp[None, :] < P), other=0.0).to(dt.dtype)
    Bm = tl.load(B_ptr + bi * sB_b + pos[:, None] * sB_l + gi * sB_g + rn[None, :] * sB_n,
                 mask=valid[:, None] & (rn[None, :] < N), other=0.0).to(dt.dtype)
    S = tl.dot(tl.trans(x * (dt * w)[:, None]), Bm, input_precision=PRECISION)
    base = ((bi * nc + c) * H + hi) * P * N
    tl.store(S_ptr + base + rp[:, None] * N + rn[None, :], S, mask=(rp[:, None] < P) & (rn[None, :] < N))
    tl.store(dec_ptr + (bi * H + hi) * nc + c, dec)


@triton.jit
def _state_passing_fwd(S_ptr, dec_ptr, h0_ptr, final_ptr, nc, H, PN, HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    """H_{c+1} = dec_c H_c + S_c over the chunks; S_c is replaced by H_c (the state entering chunk c)."""
    bh = tl.program_id(1).to(tl.int64)
    bi = bh // H
    hi = bh % H
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_H0:
        state = tl.load(h0_ptr + bh * PN + offs, mask=mask, other=0.0)
    else:
        state = tl.zeros((BLOCK,), dtype=S_ptr.dtype.element_ty)
    for c in range(nc):
        ptr = S_ptr + ((bi * nc + c) * H + hi) * PN + offs
        s = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, state, mask=mask)
        state = tl.load(dec_ptr + bh * nc + c) * state + s
    tl.store(final_ptr + bh * PN + offs, state, mask=mask)


@triton.jit
def _chunk_scan_fwd(x_ptr, sx_b, sx_l, sx_h, sx_p, dt_ptr, sdt_b, sdt_l, sdt_h, A_ptr,
                    B_ptr, sB_b, sB_l, sB_g, sB_n, C_ptr, sC_b, sC_l, sC_g, sC_n, Hs_ptr,
                    D_ptr, sD_h, sD_p, z_ptr, sz_b, sz_l, sz_h, sz_p, y_ptr, sy_b, sy_l, sy_h, sy_p, ypre_ptr,
                    doc_ptr, sdoc_b, sdoc_l, HAS_DOC: tl.constexpr, length, H, HPG, P, N,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, Q: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    bi = tl.program_id(1).to(tl.int64) // H
    hi = tl.program_id(1).to(tl.int64) % H
    gi = hi // HPG
    nc = tl.num_programs(0)
    dt, pos, valid, cs = _chunk_decays(dt_ptr, sdt_b, sdt_l, sdt_h, A_ptr, bi, hi, c, length, Q, BLOCK_Q)
    t = tl.arange(0, BLOCK_Q)
    keep = t[:, None] >= t[None, :]
    e = tl.exp(cs)
    if HAS_DOC:
        docs, last, prev = _documents(doc_ptr, sdoc_b, sdoc_l, bi, c, pos, valid, length, Q)
        keep = keep & (docs[:, None] == docs[None, :])
        e = tl.where(docs == prev, e, 0.0)
    rp = tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    mp = valid[:, None] & (rp[None, :] < P)
    mn = valid[:, None] & (rn[None, :] < N)
    x = tl.load(x_ptr + bi * sx_b + pos[:, None] * sx_l + hi * sx_h + rp[None, :] * sx_p, mask=mp, other=0.0)
    x = x.to(dt.dtype)
    Bm = tl.load(B_ptr + bi * sB_b + pos[:, None] * sB_l + gi * sB_g + rn[None, :] * sB_n, mask=mn, other=0.0)
    Cm = tl.load(C_ptr + bi * sC_b + pos[:, None] * sC_l + gi * sC_g + rn[None, :] * sC_n, mask=mn, other=0.0)
    Bm = Bm.to(dt.dtype)
    Cm = Cm.to(dt.dtype)
    # exp of -inf above the diagonal (and across documents): 0, never an overflow
    L = tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf")))
    M = tl.dot(Cm, tl.trans(Bm), input_precision=PRECISION) * L * dt[None, :]
    y = tl.dot(M, x, input_precision=PRECISION)
    Hc = tl.load(Hs_ptr + ((bi * nc + c) * H + hi) * P * N + rp[:, None] * N + rn[None, :],
                 mask=(rp[:, None] < P) & (rn[None, :] < N), other=0.0)
    y += tl.dot(Cm, tl.trans(Hc), input_precision=PRECISION) * e[:, None]
    if HAS_D:
        y += x * tl.load(D_ptr + hi * sD_h + rp * sD_p, mask=rp < P, other=0.0).to(dt.dtype)[None, :]
    if HAS_Z:
        tl.store(ypre_ptr + ((bi * length + pos[:, None]) * H + hi) * P + rp[None, :], y, mask=mp)
        zv = tl.load(z_ptr + bi * sz_b + pos[:, None] * sz_l + hi * sz_h + rp[None, :] * sz_p, mask=mp, other=0.0)
        zv = zv.to(dt.dtype)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + bi * sy_b + pos[:, None] * sy_l + hi * sy_h + rp[None, :] * sy_p,
             y.to(y_ptr.dtype.element_ty), mask=mp)


@triton.jit
def _chunk_dstate_bwd(dy_ptr, sdy_b, sdy_l, sdy_h, sdy_p, dt_ptr, sdt_b, sdt_l, sdt_h, A_ptr,
                      C_ptr, sC_b, sC_l, sC_g, sC_n, dS_ptr, doc_ptr, sdoc_b, sdoc_l, HAS_DOC: tl.constexpr,
                      length, H, HPG, P, N, Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """sum_i exp(cs_i) dy_i C_i^T: the gradient the state entering chunk c gets from the chunk's outputs."""
    c = tl.program_id(0).to(tl.int64)
    bi = tl.program_id(1).to(tl.int64) // H
    hi = tl.program_id(1).to(tl.int64) % H
    gi = hi // HPG
    nc = tl.num_programs(0)
    dt, pos, valid, cs = _chunk_decays(dt_ptr, sdt_b, sdt_l, sdt_h, A_ptr, bi, hi, c, length, Q, BLOCK_Q)
    e = tl.exp(cs)
    if HAS_DOC:
        docs, last, prev = _documents(doc_ptr, sdoc_b, sdoc_l, bi, c, pos, valid, length, Q)
        e = tl.where(docs == prev, e, 0.0)
    rp = tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    dy = tl.load(dy_ptr + bi * sdy_b + pos[:, None] * sdy_l + hi * sdy_h + rp[None, :] * sdy_p,
                 mask=valid[:, None] & (rp[None, :] < P), other=0.0)
    Cm = tl.load(C_ptr + bi * sC_b + pos[:, None] * sC_l + gi * sC_g + rn[None, :] * sC_n,
                 mask=valid[:, None] & (rn[None, :] < N), other=0.0).to(dt.dtype)
    dH = tl.dot(tl.trans(dy * e[:, None]), Cm, input_precision=PRECISION)
    tl.store(dS_ptr + ((bi * nc + c) * H + hi) * P * N + rp[:, None] * N + rn[None, :], dH,
             mask=(rp[:, None] < P) & (rn[None, :] < N))


@triton.jit
def _state_passing_bwd(dS_ptr, Hs_ptr, dec_ptr, dfinal_ptr, ddec_ptr, dh0_ptr, nc, H, PN, NB,
                       HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr):
    """dH_c = dHin_c + dec_c dH_{c+1} from the last chunk back; dHin_c (in dS) is replaced by
    dH_{c+1} = dS_c, and this block's share of <dH_{c+1}, H_c> goes to ddec[b, h, c, block]."""
    bh = tl.program_id(1).to(tl.int64)
    bi = bh // H
    hi = bh % H
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + bh * PN + offs, mask=mask, other=0.0)
    else:
        grad = tl.zeros((BLOCK,), dtype=dS_ptr.dtype.element_ty)
    for k in range(nc):
        c = nc - 1 - k
        base = ((bi * nc + c) * H + hi) * PN + offs
        inner = tl.load(dS_ptr + base, mask=mask, other=0.0)
        tl.store(dS_ptr + base, grad, mask=mask)
        Hc = tl.load(Hs_ptr + base, mask=mask, other=0.0)
        tl.store(ddec_ptr + (bh * nc + c) * NB + tl.program_id(0), tl.sum(grad * Hc, 0))
        grad = inner + tl.load(dec_ptr + bh * nc + c) * grad
    tl.store(dh0_ptr + bh * PN + offs, grad, mask=mask)


@triton.jit
def _chunk_bwd(x_ptr, sx_b, sx_l, sx_h, sx_p, dt_ptr, sdt_b, sdt_l, sdt_h, A_ptr,
               B_ptr, sB_b, sB_l, sB_g, sB_n, C_ptr, sC_b, sC_l, sC_g, sC_n, dy_ptr, sdy_b, sdy_l, sdy_h, sdy_p,
               Hs_ptr, dS_ptr, dec_ptr, ddec_ptr,
               dx_ptr, sdx_b, sdx_l, sdx_h, sdx_p, ddt_ptr, sddt_b, sddt_l, sddt_h,
               dB_ptr, sdB_b, sdB_l, sdB_g, sdB_n, dC_ptr, sdC_b, sdC_l, sdC_g, sdC_n, dA_ptr,
               doc_ptr, sdoc_b, sdoc_l, HAS_DOC: tl.constexpr, length, H, G, HPG, P, N,
               Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr):
    """Everything of the backward inside chunk c for the heads of group g (formulas: module docstring)."""
    c = tl.program_id(0).to(tl.int64)
    bi = tl.program_id(1).to(tl.int64) // G
    gi = tl.program_id(1).to(tl.int64) % G
    nc = tl.num_programs(0)
    t = tl.arange(0, BLOCK_Q)
    pos = c * Q + t
    valid = (t < Q) & (pos < length)
    rp = tl.arange(0, BLOCK_P)
    rn = tl.arange(0, BLOCK_N)
    mp = valid[:, None] & (rp[None, :] < P)
    mn = valid[:, None] & (rn[None, :] < N)
    mpn = (rp[:, None] < P) & (rn[None, :] < N)
    Bm = tl.load(B_ptr + bi * sB_b + pos[:, None] * sB_l + gi * sB_g + rn[None, :] * sB_n, mask=mn, other=0.0)
    Cm = tl.load(C_ptr + bi * sC_b + pos[:, None] * sC_l + gi * sC_g + rn[None, :] * sC_n, mask=mn, other=0.0)
    Bm = Bm.to(dt_ptr.dtype.element_ty)
    Cm = Cm.to(dt_ptr.dtype.element_ty)
    keep = t[:, None] >= t[None, :]
    if HAS_DOC:
        docs, last, prev = _documents(doc_ptr, sdoc_b, sdoc_l, bi, c, pos, valid, length, Q)
        keep = keep & (docs[:, None] == docs[None, :])
    CB = tl.dot(Cm, tl.trans(Bm), input_precision=PRECISION)       # C_i . B_j, shared by the group's heads
    earlier = t[None, :] < t[:, None]                                # [k, j]: j < k
    dBacc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=CB.dtype)
    dCacc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=CB.dtype)
    for hh in range(HPG):
        hi = gi * HPG + hh
        dt, pos, valid, cs = _chunk_decays(dt_ptr, sdt_b, sdt_l, sdt_h, A_ptr, bi, hi, c, length, Q, BLOCK_Q)
        cs_end = tl.sum(tl.where(valid, dt, 0.0) * tl.load(A_ptr + hi), 0)
        e = tl.exp(cs)
        w = tl.exp(cs_end - cs)
        if HAS_DOC:
            e = tl.where(docs == prev, e, 0.0)
            w = tl.where(docs == last, w, 0.0)
        x = tl.load(x_ptr + bi * sx_b + pos[:, None] * sx_l + hi * sx_h + rp[None, :] * sx_p, mask=mp, other=0.0)
        x = x.to(dt.dtype)
        dy = tl.load(dy_ptr + bi * sdy_b + pos[:, None] * sdy_l + hi * sdy_h + rp[None, :] * sdy_p,
                     mask=mp, other=0.0)
        state = ((bi * nc + c) * H + hi) * P * N + rp[:, None] * N + rn[None, :]
        Hc = tl.load(Hs_ptr + state, mask=mpn, other=0.0)
        dS = tl.load(dS_ptr + state, mask=mpn, other=0.0)
        u = x * dt[:, None]
        L = tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf")))
        dyu = tl.dot(dy, tl.trans(u), input_precision=PRECISION)       # dy_i . u_j
        GL = dyu * L
        CBL = CB * L
        dyH = tl.dot(dy, Hc, input_precision=PRECISION)                 # H_c^T dy_i, [Q, n]
        uS = tl.dot(u, dS, input_precision=PRECISION)                   # dS^T u_j, [Q, n]
        dCacc += tl.dot(GL, Bm, input_precision=PRECISION) + dyH * e[:, None]
        dBacc += tl.dot(tl.trans(GL), Cm, input_precision=PRECISION) + uS * w[:, None]
        BdS = tl.dot(Bm, tl.trans(dS), input_precision=PRECISION)      # dS B_j, [Q, p]
        du = tl.dot(tl.trans(CBL), dy, input_precision=PRECISION) + BdS * w[:, None]
        tl.store(dx_ptr + bi * sdx_b + pos[:, None] * sdx_l + hi * sdx_h + rp[None, :] * sdx_p,
                 du * dt[:, None], mask=mp)
        # da_k, each part summed over its own terms (module docstring)
        T = CBL * dyu
        suffix = tl.cumsum(T, 0, reverse=True)                           # [k, j]: sum_{i >= k} T_ij
        da = tl.sum(tl.where(earlier, suffix, 0.0), 1)
        E = tl.sum(dy * tl.dot(Cm, tl.trans(Hc), input_precision=PRECISION), 1) * e
        da += tl.cumsum(E, 0, reverse=True)
        W = tl.sum(u * BdS, 1) * w
        da += tl.sum(tl.where(earlier, W[None, :], 0.0), 1)
        da += tl.load(ddec_ptr + (bi * H + hi) * nc + c) * tl.load(dec_ptr + (bi * H + hi) * nc + c)
        da = tl.where(valid, da, 0.0)
        ddt = tl.sum(x * du, 1) + tl.load(A_ptr + hi) * da
        tl.store(ddt_ptr + bi * sddt_b + pos * sddt_l + hi * sddt_h, ddt, mask=valid)
        tl.store(dA_ptr + (bi * nc + c) * H + hi, tl.sum(da * dt, 0))
    tl.store(dB_ptr + bi * sdB_b + pos[:, None] * sdB_l + gi * sdB_g + rn[None, :] * sdB_n, dBacc, mask=mn)
    tl.store(dC_ptr + bi * sdC_b + pos[:, None] * sdC_l + gi * sdC_g + rn[None, :] * sdC_n, dCacc, mask=mn)
