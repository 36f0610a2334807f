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
from zoo.ops.rope import apply_rope_half
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["infini_attention", "infini_attention_ref"]

Memory = Tuple[torch.Tensor, torch.Tensor]


def infini_attention(q, k, v, gate, segment_len: int, memory: Optional[Memory] = None, delta_rule: bool = True,
                     return_memory: bool = False, *, q_local=None, k_local=None, rope=None,
                     prefix: Optional[Sequence[torch.Tensor]] = None, scale: Optional[float] = None,
                     impl: str = "auto"):
    """Infini-attention over whole segments at once.

    The whole segments run in one autograd function (`_Segments`): the local attention of every
    segment batched a query tile at a time, the memory before each segment (an exclusive prefix sum
    of the segments' sigma(K)^T V with the linear update; an ordered loop over segments, never over
    tokens, with the delta rule, whose correction reads the memory just before each segment), the
    retrieval and the gate, with a hand-written backward. A trailing partial segment and the end of
    a `prefix`'s segment run through plain autograd ops (SDPA for their local attention).

    memory: (M, z) carried in, or None for an empty memory.
    rope: (cos, sin) [length, d_k / 2], the half tables of `zoo.ops.rope.rope_cos_sin_half` at the
        positions of q's tokens: the local path then reads q and k rotated by them (what
        `apply_rope_half` gives), rotated on the way into the tiles instead of as separate tensors.
        Excludes q_local and k_local; a `prefix` then holds (k, v, k rotated).
    prefix: the current partial segment's earlier tokens, (k, v) or, when k_local is given,
        (k, v, k_local), each [batch, P, kv_heads, *] with 0 <= P < segment_len (see module doc).
    impl: "auto" | "torch" | "triton" (the memory retrieval and update of the segment-aligned part
        fused per segment by `zoo.ops.triton.infini`; the local attention stays SDPA, the prefix's
        segment stays torch), see `zoo.ops.dispatch`.
    Returns out [batch, length, heads, d_v] in q's dtype, and with `return_memory` (out, (M, z)).
    """
    if rope is not None:
        _check_rope(rope, q, q_local, k_local)
        q_local, k_local = q, k   # checked as such (a prefix then holds k rotated); rotated later, not copied
    q_local, k_local, prefix = _check_inputs(q, k, v, gate, segment_len, memory, q_local, k_local, prefix)
    use_triton = choose("infini", impl, q) == "triton"
    acc, out_dtype = accumulation_dtype(q.dtype), q.dtype
    b, length, h, dk = q.shape
    M, z = _initial_memory(memory, b, k.shape[2], dk, v.shape[3], acc, q.device)
    w = torch.sigmoid(gate.to(acc))
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    shared_q, shared_k = q_local is q, k_local is k
    q, k, v, q_local, k_local = (t.to(acc) for t in (q, k, v, q_local, k_local))
    q_local, k_local = q if shared_q else q_local, k if shared_k else k_local  # no second copy or pad
    if rope is not None:
        rope = tuple(t.to(acc) for t in rope)
        q_local = k_local = None
    local = _Local(q, k, q_local, k_local, rope)

    outs, start = [], 0
    if prefix is not None:
        # Finish the partial segment first; everything after it starts on a segment boundary.
        p = prefix[0].shape[1]
        start = min(length, segment_len - p)
        kp, vp, klp = (t.to(acc) for t in prefix)
        ql, kl = local.rotated(slice(0, start))
        out, M, z = _segment(q[:, :start], torch.cat([kp, k[:, :start]], 1), torch.cat([vp, v[:, :start]], 1),
                             ql, torch.cat([klp, kl], 1), w, M, z, scale, delta_rule, fold=p + start == segment_len)
        outs.append(out)
    if start < length:
        out, M, z = _aligned_segments(local.part(slice(start, length)), v[:, start:], w, M, z, scale, segment_len,
                                      delta_rule, use_triton)
        outs.append(out)
    out = (torch.cat(outs, 1) if outs else q.new_zeros(b, 0, h, v.shape[3])).to(out_dtype)
    return (out, (M, z)) if return_memory else out


class _Local:
    """The inputs of the local path: q_local, k_local as given, or q, k and the RoPE tables that rotate them."""

    def __init__(self, q, k, q_local, k_local, rope):
        self.q, self.k, self.q_local, self.k_local, self.rope = q, k, q_local, k_local, rope

    def part(self, sl: slice) -> "_Local":
        cut = lambda t: None if t is None else t[:, sl]
        rope = None if self.rope is None else tuple(t[sl] for t in self.rope)
        return _Local(cut(self.q), cut(self.k), cut(self.q_local), cut(self.k_local), rope)

    def rotated(self, sl: slice):
        """q_local, k_local of the tokens in `sl` as tensors."""
        if self.rope is None:
            return self.q_local[:, sl], self.k_local[:, sl]
        cos, sin = (t[sl] for t in self.rope)
        return apply_rope_half(self.q[:, sl], cos, sin), apply_rope_half(self.k[:, sl], cos, sin)


def _aligned_segments(local: _Local, v, w, M, z, scale, segment_len, delta_rule, use_triton=False):
    """Segments starting at token 0 of the given tensors; a trailing partial segment is not folded."""
    q, k = local.q, local.k
    length = q.shape[1]
    if use_triton:
        q_local, k_local = local.rotated(slice(0, length))
        return _aligned_segments_triton(q, k, v, q_local, k_local, w, M, z, scale, segment_len, delta_rule)
    full = length - length % segment_len
    outs = []
    if full:
        whole = local.part(slice(0, full))
        cos, sin = (None, None) if whole.rope is None else whole.rope
        out, M, z = _Segments.apply(whole.q, whole.k, v[:, :full], whole.q_local, whole.k_local, cos, sin, w, M, z,
                                    segment_len, scale, delta_rule)
        outs.append(out)
    if full < length:
        # The partial last segment reads the memory of every whole one and is not folded.
        sl = slice(full, length)
        ql, kl = local.rotated(sl)
        out, _, _ = _segment(q[:, sl], k[:, sl], v[:, sl], ql, kl, w, M, z, scale, delta_rule, fold=False)
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), M, z


def _aligned_segments_triton(q, k, v, q_local, k_local, w, M, z, scale, segment_len, delta_rule):
    from zoo.ops.triton.infini import infini_memory_triton
    b, length, h, dk = q.shape
    dv = v.shape[3]
    n_seg = -(-length // segment_len)
    pad = n_seg * segment_len - length
    # Zero padding at the end only: causal masking keeps it out of every real query's view.
    padded = lambda t: F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
    seg = lambda t: padded(t).reshape(b * n_seg, segment_len, *t.shape[2:])
    local = _local_attention(seg(q_local), seg(k_local), seg(v), scale).reshape(b, n_seg * segment_len, h, dv)
    mem, M, z = infini_memory_triton(q, k, v, M, z, segment_len, delta_rule)
    return _mix(mem, local[:, :length], w), M, z


# Rows per query tile of the local attention (`_Segments`): a tile of queries against every key of
# its segment up to the tile's end, so a segment of S tokens costs S / tile products and the causal
# triangle's empty corner is skipped a tile at a time. Measured (CPU, one thread, 8K tokens, 4 heads
# x 64, local attention fwd + bwd alone): at segment 512, 163 ms with tiles of 64, 166 ms with 128,
# 241 ms for SDPA's flash kernel; at segment 128, 69 / 77 / 74 ms.
_TILE = 64
# Segments up to this length keep their local attention's probabilities for the backward (about
# segment_len / 2 floats per query and head: 37 MiB at 8K tokens, 4 heads, segment 512); longer ones
# keep one log-sum-exp per row and recompute the probabilities (one more product per tile).
_KEEP_PROBS = 512


def _tile_rows(segment_len: int) -> int:
    """The largest divisor of segment_len up to _TILE; the whole segment when that divisor is under
    _TILE / 4 (a prime segment_len: one dense tile beats many thin ones)."""
    t = next(t for t in range(min(segment_len, _TILE), 0, -1) if segment_len % t == 0)
    return t if 4 * t >= min(segment_len, _TILE) else segment_len


class _Segments(torch.autograd.Function):
    """Whole segments: local attention, memory chain, retrieval and gate in one pass, by hand backward.

    q, q_local [b, n S, h, dk]; k, k_local [b, n S, hk, dk]; v [b, n S, hk, dv]; w = sigmoid(gate) [h];
    M [b, hk, dk, dv], z [b, hk, dk]. Returns out [b, n S, h, dv] and the memory after the n segments.

    Layout. Keys and values go to [b, hk, n, S, d] (one copy each): every segment of every kv head is
    one batch entry of a batched product, N = b hk n of them. Queries go to [g, S / tile, b, hk, n,
    tile, d] (g = h / hk query heads per kv head): for each (group member, tile) the rows are one
    [N, tile, d] block. A query tile i reads the keys [0, (i + 1) tile) of its segment: one product,
    the causal mask on its last tile x tile block only, a plain softmax over whole rows (no online
    rescaling: every visible key is in the product). Up to `_KEEP_PROBS` the probabilities are kept for
    the backward (tile x (i + 1) tile per tile: about S / 2 floats per query and head), which then
    needs no recomputation; longer segments keep each row's log-sum-exp and recompute them.

    Memory. z before each segment is a prefix sum; M before each segment is one too (linear update)
    or comes from an ordered loop of two products per segment (delta rule). The value column z rides
    beside M ([M | z], dk x (dv + 1)), so retrieval is one product per tile giving numerator and
    denominator. The delta rule's folds keep their retrieval (numerators and reciprocals) for the
    backward, which walks the same chain in reverse. sigma'(x) = min(sigma(x), 1) for sigma = ELU + 1,
    so sigma(q), sigma(k) are all that is saved of the memory path's inputs. With `cos`, `sin` (RoPE
    half tables) q and k are rotated on their way into the local path's tiles, and the backward rotates
    that path's gradient back (by -angle) into the same dq, dk."""

    @staticmethod
    def forward(ctx, q, k, v, q_local, k_local, cos, sin, w, M0, z0, segment_len, scale, delta_rule):
        b, length, h, dk = q.shape
        hk, dv = k.shape[2], v.shape[3]
        g, S = h // hk, segment_len
        c = _tile_rows(S)
        n, nt = length // S, S // c
        N = b * hk * n
        # One copy of q (k) into the tiles feeds both paths: sigma of it for the memory, and (unless
        # q_local is given) the same buffer rotated in place for the local attention.
        qt, kt = _query_tiles(q, hk, S, c), _kv_tiles(k, S)
        sqt, skt = _sigma_fast(qt), _sigma_fast(kt)
        if cos is None:
            qlt, klt = _query_tiles(q_local, hk, S, c).mul_(scale), _kv_tiles(k_local, S)
        else:
            qlt, klt = qt, kt
            _rotate(_query_buffer_view(qlt, b, hk), *_query_tables(cos * scale, sin * scale, S, c))
            _rotate(_kv_buffer_view(klt, b, hk), *_kv_tables(cos, sin, S))
        vt = _kv_tiles(v, S)

        # The memory before each segment, [M | z] per (b, kv head, segment).
        skv, vv = skt.view(b, hk, n, S, dk), vt.view(b, hk, n, S, dv)
        cz = skv.sum(3)                                                      # [b, hk, n, dk]
        Mz = q.new_empty(b, hk, n, dk, dv + 1)
        zb = _prefix_sums(cz, z0)
        Mz[..., dv] = zb
        num_k = inv_k = None
        if delta_rule:
            # Each fold's correction sigma(K) M / (sigma(K) z): the denominators of every segment at once (z
            # does not depend on M), the numerators in the ordered loop; both kept for the backward.
            inv_k = _reciprocal(torch.matmul(skv, zb[..., None]))          # [b, hk, n, S, 1]
            num_k = q.new_empty(b, hk, n, S, dv)
            M = M0.reshape(b * hk, dk, dv)
            for s in range(n):
                Mz[:, :, s, :, :dv] = M.view(b, hk, dk, dv)
                sk_s = skv[:, :, s].reshape(b * hk, S, dk)
                num = torch.bmm(sk_s, M)
                num_k[:, :, s] = num.view(b, hk, S, dv)
                u = torch.addcmul(vv[:, :, s].reshape(b * hk, S, dv), num, inv_k[:, :, s].reshape(b * hk, S, 1),
                                  value=-1)
                M = torch.baddbmm(M, sk_s.transpose(1, 2), u)
            M = M.view(b, hk, dk, dv)
        else:
            dM = torch.matmul(skv.transpose(-1, -2), vv)                   # [b, hk, n, dk, dv]
            Mz[..., :dv] = _prefix_sums(dM, M0)
            M = M0 + dM.sum(2)
        z = z0 + cz.sum(2)

        out = q.new_empty(b, length, h, dv)
        out_t = _query_tiles_view(out, hk, S, c)                            # [g, nt, b, hk, n, c, dv]
        olt = q.new_empty(g, nt, N, c, dv)
        inv_t = q.new_empty(g, nt, N, c, 1)
        mzf = Mz.view(N, dk, dv + 1)
        wt = w.view(hk, g).t()
        causal = torch.full((c, c), -math.inf, dtype=q.dtype, device=q.device).triu(1)
        keep = S <= _KEEP_PROBS
        probs = []    # per tile: the probabilities (keep) or their rows' log-sum-exp
        for gi in range(g):
            w_on, w_off = wt[gi].view(1, hk, 1, 1, 1), (1 - wt[gi]).view(1, hk, 1, 1, 1)
            for ti in range(nt):
                j = (ti + 1) * c
                s = torch.bmm(qlt[gi, ti], klt[:, :j].transpose(1, 2))
                s[:, :, j - c:] += causal
                if keep:
                    p = torch.softmax(s, -1)
                    probs.append(p)
                else:
                    lse = torch.logsumexp(s, -1, keepdim=True)
                    p = s.sub_(lse).exp_()
                    probs.append(lse)
                torch.bmm(p, vt[:, :j], out=olt[gi, ti])
                nd = torch.bmm(sqt[gi, ti], mzf)
                inv = inv_t[gi, ti]
                inv.copy_(_reciprocal(nd[..., dv:]))
                o = out_t[gi, ti]
                torch.mul(nd[..., :dv].view(b, hk, n, c, dv), inv.view(b, hk, n, c, 1) * w_on, out=o)
                o.addcmul_(olt[gi, ti].view(b, hk, n, c, dv), w_off)
        ctx.save_for_backward(qlt, klt, vt, sqt, skt, olt, inv_t, Mz, num_k, inv_k, w, cos, sin, *probs)
        ctx.shape = (b, length, h, hk, dk, dv, S, c, scale, delta_rule, keep)
        return out, M, z

    @staticmethod
    def backward(ctx, dout, dM_end, dz_end):
        qlt, klt, vt, sqt, skt, olt, inv_t, Mz, num_k, inv_k, w, cos, sin, *probs = ctx.saved_tensors
        b, length, h, hk, dk, dv, S, c, scale, delta_rule, keep = ctx.shape
        g, n, nt = h // hk, length // S, S // c
        N = b * hk * n
        causal = None if keep else torch.full((c, c), -math.inf, dtype=qlt.dtype, device=qlt.device).triu(1)
        do_t = _query_tiles_view(dout.contiguous(), hk, S, c)
        mzf = Mz.view(N, dk, dv + 1)
        wt = w.view(hk, g).t()
        dqlt, dsqt = torch.empty_like(qlt), torch.empty_like(sqt)
        dklt = dvt = None
        dnd = vt.new_empty(N, c, dv + 1)
        dmzf = torch.zeros_like(mzf)
        dw = w.new_zeros(g, hk)
        for gi in range(g):
            per_row = lambda x: x.view(1, hk, 1).expand(b, hk, n).reshape(N, 1, 1)
            w_on, w_off = per_row(wt[gi]), per_row(1 - wt[gi])
            for ti in reversed(range(nt)):
                j = (ti + 1) * c
                do = do_t[gi, ti].reshape(N, c, dv)
                o = olt[gi, ti]
                d_local = (do * o).sum(-1, keepdim=True)                   # rowsum(dout * local)
                # local attention, its output scaled by 1 - w
                dol = do * w_off
                p = probs[gi * nt + ti]
                if not keep:   # recomputed from the scores and their log-sum-exp
                    s = torch.bmm(qlt[gi, ti], klt[:, :j].transpose(1, 2))
                    s[:, :, j - c:] += causal
                    p = s.sub_(p).exp_()
                ds = torch.baddbmm(d_local * w_off, dol, vt[:, :j].transpose(1, 2), beta=-1).mul_(p)
                torch.bmm(ds, klt[:, :j], out=dqlt[gi, ti])
                if dklt is None:   # the first tile visited is a last one: it reaches every key
                    dvt, dklt = torch.bmm(p.transpose(1, 2), dol), torch.bmm(ds.transpose(1, 2), qlt[gi, ti])
                else:
                    dvt[:, :j] += torch.bmm(p.transpose(1, 2), dol)
                    dklt[:, :j] += torch.bmm(ds.transpose(1, 2), qlt[gi, ti])
                # memory retrieval num * inv, scaled by w
                nd = torch.bmm(sqt[gi, ti], mzf)
                inv = inv_t[gi, ti]
                e = (do * nd[..., :dv]).sum(-1, keepdim=True)              # rowsum(dout * num)
                torch.mul(do, inv * w_on, out=dnd[..., :dv])
                torch.mul(e * inv.square(), -w_on, out=dnd[..., dv:])
                torch.bmm(dnd, mzf.transpose(1, 2), out=dsqt[gi, ti])
                dmzf.baddbmm_(sqt[gi, ti].transpose(1, 2), dnd)
                # gate: out = w mem + (1 - w) local, so dw = rowsum(dout * (mem - local))
                dw[gi] += (e * inv - d_local).view(b, hk, n * c).sum((0, 2))

        # The memory chain in reverse: dM, dz before each segment -> dsigma(k), dv, dM0, dz0.
        skv, vv = skt.view(b, hk, n, S, dk), vt.view(b, hk, n, S, dv)
        dmz = dmzf.view(b, hk, n, dk, dv + 1)
        dM_end = torch.zeros_like(Mz[:, :, 0, :, :dv]) if dM_end is None else dM_end
        dz_end = torch.zeros_like(Mz[:, :, 0, :, dv]) if dz_end is None else dz_end
        if delta_rule:
            dskv, dvv = torch.empty_like(skv), torch.empty_like(vv)
            d_den_k = torch.empty_like(inv_k)
            inv2_k = inv_k.square()
            G = dM_end.reshape(b * hk, dk, dv)        # the gradient of the memory after segment s
            for s in reversed(range(n)):
                sk_s = skv[:, :, s].reshape(b * hk, S, dk)
                num, inv = num_k[:, :, s].reshape(b * hk, S, dv), inv_k[:, :, s].reshape(b * hk, S, 1)
                M_s, z_s = Mz[:, :, s, :, :dv].reshape(b * hk, dk, dv), Mz[:, :, s, :, dv].reshape(b * hk, 1, dk)
                u = torch.addcmul(vv[:, :, s].reshape(b * hk, S, dv), num, inv, value=-1)
                du = torch.bmm(sk_s, G)
                dvv[:, :, s] = du.view(b, hk, S, dv)
                # the write u = v - num * inv: d num = -du * inv, d den = rowsum(du * num) * inv^2
                d_num = torch.mul(du, inv).neg_()
                d_den = (du * num).sum(-1, keepdim=True).mul_(inv2_k[:, :, s].reshape(b * hk, S, 1))
                d_den_k[:, :, s] = d_den.view(b, hk, S, 1)
                dsk = torch.bmm(u, G.transpose(1, 2)).baddbmm_(d_num, M_s.transpose(1, 2)).addcmul_(d_den, z_s)
                dskv[:, :, s] = dsk.view(b, hk, S, dk)
                G = torch.baddbmm(G + dmz[:, :, s, :, :dv].reshape(b * hk, dk, dv), sk_s.transpose(1, 2), d_num)
            dM0 = G.view(b, hk, dk, dv)
            dmz[..., dv] += torch.matmul(d_den_k.transpose(-1, -2), skv).squeeze(3)   # the folds' use of z
        else:
            # M before segment s = M0 + sum_{s' < s} sigma(K_s')^T V_s': each segment's fold feeds every later one.
            G = _prefix_sums(dmz[..., :dv], dM_end, reverse=True)
            dskv = torch.matmul(vv, G.transpose(-1, -2))
            dvv = torch.matmul(skv, G)
            dM0 = dM_end + dmz[..., :dv].sum(2)
        dzb = dmz[..., dv]
        dskv += _prefix_sums(dzb, dz_end, reverse=True)[:, :, :, None]
        dz0 = dz_end + dzb.sum(2)
        dvt += dvv.view_as(dvt)

        # sigma'(x) = min(sigma(x), 1); with rope, the local path's gradient rotated back joins the memory path's
        dsqt.mul_(sqt.clamp(max=1))
        dskt = dskv.view_as(skt).mul_(skt.clamp(max=1))
        dq_local = dk_local = None
        if cos is None:
            dq_local = _from_query_tiles(dqlt.mul_(scale), b, length, hk, S, c)
            dk_local = _from_kv_tiles(dklt, b, length, hk)
        else:
            # the rotation's transpose is the rotation by -angle
            _rotate(_query_buffer_view(dqlt, b, hk), *_query_tables(cos * scale, sin * -scale, S, c))
            _rotate(_kv_buffer_view(dklt, b, hk), *_kv_tables(cos, -sin, S))
            dsqt += dqlt
            dskt += dklt
        dq, dk_ = _from_query_tiles(dsqt, b, length, hk, S, c), _from_kv_tiles(dskt, b, length, hk)
        dv_ = _from_kv_tiles(dvt, b, length, hk)
        return (dq, dk_, dv_, dq_local, dk_local, None, None, dw.t().reshape(h), dM0, dz0, None, None, None)


def _query_tiles_view(x, kv_heads, segment_len, tile):
    """[b, n S, h, d] -> the view [g, S / tile, b, kv_heads, n, tile, d] (query head = kv head * g + group)."""
    b, length, h, d = x.shape
    n, g = length // segment_len, h // kv_heads
    return x.reshape(b, n, segment_len // tile, tile, kv_heads, g, d).permute(5, 2, 0, 4, 1, 3, 6)


def _kv_tiles_view(x, segment_len):
    """[b, n S, hk, d] -> the view [b, hk, n, S, d]."""
    b, length, hk, d = x.shape
    return x.reshape(b, length // segment_len, segment_len, hk, d).permute(0, 3, 1, 2, 4)


def _query_buffer_view(t, b, kv_heads):
    """A query tile buffer [g, S / tile, b hk n, tile, d] as [g, S / tile, b, hk, n, tile, d]."""
    g, nt, N, tile, d = t.shape
    return t.view(g, nt, b, kv_heads, N // (b * kv_heads), tile, d)


def _kv_buffer_view(t, b, kv_heads):
    """A key / value buffer [b hk n, S, d] as [b, hk, n, S, d]."""
    N, S, d = t.shape
    return t.view(b, kv_heads, N // (b * kv_heads), S, d)


def _query_tables(cos, sin, segment_len, tile):
    """RoPE half tables [n S, d / 2] laid out to broadcast against `_query_buffer_view`."""
    view = lambda t: t.view(-1, segment_len // tile, tile, t.shape[-1]).permute(1, 0, 2, 3)[None, :, None, None]
    return view(cos), view(sin)


def _kv_tables(cos, sin, segment_len):
    """RoPE half tables [n S, d / 2] laid out to broadcast against `_kv_buffer_view`."""
    view = lambda t: t.view(-1, segment_len, t.shape[-1])[None, None]
    return view(cos), view(sin)


def _rotate(x, cos, sin):
    """x rotated in place by the half tables, as `apply_rope_half` rotates."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:]
    x1_sin = x1 * sin
    x1.mul_(cos).addcmul_(x2, sin, value=-1)
    x2.mul_(cos).add_(x1_sin)


def _query_tiles(x, kv_heads, segment_len, tile):
    """[b, n S, h, d] -> [g, S / tile, b hk n, tile, d], a new contiguous tensor."""
    view = _query_tiles_view(x, kv_heads, segment_len, tile)
    out = x.new_empty(view.shape).copy_(view)
    g, nt = out.shape[:2]
    return out.view(g, nt, -1, tile, x.shape[-1])


def _from_query_tiles(t, b, length, kv_heads, segment_len, tile):
    """[g, S / tile, b hk n, tile, d] -> [b, n S, h, d], a new tensor."""
    out = t.new_empty(b, length, kv_heads * t.shape[0], t.shape[-1])
    _query_tiles_view(out, kv_heads, segment_len, tile).copy_(_query_buffer_view(t, b, kv_heads))
    return out


def _kv_tiles(x, segment_len):
    """[b, n S, hk, d] -> [b hk n, S, d], a new contiguous tensor."""
    view = _kv_tiles_view(x, segment_len)
    return x.new_empty(view.shape).copy_(view).view(-1, segment_len, x.shape[-1])


def _from_kv_tiles(t, b, length, kv_heads):
    """[b hk n, S, d] -> [b, n S, hk, d], a new tensor."""
    out = t.new_empty(b, length, kv_heads, t.shape[-1])
    _kv_tiles_view(out, t.shape[1]).copy_(_kv_buffer_view(t, b, kv_heads))
    return out


def _prefix_sums(x, start, reverse=False):
    """start + the sum of x over the segments before each one (after it, with `reverse`).
    x [b, hk, n, *]; start [b, hk, *]. One product with a triangular matrix of ones: cumsum along a
    middle dimension of a large tensor is several times slower here, and needs a shift besides."""
    b, hk, n = x.shape[:3]
    ones = torch.ones(n, n, dtype=x.dtype, device=x.device)
    tri = ones.triu(1) if reverse else ones.tril(-1)
    flat = x.reshape(b * hk, n, -1)
    out = torch.baddbmm(start.reshape(b * hk, 1, -1), tri.expand(b * hk, n, n), flat)
    return out.view(x.shape)


def _sigma_fast(x):
    """ELU + 1 as exp(min(x, 0)) + max(x, 0): the same values (exp instead of expm1 + 1), a faster kernel here."""
    return x.clamp(max=0).exp_().add_(x.clamp(min=0))


def _reciprocal(den):
    """1 / den where den > 0, else 0 (an empty memory retrieves 0; no 0/0 reaches any gradient)."""
    filled = den > 0
    return torch.where(filled, den, torch.ones_like(den)).reciprocal() * filled


def _segment(q, k, v, q_local, k_local, w, M, z, scale, delta_rule, fold):
    """One segment whose Lq queries are the last Lq of its Lk keys (Lk - Lq from the prefix)."""
    out = _mix(_retrieve(elu_plus_one(q), M, z, weight=w), _local_attention(q_local, k_local, v, scale), w, weighted=True)
    if fold:
        M, z = fold_segment(elu_plus_one(k), v, M, z, delta_rule)
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


def fold_segment(sk, v, M, z, delta_rule):
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


def elu_plus_one(x):
    return F.elu(x) + 1


# ----------------------------------------------------------------------------------------------
# Reference: a loop over segments, dense masked softmax inside each, heads repeated for GQA.


def infini_attention_ref(q, k, v, gate, segment_len: int, memory: Optional[Memory] = None, delta_rule: bool = True,
                         return_memory: bool = False, *, q_local=None, k_local=None, scale: Optional[float] = None):
    """Slow twin of `infini_attention` (no `prefix`: streaming is checked against whole calls)."""
    q_local, k_local, _ = _check_inputs(q, k, v, gate, segment_len, memory, q_local, k_local, None)
    acc, out_dtype = accumulation_dtype(q.dtype), q.dtype
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


def _initial_memory(memory, b, hk, dk, dv, acc, device):
    if memory is None:
        return (torch.zeros(b, hk, dk, dv, dtype=acc, device=device), torch.zeros(b, hk, dk, dtype=acc, device=device))
    return memory[0].to(acc), memory[1].to(acc)


def _check_rope(rope, q, q_local, k_local):
    if q_local is not None or k_local is not None:
        raise ValueError("rope: the local path's q, k are either given (q_local, k_local) or rotated by rope, not both")
    length, d = q.shape[1], q.shape[3]
    if (not isinstance(rope, (tuple, list)) or len(rope) != 2 or not all(torch.is_tensor(t) for t in rope)
            or any(tuple(t.shape) != (length, d // 2) for t in rope) or d % 2):
        shape = lambda t: tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        got = [shape(t) for t in rope] if isinstance(rope, (tuple, list)) else shape(rope)
        raise ValueError(f"rope: expected (cos, sin) half tables of shape [length, d_k / 2] = ({length}, {d // 2}) "
                         f"(zoo.ops.rope.rope_cos_sin_half), got {got}")


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
