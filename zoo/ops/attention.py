"""Exact softmax attention: an SDPA fast path, a blockwise path and a log-sum-exp merge.

The blockwise path is the Blockwise Parallel Transformer's attention (Liu & Abbeel,
arXiv 2305.19370) computed as in FlashAttention-2 (Dao, arXiv 2307.08691, algorithms 1 and 2):
the forward walks query blocks and, for each, only the key blocks it can see, keeping a running
row max and row sum (online softmax); it saves q, k, v, the output and the row log-sum-exp, and
the backward recomputes each block's probabilities from that log-sum-exp. Activation memory is
therefore linear in length: one block x block score tile lives at a time.

Layout as flash-attn: q is [batch, Lq, heads, head_dim], k and v are [batch, Lk, kv_heads,
head_dim] with kv_heads dividing heads (GQA: query head i reads kv head i // (heads // kv_heads));
lse is [batch, heads, Lq]. When Lq < Lk the queries are the last Lq positions of the key sequence
(decoding or chunked prefill through a KV cache), so causal masks are bottom-right aligned as in
flash-attn >= 2.1: query i sits at key position Lk - Lq + i. `window` counts the keys a query sees
including itself (flash-attn's window_size=(window - 1, 0)); None means unbounded.

Arithmetic runs in float32 for float32 and narrower inputs and in float64 for float64 inputs;
outputs come back in the input dtype and lse in that accumulation dtype (float32 unless the
inputs are float64, where float32 would spoil exactness checks of merged results).

Packed documents: `seq_idx` [batch, Lk] (document ids of the key positions, see
`zoo.ops.documents`) adds document masking to the causal and window masks: a query sees only keys
of its own document. `attention` runs causal self-attention one document at a time through SDPA
(no mask at all; what SDPA skips is the cross-document work); the blockwise path builds the mask per
tile from the ids, skips tiles whose keys all lie in other documents, drops the mask from tiles
inside one document and, where only documents (not positions) need masking, masks just the batch
rows that a boundary crosses.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from zoo.ops.documents import check_seq_idx, document_number, document_spans, per_document
from zoo.ops.dtypes import accumulation_dtype

__all__ = [
    "attention",
    "attention_ref",
    "blockwise_attention",
    "blockwise_attention_ref",
    "merge_attention",
    "merge_attention_ref",
]


# Largest batch x Lq x Lk document mask `attention` hands SDPA (32 Mi bools); beyond it the
# blockwise path, which builds the mask one tile at a time.
_DENSE_DOCUMENT_MASK = 1 << 25
# Mean documents per row up to which `attention` calls SDPA once per document. Measured (CPU, one
# thread, 4 x 1024 tokens, 4 heads x 64, fwd + bwd; benchmarks/bench_documents.py): with 1-16 documents
# per row, per-document SDPA took 0.49-0.68 s, SDPA with a dense document mask 0.93-1.04 s and the
# blockwise path 0.72-1.05 s; per-call overhead grows with the count, tile skipping does not.
_PER_DOCUMENT_CALLS = 32


def attention(q, k, v, causal: bool = True, window: Optional[int] = None, scale: Optional[float] = None,
              seq_idx=None):
    """Exact attention: `F.scaled_dot_product_attention` when unwindowed, the blockwise path otherwise.

    Returns out [batch, Lq, heads, head_dim] in q's dtype. Chunked prefill (1 < Lq < Lk, causal)
    hands SDPA an Lq x Lk bool mask; self-attention (Lq = Lk) and decoding (Lq = 1) need none.
    seq_idx [batch, Lk]: document masking (module docstring). Causal self-attention (Lq = Lk, no
    window) runs SDPA per document while rows hold at most 32 documents on average; otherwise SDPA
    gets a [batch, 1, Lq, Lk] bool mask while that stays under 32 Mi elements, the blockwise path beyond.
    """
    check_attention_inputs(q, k, v, causal, window, seq_idx)
    lq, lk = q.shape[1], k.shape[1]
    if window is not None and window >= lk:
        window = None  # every query already sees all of its causal keys
    if seq_idx is not None and causal and lq == lk and window is None and lq > 0:
        spans = document_spans(seq_idx)
        if sum(map(len, spans)) <= _PER_DOCUMENT_CALLS * len(spans):
            return per_document(lambda q_, k_, v_: attention(q_, k_, v_, causal=True, scale=scale),
                                seq_idx, q, k, v, spans=spans)
    if (window is not None or lq == 0 or lk == 0
            or (seq_idx is not None and q.shape[0] * lq * lk > _DENSE_DOCUMENT_MASK)):
        # A windowed mask through SDPA would be an Lq x Lk tensor; the blockwise path never builds one.
        return blockwise_attention(q, k, v, causal=causal, window=window, scale=scale, seq_idx=seq_idx)
    mask, is_causal = None, False
    if seq_idx is not None:
        doc = document_number(seq_idx)
        mask = (doc[:, lk - lq:, None] == doc[:, None, :])[:, None]
        if causal:
            mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    elif causal and lq > 1:
        if lq == lk:
            is_causal = True
        else:
            # SDPA's is_causal is top-left aligned when Lq != Lk; the KV-cache convention is bottom-right.
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal,
        scale=_default_scale(q, scale), enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2).contiguous()


def blockwise_attention(q, k, v, causal: bool = True, window: Optional[int] = None, scale: Optional[float] = None,
                        block_size: int = 512, return_lse: bool = False, seq_idx=None):
    """Exact attention by query/key blocks with online softmax; memory linear in length.

    Returns out [batch, Lq, heads, head_dim] in q's dtype, and with `return_lse` also
    lse [batch, heads, Lq] (differentiable: partial results merge by it, see `merge_attention`).
    seq_idx [batch, Lk]: document masking (module docstring).
    """
    check_attention_inputs(q, k, v, causal, window, seq_idx)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: must be an integer >= 1, got {block_size!r}")
    doc = None if seq_idx is None else document_number(seq_idx)
    out, lse = _BlockwiseAttention.apply(q, k, v, causal, window, _default_scale(q, scale), block_size, doc)
    return (out, lse) if return_lse else out


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key sets into attention over their union.

    out_*: [batch, L, heads, head_dim]; lse_*: [batch, heads, L]. A side whose rows saw no key
    (lse = -inf) contributes nothing; rows empty on both sides give out 0 and lse -inf, with
    finite gradients. Returns (out in out_a's dtype, lse in the accumulation dtype).
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(f"out_a/out_b, lse_a/lse_b: shapes must match, got {tuple(out_a.shape)}, "
                         f"{tuple(out_b.shape)}, {tuple(lse_a.shape)}, {tuple(lse_b.shape)}")
    if out_a.dim() != 4:
        raise ValueError(f"out_a: expected [batch, length, heads, head_dim], got shape {tuple(out_a.shape)}")
    b, length, h, _ = out_a.shape
    if tuple(lse_a.shape) != (b, h, length):
        raise ValueError(f"lse_a: expected [batch, heads, length] = {(b, h, length)} for out_a "
                         f"{tuple(out_a.shape)}, got {tuple(lse_a.shape)}")
    acc = accumulation_dtype(out_a.dtype)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(lse_a, lse_b)
    # Shifting by a finite max keeps exp() in range; where both sides are empty (-inf) the shift
    # is 0 so that no -inf - -inf = NaN enters the forward or, through exp's derivative, the backward.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    empty = total == 0
    total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, -math.inf), m + torch.log(total))
    w_a, w_b = (w_a / total).transpose(1, 2)[..., None], (w_b / total).transpose(1, 2)[..., None]
    out = w_a * out_a.to(acc) + w_b * out_b.to(acc)
    return out.to(out_a.dtype), lse


# ----------------------------------------------------------------------------------------------
# References: dense masked softmax, obviously correct, O(Lq * Lk) memory.


def attention_ref(q, k, v, causal: bool = True, window: Optional[int] = None, scale: Optional[float] = None,
                  seq_idx=None):
    """Dense twin of `attention` (explicit mask, kv heads repeated for GQA)."""
    return blockwise_attention_ref(q, k, v, causal=causal, window=window, scale=scale, seq_idx=seq_idx)


def blockwise_attention_ref(q, k, v, causal: bool = True, window: Optional[int] = None,
                            scale: Optional[float] = None, return_lse: bool = False, seq_idx=None):
    """Dense twin of `blockwise_attention`, also returning lse [batch, heads, Lq] on request."""
    check_attention_inputs(q, k, v, causal, window, seq_idx)
    acc = accumulation_dtype(q.dtype)
    groups = q.shape[2] // k.shape[2]
    qh = q.to(acc).transpose(1, 2)
    kh = k.to(acc).repeat_interleave(groups, dim=2).transpose(1, 2)
    vh = v.to(acc).repeat_interleave(groups, dim=2).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) * _default_scale(q, scale)
    visible = _visible(q.shape[1], k.shape[1], causal, window, q.device)
    if seq_idx is not None:
        # same document: no id change between the key's position and the query's (inclusive scan)
        lk, lq = k.shape[1], q.shape[1]
        changed = torch.zeros(q.shape[0], lk, dtype=torch.bool, device=q.device)
        changed[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        run = changed.long().cumsum(1)
        visible = visible & (run[:, lk - lq:, None] == run[:, None, :])
        visible = visible[:, None]
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.exp(s - lse[..., None]) @ vh).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def merge_attention_ref(out_a, lse_a, out_b, lse_b):
    """The textbook merge: weights exp(lse_side - logaddexp(lse_a, lse_b)); NaN if both sides are empty."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).transpose(1, 2)[..., None]
    w_b = torch.exp(lse_b - lse).transpose(1, 2)[..., None]
    return w_a * out_a + w_b * out_b, lse


def _visible(lq: int, lk: int, causal: bool, window: Optional[int], device) -> torch.Tensor:
    """[Lq, Lk] bool: key j is visible to query i (bottom-right aligned)."""
    qpos = torch.arange(lq, device=device)[:, None] + (lk - lq)
    kpos = torch.arange(lk, device=device)[None, :]
    visible = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        visible &= kpos <= qpos
    if window is not None:
        visible &= kpos > qpos - window
    return visible


# ----------------------------------------------------------------------------------------------
# Checks and small helpers.


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def check_attention_inputs(q, k, v, causal, window, seq_idx=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected [batch, length, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k, v: shapes must match, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q, k: batch sizes differ ({q.shape[0]} vs {k.shape[0]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k: head_dim differs ({q.shape[3]} vs {k.shape[3]})")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"k: kv heads ({k.shape[2]}) must divide the query heads ({q.shape[2]})")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: must be None or an integer >= 1, got {window!r}")
        if not causal:
            raise ValueError("window: a sliding window looks back only (flash-attn window_size=(window-1, 0)); "
                             "it needs causal=True")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(f"q: under causal masking the queries are the last Lq of the Lk keys, so Lq "
                         f"({q.shape[1]}) must not exceed Lk ({k.shape[1]})")
    if seq_idx is not None:
        if q.shape[1] > k.shape[1]:
            raise ValueError(f"seq_idx: the ids of the key positions place the queries as the last Lq of "
                             f"them, so Lq ({q.shape[1]}) must not exceed Lk ({k.shape[1]})")
        check_seq_idx(seq_idx, k.shape[0], k.shape[1])


def to_rows(x: torch.Tensor, groups: int, acc: torch.dtype) -> torch.Tensor:
    """[b, L, h, d] -> contiguous [b * kv_heads, L, groups, d] in `acc`.

    Putting a kv head's query heads next to each other makes a block of queries one contiguous
    [rows, d] matrix that multiplies its kv head's keys directly: GQA without repeating K/V.
    """
    b, length, h, d = x.shape
    out = torch.empty(b, h // groups, length, groups, d, dtype=acc, device=x.device)
    out.copy_(x.view(b, length, h // groups, groups, d).permute(0, 2, 1, 3, 4))
    return out.view(b * (h // groups), length, groups, d)


def from_rows(x: torch.Tensor, b: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `to_rows`: [b * kv_heads, L, groups, d] -> [b, L, kv_heads * groups, d]."""
    n, length, groups, d = x.shape
    return x.view(b, n // b, length, groups, d).permute(0, 2, 1, 3, 4).reshape(b, length, -1, d).to(dtype)


def key_blocks(qs: int, qe: int, lq: int, lk: int, causal: bool, window: Optional[int],
                block_size: int) -> Iterator[tuple[int, int, bool]]:
    """Key blocks [ks, ke) that queries [qs, qe) can see, and whether each needs a mask.

    Blocks are laid down backwards from the last visible key, so with equal query and key
    lengths the diagonal is exactly one block and the rest are fully visible.
    """
    off = lk - lq
    hi, lo = lk, 0
    if causal:
        hi = qe + off
        if window is not None:
            lo = max(0, qs + off - window + 1)
    for ke in range(hi, lo, -block_size):
        ks = max(lo, ke - block_size)
        full = not causal or (ke - 1 <= qs + off and (window is None or ks > qe - 1 + off - window))
        yield ks, ke, full


def _document_tile(doc, qs, qe, ks, ke, off):
    """(seen, crossing) for queries [qs, qe) and keys [ks, ke): whether some query shares a document
    with some key in some batch row, and the batch rows where the tile is not inside one document.
    doc: per batch row, the non-decreasing document numbers of the key positions (host lists, so the
    per-tile decision costs no tensor ops); queries sit at + off."""
    seen, crossing = False, []
    for r, row in enumerate(doc):
        q0, q1, k0, k1 = row[qs + off], row[qe - 1 + off], row[ks], row[ke - 1]
        seen = seen or (k1 >= q0 and k0 <= q1)
        if min(q0, k0) != max(q1, k1):
            crossing.append(r)
    return seen, crossing


def _tiles(qs, qe, lq, lk, causal, window, block_size, doc_host):
    """The key blocks of `key_blocks`, less those all in other documents, each with `full` (no mask
    needed) and the batch rows that need only a document mask (when the positions need none), so a
    tile crossed by a boundary in one row of the batch masks that row alone."""
    for ks, ke, full in key_blocks(qs, qe, lq, lk, causal, window, block_size):
        rows = None
        if doc_host is not None:
            seen, crossing = _document_tile(doc_host, qs, qe, ks, ke, lk - lq)
            if not seen:
                continue
            if full and crossing:
                full, rows = False, crossing
        yield ks, ke, full, rows


def _mask_documents(s, spans, rows, q0, q1, ks, ke, groups):
    """Fill -inf where query positions [q0, q1) and keys [ks, ke) are in different documents, in the
    given batch rows of s [batch * kv_heads, q rows * groups, keys] only. Documents are contiguous, so
    what a run of queries in one document must not see is at most two key ranges: rectangles filled
    through views, no mask tensor. spans: per batch row, the documents' [start, end) (host lists)."""
    sv = s.view(len(spans), -1, q1 - q0, groups, ke - ks)
    for r in rows:
        i = bisect.bisect_right(spans[r], (q0, math.inf)) - 1   # the document holding query q0
        while i < len(spans[r]) and spans[r][i][0] < q1:
            start, end = spans[r][i]
            a, b = max(start, q0) - q0, min(end, q1) - q0
            if start > ks:
                sv[r, :, a:b, :, :min(start, ke) - ks] = -math.inf
            if end < ke:
                sv[r, :, a:b, :, max(end, ks) - ks:] = -math.inf
            i += 1


def _document_spans_host(doc_host):
    """Per batch row, the [start, end) of each document, from the document numbers (host lists)."""
    spans = []
    for row in doc_host:
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]]
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def hidden_keys(qs, qe, ks, ke, lq, lk, causal, window, doc, device) -> torch.Tensor:
    """[1 or batch, qe - qs, ke - ks] bool: True where the key is masked for the query."""
    qpos = torch.arange(qs, qe, device=device)[:, None] + (lk - lq)
    kpos = torch.arange(ks, ke, device=device)[None, :]
    hidden = kpos > qpos if causal else torch.zeros(qe - qs, ke - ks, dtype=torch.bool, device=device)
    if window is not None:
        hidden |= kpos <= qpos - window
    hidden = hidden[None]
    if doc is not None:
        hidden = hidden | (doc[:, qs + lk - lq:qe + lk - lq, None] != doc[:, None, ks:ke])
    return hidden


def mask_tile(s, hidden, groups):
    """Fill s [batch * kv_heads, q rows * groups, keys] with -inf where hidden [1 or batch, q rows, keys]."""
    rows, keys = hidden.shape[1:]
    s.view(hidden.shape[0], -1, rows, groups, keys).masked_fill_(hidden[:, None, :, None, :], -math.inf)


# ----------------------------------------------------------------------------------------------
# The blockwise path (FlashAttention-2 algorithms 1 and 2).


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, block_size, doc):
        out, lse = _blockwise_forward(q, k, v, causal, window, scale, block_size, doc)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, window, scale, block_size, doc)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _blockwise_backward(q, k, v, out, lse, dout, dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def _blockwise_forward(q, k, v, causal, window, scale, block_size, doc=None):
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    groups, acc = h // hk, accumulation_dtype(q.dtype)
    # The scale is folded into q once: s = (q * scale) k^T, so dK later needs no extra multiply.
    qr = to_rows(q, groups, acc).mul_(scale)
    kr, vr = to_rows(k, 1, acc).squeeze(2), to_rows(v, 1, acc).squeeze(2)
    n = qr.shape[0]
    doc_host = None if doc is None else doc.tolist()  # tile decisions on the host: no device sync per tile
    spans = None if doc is None else _document_spans_host(doc_host)
    out = torch.empty(n, lq, groups, d, dtype=acc, device=q.device)
    lse = torch.empty(n, lq, groups, dtype=acc, device=q.device)
    # Key blocks run from the diagonal backwards, so every row meets its own key in its first
    # block; the running max still starts at the most negative finite value rather than -inf so
    # that a row meeting only masked keys would give exp(-inf - min) = 0, not exp(-inf + inf) = NaN.
    floor = torch.finfo(acc).min
    for qs in range(0, lq, block_size):
        qe = min(qs + block_size, lq)
        rows = (qe - qs) * groups
        qb = qr[:, qs:qe].view(n, rows, d)
        m = torch.full((n, rows), floor, dtype=acc, device=q.device)
        l = torch.zeros(n, rows, dtype=acc, device=q.device)
        o = torch.zeros(n, rows, d, dtype=acc, device=q.device)
        for ks, ke, full, rows_ in _tiles(qs, qe, lq, lk, causal, window, block_size, doc_host):
            s = torch.bmm(qb, kr[:, ks:ke].transpose(1, 2))
            if rows_ is not None:
                _mask_documents(s, spans, rows_, qs + lk - lq, qe + lk - lq, ks, ke, groups)
            elif not full:
                mask_tile(s, hidden_keys(qs, qe, ks, ke, lq, lk, causal, window, doc, q.device), groups)
            m_new = torch.maximum(m, s.amax(dim=-1))
            p = s.sub_(m_new[..., None]).exp_()
            alpha = (m - m_new).exp_()  # FA-2 eq. for the rescaling of earlier partial sums
            l.mul_(alpha).add_(p.sum(dim=-1))
            o.mul_(alpha[..., None]).baddbmm_(p, vr[:, ks:ke])
            m = m_new
        # Rows with no visible key at all (only possible without causal and with Lk = 0) have
        # l = 0: their output is 0 and their lse -inf, as merge_attention expects of an empty side.
        out[:, qs:qe] = (o / l.clamp_min(torch.finfo(acc).tiny)[..., None]).view(n, qe - qs, groups, d)
        lse[:, qs:qe] = (m + l.log()).view(n, qe - qs, groups)
    del qr, kr, vr  # the layout change below then reuses their memory: peak stays at fewer copies
    lse_out = lse.view(b, hk, lq, groups).permute(0, 1, 3, 2).reshape(b, h, lq)
    return from_rows(out, b, q.dtype), lse_out


def _blockwise_backward(q, k, v, out, lse, dout, dlse, causal, window, scale, block_size, doc=None):
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    groups, acc = h // hk, accumulation_dtype(q.dtype)
    qr = to_rows(q, groups, acc).mul_(scale)
    kr, vr = to_rows(k, 1, acc).squeeze(2), to_rows(v, 1, acc).squeeze(2)
    n = qr.shape[0]
    doc_host = None if doc is None else doc.tolist()
    spans = None if doc is None else _document_spans_host(doc_host)
    lse_r = lse.view(b, hk, groups, lq).permute(0, 1, 3, 2).reshape(n, lq, groups)
    if dout is not None:
        do = to_rows(dout, groups, acc)
        # D_i = rowsum(dO_i * O_i) (FA-2 algorithm 2, line 4)
        delta = (do * to_rows(out, groups, acc)).sum(dim=-1)
    else:
        do = torch.zeros(n, lq, groups, d, dtype=acc, device=q.device)
        delta = torch.zeros(n, lq, groups, dtype=acc, device=q.device)
    if dlse is not None:
        # d lse_i / d s_ij = P_ij, so dS = P * (dP - D + dlse): the lse gradient shifts D.
        delta = delta - dlse.to(acc).view(b, hk, groups, lq).permute(0, 1, 3, 2).reshape(n, lq, groups)
    dq = torch.zeros_like(qr)
    dk, dv = torch.zeros_like(kr), torch.zeros_like(vr)
    for qs in range(0, lq, block_size):
        qe = min(qs + block_size, lq)
        rows = (qe - qs) * groups
        qb, dob, dqb = (t[:, qs:qe].view(n, rows, d) for t in (qr, do, dq))
        lse_b = lse_r[:, qs:qe].reshape(n, rows, 1)
        delta_b = delta[:, qs:qe].reshape(n, rows, 1)
        for ks, ke, full, rows_ in _tiles(qs, qe, lq, lk, causal, window, block_size, doc_host):
            kb, vb = kr[:, ks:ke], vr[:, ks:ke]
            s = torch.bmm(qb, kb.transpose(1, 2))
            if rows_ is not None:
                _mask_documents(s, spans, rows_, qs + lk - lq, qe + lk - lq, ks, ke, groups)
            elif not full:
                mask_tile(s, hidden_keys(qs, qe, ks, ke, lq, lk, causal, window, doc, q.device), groups)
            p = s.sub_(lse_b).exp_()  # probabilities recomputed, never stored
            dv[:, ks:ke].baddbmm_(p.transpose(1, 2), dob)
            ds = torch.bmm(dob, vb.transpose(1, 2)).sub_(delta_b).mul_(p)
            dqb.baddbmm_(ds, kb)
            # Summing over the rows of a kv head sums its query heads: the GQA reduction is free.
            dk[:, ks:ke].baddbmm_(ds.transpose(1, 2), qb)
    del qr, kr, vr, do
    dq.mul_(scale)
    dk, dv = dk.view(b, hk, lk, d).transpose(1, 2), dv.view(b, hk, lk, d).transpose(1, 2)
    return from_rows(dq, b, q.dtype), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()
