"""Infini-attention: segment-local softmax attention plus a compressive memory (Munkhdalai, Faruqui
& Gopal, "Leave No Context Behind", arXiv 2404.07143, section 2.1).

The sequence is cut into segments of `segment_len` tokens. For segment s, with sigma = ELU + 1:

    A_local = causal softmax(Q_loc K_loc^T * scale) V          (within the segment only)
    A_mem   = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})             (memory retrieval)
    A       = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_local     (per head)
    linear update:  M_s = M_{s-1} + sigma(K)^T V
    delta rule:     M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))
    both:           z_s = z_{s-1} + sum_t sigma(K_t)

A segment retrieves from the memory of the segments before it and is folded in only once it is
complete. The paper's ratio has no guard: before any segment is folded z is 0 and so is the
denominator (sigma > 0, z >= 0, so it is 0 exactly when z is). We define the retrieval as 0 there
(also inside the delta rule's correction), with a denominator swapped for 1 so that no 0/0 reaches
the backward either.

Positions: the paper puts no positional encoding on the memory path. `q`, `k` feed the memory;
`q_local`, `k_local` (default: the same tensors) feed the local attention, so a caller with RoPE
passes the un-rotated projections as q, k and the rotated ones as q_local, k_local.

Layout: q, q_local [batch, length, heads, d_k]; k, k_local [batch, length, kv_heads, d_k]; v
[batch, length, kv_heads, d_v], kv_heads dividing heads (GQA: query head i reads kv head
i // (heads // kv_heads), for the local attention and for the memory alike). gate: [heads]
logits beta. Memory (M, z): M [batch, kv_heads, d_k, d_v], z [batch, kv_heads, d_k], one memory
per kv head because it is built from keys and values only.

Streaming. The memory returned folds every segment completed so far; tokens after the last
segment boundary are not folded. A caller that feeds the sequence in arbitrary chunks keeps
those tokens (their k, v and, if used, k_local) and passes them back as `prefix`: the call then
continues that partial segment, its queries see the prefix keys locally, and the segment is folded
once prefix + new tokens complete it. After a call with a prefix of P tokens on L new tokens, the
next prefix is the last (P + L) % segment_len tokens of cat(prefix, new). Feeding a sequence whole,
in segment-aligned chunks with the memory carried, or in any chunks with memory and prefix carried
gives the same outputs and memory.

Arithmetic runs in float32 for float32 and narrower inputs and in float64 for float64 inputs; the
output comes back in q's dtype and the memory stays in that accumulation dtype.

`impl="triton"` computes the memory path of the segment-aligned part (retrieval and update, fused
per segment, forward and backward) with `zoo.ops.triton.infini`; the local attention stays SDPA.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from zoo.ops.dispatch import choose

__all__ = ["infini_attention", "infini_attention_ref"]

Memory = Tuple[torch.Tensor, torch.Tensor]


def infini_attention(q, k, v, gate, segment_len: int, memory: Optional[Memory] = None, delta_rule: bool = True,
                     return_memory: bool = False, *, q_local=None, k_local=None,
                     prefix: Optional[Sequence[torch.Tensor]] = None, scale: Optional[float] = None,
                     impl: str = "auto"):
    """Infini-attention over whole segments at once.

    The local attention of every segment runs in one SDPA call ([batch * segments, segment_len]);
    with the linear update the memory before each segment is an exclusive prefix sum of the
    segments' sigma(K)^T V, so no Python loop runs; the delta rule's correction reads the memory
    just before each segment, so that path loops over segments (never over tokens).

    memory: (M, z) carried in, or None for an empty memory.
    prefix: the current partial segment's earlier tokens, (k, v) or, when k_local is given,
        (k, v, k_local), each [batch, P, kv_heads, *] with 0 <= P < segment_len (see module doc).
    impl: "auto" | "torch" | "triton" (the memory retrieval and update of the segment-aligned part
        fused per segment by `zoo.ops.triton.infini`; the local attention stays SDPA, the prefix's
        segment stays torch), see `zoo.ops.dispatch`.
    Returns out [batch, length, heads, d_v] in q's dtype, and with `return_memory` (out, (M, z)).
    """
    q_local, k_local, prefix = _check_inputs(q, k, v, gate, segment_len, memory, q_local, k_local, prefix)
    use_triton = choose("infini", impl, q) == "triton"
    acc, out_dtype = _acc_dtype(q.dtype), q.dtype
    b, length, h, dk = q.shape
    M, z = _initial_memory(memory, b, k.shape[2], dk, v.shape[3], acc, q.device)
    w = torch.sigmoid(gate.to(acc))
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    shared_q, shared_k = q_local is q, k_local is k
    q, k, v, q_local, k_local = (t.to(acc) for t in (q, k, v, q_local, k_local))
    q_local, k_local = q if shared_q else q_local, k if shared_k else k_local  # no second copy or pad

    outs, start = [], 0
    if prefix is not None:
        # Finish the partial segment first; everything after it starts on a segment boundary.
        p = prefix[0].shape[1]
        start = min(length, segment_len - p)
        kp, vp, klp = (t.to(acc) for t in prefix)
        out, M, z = _segment(q[:, :start], torch.cat([kp, k[:, :start]], 1), torch.cat([vp, v[:, :start]], 1),
                             q_local[:, :start], torch.cat([klp, k_local[:, :start]], 1), w, M, z, scale,
                             delta_rule, fold=p + start == segment_len)
        outs.append(out)
    if start < length:
        sl = slice(start, length)
        out, M, z = _aligned_segments(q[:, sl], k[:, sl], v[:, sl], q_local[:, sl], k_local[:, sl], w, M, z,
                                      scale, segment_len, delta_rule, use_triton)
        outs.append(out)
    out = (torch.cat(outs, 1) if outs else q.new_zeros(b, 0, h, v.shape[3])).to(out_dtype)
    return (out, (M, z)) if return_memory else out


def _aligned_segments(q, k, v, q_local, k_local, w, M, z, scale, segment_len, delta_rule, use_triton=False):
    """Segments starting at token 0 of the given tensors; a trailing partial segment is not folded."""
    b, length, h, dk = q.shape
    hk, dv = k.shape[2], v.shape[3]
    n_seg, n_full = -(-length // segment_len), length // segment_len
    pad = n_seg * segment_len - length
    # Zero padding at the end only: causal masking keeps it out of every real query's view, and
    # the padded (partial) segment is never folded into the memory.
    padded = lambda t: F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
    q_local = padded(q_local) if q_local is not q else None
    k_local = padded(k_local) if k_local is not k else None
    q, k, v = padded(q), padded(k), padded(v)
    q_local, k_local = q if q_local is None else q_local, k if k_local is None else k_local
    seg = lambda t: t.reshape(b * n_seg, segment_len, *t.shape[2:])
    local = _local_attention(seg(q_local), seg(k_local), seg(v), scale).reshape(b, n_seg * segment_len, h, dv)
    if use_triton:
        from zoo.ops.triton.infini import infini_memory_triton
        mem, M, z = infini_memory_triton(q[:, :length], k[:, :length], v[:, :length], M, z, segment_len, delta_rule)
        return _mix(mem, local[:, :length], w), M, z

    sk = _sigma(k).view(b, n_seg, segment_len, hk, dk)
    vs = v.view(b, n_seg, segment_len, hk, dv)
    # z never reads M, under either rule: its value before each segment is an exclusive prefix sum.
    cz = sk[:, :n_full].sum(2).cumsum(1)
    z_before = z[:, None] + F.pad(cz, (0, 0, 0, 0, 1, 0))[:, :n_seg]
    if delta_rule:
        # The correction of segment s reads M_{s-1}: an ordered loop over segments. Its
        # denominators sigma(K_s) z_{s-1} are known up front (z does not depend on M), so the loop
        # holds two matrix products per segment and nothing else; keys and values are laid out
        # [b, segment, kv_head, token, dim] once, and taken apart with unbind (indexing sk[:, s]
        # would give every segment's backward its own zeroed full-size gradient buffer).
        den = torch.einsum("bstnk,bsnk->bsnt", sk, z_before)[..., None]
        filled = den > 0
        inv = torch.where(filled, den, torch.ones_like(den)).reciprocal() * filled   # 0 where empty
        sk_t, vs_t = sk.permute(0, 1, 3, 2, 4).contiguous(), vs.permute(0, 1, 3, 2, 4).contiguous()
        M_before = []
        for s, (sk_s, vs_s, inv_s) in enumerate(zip(sk_t.unbind(1), vs_t.unbind(1), inv.unbind(1))):
            M_before.append(M)
            if s < n_full:
                M = M + sk_s.transpose(-1, -2) @ (vs_s - (sk_s @ M) * inv_s)
        M_before = torch.stack(M_before, 1)
    else:
        dM = torch.einsum("bstnk,bstnv->bsnkv", sk[:, :n_full], vs[:, :n_full])
        # M before segment s = M_0 + sum_{s' < s} dM_s': an exclusive prefix sum over segments.
        cM = dM.cumsum(1)
        M_before = M[:, None] + F.pad(cM, (0, 0, 0, 0, 0, 0, 1, 0))[:, :n_seg]
        if n_full:
            M = M + cM[:, -1]
    if n_full:
        z = z + cz[:, -1]
    # Every segment's queries read their memory in one batched product.
    mem = _retrieve(seg(_sigma(q)), M_before.flatten(0, 1), z_before.flatten(0, 1), weight=w)
    mem = mem.reshape(b, n_seg * segment_len, h, dv)
    return _mix(mem, local, w, weighted=True)[:, :length], M, z


def _segment(q, k, v, q_local, k_local, w, M, z, scale, delta_rule, fold):
    """One segment whose Lq queries are the last Lq of its Lk keys (Lk - Lq from the prefix)."""
    out = _mix(_retrieve(_sigma(q), M, z, weight=w), _local_attention(q_local, k_local, v, scale), w, weighted=True)
    if fold:
        M, z = _fold(_sigma(k), v, M, z, delta_rule)
    return out, M, z


def _local_attention(q, k, v, scale):
    """Causal softmax attention, queries aligned to the last keys (bottom-right), GQA by SDPA."""
    lq, lk = q.shape[1], k.shape[1]
    mask = None
    if lq != lk:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=lq == lk and lq > 1, scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _retrieve(sq, M, z, weight=None):
    """sigma(Q) M / (sigma(Q) z) per kv head, 0 where the memory is empty. sq [B, T, h, dk].
    weight [h]: scales each query head's result (the gate), folded into the small reciprocal."""
    B, T, h, dk = sq.shape
    hk, dv = M.shape[1], M.shape[-1]
    sq = sq.reshape(B, T, hk, h // hk, dk)
    # z rides along as one more value column: numerator and denominator from one product.
    r = torch.einsum("btngk,bnkv->btngv", sq, torch.cat([M, z[..., None]], -1))
    num, den = r[..., :dv], r[..., dv:]
    filled = den > 0
    # A masked reciprocal of the small denominator, then one product: no full-size divide or where.
    inv = torch.where(filled, den, torch.ones_like(den)).reciprocal() * filled
    if weight is not None:
        inv = inv * weight.view(hk, h // hk, 1)
    return (num * inv).reshape(B, T, h, M.shape[-1])


def _fold(sk, v, M, z, delta_rule):
    """Add one complete segment to the memory. sk = sigma(K) [B, T, kv_heads, dk], v [B, T, kv_heads, dv]."""
    if delta_rule:
        # Only the part of V the memory does not already return for these keys is written.
        v = v - _retrieve(sk, M, z)
    return M + torch.einsum("btnk,btnv->bnkv", sk, v), z + sk.sum(1)


def _mix(mem, local, w, weighted=False):
    """sigmoid(beta) mem + (1 - sigmoid(beta)) local; `weighted`: mem already carries its factor."""
    if weighted:
        return torch.addcmul(mem, local, (1 - w)[:, None])
    return local + w[:, None] * (mem - local)   # = w mem + (1 - w) local, one product fewer


def _sigma(x):
    return F.elu(x) + 1


# ----------------------------------------------------------------------------------------------
# Reference: a loop over segments, dense masked softmax inside each, heads repeated for GQA.


def infini_attention_ref(q, k, v, gate, segment_len: int, memory: Optional[Memory] = None, delta_rule: bool = True,
                         return_memory: bool = False, *, q_local=None, k_local=None, scale: Optional[float] = None):
    """Slow twin of `infini_attention` (no `prefix`: streaming is checked against whole calls)."""
    q_local, k_local, _ = _check_inputs(q, k, v, gate, segment_len, memory, q_local, k_local, None)
    acc, out_dtype = _acc_dtype(q.dtype), q.dtype
    b, length, h, dk = q.shape
    hk = k.shape[2]
    groups = h // hk
    M, z = _initial_memory(memory, b, hk, dk, v.shape[3], acc, q.device)
    w = torch.sigmoid(gate.to(acc))[None, None, :, None]
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    q, k, v, q_local, k_local = (t.to(acc) for t in (q, k, v, q_local, k_local))
    sigma = lambda x: F.elu(x) + 1

    def read(sx, M, z):  # sx [b, n, heads, dk] against a memory of the same number of heads
        num = torch.einsum("bnhk,bhkv->bnhv", sx, M)
        den = torch.einsum("bnhk,bhk->bnh", sx, z)[..., None]
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))

    outs = []
    for s0 in range(0, length, segment_len):
        s1 = min(s0 + segment_len, length)
        n = s1 - s0
        ql = q_local[:, s0:s1].transpose(1, 2)
        kl = k_local[:, s0:s1].repeat_interleave(groups, 2).transpose(1, 2)
        vl = v[:, s0:s1].repeat_interleave(groups, 2).transpose(1, 2)
        logits = ql @ kl.transpose(-1, -2) * scale
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        local = (logits.masked_fill(future, -math.inf).softmax(-1) @ vl).transpose(1, 2)
        mem = read(sigma(q[:, s0:s1]), M.repeat_interleave(groups, 1), z.repeat_interleave(groups, 1))
        outs.append(w * mem + (1 - w) * local)
        if n == segment_len:
            sk, vs = sigma(k[:, s0:s1]), v[:, s0:s1]
            if delta_rule:
                vs = vs - read(sk, M, z)
            M = M + torch.einsum("bnhk,bnhv->bhkv", sk, vs)
            z = z + sk.sum(1)
    out = (torch.cat(outs, 1) if outs else q.new_zeros(b, 0, h, v.shape[3])).to(out_dtype)
    return (out, (M, z)) if return_memory else out


# ----------------------------------------------------------------------------------------------
# Checks and small helpers.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _initial_memory(memory, b, hk, dk, dv, acc, device):
    if memory is None:
        return (torch.zeros(b, hk, dk, dv, dtype=acc, device=device), torch.zeros(b, hk, dk, dtype=acc, device=device))
    return memory[0].to(acc), memory[1].to(acc)


def _check_inputs(q, k, v, gate, segment_len, memory, q_local, k_local, prefix):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"{name}: expected a tensor [batch, length, heads, head_dim], got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    b, length, h, dk = q.shape
    if k.shape[:2] != (b, length) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k, v: expected [batch, length, kv_heads, *] matching q {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != dk:
        raise ValueError(f"k: head_dim {k.shape[3]} differs from q's {dk}")
    if k.shape[2] < 1 or h % k.shape[2]:
        raise ValueError(f"k: kv heads ({k.shape[2]}) must divide the query heads ({h})")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v: need one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not torch.is_tensor(gate) or tuple(gate.shape) != (h,):
        raise ValueError(f"gate: expected logits of shape [heads] = ({h},), got "
                         f"{tuple(gate.shape) if torch.is_tensor(gate) else type(gate).__name__}")
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"segment_len: must be an integer >= 1, got {segment_len!r}")
    prefix_len = 2 if k_local is None else 3
    q_local = q if q_local is None else q_local
    k_local = k if k_local is None else k_local
    for name, t, like in (("q_local", q_local, q), ("k_local", k_local, k)):
        if not torch.is_tensor(t) or t.shape != like.shape or t.dtype != like.dtype:
            raise ValueError(f"{name}: must have the shape and dtype of {name[0]} ({tuple(like.shape)}, {like.dtype})")
    if memory is not None:
        hk, dv = k.shape[2], v.shape[3]
        if (not isinstance(memory, (tuple, list)) or len(memory) != 2
                or tuple(memory[0].shape) != (b, hk, dk, dv) or tuple(memory[1].shape) != (b, hk, dk)):
            raise ValueError(f"memory: expected (M, z) with M [batch, kv_heads, d_k, d_v] = {(b, hk, dk, dv)} and "
                             f"z [batch, kv_heads, d_k] = {(b, hk, dk)}")
    if prefix is not None:
        want = prefix_len
        if not isinstance(prefix, (tuple, list)) or len(prefix) != want:
            raise ValueError(f"prefix: expected {'(k, v)' if want == 2 else '(k, v, k_local)'} of the current "
                             f"partial segment ({'k_local was given' if want == 3 else 'no k_local was given'})")
        p = prefix[0].shape[1] if torch.is_tensor(prefix[0]) and prefix[0].dim() == 4 else -1
        for name, t, like in zip(("k", "v", "k_local"), prefix, (k, v, k_local)):
            if (not torch.is_tensor(t) or t.dim() != 4 or t.shape[1] != p or t.shape[0] != b
                    or t.shape[2:] != like.shape[2:] or t.dtype != like.dtype):
                raise ValueError(f"prefix: {name} must be [batch, P, {', '.join(map(str, like.shape[2:]))}] in "
                                 f"{like.dtype} with one P for all entries, got "
                                 f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
        if not 0 <= p < segment_len:
            raise ValueError(f"prefix: holds the unfinished segment, so its length P must satisfy "
                             f"0 <= P < segment_len ({segment_len}), got {p}")
        if want == 2:
            prefix = (prefix[0], prefix[1], prefix[0])
        if p == 0:
            prefix = None
    return q_local, k_local, prefix
