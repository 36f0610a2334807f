"""Taipan's Selective Attention Layer (`taipan`): Nguyen et al., "Taipan: Efficient and Expressive
State Space Language Models with Selective Attention", arXiv 2410.18572, section 3.

What the paper specifies, and how this module reads it:

- Gating (eq. 1). A light network G: R^d -> R^2 scores every token, s_i = G(h_i). The paper does
  not say how deep G is; here it is one linear layer. Its bias starts at [0, log(C / (1 - C))] so
  that, with small weights, a token is drawn into attention with probability C at the first step
  (our choice; the model's re-initialisation leaves it alone).
- Selection (eqs. 2-3). Training draws m_i = argmax(s_i + g) with Gumbel(0, 1) noise g and passes
  gradients through the relaxed sample softmax((s_i + g) / tau) (straight-through Gumbel-softmax,
  Jang et al. 2017). Eq. 3 writes the relaxation as the probability of whichever class was drawn;
  we use the standard estimator on the "selected" component, m_i = hard_i + p_i - stop_grad(p_i)
  with p_i = softmax((s_i + g) / tau)[1], so that raising p_i always means "attend more". At
  evaluation m_i = [s_i1 > s_i0], the noise-free argmax: deterministic and, since it reads only
  token i's own representation, causal, which is what lets streaming be exact.
- Attention (eq. 4). Figure 2 feeds only the selected tokens into softmax attention, so the keys and
  values are those of selected tokens: a query at position i sees position j when j = i or when j is
  selected and i - window < j < i. The window counts sequence positions, not selected tokens
  (section 3.2 and figure 3c, which draws C = 0.3 with w = 5 over ten tokens: the sparser map is
  what "affords a longer window"); it includes the query itself, as `window` does everywhere in zoo.
- Refinement and augmentation (eq. 5). [1 - alpha_i, alpha_i] = softmax(s_i) (noise-free, no
  temperature), and a selected token becomes (1 - alpha_i) h_i + alpha_i o_i: the alpha_i share of
  h_i is removed and replaced by the attention output. Unselected tokens keep h_i. In zoo's pre-norm
  stack the block sees h = norm(x) and returns the update m_i alpha_i (o_i - h_i), so the layer
  computes x_i + m_i alpha_i (o_i - h_i): exactly x_i for unselected tokens.
- Feed-forward (eq. 6). All tokens then go through a residual SwiGLU: the layer's `ffn`, not this
  block (in recipes/taipan.yaml the SAL keeps the model's SwiGLU and the Mamba-2 layers have none).
- Positions (sections 3.2 and 5.2). The paper's attention has no positional embedding, which
  extrapolated better than RoPE in its ablation; `rope_base: null` (the default) follows it, a
  number turns on RoPE at absolute sequence positions (the ablation's other arm).
- Budget (eq. 7). L_constraint = sum over SALs of (C - sum_i m_i / L)^2 with m_i the straight-
  through mask; in training each block returns `aux_loss = aux_loss_weight * mean over the batch of
  (C - mean_i m_i)^2` beside its output (the model sums the blocks'), at evaluation its output alone. The paper names the
  weight lambda without a value; 1.0 is our default.

The straight-through gradient of an unselected token needs o_i, the attention output it would have
had if selected. Training therefore attends from every token (its own key plus the selected keys in
its window); forward values of unselected tokens are still exactly h_i. At evaluation only selected
tokens are projected and attended.

Packed documents (seq_idx): each document's attention runs alone (`zoo.ops.documents.per_document`), so
no window reaches across a boundary and RoPE positions restart; selection, gate and alpha are per token
already. Exact, at one op call per document (packed rows hold few). The capacity loss stays a mean over
the whole row (eq. 7 budgets a training sequence), the one quantity not computed per document.

Inference state: K, V and the selection flag of the last window - 1 positions (zeros for unselected
ones), so `state_bytes` stops growing at the window.

`selective_window_attention` is the fast path (compacted queries and keys, query blocks, a key span
per block and batch row); `selective_window_attention_ref` is its dense masked-softmax twin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from zoo.blocks.base import Block, BlockCache, left_padded_cat
from zoo.distributed.window import taipan_cp
from zoo.ops.documents import check_block_documents, document_positions, per_document
from zoo.ops.rope import apply_rope, rope_cos_sin
from zoo.registry import register_block

__all__ = ["TaipanConfig", "TaipanBlock", "selective_window_attention", "selective_window_attention_ref"]


# ---------------------------------------------------------------------------------------------
# The attention op: softmax over {i} and the selected keys of the window before i
# ---------------------------------------------------------------------------------------------

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
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if rows is None:
        rows = torch.ones(b, lq, dtype=torch.bool, device=q.device)
    # Padding slots get a position no real query or key lies within `window` of, so the masks below
    # hide them from real rows, and a padded query sees only its own (self) score.
    far = lk + window
    qi, q_ok = _compact(rows)
    ki, k_ok = _compact(selected)
    q_pos = torch.where(q_ok, qi + (lk - lq), far)
    k_pos = torch.where(k_ok, ki, far).contiguous()
    qc = _take(q, qi).to(acc)
    k_self, v_self = _take(k, qi + (lk - lq)).to(acc), _take(v, qi + (lk - lq)).to(acc)
    kc, vc = _take(k, ki).to(acc), _take(v, ki).to(acc)

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
    return _put(out_c, qi, q_ok, lq).to(q.dtype)


def selective_window_attention_ref(q, k, v, selected, window: int, rows=None, scale: Optional[float] = None):
    """The dense twin of `selective_window_attention`: one Lq x Lk masked softmax."""
    _check_op_inputs(q, k, v, selected, window, rows)
    lq, lk = q.shape[1], k.shape[1]
    acc = _acc_dtype(q.dtype)
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


def _compact(mask: torch.Tensor):
    """Indices of the True entries of each row, in order, padded to the longest row: (idx, valid) [b, m]."""
    b, n = mask.shape
    ar = torch.arange(n, device=mask.device)
    order = torch.sort(torch.where(mask, ar, ar + n), dim=1).indices    # True first, each group in order
    count = mask.sum(1)
    m = int(count.max()) if b else 0
    return order[:, :m], ar[:m][None, :] < count[:, None]


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [b, n, ...] at per-row indices idx [b, m] -> [b, m, ...]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def _put(src: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of `_take` into zeros [b, length, ...]; padding slots land in a dropped extra row."""
    out = src.new_zeros(src.shape[0], length + 1, *src.shape[2:])
    dest = torch.where(valid, idx, length).view(*idx.shape, *([1] * (src.dim() - 2))).expand_as(src)
    return out.scatter(1, dest, src)[:, :length]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


# ---------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------

@dataclass
class TaipanConfig:
    n_heads: int = 4
    head_dim: Optional[int] = None     # default d_model // n_heads
    window: int = 128                  # sequence positions a query spans, itself included (section 3.2)
    capacity: float = 0.15             # C: target fraction of tokens selected (eq. 7; the paper's value)
    tau: float = 1.0                   # Gumbel-softmax temperature of the backward relaxation (eq. 3)
    aux_loss_weight: float = 1.0       # lambda in L = L_CE + lambda L_constraint
    rope_base: Optional[float] = None  # None: no positional embedding, as the paper; a number: RoPE
    block_size: int = 128              # queries per step of the attention op

    def __post_init__(self):
        if isinstance(self.n_heads, bool) or self.n_heads < 1:
            raise ValueError(f"n_heads: must be an integer >= 1, got {self.n_heads}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim: must be null or an integer >= 1, got {self.head_dim}")
        if self.head_dim is not None and self.rope_base is not None and self.head_dim % 2:
            raise ValueError(f"head_dim: must be even with rope_base set (rotary pairs), got {self.head_dim}")
        if isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window: must be an integer >= 1, got {self.window}")
        if not 0 < self.capacity < 1:
            raise ValueError(f"capacity: must be in (0, 1) (fraction of tokens attended), got {self.capacity}")
        if not self.tau > 0:
            raise ValueError(f"tau: must be > 0, got {self.tau}")
        if not self.aux_loss_weight >= 0:
            raise ValueError(f"aux_loss_weight: must be >= 0, got {self.aux_loss_weight}")
        if self.rope_base is not None and not self.rope_base > 1:
            raise ValueError(f"rope_base: must be null (no positional embedding) or > 1, got {self.rope_base}")
        if isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"block_size: must be an integer >= 1, got {self.block_size}")

    def check(self, d_model: int, seq_len: int) -> None:
        """Checks that need the model's width and the training length."""
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide model.d_model {d_model}")
        if self.head_dim is None and self.rope_base is not None and (d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads: head_dim d_model/n_heads = {d_model // self.n_heads} must be even "
                             f"with rope_base set (rotary pairs)")
        if self.window > seq_len:
            raise ValueError(f"window: {self.window} exceeds train.seq_len {seq_len}")


@dataclass
class TaipanCache(BlockCache):
    """K, V [batch, kept, heads, head_dim] and `selected` [batch, kept] of the last window - 1 positions
    (zeros and False for unselected ones), `pos` the tokens seen; `row_start` as `AttentionCache`'s."""
    k: torch.Tensor
    v: torch.Tensor
    selected: torch.Tensor
    pos: int = 0
    row_start: Optional[torch.Tensor] = None


@register_block("taipan", config=TaipanConfig)
class TaipanBlock(Block):
    """Gate -> (Gumbel) selection -> windowed attention among selected tokens -> alpha-mix update.
    forward returns (output, capacity loss) in training, the output at evaluation."""

    supports_seq_idx = True
    supports_cp = True

    def __init__(self, d_model: int, cfg: TaipanConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim or d_model // cfg.n_heads
        inner = self.n_heads * self.head_dim
        self.gate = nn.Linear(d_model, 2)
        with torch.no_grad():
            self.gate.bias.copy_(torch.tensor([0.0, math.log(cfg.capacity / (1 - cfg.capacity))]))
        self.gate.bias._no_reinit = True
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            return taipan_cp(self, x, cp, selective_window_attention, cache)
        b, t, _ = x.shape
        acc = _acc_dtype(x.dtype)
        start = 0 if cache is None else cache.pos
        logits = self.gate(x).to(acc)                                    # s_i, eq. 1
        gap = logits[..., 1] - logits[..., 0]
        alpha = torch.sigmoid(gap)                                       # softmax(s_i)[1], eq. 5
        if self.training:
            gumbel = -torch.empty_like(logits).exponential_().log()
            noisy = (gap + gumbel[..., 1] - gumbel[..., 0]) / self.cfg.tau
            hard = noisy > 0                                             # argmax of eq. 2
            soft = torch.sigmoid(noisy)                                  # softmax((s + g) / tau)[1]
            mask = hard.to(acc) + soft - soft.detach()                   # straight-through
            aux = self.cfg.aux_loss_weight * (self.cfg.capacity - mask.mean(1)).pow(2).mean()
            rows = None
        else:
            hard = gap > 0
            mask = hard.to(acc)
            aux = None
            rows = hard

        q, k, v = self._project(x, rows)
        if self.cfg.rope_base is not None:
            positions = (torch.arange(start, start + t, device=x.device) if seq_idx is None
                         else document_positions(seq_idx))
            if cache is not None and cache.row_start is not None:
                # a left-padded batch decoding through one cache (zoo.hf): positions count from each row's
                # first token; its padding keys need no mask, they are cached as unselected
                positions = (positions[None] - cache.row_start[:, None]).clamp(min=0)
            cos, sin = rope_cos_sin(positions, self.head_dim, self.cfg.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        selected = hard
        if cache is not None:
            k = torch.cat([cache.k, k.to(cache.k.dtype)], dim=1)
            v = torch.cat([cache.v, v.to(cache.v.dtype)], dim=1)
            selected = torch.cat([cache.selected, hard], dim=1)
            cache.k, cache.v, cache.selected = self._kept(k), self._kept(v), self._kept(selected)
            cache.pos = start + t
            k, v = k.to(q.dtype), v.to(q.dtype)
        if seq_idx is None:
            o = selective_window_attention(q, k, v, selected, self.cfg.window, rows=rows, block_size=self.cfg.block_size)
        else:
            o = per_document(lambda q_, k_, v_, sel, rows_: selective_window_attention(
                q_, k_, v_, sel, self.cfg.window, rows=rows_, block_size=self.cfg.block_size),
                seq_idx, q, k, v, selected, rows)
        y = self._out(o.reshape(b, t, -1), rows)
        out = ((mask * alpha)[..., None] * (y.to(acc) - x.to(acc))).to(x.dtype)
        return out if aux is None else (out, aux)

    def _project(self, x, rows):
        """q, k, v [b, t, heads, head_dim]; with `rows`, computed only there and zero elsewhere."""
        b, t, _ = x.shape
        if rows is None:
            return tuple(p(x).view(b, t, self.n_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        idx, ok = _compact(rows)
        xs = _take(x, idx)
        return tuple(_put(p(xs).view(b, -1, self.n_heads, self.head_dim), idx, ok, t)
                     for p in (self.q_proj, self.k_proj, self.v_proj))

    def _out(self, o, rows):
        if rows is None:
            return self.out_proj(o)
        idx, ok = _compact(rows)
        return _put(self.out_proj(_take(o, idx)), idx, ok, o.shape[1])

    def _kept(self, t: torch.Tensor) -> torch.Tensor:
        keep = self.cfg.window - 1
        # clone: a view would pin the whole concatenated history in memory
        return t[:, t.shape[1] - keep:].clone() if t.shape[1] > keep else t

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> TaipanCache:
        empty = torch.empty(batch_size, 0, self.n_heads, self.head_dim, device=device, dtype=dtype)
        return TaipanCache(empty, empty.clone(), torch.empty(batch_size, 0, dtype=torch.bool, device=device))

    def merge_left_padded(self, caches: Sequence[TaipanCache], row_start, length: int) -> TaipanCache:
        """K, V and the flags left-padded with unselected slots, which the attention never shows to another
        token; RoPE (when enabled) reads `row_start`."""
        return TaipanCache(left_padded_cat([c.k for c in caches]), left_padded_cat([c.v for c in caches]),
                           left_padded_cat([c.selected for c in caches], False), pos=length, row_start=row_start)

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        kept = min(seq_len, self.cfg.window - 1)
        # K and V per position, plus one bool selection flag
        return batch_size * kept * (2 * self.n_heads * self.head_dim * elem + 1)
