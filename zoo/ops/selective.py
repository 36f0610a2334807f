"""Selective attention (Leviathan, Kalman & Matias, "Selective Attention Improves Transformer",
arXiv 2410.02703): causal attention whose logits are lowered by how strongly earlier tokens
"selected" (asked to forget) each key, plus the context pruning that this makes safe.

Our reading of the paper's definition and of its sketch implementation (figure 2), for query i
and key j (positions in the key sequence), with scale = 1/sqrt(head_dim) unless given:

    S[i, j] = ReLU(scale * q0_i . k0_j)   for 0 < j < i, else 0
        - head 0's ordinary scaled logits are reused: no parameters are added;
        - ReLU: a token can only push a key out, never pull it back in;
        - j = 0 is excluded: nobody masks the first (BOS) token;
        - j = i is excluded: a token does not mask itself;
    F[i, j] = sum_{i' < i} S[i', j]       a selection acts on strictly later queries only
                                          (figure 2 rolls S down one row before the cumsum);
    out^h_i = sum_j softmax_j(scale * q^h_i . k^h_j - F[i, j]) v^h_j,   j <= i, every head h
                                          (head 0 included).

Context pruning (the paper's "Context Pruning" section, as we read it): S >= 0 makes F[., j]
non-decreasing in the query, so a key whose F is already large stays suppressed for every later
query; under a KV budget the keys with the largest F are dropped. Here the accumulated F of each
key after the last query ("scores", [batch, keys]) is what a cache keeps beside K and V:
`selective_attention(..., scores=..., return_scores=True)` continues a cached sequence (the same
hand-over serves context parallelism: a rank's keys arrive with the F of earlier ranks' queries),
`selective_evict` drops keys under a budget, and `selective_cache_step` appends, attends and evicts
for one decoding or prefill step. Two choices are ours: the first key is never evicted (so position
0 of a cache stays the BOS token whose column S never touches), and among equal F the older key
goes first. With a budget at least the number of keys nothing is dropped and the result is exact.

Layout as flash-attn: q [batch, Lq, heads, head_dim], k, v [batch, Lk, kv_heads, head_dim],
kv_heads dividing heads (query head i reads kv head i // (heads // kv_heads); the selection uses
query head 0 with kv head 0). Lq <= Lk: the queries are the last Lq of the Lk keys (bottom-right
causal alignment, as zoo.ops.attention), the first Lk - Lq keys coming from a cache whose keys
carry their accumulated `scores`. The fast path walks blocks of queries, carrying the column sums
of S from block to block (F's rows in a block = carried sums + an exclusive cumsum within it), so
only one block's [heads, block, Lk] logits exist at a time; under autograd each block is
checkpointed and recomputed in the backward, which keeps activation memory at the inputs plus one
[batch, Lk] carry per block. Arithmetic runs in float32 for float32 and narrower inputs and in
float64 for float64 inputs; the output comes back in q's dtype, scores in that accumulation dtype.
`impl="triton"` runs the same math as fused Triton kernels (`zoo.ops.triton.selective`: a column-sum
pass, a flash-style forward and a key-block-parallel backward, derived in that module's docstring).

Memory loss (the paper's auxiliary loss that trains a model to need fewer keys, as we read it): a key
whose F reached tau counts as gone for query i, one below it as partly kept, so query i needs

    M[i] = (i + 1) - sum_{j <= i} min(F[i, j], tau) / tau          keys (of the i + 1 it can see);

`selective_memory` returns M for every query (head 0's logits only, by query blocks like the forward,
torch only), and the block turns max_i M[i] / length into its auxiliary loss (`zoo.blocks.selective`).
Its gradient raises S (through head 0's q and k) on keys whose F is still below tau.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zoo.ops.dispatch import choose
from zoo.ops.dtypes import accumulation_dtype

__all__ = [
    "selective_attention",
    "selective_attention_ref",
    "selective_cache_step",
    "selective_evict",
    "selective_keep_index",
    "selective_memory",
    "selective_memory_ref",
]

Cache = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def selective_attention(q, k, v, scale: Optional[float] = None, *, scores: Optional[torch.Tensor] = None,
                        block_size: int = 256, return_scores: bool = False, impl: str = "auto"):
    """Causal selective attention by query blocks.

    scores: [batch, Lk - Lq] accumulated F of the cached keys (required when Lk > Lq).
    Returns out [batch, Lq, heads, head_dim] in q's dtype, and with `return_scores` also the
    accumulated F of all Lk keys after the last query, [batch, Lk] in the accumulation dtype.
    impl: "auto" | "torch" (the blocked path below) | "triton" (`zoo.ops.triton.selective`, fused
    forward and backward kernels; block_size is then unused), see `zoo.ops.dispatch`.
    """
    _check_inputs(q, k, v, scores)
    if choose("selective_attention", impl, q) == "triton":
        from zoo.ops.triton.selective import selective_attention_triton
        return selective_attention_triton(q, k, v, scale, scores=scores, return_scores=return_scores)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: must be an integer >= 1, got {block_size!r}")
    acc = accumulation_dtype(q.dtype)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scale = _default_scale(q, scale)
    carry = F.pad(scores.to(acc), (0, lq)) if scores is not None else q.new_zeros(b, lk, dtype=acc)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, carry))
    outs = []
    for qs in range(0, lq, block_size):
        qe = min(qs + block_size, lq)
        first, kend = lk - lq + qs, lk - lq + qe  # key position of the block's first query; keys it can see
        args = (qa[:, qs:qe], ka[:, :kend], va[:, :kend], carry[:, :kend], first, scale)
        if track:
            out, colsum = checkpoint(_query_block, *args, use_reentrant=False)
        else:
            out, colsum = _query_block(*args)
        outs.append(out)
        carry = torch.cat([carry[:, :kend] + colsum, carry[:, kend:]], 1)
    out = (torch.cat(outs, 1) if outs else qa.new_zeros(b, 0, h, v.shape[3])).to(q.dtype)
    return (out, carry) if return_scores else out


def _query_block(q, k, v, carry, first, scale):
    """Queries at key positions first.. against keys [0, kend): (out [b, B, h, d], column sums of S [b, kend])."""
    b, n, h, d = q.shape
    hk = k.shape[2]
    logits = torch.einsum("bingd,bjnd->bngij", q.view(b, n, hk, h // hk, d), k) * scale
    s, f, qpos, kpos = _selection(logits[:, 0, 0], carry, first)
    p = (logits - f[:, None, None]).masked_fill(kpos > qpos, -math.inf).softmax(-1)
    out = torch.einsum("bngij,bjnd->bingd", p, v).reshape(b, n, h, v.shape[3])
    return out, s.sum(1)


def _selection(logits0, carry, first):
    """Head 0's scaled logits [b, n, kend] of the queries at key positions first.. -> (S, F rows, qpos
    [n, 1], kpos [1, kend]): S with the BOS column, the diagonal and the future zeroed, F = the carried
    column sums plus the rows of S above each query within the block (strictly earlier queries)."""
    n, kend = logits0.shape[-2:]
    qpos = torch.arange(first, first + n, device=logits0.device)[:, None]
    kpos = torch.arange(kend, device=logits0.device)[None, :]
    s = logits0.relu().masked_fill((kpos >= qpos) | (kpos == 0), 0.0)
    f = carry[:, None, :] + F.pad(s.cumsum(1), (0, 0, 1, 0))[:, :n]
    return s, f, qpos, kpos


def selective_memory(q, k, scale: Optional[float] = None, *, tau: float = 1.0, block_size: int = 256):
    """Keys each query still needs, M [batch, L] (see the module docstring), for a whole sequence.

    q [batch, L, heads, head_dim], k [batch, L, kv_heads, head_dim]; only head 0 is read (the
    selection head). Blocks of queries carry the column sums of S as the forward does, so one block's
    [batch, block, L] logits exist at a time (checkpointed under autograd). Accumulates in float32
    (float64 for float64 inputs) and returns that dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k: expected [batch, L, heads, head_dim] with the same batch, L and head_dim, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if not tau > 0:
        raise ValueError(f"tau: must be > 0, got {tau}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: must be an integer >= 1, got {block_size!r}")
    acc = accumulation_dtype(q.dtype)
    q0, k0 = q[:, :, 0].to(acc), k[:, :, 0].to(acc)
    scale = _default_scale(q, scale)
    b, length = q0.shape[:2]
    track = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    carry, kept = q0.new_zeros(b, length), []
    for qs in range(0, length, block_size):
        qe = min(qs + block_size, length)
        args = (q0[:, qs:qe], k0[:, :qe], carry[:, :qe], qs, scale, float(tau))
        m, colsum = checkpoint(_memory_block, *args, use_reentrant=False) if track else _memory_block(*args)
        kept.append(m)
        carry = torch.cat([carry[:, :qe] + colsum, carry[:, qe:]], 1)
    return torch.cat(kept, 1) if kept else q0.new_zeros(b, 0)


def _memory_block(q0, k0, carry, first, scale, tau):
    """Queries first.. (head 0) against keys [0, kend): (M [b, n], column sums of S [b, kend])."""
    s, f, qpos, kpos = _selection(q0 @ k0.transpose(1, 2) * scale, carry, first)
    gone = f.clamp(max=tau).masked_fill(kpos > qpos, 0.0).sum(-1) / tau
    return (qpos[:, 0] + 1).to(f.dtype) - gone, s.sum(1)


def selective_keep_index(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Positions [batch, min(budget, keys)] (ascending) of the keys a budget keeps.

    Key 0 (BOS) is always kept; of the others the ones with the smallest accumulated F, ties going
    to the more recent key (its future selections are still to come, an old tie has had its chance).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores: expected [batch, keys], got shape {tuple(scores.shape)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget: must be an integer >= 1 (key 0 is always kept), got {budget!r}")
    b, lk = scores.shape
    if budget >= lk:
        return torch.arange(lk, device=scores.device).expand(b, lk)
    rank = scores.detach().clone()
    rank[:, 0] = -math.inf
    # A stable ascending sort of the reversed keys puts, among equal F, the most recent key first.
    order = torch.argsort(rank.flip(1), dim=1, stable=True)[:, :budget]
    return (lk - 1 - order).sort(dim=1).values


def selective_evict(k, v, scores, budget: int) -> Cache:
    """Drop keys under a KV budget: (k, v, scores) with at most `budget` keys, in their original order.

    k, v: [batch, keys, kv_heads, head_dim]; scores: [batch, keys]. See `selective_keep_index`.
    A budget >= keys returns the inputs unchanged (pruning is then exact).
    """
    if k.dim() != 4 or v.shape[:3] != k.shape[:3] or tuple(scores.shape) != tuple(k.shape[:2]):
        raise ValueError(f"k, v, scores: expected [batch, keys, kv_heads, *] twice and [batch, keys], got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(scores.shape)}")
    if isinstance(budget, int) and not isinstance(budget, bool) and budget >= k.shape[1]:
        return k, v, scores
    keep = selective_keep_index(scores, budget)
    take = lambda t: torch.gather(t, 1, keep[:, :, None, None].expand(-1, -1, *t.shape[2:]))
    return take(k), take(v), torch.gather(scores, 1, keep)


def selective_cache_step(q, k, v, cache: Optional[Cache] = None, *, scale: Optional[float] = None,
                         budget: Optional[int] = None, block_size: int = 256, impl: str = "auto"):
    """One streaming step through a KV cache: append the new keys, attend, then evict under `budget`.

    q [batch, n, heads, head_dim], k, v [batch, n, kv_heads, head_dim]: the n new tokens (n = 1 when
    decoding, more for chunked prefill). cache: (k_cache, v_cache, scores) from the previous step, or
    None at the start of a sequence. Returns (out [batch, n, heads, head_dim], new cache), the new
    cache's scores being every kept key's F after these n queries. Without a budget (or with one at
    least the sequence length) the outputs equal `selective_attention` on the whole sequence.
    """
    if cache is not None:
        k_cache, v_cache, scores = cache
        k, v = torch.cat([k_cache, k], 1), torch.cat([v_cache, v], 1)
    else:
        scores = None
    out, scores = selective_attention(q, k, v, scale, scores=scores, block_size=block_size, return_scores=True,
                                      impl=impl)
    new_cache = (k, v, scores)
    if budget is not None:
        new_cache = selective_evict(k, v, scores, budget)
    return out, new_cache


# ----------------------------------------------------------------------------------------------
# Reference: dense, every head at once, the whole [Lq, Lk] selection matrix.


def selective_attention_ref(q, k, v, scale: Optional[float] = None, *, scores: Optional[torch.Tensor] = None,
                            return_scores: bool = False):
    """Dense twin of `selective_attention`."""
    _check_inputs(q, k, v, scores)
    acc = accumulation_dtype(q.dtype)
    b, lq, h, d = q.shape
    lk, groups = k.shape[1], h // k.shape[2]
    scale = _default_scale(q, scale)
    qh = q.to(acc).transpose(1, 2)
    kh = k.to(acc).repeat_interleave(groups, 2).transpose(1, 2)
    vh = v.to(acc).repeat_interleave(groups, 2).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) * scale  # [b, h, Lq, Lk]
    qpos = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    kpos = torch.arange(lk, device=q.device)[None, :]
    s = torch.where((kpos < qpos) & (kpos > 0), logits[:, 0].relu(), torch.zeros_like(logits[:, 0]))
    f = torch.cumsum(s, dim=1) - s  # sum over strictly earlier queries
    if scores is not None:
        f = f + F.pad(scores.to(acc), (0, lq))[:, None, :]
    p = (logits - f[:, None]).masked_fill(kpos > qpos, -math.inf).softmax(-1)
    out = (p @ vh).transpose(1, 2).to(q.dtype)
    if not return_scores:
        return out
    final = s.sum(1) + (F.pad(scores.to(acc), (0, lq)) if scores is not None else 0)
    return out, final


def selective_memory_ref(q, k, scale: Optional[float] = None, *, tau: float = 1.0):
    """Dense twin of `selective_memory`: the whole [L, L] F of head 0 at once."""
    acc = accumulation_dtype(q.dtype)
    q0, k0 = q[:, :, 0].to(acc), k[:, :, 0].to(acc)
    length = q0.shape[1]
    qpos = torch.arange(length, device=q.device)[:, None]
    kpos = torch.arange(length, device=q.device)[None, :]
    logits = q0 @ k0.transpose(1, 2) * _default_scale(q, scale)
    s = torch.where((kpos < qpos) & (kpos > 0), logits.relu(), torch.zeros_like(logits))
    f = torch.cumsum(s, dim=1) - s
    gone = torch.where(kpos <= qpos, torch.clamp(f, max=tau), torch.zeros_like(f)).sum(-1) / tau
    return (qpos[:, 0] + 1).to(acc) - gone


# ----------------------------------------------------------------------------------------------
# Checks and small helpers.


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _check_inputs(q, k, v, scores):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"{name}: expected a tensor [batch, length, heads, head_dim], got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k, v: [batch, length, kv_heads] must match, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v: need one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k: batch and head_dim must match, got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"k: kv heads ({k.shape[2]}) must divide the query heads ({q.shape[2]})")
    lq, lk = q.shape[1], k.shape[1]
    if lq > lk:
        raise ValueError(f"q: the queries are the last Lq of the Lk keys, so Lq ({lq}) must not exceed Lk ({lk})")
    if scores is None and lk > lq:
        raise ValueError(f"scores: the {lk - lq} cached keys (Lk {lk} > Lq {lq}) need their accumulated "
                         f"selection scores [batch, {lk - lq}] (zeros for keys no query has seen yet)")
    if scores is not None and (not torch.is_tensor(scores) or tuple(scores.shape) != (q.shape[0], lk - lq)):
        raise ValueError(f"scores: expected [batch, Lk - Lq] = {(q.shape[0], lk - lq)} (the cached keys), got "
                         f"{tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__}")
