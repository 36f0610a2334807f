"""Taipan's selective window attention (Nguyen et al., arXiv 2410.18572, eq. 4): sliding-window softmax
attention in which a query sees itself and the *selected* keys of its window.

`selective_window_attention` is the fast path (compacted queries and keys, query blocks, a key span
per block and batch row); `selective_window_attention_ref` is its dense masked-softmax twin.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["selective_window_attention", "selective_window_attention_ref"]


def selective_window_attention(q, k, v, selected, window: int, rows=None, scale: Optional[float] = None,
                               block_size: int = 128):
    """Sliding-window softmax attention restricted to selected keys.

    q [batch, Lq, heads, head_dim] are the queries of the last Lq of the Lk key positions (bottom-right
    aligned, as with a KV cache); k, v [batch, Lk, heads, head_dim]; selected [batch, Lk] bool marks the
    keys other queries may see; rows [batch, Lq] bool (None: all) marks the queries to compute.
    Query i (at key position p) attends to p itself and to selected positions j with p - window < j < p.
    Returns out [batch, Lq, heads, head_dim] in q's dtype, zero at rows not computed.

    Queries and selected keys are compacted per batch row. A block of queries reads the selected keys
    from its first query's window start to its last query, so when the rows are all positions (training)
    or themselves selected keys (the block at evaluation) the work is about rows x (selected keys per
    window + block_size) rather than Lq x window; rows scattered far apart among few keys cost more.
    """
    _check_op_inputs(q, k, v, selected, window, rows)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: must be an integer >= 1, got {block_size!r}")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if rows is None:
        rows = torch.ones(b, lq, dtype=torch.bool, device=q.device)
    # Padding slots get a position no real query or key lies within `window` of, so the masks below
    # hide them from real rows, and a padded query sees only its own (self) score.
    far = lk + window
    qi, q_ok = compact_rows(rows)
    ki, k_ok = compact_rows(selected)
    q_pos = torch.where(q_ok, qi + (lk - lq), far)
    k_pos = torch.where(k_ok, ki, far).contiguous()
    qc = take_rows(q, qi).to(acc)
    k_self, v_self = take_rows(k, qi + (lk - lq)).to(acc), take_rows(v, qi + (lk - lq)).to(acc)
    kc, vc = take_rows(k, ki).to(acc), take_rows(v, ki).to(acc)

    nq, nk = qi.shape[1], ki.shape[1]
    starts = list(range(0, nq, block_size))
    ends = [min(s + block_size, nq) for s in starts]
    outs = []
    if starts:
        # Keys a block can see: selected positions in [first query - window + 1, last query); each batch
        # row gets its own start (lo), all rows share the widest span so one gather serves the block.
        first = q_pos[:, starts]
        last = q_pos[:, [e - 1 for e in ends]]
        lo = torch.searchsorted(k_pos, (first - window + 1).contiguous())
        hi = torch.searchsorted(k_pos, last.contiguous())
        spans = (hi - lo).amax(0).tolist()
        # One gather of every block's key span and one split of the queries: slicing or indexing the
        # full tensors per block would make each block's backward zero-fill a full-size gradient
        # (quadratic in length).
        idx, inside = zip(*(_span_index(lo[:, j], span, nk) for j, span in enumerate(spans)))
        batch = torch.arange(b, device=q.device)[:, None]
        flat = torch.cat(idx, dim=1)
        kbs, vbs = kc[batch, flat].split(spans, dim=1), vc[batch, flat].split(spans, dim=1)
        kps = torch.where(torch.cat(inside, dim=1), k_pos.gather(1, flat), far).split(spans, dim=1)
        sizes = [e - s_ for s_, e in zip(starts, ends)]
        blocks = zip(*(t.split(sizes, dim=1) for t in (qc, k_self, v_self, q_pos)), kbs, vbs, kps)
        outs = [_attend_block(*blk, window, scale) for blk in blocks]
    out_c = torch.cat(outs, dim=1) if outs else qc.new_zeros(b, 0, h, d)
    return put_rows(out_c, qi, q_ok, lq).to(q.dtype)


def selective_window_attention_ref(q, k, v, selected, window: int, rows=None, scale: Optional[float] = None):
    """The dense twin of `selective_window_attention`: one Lq x Lk masked softmax."""
    _check_op_inputs(q, k, v, selected, window, rows)
    lq, lk = q.shape[1], k.shape[1]
    acc = accumulation_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    i = torch.arange(lk - lq, lk, device=q.device)[:, None]
    j = torch.arange(lk, device=q.device)[None, :]
    visible = (j == i) | (selected[:, None, :] & (j < i) & (j > i - window))          # [b, Lq, Lk]
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    p = torch.softmax(s.masked_fill(~visible[:, None], -math.inf), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(acc))
    if rows is not None:
        out = out * rows[:, :, None, None]
    return out.to(q.dtype)


def _span_index(lo, span, nk):
    """Key indices [b, span] from each row's start `lo`, clamped to the last key, and which are real."""
    idx = lo[:, None] + torch.arange(span, device=lo.device)
    return idx.clamp(max=max(nk - 1, 0)), idx < nk


def _attend_block(qb, ksb, vsb, qpb, kb, vb, kp, window, scale):
    """One query block against its key span plus each query's own key (the softmax's last column).
    kp: the span's key positions, `far` where an index was clamped past the last key (so no key is
    counted twice)."""
    visible = (kp[:, None, :] < qpb[:, :, None]) & (kp[:, None, :] > qpb[:, :, None] - window)
    s = torch.einsum("bqhd,bkhd->bhqk", qb, kb) * scale
    s = s.masked_fill(~visible[:, None], -math.inf)
    s_self = torch.einsum("bqhd,bqhd->bhq", qb, ksb) * scale
    # The self column is always finite, so no row is all -inf and softmax never makes NaN.
    p = torch.softmax(torch.cat([s, s_self[..., None]], dim=-1), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p[..., :-1], vb) + p[..., -1].transpose(1, 2)[..., None] * vsb


def compact_rows(mask: torch.Tensor):
    """Indices of the True entries of each row, in order, padded to the longest row: (idx, valid) [b, m]."""
    b, n = mask.shape
    ar = torch.arange(n, device=mask.device)
    order = torch.sort(torch.where(mask, ar, ar + n), dim=1).indices    # True first, each group in order
    count = mask.sum(1)
    m = int(count.max()) if b else 0
    return order[:, :m], ar[:m][None, :] < count[:, None]


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [b, n, ...] at per-row indices idx [b, m] -> [b, m, ...]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def put_rows(src: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of `take_rows` into zeros [b, length, ...]; padding slots land in a dropped extra row."""
    out = src.new_zeros(src.shape[0], length + 1, *src.shape[2:])
    dest = torch.where(valid, idx, length).view(*idx.shape, *([1] * (src.dim() - 2))).expand_as(src)
    return out.scatter(1, dest, src)[:, :length]


def _check_op_inputs(q, k, v, selected, window, rows):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected [batch, length, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v: batch, heads and head_dim must match (k and v entirely), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"q: {q.shape[1]} queries but only {k.shape[1]} keys; queries are the last Lq key positions")
    if selected.dtype != torch.bool or tuple(selected.shape) != tuple(k.shape[:2]):
        raise ValueError(f"selected: expected a bool tensor of shape {tuple(k.shape[:2])}, "
                         f"got {selected.dtype} {tuple(selected.shape)}")
    if rows is not None and (rows.dtype != torch.bool or tuple(rows.shape) != tuple(q.shape[:2])):
        raise ValueError(f"rows: expected None or a bool tensor of shape {tuple(q.shape[:2])}, "
                         f"got {rows.dtype} {tuple(rows.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: must be an integer >= 1 (keys a query sees, itself included), got {window!r}")
