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

Numerics: the decay mask is built from differences of cumulative sums, filled with -inf above the
diagonal (and between documents) *before* exp, so exp only ever sees non-positive arguments (for
A < 0, dt > 0) and never overflows into an inf * 0. Arithmetic runs in float32 for float32 and
narrower inputs and in float64 for float64 inputs; y comes back in x's dtype, final states stay in
that accumulation dtype.

Memory. The pure path is one autograd Function with its own backward: the forward keeps only the
chunked inputs, the cumulative decays and the chunk-boundary states ([b, h, n_chunks + 1, p, n]),
and both directions build the [Q, Q] matrices for a bounded group of chunks at a time, so memory
grows linearly in the length.

On CUDA, when mamba_ssm imports, `ssd_scan` calls its Triton `mamba_chunk_scan_combined`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["ssd_scan", "ssd_scan_ref"]

# Elements of one [b, h, chunks, Q, Q] working tensor per group of chunks (4 Mi * 4 B = 16 MiB in
# float32); the backward holds four of them at once.
_GROUP_ELEMENTS = 1 << 22


def ssd_scan(x, dt, A, B, C, chunk_size: int, D=None, z=None, dt_bias=None, initial_states=None,
             seq_idx=None, dt_softplus: bool = False, return_final_states: bool = False):
    """Chunked SSD scan; returns y [b, l, h, p] or (y, final_states [b, h, p, n]).

    dt is shifted by dt_bias and passed through softplus (if dt_softplus) before use, as in
    mamba_chunk_scan_combined. Lengths that chunk_size does not divide are padded internally with
    steps that neither decay nor write the state, so outputs and final states do not depend on it.
    """
    _check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)
    doc = None if seq_idx is None else _document_number(seq_idx)
    kernel = _mamba_kernel() if x.is_cuda and x.dtype != torch.float64 else None
    if kernel is not None:
        return kernel(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                      seq_idx=None if doc is None else doc.to(torch.int32), dt_softplus=dt_softplus,
                      return_final_states=return_final_states)

    length, Q = x.shape[1], chunk_size
    acc = _accumulation_dtype(x.dtype)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, acc)
    xa = x.to(acc)
    pad = (-length) % Q
    # Padding steps have dt = 0: decay exp(0 * A) = 1 and input 0, so they leave the state as is.
    # Chunk-major layout [chunks, b, ...]: a group of chunks is one contiguous slice.
    u = rearrange(F.pad(xa * dt[..., None], (0, 0, 0, 0, 0, pad)), "b (c q) h p -> c b h q p", q=Q)
    log_decay = rearrange(F.pad(dt * A.to(acc), (0, 0, 0, pad)), "b (c q) h -> c b h q", q=Q)
    Bc, Cc = (rearrange(F.pad(t.to(acc), (0, 0, 0, 0, 0, pad)), "b (c q) g n -> c b g q n", q=Q) for t in (B, C))
    if doc is not None:
        # Padding continues the last document, so it cannot reset the final state.
        doc = rearrange(torch.cat([doc, doc[:, -1:].expand(-1, pad)], 1), "b (c q) -> c b q", q=Q)
    h0 = None if initial_states is None else initial_states.to(acc)

    y, final_states = _ChunkedSSD.apply(u.contiguous(), log_decay.contiguous(), Bc.contiguous(),
                                        Cc.contiguous(), h0, doc)
    y = rearrange(y, "c b h q p -> b (c q) h p")[:, :length]
    y = _skip_and_gate(y, xa, D, z)
    y = y.to(x.dtype)
    return (y, final_states) if return_final_states else y


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                 dt_softplus: bool = False, return_final_states: bool = False):
    """The twin of `ssd_scan`: the recurrence one step at a time (same arguments, no chunk_size)."""
    _check_inputs(x, dt, A, B, C, 1, D, z, dt_bias, initial_states, seq_idx)
    batch, length, heads, head_dim = x.shape
    acc = _accumulation_dtype(x.dtype)
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
    y = _skip_and_gate(torch.stack(ys, dim=1), xa, D, z).to(x.dtype)
    return (y, state) if return_final_states else y


class _ChunkedSSD(torch.autograd.Function):
    """Steps 1-4 on chunked tensors, with a backward that rebuilds the [Q, Q] matrices group by
    group instead of keeping them.

    u [c, b, h, Q, p] (dt * x), log_decay [c, b, h, Q] (dt * A), B, C [c, b, g, Q, n],
    h0 [b, h, p, n] or None, doc [c, b, Q] non-decreasing document numbers or None.
    Returns y [c, b, h, Q, p] (without the D term) and the final state [b, h, p, n].

    Backward, with cs the in-chunk cumulative sum of log_decay: every term of y and of the chunk
    states is exp(cs_target - cs_source) times something free of cs, so
        dL/dcs_i = dy_i . y_i - u_i . du_i     (+ at a chunk's last position, the terms of its
                                                 end state and of its decay)
    which spares the backward the [Q, Q] matrix d(segsum) and its row and column sums. Terms with
    no decay at all (source = target: the diagonal C_i.B_i u_i, and the last token's write into
    the end state) cancel exactly in the sum that turns dcs into d log_decay; they are kept out of
    both sides, because under strong decay they dominate what is left and their rounding would
    swamp d(dt A) (the trap behind mamba_ssm's "ddAcs_stable" kernels).
    """

    @staticmethod
    def forward(ctx, u, log_decay, B, C, h0, doc):
        cs = log_decay.cumsum(-1)
        masks = _document_masks(doc)
        S = _chunk_states(u, cs, B, masks)
        H = _state_passing(S, _chunk_decay(cs, masks), h0)
        y_off_diag = torch.empty_like(u)
        eC = _entry_decay_times_C(cs, C, masks)
        for sl in _chunk_groups(u):
            _intra_chunk(u[sl], cs[sl], B[sl], C[sl], _slice(doc, sl), out=y_off_diag[sl])
            _inter_chunk(eC[sl], H[sl], out=y_off_diag[sl])
        ctx.save_for_backward(u, cs, B, C, H, doc, y_off_diag)
        ctx.has_h0 = h0 is not None
        return y_off_diag + _diagonal_term(u, B, C), H[-1].clone()

    @staticmethod
    def backward(ctx, dy, dfinal):
        u, cs, B, C, H, doc, y_off_diag = ctx.saved_tensors
        dy = dy.contiguous()
        masks = _document_masks(doc)
        dec = _chunk_decay(cs, masks)
        eC = _entry_decay_times_C(cs, C, masks)

        dH_in, dC = _inter_chunk_bwd(dy, C, H, eC, cs, masks)
        del eC
        dH, ddec = _state_passing_bwd(dH_in, dfinal, dec, H)
        du_states, dB, u_du_states = _chunk_states_bwd(dH[1:], u, cs, B, masks)
        du = torch.empty_like(u)
        for sl in _chunk_groups(u):
            _intra_chunk_bwd(dy[sl], u[sl], cs[sl], B[sl], C[sl], _slice(doc, sl), du[sl], dB[sl], dC[sl])
        # cs = cumsum(log_decay) within each chunk, so d log_decay_k = sum over i >= k of dcs_i.
        dcs = (dy * y_off_diag).sum(-1) - (u * du).sum(-1)
        dlog_decay = dcs.flip(-1).cumsum(-1).flip(-1) + (ddec * dec)[..., None]
        # The end state's terms, -u_j.du_j at j and +u_j.du_j at the chunk's end, leave
        # sum_{j < k} u_j.du_j to log_decay_k: summed directly, nothing cancels.
        dlog_decay[..., 1:] += u_du_states[..., :-1].cumsum(-1)
        du += du_states
        du += _diagonal_term(dy, B, C)
        return du, dlog_decay, dB, dC, dH[0] if ctx.has_h0 else None, None


# ---- steps of the chunked algorithm -------------------------------------------------------------
# Shapes: chunk-major, [c, b, h, Q, ...] for heads and [c, b, g, Q, ...] for groups; r = h // g.

def _decay_matrix(cs):
    """exp(segsum(dt A)) of every chunk, [c, b, h, Q, Q]: exp(cs_i - cs_j) for j <= i.

    The difference of cumulative sums is clamped to [-80, 80] on and below the diagonal and set to
    -80 above it, instead of being filled with -inf: exp then never overflows and never produces
    an inf that a 0 would turn into NaN, and exp stays out of its underflow range (inputs below
    about -87 in float32, and -inf, run 3 to 20 times slower on CPU). exp(-80) < 2e-35 is
    negligible beside the terms that matter, and the causal (and document) mask is applied
    exactly, as zeros in C B^T (_masked_CB). For A < 0 and dt > 0 every argument is <= 0."""
    Q = cs.shape[-1]
    lower = torch.ones(Q, Q, dtype=torch.bool, device=cs.device).tril()
    hi = torch.full((Q, Q), -80.0, dtype=cs.dtype, device=cs.device).masked_fill_(lower, 80.0)
    seg = cs[..., :, None] - cs[..., None, :]
    return torch.clamp(seg, min=hi.new_tensor(-80.0), max=hi, out=seg).exp_()


def _causal_mask(doc, Q, device):
    """[Q, Q] (or [c, b, 1, Q, Q] with documents): j <= i, in the same document."""
    keep = torch.ones(Q, Q, dtype=torch.bool, device=device).tril()
    if doc is not None:
        keep = keep & (doc[:, :, None, :, None] == doc[:, :, None, None, :])
    return keep


def _masked_CB(B, C, doc):
    """C B^T per group, [c, b, g, Q, Q], zero above the diagonal and between documents."""
    CB = C @ B.mT
    return CB.mul_(_causal_mask(doc, B.shape[-2], B.device))


def _intra_chunk(u, cs, B, C, doc, out):
    """Step 1 without its diagonal: Y_diag = (L * C B^T) U per chunk, C B^T shared by the heads of
    a group; the diagonal, C_i.B_i u_i, is `_diagonal_term`."""
    M = _decay_matrix(cs)
    _by_group(M, B.shape[2]).mul_(_masked_CB(B, C, doc)[:, :, :, None])
    M.diagonal(dim1=-2, dim2=-1).zero_()
    torch.matmul(M, u, out=out)


def _diagonal_term(u, B, C):
    """(C_i . B_i) u_i per head: the undecayed diagonal of step 1 (and its transpose's action)."""
    CB_ii = (C * B).sum(-1)
    return (_by_group(u, B.shape[2]) * CB_ii[:, :, :, None, :, None]).flatten(2, 3)


def _chunk_states(u, cs, B, masks):
    """Step 2: S_c = sum_j exp(cs_end - cs_j) u_j B_j^T, only from the chunk's last document."""
    uw = _by_group(u * _state_weights(cs, masks)[..., None], B.shape[2])
    return torch.einsum("cbgrqp,cbgqn->cbgrpn", uw, B).flatten(2, 3)


def _state_weights(cs, masks):
    w = torch.exp(cs[..., -1:] - cs)
    return w if masks is None else w * masks["last_doc"][:, :, None]


def _chunk_decay(cs, masks):
    """exp(sum of dt A over the chunk), zeroed for chunks in which a new document starts."""
    dec = torch.exp(cs[..., -1])
    return dec if masks is None else dec * masks["no_reset"][:, :, None]


def _state_passing(S, dec, h0):
    """Step 3: H_{c+1} = dec_c H_c + S_c; H [c + 1, b, h, p, n] holds the state entering each chunk
    and, last, the final state. A loop over chunks: n_chunks steps of b*h*p*n, where the
    segsum-matrix form over chunks would cost n_chunks^2 * b*h*p*n."""
    H = S.new_empty(S.shape[0] + 1, *S.shape[1:])
    H[0] = 0 if h0 is None else h0
    for c in range(S.shape[0]):
        torch.addcmul(S[c], dec[c, :, :, None, None], H[c], out=H[c + 1])
    return H


def _entry_decay_times_C(cs, C, masks):
    """exp(cs_i) C_i per head, [c, b, h, Q, n]: how position i reads the state entering its chunk;
    zero from the chunk's first document change on."""
    e = torch.exp(cs)
    if masks is not None:
        e = e * masks["first_doc"][:, :, None]
    return (_by_group(e, C.shape[2])[..., None] * C[:, :, :, None]).flatten(2, 3)


def _inter_chunk(eC, H, out):
    """Step 4: Y_off_i = exp(cs_i) H_c C_i from the state H_c entering chunk c, added to out."""
    Q, p = out.shape[-2:]
    out.view(-1, Q, p).baddbmm_(eC.view(-1, Q, eC.shape[-1]), H.view(-1, p, H.shape[-1]).mT)


# ---- their backward -----------------------------------------------------------------------------

def _inter_chunk_bwd(dy, C, H, eC, cs, masks):
    """Gradients of step 4: dH_c from this chunk's outputs only, and dC (its only dC terms so
    far; step 1 adds the rest). The dcs terms are in the dy . y identity."""
    dH_in = dy.mT @ eC
    e = torch.exp(cs)
    if masks is not None:
        e = e * masks["first_doc"][:, :, None]
    dyH = (dy @ H[:-1]).mul_(e[..., None])
    return dH_in, _by_group(dyH, C.shape[2]).sum(3)


def _state_passing_bwd(dH_in, dfinal, dec, H):
    """Reverse recurrence of step 3: dH_c = dH_in_c + dec_c dH_{c+1}, dH_{n_chunks} = dfinal.
    Returns dH [c + 1, b, h, p, n] (dH[c + 1] is also dS_c) and d dec [c, b, h]."""
    dH = dH_in.new_empty(dH_in.shape[0] + 1, *dH_in.shape[1:])
    dH[-1] = dfinal
    for c in reversed(range(dH_in.shape[0])):
        torch.addcmul(dH_in[c], dec[c, :, :, None, None], dH[c + 1], out=dH[c])
    ddec = (dH[1:] * H[:-1]).sum((-1, -2))
    return dH, ddec


def _chunk_states_bwd(dS, u, cs, B, masks):
    """Gradients of step 2 given dS_c: du, dB (the first terms of dB) and u_j . du_j, the dcs_j
    terms (with a minus sign; their sum goes to cs_end)."""
    g = B.shape[2]
    w = _state_weights(cs, masks)
    dSg = _by_group(dS, g)
    du = (torch.einsum("cbgqn,cbgrpn->cbgrqp", B, dSg).flatten(2, 3) * w[..., None]).contiguous()
    dB = torch.einsum("cbgrqp,cbgrpn->cbgqn", _by_group(u * w[..., None], g), dSg).contiguous()
    return du, dB, (u * du).sum(-1)


def _intra_chunk_bwd(dy, u, cs, B, C, doc, du, dB, dC):
    """Gradients of step 1 for one group of chunks: du without the diagonal's term written to du,
    dB and dC added in place."""
    g, Q, p = B.shape[2], u.shape[-2], u.shape[-1]
    L = _decay_matrix(cs)
    CB = _masked_CB(B, C, doc)
    M = _by_group(L, g) * CB[:, :, :, None]
    M.diagonal(dim1=-2, dim2=-1).zero_()
    torch.matmul(M.view_as(L).mT, dy, out=du)
    dM = torch.matmul(dy, u.mT, out=M.view_as(L))
    dCB = _by_group(dM.mul_(L), g).sum(3).mul_(_causal_mask(doc, Q, B.device))
    n = B.shape[-1]
    dC.view(-1, Q, n).baddbmm_(dCB.view(-1, Q, Q), B.view(-1, Q, n))
    dB.view(-1, Q, n).baddbmm_(dCB.view(-1, Q, Q).mT, C.view(-1, Q, n))


# ---- helpers --------------------------------------------------------------------------------------

def _by_group(t, groups):
    """[c, b, h, ...] -> [c, b, g, h // g, ...] (head i in group i // (h // g)), a view."""
    return t.unflatten(2, (groups, t.shape[2] // groups))


def _chunk_groups(u):
    """Slices over the chunk axis with at most _GROUP_ELEMENTS elements per [chunks, b, h, Q, Q]."""
    nc, b, h, Q, _ = u.shape
    step = max(1, _GROUP_ELEMENTS // (b * h * Q * Q))
    return [slice(c, min(c + step, nc)) for c in range(0, nc, step)]


def _slice(doc, sl):
    return None if doc is None else doc[sl]


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


def _discretize_dt(dt, dt_bias, dt_softplus, acc):
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    return F.softplus(dt) if dt_softplus else dt


def _skip_and_gate(y, x, D, z):
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D).to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _accumulation_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


@functools.lru_cache(maxsize=1)
def _mamba_kernel():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # absent, or installed without a working CUDA/Triton build: use the pure path
        return None
    return mamba_chunk_scan_combined


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
