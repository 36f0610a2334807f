"""The mLSTM of xLSTM (Beck et al., arXiv 2405.04517, section 2.3; xLSTM-7B, arXiv 2503.13427): a matrix memory
with exponential input gates, sigmoid forget gates, a normaliser and a max-stabiliser. Per head, with q scaled by
d_k^-1/2, i_t the input gate's pre-activation and log f_t = logsigmoid(forget pre-activation):

    m_t = max(log f_t + m_{t-1}, i_t)                                   the stabiliser
    C_t = e^{log f_t + m_{t-1} - m_t} C_{t-1} + e^{i_t - m_t} k_t v_t^T
    n_t = e^{log f_t + m_{t-1} - m_t} n_{t-1} + e^{i_t - m_t} k_t
    h_t = (q_t C_t) / (max(|q_t . n_t|, e^{-m_t}) + eps)

(C, n, m) start at zero. Unrolled, m_t = max(F_t + m_0, max_{j<=t} (F_t - F_j + i_j)) with F the cumulative log f,
so the chunked form is exact, not an approximation: inside a chunk every pair (t, j) carries e^{F_t - F_j + i_j -
m_t} <= 1 and the state entering the chunk e^{F_t + m_0 - m_t} <= 1, whatever the gates.

`mlstm_ref` is the recurrence token by token (transformers' mlstm_recurrent_step_native, the same equations);
`mlstm` computes the pairs of each chunk at once and carries (C, n, m) from chunk to chunk. Packed documents
(`seq_idx`): a document starts from the empty memory (zeros, m = 0), as a sequence does; `initial_state` belongs
to the first document. Shapes: q, k
[b, t, heads, d_k], v [b, t, heads, d_v], i, f [b, t, heads]; the state ([b, heads, d_k, d_v], [b, heads, d_k],
[b, heads]). Float32 accumulation (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.ops.delta import check_qkv
from zoo.ops.documents import check_seq_idx, document_number
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["mlstm", "mlstm_ref"]


def _prepare(q, k, v, i, f, initial_state, seq_idx=None):
    b, t, h, dk = check_qkv(q, k, v)
    for name, g in (("i", i), ("f", f)):
        if tuple(g.shape) != (b, t, h):
            raise ValueError(f"{name}: expected [batch, length, heads] = {[b, t, h]}, got {tuple(g.shape)}")
    if seq_idx is not None:
        check_seq_idx(seq_idx, b, t)
    acc = accumulation_dtype(q.dtype)
    dv = v.shape[-1]
    if initial_state is None:
        state = (q.new_zeros(b, h, dk, dv, dtype=acc), q.new_zeros(b, h, dk, dtype=acc), q.new_zeros(b, h, dtype=acc))
    else:
        C, n, m = initial_state
        if tuple(C.shape) != (b, h, dk, dv) or tuple(n.shape) != (b, h, dk) or tuple(m.shape) != (b, h):
            raise ValueError(f"initial_state: expected (C [b, h, d_k, d_v], n [b, h, d_k], m [b, h]) = "
                             f"({[b, h, dk, dv]}, {[b, h, dk]}, {[b, h]}), got {[tuple(s.shape) for s in initial_state]}")
        state = tuple(s.to(acc) for s in initial_state)
    q = q.to(acc) * dk ** -0.5
    return q, k.to(acc), v.to(acc), i.to(acc), F.logsigmoid(f.to(acc)), state


def mlstm_ref(q, k, v, i, f, initial_state=None, return_final_state: bool = False, eps: float = 1e-6,
              seq_idx=None):
    """The recurrence token by token; h [b, t, heads, d_v] in the accumulation dtype."""
    q, k, v, i, logf, (C, n, m) = _prepare(q, k, v, i, f, initial_state, seq_idx)
    doc = None if seq_idx is None else document_number(seq_idx)
    out = []
    for t in range(q.shape[1]):
        if doc is not None and t > 0:   # a new document: the empty memory
            keep = (doc[:, t] == doc[:, t - 1]).to(C.dtype)[:, None]
            C, n, m = C * keep[..., None, None], n * keep[..., None], m * keep
        m_new = torch.maximum(logf[:, t] + m, i[:, t])
        decay, write = torch.exp(logf[:, t] + m - m_new), torch.exp(i[:, t] - m_new)
        C = decay[..., None, None] * C + write[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = decay[..., None] * n + write[..., None] * k[:, t]
        m = m_new
        num = torch.einsum("bhk,bhkv->bhv", q[:, t], C)
        den = torch.maximum((q[:, t] * n).sum(-1).abs(), torch.exp(-m)) + eps
        out.append(num / den[..., None])
    h = torch.stack(out, 1)
    return (h, (C, n, m)) if return_final_state else h


def mlstm(q, k, v, i, f, initial_state=None, return_final_state: bool = False, eps: float = 1e-6,
          chunk_size: int = 64, seq_idx=None):
    """`mlstm_ref` by chunks of `chunk_size` tokens (any length: the last chunk may be shorter).

    Three steps: every chunk's pairs and the summary of what it writes into the state (its last row's weights,
    their maximum M and the weighted sums S = sum_j w_j k_j v_j^T, s = sum_j w_j k_j), all chunks at once; the
    state from chunk to chunk, a scan of rescalings and additions (no matmul in the loop); every chunk's output
    from its entering state, all chunks at once. The padded tail writes nothing (i = -inf) and keeps the state
    (log f = 0)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    q, k, v, i, logf, (C, n, m) = _prepare(q, k, v, i, f, initial_state, seq_idx)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    L = min(chunk_size, t)
    nc = -(-t // L)
    pad = nc * L - t
    doc = (document_number(seq_idx) if seq_idx is not None else
           torch.zeros(b, t, dtype=torch.int64, device=q.device))

    def chunks(x, value=0.0):   # [b, t, h(, d)] -> [b, nc, h, L(, d)]
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad), value=value)
        return x.view(b, nc, L, *x.shape[2:]).transpose(2, 3)
    qc, kc, vc, ic, lf = chunks(q), chunks(k), chunks(v), chunks(i, float("-inf")), chunks(logf)
    dc = F.pad(doc, (0, pad), mode="replicate").view(b, nc, L)               # [b, nc, L]
    Fc = lf.cumsum(-1)                                                       # [b, nc, h, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    same = ((dc[..., :, None] == dc[..., None, :]) & causal)[:, :, None]    # [b, nc, 1, L, L]: pairs of one document
    entering = torch.cat([dc[:, :1, 0], dc[:, :-1, -1]], 1)                 # [b, nc]: the entering state's document
    reach = (dc == entering[..., None])[:, :, None]                         # [b, nc, 1, L]
    # where a document starts inside a chunk, the empty memory (m = 0) enters it, decayed from that start: the base
    # of the stabiliser is F_t - F_{s-1} there, with s the start
    starts = torch.arange(L, device=q.device).expand(b, nc, L).masked_fill(
        torch.cat([torch.zeros_like(dc[..., :1], dtype=torch.bool), dc[..., 1:] != dc[..., :-1]], -1).logical_not(), 0)
    s_idx = starts.cummax(-1).values[:, :, None].expand(-1, -1, h, -1)      # [b, nc, h, L]
    before = Fc.gather(-1, s_idx) - lf.gather(-1, s_idx)                     # F_{s-1}
    D = (Fc[..., :, None] - Fc[..., None, :] + ic[..., None, :]).masked_fill(~same, float("-inf"))

    # what each chunk writes into the state: its last row's pair weights, relative to their maximum
    a = D[..., -1, :]                                                        # [b, nc, h, L]
    M = a.amax(-1)
    wk = torch.exp(a - M[..., None])[..., None] * kc                         # [b, nc, h, L, dk]
    S, s = wk.transpose(-1, -2) @ vc, wk.sum(-2)
    F_end, before_end, reach_end = Fc[..., -1], before[..., -1], reach[..., -1]   # [b, nc, h], ..., [b, nc, 1]
    states = []
    for c in range(nc):
        states.append((C, n, m))
        base = torch.where(reach_end[:, c], F_end[:, c] + m, F_end[:, c] - before_end[:, c])
        m_new = torch.maximum(base, M[:, c])
        carry = torch.exp((F_end[:, c] + m - m_new).masked_fill(~reach_end[:, c], float("-inf")))
        fresh = torch.exp(M[:, c] - m_new)
        C = carry[..., None, None] * C + fresh[..., None, None] * S[:, c]
        n = carry[..., None] * n + fresh[..., None] * s[:, c]
        m = m_new
    Cs, ns, ms = (torch.stack(x, 1) for x in zip(*states))                  # the states entering each chunk

    base = torch.where(reach, Fc + ms[..., None], Fc - before)
    m_t = torch.maximum(base, D.amax(-1))                                    # [b, nc, h, L]
    W = torch.exp(D - m_t[..., None])                                        # pairs, <= 1 (0 outside the document)
    carry = torch.exp((Fc + ms[..., None] - m_t).masked_fill(~reach, float("-inf")))   # the entering state's weight
    num = carry[..., None] * (qc @ Cs) + (W * (qc @ kc.transpose(-1, -2))) @ vc
    nvec = carry[..., None] * ns[..., None, :] + W @ kc
    den = torch.maximum((qc * nvec).sum(-1).abs(), torch.exp(-m_t)) + eps
    h_out = (num / den[..., None]).transpose(2, 3).reshape(b, nc * L, h, dv)[:, :t]
    return (h_out, (C, n, m)) if return_final_state else h_out
