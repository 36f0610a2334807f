"""The delta rule: linear attention whose state is corrected, not only added to (DeltaNet, Gated DeltaNet, KDA).

Per head, a state S [d_k, d_v] and for each token t (q, k [d_k], v [d_v], beta and a decay):

    S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T (scale q_t)

D_t = exp(g_t): the identity without `g` (DeltaNet, arXiv 2406.06484), a scalar per head with g [b, t, h]
(Gated DeltaNet, arXiv 2412.06464), a diagonal over d_k with g [b, t, h, d_k] (Kimi Delta Attention, the Kimi
Linear report, 2025). g is a log-decay (<= 0). beta in (0, 1) writes; in (0, 2) it may also flip a direction
(negative eigenvalues of I - beta k k^T, OLMo-Hybrid's allow_neg_eigval): the op takes beta as given.

`delta_rule_ref` is the recurrence itself, token by token. `delta_rule` computes it by chunks of C tokens in
the WY / UT form: inside a chunk, with c_i the cumulative log-decay from the chunk's start and S_0 the state
entering it, the state reads S_i = e^{c_i} S_0 + sum_{j<=i} e^{c_i - c_j} k_j u_j^T, where the corrected
writes u solve a unit lower-triangular system

    u_i + beta_i sum_{j<i} (e^{c_i - c_j} k_i . k_j) u_j = beta_i (v_i - S_0^T (e^{c_i} k_i))

so U = T (beta V) - T (beta e^{c} K) S_0 with T = (I + A)^{-1}: everything but the S_0 terms is computed for
all chunks at once, then one short loop over chunks carries S_0. Products e^{c_i - c_j} are formed pairwise
(j <= i, so they never overflow, however strong the decay).

Documents (seq_idx, `zoo.ops.documents`): the state is zeroed at each document's start. Inside a chunk that is
a mask on the pairs (i, j) of one document and on the S_0 terms of positions in the document S_0 belongs to;
`initial_state` belongs to the first document.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.ops.dispatch import choose
from zoo.ops.documents import check_seq_idx, document_number
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["check_qkv", "chunk_gated_delta_rule", "delta_rule", "delta_rule_ref", "l2_normalize"]

L2_EPS = 1e-6   # transformers' and fla's l2norm: x / sqrt(sum x^2 + eps)


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def delta_rule_ref(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                   qk_l2norm=False, seq_idx=None):
    """The recurrence token by token (the twin every fast path is tested against). Shapes: q, k [b, t, h, d_k],
    v [b, t, h, d_v], beta [b, t, h], g None, [b, t, h] or [b, t, h, d_k]; initial_state [b, h, d_k, d_v].
    Returns o [b, t, h, d_v] and, with output_final_state, the final state, both in the accumulation dtype
    (float64 for float64 inputs, else float32)."""
    q, k, v, beta, g, scale = _prepare(q, k, v, beta, g, scale, initial_state, qk_l2norm, seq_idx)
    b, t, h, dk = k.shape
    acc = q.dtype
    state = (torch.zeros(b, h, dk, v.shape[-1], dtype=acc, device=q.device) if initial_state is None
             else initial_state.to(acc))
    doc = None if seq_idx is None else document_number(seq_idx)
    out = []
    for i in range(t):
        if doc is not None and i > 0:
            state = state * (doc[:, i] == doc[:, i - 1]).to(acc)[:, None, None, None]   # a new document: zero
        if g is not None:
            decay = g[:, i].exp()
            state = state * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        kt, vt = k[:, i], v[:, i]
        delta = beta[:, i, :, None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, state))
        state = state + kt[..., None] * delta[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * scale, state))
    o = torch.stack(out, 1)
    return (o, state) if output_final_state else o


def delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, qk_l2norm=False,
               seq_idx=None, chunk_size: int = 64, impl: str = "auto"):
    """`delta_rule_ref` by chunks of `chunk_size` tokens (any length; the last chunk may be shorter).
    impl: "auto" | "torch" | "triton" (`zoo.ops.dispatch`; "triton" runs the pass from chunk to chunk, forward and
    backward, as one kernel each, zoo.ops.triton.delta; the chunks' parallel part stays in torch)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    use_triton = choose("delta_rule", impl, q) == "triton"
    q, k, v, beta, g, scale = _prepare(q, k, v, beta, g, scale, initial_state, qk_l2norm, seq_idx)
    b, t, h, dk = k.shape
    dv, acc = v.shape[-1], q.dtype
    if t == 1:   # a decoding step: the recurrence itself, without the chunked form's setup
        o, state = _step(q[:, 0] * scale, k[:, 0], v[:, 0], beta[:, 0], None if g is None else g[:, 0],
                         initial_state, acc)
        return (o[:, None], state) if output_final_state else o[:, None]
    C = min(chunk_size, t)
    n = math.ceil(t / C)
    pad = n * C - t
    # padded steps: k = 0 writes nothing and g = 0 keeps the state, so the final state is the last real one's
    doc = document_number(seq_idx) if seq_idx is not None else torch.zeros(b, t, dtype=torch.int64, device=q.device)
    q, k, v, beta = (_chunks(F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)), n, C) for x in (q * scale, k, v, beta))
    gc = None if g is None else _chunks(F.pad(g, (0, 0) * (g.dim() - 2) + (0, pad)), n, C)
    doc = _chunks(F.pad(doc, (0, pad), mode="replicate"), n, C)          # [b, n, C]
    # the document S_0 belongs to: that of the position before the chunk (the first document for chunk 0)
    before = torch.cat([doc[:, :1, :1], doc[:, :-1, -1:]], 1)            # [b, n, 1]

    cum = None if gc is None else gc.cumsum(2)                          # [b, n, C, h(, dk)]
    same = (doc[:, :, :, None] == doc[:, :, None, :])                    # [b, n, C, C]: i, j one document
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    keep0 = (doc == before).to(acc)                                      # [b, n, C]: S_0 reaches position i

    # kk[i, j] = (e^{c_i - c_j} k_i) . k_j and qk[i, j] = (e^{c_i - c_j} q_i) . k_j, for j <= i in one document,
    # [b, n, h, C, C] (heads before positions: plain batched matmuls, no copies between the steps)
    mask = (same & causal)[:, :, None]
    kk, qk = _pairs(k, k, cum) * mask, _pairs(q, k, cum) * mask
    eye = torch.eye(C, dtype=acc, device=q.device)
    A = beta.permute(0, 1, 3, 2)[..., None] * kk * (1 - eye)
    decay_i = _decay_from_start(cum, keep0, k)                           # e^{c_i} on k's channels, or 1
    bk = (beta[..., None] * decay_i * k).permute(0, 1, 3, 2, 4)          # [b, n, h, C, dk]
    bv = (beta[..., None] * v).permute(0, 1, 3, 2, 4)                     # [b, n, h, C, dv]
    # T = (I + A)^{-1} by one triangular solve against I (cheaper here than solving for the wider [v | k] directly)
    T = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
    W_v, W_k = T @ bv, T @ bk
    q0 = (decay_i * q).permute(0, 1, 3, 2, 4)                          # e^{c_i} q_i where S_0 reaches i
    k_end = _decay_to_end(cum, doc, k).permute(0, 1, 3, 2, 4)             # e^{c_C - c_j} k_j, same doc as C
    end0 = _end_decay(cum, doc, before, acc)                              # e^{c_C}, 0 if a document started

    state = (torch.zeros(b, h, dk, dv, dtype=acc, device=q.device) if initial_state is None
             else initial_state.to(acc))
    if use_triton:   # the same pass as the loop below, one kernel walking the chunks (zoo.ops.triton.delta)
        from zoo.ops.triton.delta import delta_chunk_scan_triton
        E = (end0 if end0.dim() == 4 else end0[..., None]).expand(b, n, h, dk)
        o, state = delta_chunk_scan_triton(W_v, W_k, q0, qk, k_end, E, state)
        o = o.permute(0, 1, 3, 2, 4).reshape(b, n * C, h, dv)[:, :t]
        return (o, state) if output_final_state else o
    outs = []
    # unbind, not indexing per chunk: each index's backward would fill a zero tensor the size of the whole
    # input (two thirds of the backward at 4K); unbind's stacks the chunks' gradients once
    per_chunk = zip(*(t.unbind(1) for t in (W_v, W_k, q0, qk, k_end, end0)))
    for w_v, w_k, q_c, qk_c, k_c, e_c in per_chunk:
        U = w_v - w_k @ state                                             # [b, h, C, dv]
        outs.append(q_c @ state + qk_c @ U)
        state = _scale_rows(state, e_c) + k_c.transpose(-1, -2) @ U
    o = torch.stack(outs, 1).permute(0, 1, 3, 2, 4).reshape(b, n * C, h, dv)[:, :t]
    return (o, state) if output_final_state else o


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, seq_idx=None, chunk_size: int = 64, impl: str = "auto"):
    """`delta_rule` under fla's name and argument order (fla.ops.gated_delta_rule.chunk_gated_delta_rule), so that
    code written for fla runs on zoo by changing the import: g before beta, `use_qk_l2norm_in_kernel`. g may be
    [b, t, h] (Gated DeltaNet), [b, t, h, d_k] (KDA) or None (DeltaNet). Returns (o in v's dtype, the final state
    in the accumulation dtype, or None unless `output_final_state`), as fla does."""
    o, state = delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=True,
                          qk_l2norm=use_qk_l2norm_in_kernel, seq_idx=seq_idx, chunk_size=chunk_size, impl=impl)
    return o.to(v.dtype), (state if output_final_state else None)


def _step(q, k, v, beta, g, state, acc):
    """One token: q, k [b, h, dk], v [b, h, dv], beta [b, h], g None / [b, h] / [b, h, dk]; (o, new state)."""
    b, h, dk = k.shape
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=acc, device=k.device) if state is None else state.to(acc)
    if g is not None:
        state = state * (g.exp()[..., None, None] if g.dim() == 2 else g.exp()[..., None])
    delta = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, state))
    state = state + k[..., None] * delta[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q, state), state


def check_qkv(q, k, v) -> tuple:
    """(batch, length, heads, d_k) of q, k [b, t, h, d_k] and v [b, t, h, d_v] (an error naming the argument)."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q, k: expected equal shapes [batch, length, heads, d_k], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    b, t, h, dk = k.shape
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v: expected [batch, length, heads, d_v] = [{b}, {t}, {h}, d_v], got {tuple(v.shape)}")
    return b, t, h, dk


def _prepare(q, k, v, beta, g, scale, initial_state, qk_l2norm, seq_idx):
    """Checked inputs in the accumulation dtype, q and k normalised if asked; the scale (default d_k^-1/2)."""
    b, t, h, dk = check_qkv(q, k, v)
    if tuple(beta.shape) != (b, t, h):
        raise ValueError(f"beta: expected [batch, length, heads] = {[b, t, h]}, got {tuple(beta.shape)}")
    if g is not None and tuple(g.shape) not in ((b, t, h), (b, t, h, dk)):
        raise ValueError(f"g: expected [batch, length, heads] (a decay per head) or [batch, length, heads, d_k] "
                         f"(per channel), got {tuple(g.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, dk, v.shape[-1]):
        raise ValueError(f"initial_state: expected [batch, heads, d_k, d_v] = {[b, h, dk, v.shape[-1]]}, got "
                         f"{tuple(initial_state.shape)}")
    if seq_idx is not None:
        check_seq_idx(seq_idx, b, t)
    acc = accumulation_dtype(q.dtype)
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    if qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    return q, k, v, beta, None if g is None else g.to(acc), dk ** -0.5 if scale is None else scale


def _chunks(x, n, C):
    """[b, n * C, ...] -> [b, n, C, ...]."""
    return x.reshape(x.shape[0], n, C, *x.shape[2:])


def _pairs(a, k, cum):
    """[b, n, h, C, C]: (e^{c_i - c_j} a_i) . k_j, the decay per head or per channel (lower triangle valid)."""
    if cum is None or cum.dim() == 4:
        prod = a.permute(0, 1, 3, 2, 4) @ k.permute(0, 1, 3, 4, 2)      # [b, n, h, C, C]
        if cum is None:
            return prod
        c = cum.permute(0, 1, 3, 2)                                      # a scalar per head: [b, n, h, C]
        return prod * (c[..., :, None] - c[..., None, :]).clamp(max=0).exp()   # j > i is masked by the caller
    return _pair_products(a, k, cum).permute(0, 1, 4, 2, 3)


def _pair_products(a, k, cum):
    """[b, n, C, C, h]: (e^{c_i - c_j} a_i) . k_j with a decay per channel (lower triangle valid)."""
    C = a.shape[2]
    s = next((s for s in (16, 8) if C > s and C % s == 0), C)
    if s == C:
        diff = (cum[:, :, :, None] - cum[:, :, None, :]).clamp(max=0)    # [b, n, C, C, h, dk]
        return torch.einsum("bnihd,bnjhd,bnijhd->bnijh", a, k, diff.exp())
    return _channel_pairs_by_blocks(a, k, cum, s)


def _channel_pairs_by_blocks(a, k, cum, s):
    """`_pair_products` with a decay per channel, by sub-blocks of s positions: for a row block I after a column
    block J, e^{c_i - c_j} = e^{c_i - c_m} e^{c_m - c_j} with m the last position of J, both factors <= 1, so the
    block is one product over d_k; blocks on the diagonal pairwise as above. [b, n, C, d_k] memory per pair
    block instead of [C, C, d_k]."""
    b, n, C, h, d = a.shape
    r = C // s
    A, K, c = (x.reshape(b, n, r, s, h, d) for x in (a, k, cum))
    ref = c[:, :, :, -1]                                                 # [b, n, r (J), h, d]: c at J's end
    left = A[:, :, :, None] * (c[:, :, :, None] - ref[:, :, None, :, None]).clamp(max=0).exp()  # [b,n,I,J,s,h,d]
    right = K * (ref[:, :, :, None] - c).exp()                          # [b, n, J, s, h, d], exponents <= 0
    pairs = torch.einsum("bnIJihd,bnJjhd->bnIiJjh", left, right)        # J < I valid; the rest replaced / masked
    strict = torch.ones(r, r, dtype=torch.bool, device=a.device).tril(-1)
    pairs = pairs * strict[:, None, :, None, None].to(pairs.dtype)
    diff = (c[:, :, :, :, None] - c[:, :, :, None, :]).clamp(max=0)      # [b, n, r, s, s, h, d]
    diag = torch.einsum("bnRihd,bnRjhd,bnRijhd->bnRijh", A, K, diff.exp())
    idx = torch.arange(r, device=a.device)
    pairs[:, :, idx, :, idx] = diag.permute(2, 0, 1, 3, 4, 5)
    return pairs.reshape(b, n, C, C, h)


def _decay_from_start(cum, keep0, k):
    """e^{c_i} as a factor on k's channels [b, n, C, h, 1 or dk], zero where S_0 does not reach position i."""
    if cum is None:
        return keep0[..., None, None].expand(*keep0.shape, k.shape[3], 1)
    e = cum.exp() if cum.dim() == 5 else cum.exp()[..., None]
    return e * keep0[..., None, None]


def _decay_to_end(cum, doc, k):
    """e^{c_C - c_j} k_j [b, n, C, h, dk], zero for j outside the chunk's last document."""
    last = (doc == doc[:, :, -1:]).to(k.dtype)[..., None, None]
    if cum is None:
        return k * last
    diff = cum[:, :, -1:] - cum
    return k * (diff.exp() if diff.dim() == 5 else diff.exp()[..., None]) * last


def _end_decay(cum, doc, before, acc):
    """The factor on S_0 at the chunk's end, [b, n, h] or [b, n, h, dk] ([b, n, 1, 1] without a decay): e^{c_C},
    zero if a document started in the chunk."""
    reach = (doc[:, :, -1:] == before).to(acc)[..., 0]                   # [b, n]
    if cum is None:
        return reach[..., None, None]
    return cum[:, :, -1].exp() * (reach[..., None] if cum.dim() == 4 else reach[..., None, None])


def _scale_rows(state, factor):
    """state [b, h, dk, dv] times a factor per head [b, h] or per key channel [b, h, dk] (or [b, 1, 1])."""
    if factor.dim() == 2:
        return state * factor[..., None, None]
    return state * factor[..., None]
