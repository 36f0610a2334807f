"""Mamba-2 state space duality (SSD) scan (Dao & Gu, "Transformers are SSMs", arXiv 2405.21060,
section 6).

The selective SSM with a scalar decay per head (eq. 1, with A_t = exp(dt_t A) times identity):

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          h_t: [head_dim, d_state]
    y_t = h_t C_t + D x_t,     then y_t * silu(z_t) when z is given (mamba_chunk_scan_combined)

Layout as mamba_ssm's `mamba_chunk_scan_combined`: x, z [b, l, h, p]; dt [b, l, h]; A, dt_bias
[h]; B, C [b, l, g, n], head i reading group i // (h // g); D [h] or [h, p]; initial and final
states [b, h, p, n]; seq_idx [b, l] integer document ids.

The chunked algorithm (section 6) cuts the sequence into chunks of Q tokens. With a_t = dt_t A,
cs the cumulative sum of a inside a chunk and u_t = dt_t x_t:
  1. intra-chunk output, the quadratic "attention-like" form: Y_diag = (L * C B^T) U with the
     segment-sum decay mask L_ij = exp(cs_i - cs_j) for j <= i, 0 above the diagonal;
  2. each chunk's own end state S = sum_j exp(cs_end - cs_j) u_j B_j^T;
  3. state passing, a short recurrence over chunks: H_{c+1} = exp(cs_end(c)) H_c + S_c, H_0 the
     initial state, H_{n_chunks} the final state;
  4. inter-chunk output from the incoming state: Y_off_i = exp(cs_i) H_c C_i.

Documents. seq_idx packs documents into one row: the state is zeroed wherever seq_idx changes from
one position to the next, so no state leaks between documents, and the initial state belongs to
the first document only. Internally the ids become a running document number (how many changes so
far), which is non-decreasing, so "same document" is a plain equality: steps 1-4 drop every term
whose source and target positions lie in different documents.

Numerics. The decay mask comes from differences of cumulative sums, taken in float64 (or as a
float64 hi + lo pair) because cs reaches hundreds inside a chunk; exp never sees an argument above
0 where the mask is kept (for A < 0, dt > 0) nor one that could overflow anywhere
(`_GroupWork.decay_matrix`). The gradient of dt A is summed directly from the terms each step's
decay reaches (`_SSDScan`). Arithmetic runs in float32 for float32 and narrower inputs and in
float64 for float64 inputs; y comes back in x's dtype, final states stay in the accumulation
dtype.

Speed and memory (the pure path). One autograd Function with its own backward runs the chunks in
groups, in order forward and in reverse order backward, carrying the state (or its gradient)
from group to group, so every temporary, the [Q, Q] matrices included, is the size of one group.
Between the passes it keeps the inputs, the cumulative decays [c, b, h, Q], the chunk-boundary
states [c + 1, b, h, p, n] and, only when z is given, the gate's input: memory grows linearly in
the length.

Dispatch (`zoo.ops.dispatch`): on CUDA, mamba_ssm's `mamba_chunk_scan_combined` when it imports, else
zoo's own Triton kernels (`zoo.ops.triton.ssd`), else this path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.ops.dispatch import choose, cuda_kernel
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["ssd_scan", "ssd_scan_ref", "ssd_state_update"]

# Elements of one [chunks, b, h, Q, Q] (or [chunks, b, h, Q, p]) working tensor per group of
# chunks: 1 Mi, 4 MiB in float32. Measured at h=8, p=n=64, Q=256, 16K tokens, fwd + bwd on CPU:
# with one thread, groups of 1, 4 and 16 Mi take the same time; with two threads on a busy
# machine, 1 Mi took 1.7x as long as 4 Mi (twice the parallel regions to synchronise), and 16 Mi
# gained nothing for 2.3x the peak memory. At Q=64 (the Mamba-2 block's default) and one thread,
# 1 Mi against 4 Mi: the op alone at 16K 0.37 s against 0.39 s; the mixer (benchmarks/bench_ssm.py)
# within noise in time, its peak 145 / 355 MiB against 187 / 580-640 MiB at 4K / 16K. A group is
# then 32 chunks (2K tokens) rather than the 2 chunks that made 1 Mi slow on two threads at Q=256;
# two threads on the busy machine gave no consistent difference (0.63-0.83 s against 0.82-0.91 s).
_GROUP_ELEMENTS = 1 << 20


def ssd_scan(x, dt, A, B, C, chunk_size: int, D=None, z=None, dt_bias=None, initial_states=None,
             seq_idx=None, dt_softplus: bool = False, return_final_states: bool = False, impl: str = "auto"):
    """Chunked SSD scan; returns y [b, l, h, p] or (y, final_states [b, h, p, n]).

    dt is shifted by dt_bias and passed through softplus (if dt_softplus) before use, as in
    mamba_chunk_scan_combined. chunk_size only splits the work: results agree across chunk sizes
    up to rounding. Lengths that it does not divide are padded internally with steps that neither
    decay nor write the state. seq_idx: see the module docstring (documents). CUDA tensors go to
    mamba_ssm's kernel when it imports (seq_idx passed as the running document number, which it
    treats the same way); everything else, float64 included, runs the pure path below.
    impl: "auto" | "torch" | "triton" (zoo.ops.triton.ssd) | "cuda" (mamba_chunk_scan_combined),
    see `zoo.ops.dispatch`.
    """
    _check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)
    doc = None if seq_idx is None else _document_number(seq_idx)
    unsupported = {"cuda": "mamba_chunk_scan_combined has no float64"} if x.dtype == torch.float64 else {}
    tile = _padded(x.shape[3]) * _padded(B.shape[3])
    if tile > _TRITON_MAX_TILE:
        unsupported["triton"] = (f"head_dim x d_state padded to {tile} elements exceeds the Triton kernels' "
                                 f"{_TRITON_MAX_TILE} (64 x 128)")
    impl = choose("ssd", impl, x, unsupported)
    if impl == "triton":
        from zoo.ops.triton.ssd import ssd_scan_triton
        return ssd_scan_triton(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                               doc=doc, dt_softplus=dt_softplus, return_final_states=return_final_states,
                               torch_path=_discretised_torch_path)
    if impl == "cuda":
        return cuda_kernel("ssd")(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                  initial_states=initial_states,
                                  seq_idx=None if doc is None else doc.to(torch.int32), dt_softplus=dt_softplus,
                                  return_final_states=return_final_states)

    acc = accumulation_dtype(x.dtype)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, acc)
    D = None if D is None else (D[:, None] if D.dim() == 1 else D).to(acc)
    cast = lambda t: None if t is None else t.to(acc)
    # A sequence shorter than a chunk is one chunk of its own length: no [Q, Q] work on padding
    # (a token-by-token decode would otherwise pay for a whole chunk per token).
    y, final_states = _SSDScan.apply(cast(x), dt, cast(A), cast(B), cast(C), D, cast(z),
                                     cast(initial_states), doc, min(chunk_size, x.shape[1]))
    y = y.to(x.dtype)
    return (y, final_states) if return_final_states else y


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                 dt_softplus: bool = False, return_final_states: bool = False):
    """The twin of `ssd_scan`: the recurrence one step at a time (same arguments, no chunk_size)."""
    _check_inputs(x, dt, A, B, C, 1, D, z, dt_bias, initial_states, seq_idx)
    batch, length, heads, head_dim = x.shape
    acc = accumulation_dtype(x.dtype)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, acc)
    xa, A = x.to(acc), A.to(acc)
    per_group = heads // B.shape[2]
    Bh = B.to(acc).repeat_interleave(per_group, dim=2)
    Ch = C.to(acc).repeat_interleave(per_group, dim=2)
    state = xa.new_zeros(batch, heads, head_dim, B.shape[3]) if initial_states is None else initial_states.to(acc)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).to(acc)[:, None]
        write = (dt[:, t, :, None] * xa[:, t])[..., None] * Bh[:, t, :, None, :]
        state = decay[..., None, None] * state + write
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + xa * (D[:, None] if D.dim() == 1 else D).to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus: bool = False):
    """One decoding step of the recurrence, as mamba_ssm's `selective_state_update` for Mamba-2 heads:
    returns y [b, h, p] in x's dtype and updates state [b, h, p, n] IN PLACE (inference: no autograd
    through the state). x, z [b, h, p]; dt [b, h]; A, dt_bias [h]; B, C [b, g, n]; D [h] or [h, p].

    Per head the decay is one scalar, so exp runs over [b, h] (not the [b, h, p, n] state), and the
    groups are broadcast through a [b, g, h / g, p, n] view of the state instead of repeated per head:
    a multiply, a multiply-add and one matrix-vector product per group touch the state."""
    _check_inputs(x[:, None], dt[:, None], A, B[:, None], C[:, None], 1, D, None if z is None else z[:, None],
                  dt_bias, state, None)
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    acc = accumulation_dtype(x.dtype)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, acc)                          # [b, h]
    xa = x.to(acc)
    work = state if state.dtype == acc and state.is_contiguous() else state.to(acc).contiguous()
    heads = work.view(b, g, h // g, p, n)
    heads.mul_(torch.exp(dt * A.to(acc)).view(b, g, h // g, 1, 1))
    heads.addcmul_((xa * dt[..., None]).view(b, g, h // g, p, 1), B.to(acc).view(b, g, 1, 1, n))
    y = torch.matmul(work.view(b, g, h // g * p, n), C.to(acc).view(b, g, n, 1)).view(b, h, p)
    if D is not None:
        y.addcmul_(xa, (D[:, None] if D.dim() == 1 else D).to(acc))
    if z is not None:
        y.mul_(F.silu(z.to(acc)))
    if work is not state:
        state.copy_(work)
    return y.to(x.dtype)


class _SSDScan(torch.autograd.Function):
    """The chunked scan with D and the z gate, group of chunks by group of chunks.

    x [b, l, h, p] and dt [b, l, h] (after bias and softplus), A [h], B, C [b, l, g, n],
    D [h, 1] or [h, p] or None, z like x or None, h0 [b, h, p, n] or None, doc [b, l]
    non-decreasing document numbers or None, Q the chunk size. Returns y [b, l, h, p] and the
    final state [b, h, p, n]. Inside, tensors are chunk-major: [c, b, h, Q, ...] per head and
    [c, b, g, Q, ...] per group.

    Backward, with cs the in-chunk cumulative sum of a = dt A: a_k enters every term whose path
    from source j to target i crosses k (j < k <= i), so da_k sums exactly those terms' gradients;
    no sum over all terms minus the ones that do not cross (the identity dy.y - u.du of
    mamba_ssm's "unstable" kernel, which cancels catastrophically under strong decay).
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, h0, doc, Q):
        nc = -(-x.shape[1] // Q)
        dt_c = _to_chunks(dt, Q)
        # In float64: exp(cs_i - cs_j) needs the difference accurate to its own size, and cs
        # reaches hundreds within a chunk (float32 differences would carry ~|cs| * 6e-8).
        cs = (dt_c * A[:, None]).cumsum(-1, dtype=torch.float64)
        doc_c = None if doc is None else _to_chunks(doc, Q, pad_with_last=True)
        masks = _document_masks(doc_c)
        dec = _chunk_decay(cs, masks, x.dtype)
        H = x.new_empty(nc + 1, x.shape[0], x.shape[2], x.shape[3], B.shape[3])
        H[0] = 0 if h0 is None else h0
        y = torch.empty_like(x)
        # The gate's input, kept for dz.
        y_pre = None if z is None else x.new_empty(nc, x.shape[0], x.shape[2], Q, x.shape[3])
        work = _GroupWork(nc, x, B, Q)
        for sl in work.groups:
            xg, Bg, Cg = (_group(t, sl, Q) for t in (x, B, C))
            ug = xg * dt_c[sl, ..., None]
            mg = _slice_masks(masks, sl)
            _state_passing(_chunk_states(ug, cs[sl], Bg, mg), dec[sl], H[sl.start:sl.stop + 1])
            yg = _intra_chunk(ug, cs[sl], Bg, Cg, _slice(doc_c, sl), work)
            _inter_chunk(_entry_decay(cs[sl], mg, x.dtype), Cg, H[sl], out=yg)
            if D is not None:
                yg.addcmul_(xg, D[:, None])
            if z is not None:
                y_pre[sl] = yg
                yg.mul_(F.silu(_group(z, sl, Q)))
            _ungroup(yg, y, sl, Q)
        ctx.save_for_backward(x, dt, A, B, C, D, z, doc, cs, H, y_pre)
        ctx.Q, ctx.has_h0 = Q, h0 is not None
        return y, H[-1].clone()

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, z, doc, cs, H, y_pre = ctx.saved_tensors
        Q = ctx.Q
        nc = cs.shape[0]
        dt_c = _to_chunks(dt, Q)
        doc_c = None if doc is None else _to_chunks(doc, Q, pad_with_last=True)
        masks = _document_masks(doc_c)
        dec = _chunk_decay(cs, masks, x.dtype)
        dx, dB, dC = torch.empty_like(x), torch.empty_like(B), torch.empty_like(C)
        dz = None if z is None else torch.empty_like(z)
        dD = None if D is None else torch.zeros(D.shape[0], x.shape[3], dtype=x.dtype, device=x.device)
        ddt_c, da_c = torch.empty_like(dt_c), torch.empty_like(dt_c)
        dH_next = dfinal
        work = _GroupWork(nc, x, B, Q, backward=True)
        for sl in reversed(work.groups):
            xg, Bg, Cg, dyg = (_group(t, sl, Q) for t in (x, B, C, dy))
            ug = xg * dt_c[sl, ..., None]
            mg = _slice_masks(masks, sl)
            if z is not None:
                dyg, dzg = _gate_bwd(dyg, y_pre[sl], _group(z, sl, Q))
                _ungroup(dzg, dz, sl, Q)
            if D is not None:
                dD += torch.linalg.vecdot(dyg, xg, dim=-2).sum((0, 1))
            e = _entry_decay(cs[sl], mg, x.dtype)
            dH_in, dCg, da_entry = _inter_chunk_bwd(dyg, Cg, H[sl], e)
            dH, ddec = _state_passing_bwd(dH_in, dH_next, dec[sl], H[sl])
            dH_next = dH[0]
            du_states, dBg, da_states = _chunk_states_bwd(dH[1:], ug, cs[sl], Bg, mg)
            du, da_intra = _intra_chunk_bwd(dyg, ug, cs[sl], Bg, Cg, _slice(doc_c, sl), work, dBg, dCg)
            da = da_intra.add_(da_entry).add_(da_states).add_((ddec * dec[sl])[..., None])
            du += du_states
            da_c[sl] = da
            ddt_c[sl] = torch.linalg.vecdot(du, xg) + da * A[:, None]
            dxg = du.mul_(dt_c[sl, ..., None])
            if D is not None:
                dxg.addcmul_(dyg, D[:, None])
            _ungroup(dxg, dx, sl, Q)
            _ungroup(dBg, dB, sl, Q)
            _ungroup(dCg, dC, sl, Q)
        dA = (da_c * dt_c).sum((0, 1, 3))
        ddt = _from_chunks(ddt_c, dt.shape[1])
        if D is not None and D.shape[1] == 1:
            dD = dD.sum(1, keepdim=True)
        return dx, ddt, dA, dB, dC, dD, dz, dH_next if ctx.has_h0 else None, None, None


# ---- steps of the chunked algorithm -------------------------------------------------------------

class _GroupWork:
    """The [Q, Q] work runs over groups of chunks, at most _GROUP_ELEMENTS elements per
    [chunks, b, h, Q, Q] or [chunks, b, h, Q, p or n] tensor; the group buffers are allocated
    once per call and reused by every group. Also holds the [Q, Q] triangle constants."""

    def __init__(self, nc, x, B, Q, backward=False):
        b, _, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        step = max(1, _GROUP_ELEMENTS // (b * h * Q * max(Q, p, n)))
        self.groups = [slice(c, min(c + step, nc)) for c in range(0, nc, step)]
        step = min(step, nc)
        self.L = x.new_empty(step, b, h, Q, Q)
        self.M = x.new_empty(step, b, h, Q, Q) if backward else None
        self.CB = x.new_empty(step, b, g, Q, Q)
        self.dCB = x.new_empty(step, b, g, Q, Q) if backward and g < h else None
        self.Y = None if backward else x.new_empty(step, b, h, Q, p)
        self.lower = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
        self.strictly_lower = self.lower.tril(-1).to(x.dtype)
        self.hi = torch.full((Q, Q), -80.0, dtype=x.dtype, device=x.device).masked_fill_(self.lower, 80.0)
        self.lo = self.hi.new_tensor(-80.0)

    def decay_matrix(self, cs):
        """exp(segsum(dt A)) of every chunk in the group, [G, b, h, Q, Q]: exp(cs_i - cs_j), j <= i.

        The difference of cumulative sums is clamped to [-80, 80] on and below the diagonal and
        set to -80 above it, instead of being filled with -inf: exp then never overflows, never
        yields an inf that a 0 would turn into NaN, and stays out of its underflow range (inputs
        below about -87 in float32, and -inf, run 3 to 20 times slower on CPU). exp(-80) < 2e-35
        is negligible beside the terms that matter; the causal (and document) mask is applied
        exactly, as zeros in C B^T (masked_CB). For A < 0 and dt > 0 every argument is <= 0."""
        L = self.L[: cs.shape[0]]
        # cs (float64) = hi + lo in L's dtype; hi_i - hi_j is exact where it is small (Sterbenz),
        # so (hi_i - hi_j) + lo_i - lo_j keeps the precision of float64 at float32 speed.
        hi = cs.to(L.dtype)
        torch.sub(hi[..., :, None], hi[..., None, :], out=L)
        if hi.dtype != cs.dtype:
            lo = (cs - hi).to(L.dtype)
            L.add_(lo[..., :, None]).sub_(lo[..., None, :])
        return torch.clamp(L, min=self.lo, max=self.hi, out=L).exp_()

    def causal_mask(self, doc):
        """[Q, Q], or [G, b, 1, Q, Q] with documents: j <= i, in the same document."""
        if doc is None:
            return self.lower
        return self.lower & (doc[:, :, None, :, None] == doc[:, :, None, None, :])

    def masked_CB(self, B, C, keep):
        """C B^T per group, [G, b, g, Q, Q], zero where the causal mask `keep` is False."""
        return torch.matmul(C, B.mT, out=self.CB[: B.shape[0]]).mul_(keep)


def _intra_chunk(u, cs, B, C, doc, work):
    """Step 1: Y_diag = (L * C B^T) U per chunk, C B^T shared by the heads of a group. Returns a
    view of a group buffer."""
    M = work.decay_matrix(cs)
    _by_group(M, B.shape[2]).mul_(work.masked_CB(B, C, work.causal_mask(doc))[:, :, :, None])
    return torch.matmul(M, u, out=work.Y[: u.shape[0]])


def _chunk_states(u, cs, B, masks):
    """Step 2: S_c = sum_j exp(cs_end - cs_j) u_j B_j^T, only from the chunk's last document."""
    return u.mT @ _per_head(_state_weights(cs, masks, u.dtype), B)


def _state_weights(cs, masks, dtype):
    """exp(cs_end - cs_j) [G, b, h, Q], zero outside the chunk's last document."""
    w = torch.exp(cs[..., -1:] - cs).to(dtype)
    return w if masks is None else w * masks["last_doc"][:, :, None]


def _per_head(w, B):
    """w_j B_j for every head, [G, b, h, Q, n], from w [G, b, h, Q] and B [G, b, g, Q, n]."""
    return (_by_group(w, B.shape[2])[..., None] * B[:, :, :, None]).flatten(2, 3)


def _chunk_decay(cs, masks, dtype):
    """exp(sum of dt A over the chunk), zeroed for chunks in which a new document starts."""
    dec = torch.exp(cs[..., -1]).to(dtype)
    return dec if masks is None else dec * masks["no_reset"][:, :, None]


def _state_passing(S, dec, H):
    """Step 3 over a group's chunks: H[k + 1] = dec_k H[k] + S_k, with H [G + 1, b, h, p, n] and
    H[0] the state entering the group. A loop over chunks: n_chunks steps of b*h*p*n, where the
    segsum-matrix form over chunks would cost n_chunks^2 * b*h*p*n."""
    for k in range(S.shape[0]):
        torch.addcmul(S[k], dec[k, :, :, None, None], H[k], out=H[k + 1])


def _entry_decay(cs, masks, dtype):
    """exp(cs_i): how much of the state entering the chunk is left at position i; zero from the
    chunk's first document change on."""
    e = torch.exp(cs).to(dtype)
    return e if masks is None else e * masks["first_doc"][:, :, None]


def _inter_chunk(e, C, H, out):
    """Step 4: Y_off_i = exp(cs_i) H_c C_i from the state H_c entering chunk c, added to out."""
    Q, p, n = out.shape[-2], out.shape[-1], C.shape[-1]
    out.view(-1, Q, p).baddbmm_(_per_head(e, C).view(-1, Q, n), H.reshape(-1, p, n).mT)


# ---- their backward -----------------------------------------------------------------------------

def _inter_chunk_bwd(dy, C, H, e):
    """Gradients of step 4: dH_c from this chunk's outputs only, the first terms of dC (step 1
    adds the rest) and da, a_k reaching every Y_off_i with i >= k through exp(cs_i)."""
    g = C.shape[2]
    dH_in = dy.mT @ _per_head(e, C)
    dyH = dy @ H
    de = torch.linalg.vecdot(_by_group(dyH, g), C[:, :, :, None]).flatten(2, 3).mul_(e)
    dC = _sum_heads(dyH.mul_(e[..., None]), g)
    return dH_in, dC, de.flip(-1).cumsum(-1).flip(-1)


def _state_passing_bwd(dH_in, dH_end, dec, H):
    """Reverse recurrence of step 3 over a group's chunks: dH[k] = dH_in[k] + dec_k dH[k + 1],
    dH[G] = dH_end (the gradient of the state leaving the group). Returns dH [G + 1, b, h, p, n]
    (dH[k + 1] is also dS_k) and d dec [G, b, h]."""
    dH = dH_in.new_empty(dH_in.shape[0] + 1, *dH_in.shape[1:])
    dH[-1] = dH_end
    for k in reversed(range(dH_in.shape[0])):
        torch.addcmul(dH_in[k], dec[k, :, :, None, None], dH[k + 1], out=dH[k])
    return dH, (dH[1:] * H).sum((-1, -2))


def _chunk_states_bwd(dS, u, cs, B, masks):
    """Gradients of step 2 given dS_c: du, dB (their first terms) and da, a_k reaching the writes
    of every j < k through exp(cs_end - cs_j)."""
    w = _state_weights(cs, masks, u.dtype)
    du = _per_head(w, B) @ dS.mT
    dB = _sum_heads((u @ dS).mul_(w[..., None]), B.shape[2])
    dw = torch.linalg.vecdot(u, du)
    return du, dB, F.pad(dw[..., :-1].cumsum(-1), (1, 0))


def _intra_chunk_bwd(dy, u, cs, B, C, doc, work, dB, dC):
    """Gradients of step 1 for one group of chunks: returns du and da, adds to dB and dC in place.

    With G = dY U^T and M = L * C B^T: dU = M^T dY, d(C B^T) = G * L summed over a group's heads,
    and a_k reaches M_ij for j < k <= i, so da_k = sum over i >= k, j < k of G_ij M_ij: a prefix
    sum along j, then a column sum over i > j."""
    g, Q, n = B.shape[2], u.shape[-2], B.shape[-1]
    L = work.decay_matrix(cs)
    keep = work.causal_mask(doc)
    CB = work.masked_CB(B, C, keep)
    M = work.M[: u.shape[0]]
    torch.mul(_by_group(L, g), CB[:, :, :, None], out=_by_group(M, g))
    du = M.mT @ dy
    GL = torch.matmul(dy, u.mT, out=M).mul_(L)
    dCB = GL if work.dCB is None else torch.sum(_by_group(GL, g), 3, out=work.dCB[: u.shape[0]])
    # C B^T is used masked, so its gradient is masked too.
    dCB.mul_(keep)
    dC.view(-1, Q, n).baddbmm_(dCB.view(-1, Q, Q), B.view(-1, Q, n))
    dB.view(-1, Q, n).baddbmm_(dCB.view(-1, Q, Q).mT, C.view(-1, Q, n))
    dM_M = _by_group(GL, g).mul_(CB[:, :, :, None]).flatten(2, 3)
    prefix = dM_M.cumsum_(-1).mul_(work.strictly_lower)
    return du, F.pad(prefix.sum(-2)[..., :-1], (1, 0))


def _gate_bwd(dout, y, z):
    """Backward of out = y * silu(z): returns dy, dz."""
    sig = torch.sigmoid(z)
    # d silu(z) / dz = sig (1 + z (1 - sig))
    dz = (1 - sig).mul_(z).add_(1).mul_(sig).mul_(y).mul_(dout)
    return dout * sig.mul_(z), dz


# ---- layout and helpers ---------------------------------------------------------------------------

def _group(t, sl, Q):
    """Chunks sl of t [b, l, X, Y] as [G, b, X, Q, Y], zero-padded past the end (None stays None)."""
    if t is None:
        return None
    b, length, X, Y = t.shape
    t0, t1 = sl.start * Q, min(sl.stop * Q, length)
    out = t.new_empty(sl.stop - sl.start, b, X, Q, Y)
    full = (t1 - t0) // Q
    out[:full] = rearrange(t[:, t0:t0 + full * Q], "b (c q) x y -> c b x q y", q=Q)
    if full < out.shape[0]:
        rest = t1 - t0 - full * Q
        out[full, :, :, :rest] = t[:, t0 + full * Q:t1].transpose(1, 2)
        out[full, :, :, rest:] = 0
    return out


def _ungroup(tg, out, sl, Q):
    """Writes [G, b, X, Q, Y] chunks back into out [b, l, X, Y] (dropping the padding)."""
    t0, t1 = sl.start * Q, min(sl.stop * Q, out.shape[1])
    out[:, t0:t1] = rearrange(tg, "c b x q y -> b (c q) x y")[:, : t1 - t0]


def _to_chunks(t, Q, pad_with_last=False):
    """[b, l] -> [c, b, Q] or [b, l, h] -> [c, b, h, Q], padded with zeros (or the last value)."""
    pad = -t.shape[1] % Q
    fill = t[:, -1:] if pad_with_last else t.new_zeros(1).expand(t.shape[0], 1, *t.shape[2:])
    t = torch.cat([t, fill.expand(-1, pad, *t.shape[2:])], 1)
    return rearrange(t, "b (c q) ... -> c b ... q", q=Q).contiguous()


def _from_chunks(t, length):
    """[c, b, h, Q] -> [b, length, h]."""
    return rearrange(t, "c b h q -> b (c q) h")[:, :length]


def _sum_heads(t, groups):
    """[c, b, h, ...] -> [c, b, g, ...]: the sum over each group's heads."""
    return t if t.shape[2] == groups else _by_group(t, groups).sum(3)


def _by_group(t, groups):
    """[c, b, h, ...] -> [c, b, g, h // g, ...] (head i in group i // (h // g)), a view."""
    return t.unflatten(2, (groups, t.shape[2] // groups))


def _slice(doc, sl):
    return None if doc is None else doc[sl]


def _slice_masks(masks, sl):
    return None if masks is None else {k: v[sl] for k, v in masks.items()}


def _document_number(seq_idx):
    """[b, l] ids -> how many id changes precede each position: 0 for the first document."""
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return F.pad(changes.cumsum(1), (1, 0))


def _document_masks(doc):
    """Per chunk, from non-decreasing document numbers doc [c, b, Q]:
    first_doc [c, b, Q]: position i is still in the document the chunk's incoming state belongs to;
    last_doc [c, b, Q]: position j is in the chunk's last document (it reaches the end state);
    no_reset [c, b]: no document starts inside the chunk (the incoming state reaches its end)."""
    if doc is None:
        return None
    # The document before chunk c is that of its predecessor's last token; before chunk 0, the
    # initial state's, which is the first document (number 0).
    last = doc[..., -1]
    prev = F.pad(last[:-1], (0, 0, 1, 0))
    return {"first_doc": (doc == prev[..., None]), "last_doc": (doc == last[..., None]),
            "no_reset": (last == prev)}


def _discretised_torch_path(x, dt, A, B, C, chunk_size, D, z, h0, doc):
    """The pure path on arguments already discretised (dt after its bias and softplus; the document numbers
    change where seq_idx did, so they serve as seq_idx): the Triton kernels' fallback where a device refuses
    them (zoo.ops.triton.ssd)."""
    return ssd_scan(x, dt, A, B, C, chunk_size, D=D, z=z, initial_states=h0, seq_idx=doc, return_final_states=True,
                    impl="torch")


def _discretize_dt(dt, dt_bias, dt_softplus, acc):
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    return F.softplus(dt) if dt_softplus else dt


# zoo.ops.triton.ssd.MAX_TILE, repeated here so that the choice needs no Triton import
_TRITON_MAX_TILE = 64 * 128


def _padded(size):
    """The power-of-two tile (at least 16) a Triton kernel uses for a dimension of `size`."""
    return max(16, 1 << (size - 1).bit_length())


def _check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx):
    if x.dim() != 4:
        raise ValueError(f"x: expected [batch, length, heads, head_dim], got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if l < 1:
        raise ValueError("x: length must be at least 1")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    if tuple(dt.shape) != (b, l, h):
        raise ValueError(f"dt: expected shape {(b, l, h)} (batch, length, heads), got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"A: expected shape {(h,)} (heads), got {tuple(A.shape)}")
    if B.dim() != 4 or tuple(B.shape[:2]) != (b, l):
        raise ValueError(f"B: expected [batch={b}, length={l}, groups, d_state], got {tuple(B.shape)}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"C: expected the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g:
        raise ValueError(f"B, C: groups {g} must divide heads {h}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D: expected shape {(h,)} or {(h, p)}, got {tuple(D.shape)}")
    if z is not None and tuple(z.shape) != tuple(x.shape):
        raise ValueError(f"z: expected the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (h,):
        raise ValueError(f"dt_bias: expected shape {(h,)} (heads), got {tuple(dt_bias.shape)}")
    if initial_states is not None and tuple(initial_states.shape) != (b, h, p, n):
        raise ValueError(f"initial_states: expected shape {(b, h, p, n)} (batch, heads, head_dim, d_state), "
                         f"got {tuple(initial_states.shape)}")
    if seq_idx is not None:
        if tuple(seq_idx.shape) != (b, l):
            raise ValueError(f"seq_idx: expected shape {(b, l)} (batch, length), got {tuple(seq_idx.shape)}")
        if seq_idx.is_floating_point() or seq_idx.is_complex():
            raise ValueError(f"seq_idx: expected an integer dtype, got {seq_idx.dtype}")
