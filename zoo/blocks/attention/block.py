"""The attention blocks: `attn`, `blockwise`, `ring` and `swa` (package docstring). The math lives in
zoo.ops.attention; the context-parallel paths (the ring; swa's halo exchange) in `cp.py`."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.attention.cache import AttentionCache
from zoo.blocks.attention.config import AttnConfig, BlockwiseConfig, SwaConfig
from zoo.blocks.attention.cp import attention_cp, swa_cp
from zoo.blocks.base import Block
from zoo.ops.attention import attention, blockwise_attention
from zoo.ops.documents import check_block_documents, document_positions
from zoo.ops.rope import apply_rope_half, rope_cos_sin, rope_cos_sin_half
from zoo.registry import register_block


class CausalSelfAttention(Block):
    """q/k/v projections, RoPE, an attention op, output projection; cache = rotated K/V.

    RoPE rotates the first `rope_dim` dims of each head (all by default; none with `rope_base: null`);
    `scale` overrides the softmax scale 1 / sqrt(head_dim) (Granite's attention_multiplier); `logn_length`
    sharpens the queries that see more keys than it (log-length scaling).
    seq_idx (packed documents): RoPE at each token's position in its document and document masking
    in the attention op, so every token gets what its document alone would give."""

    window: Optional[int] = None
    supports_seq_idx = True
    supports_cp = True

    def __init__(self, d_model: int, cfg: AttnConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or d_model // cfg.n_heads
        self.rope_dim = cfg.rope_dim or self.head_dim
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=cfg.out_bias)
        if cfg.qk_norm:   # over each head's dims, or over all of q's (k's) channels
            heads = cfg.qk_norm_scope == "all"
            self.q_norm = nn.RMSNorm(self.head_dim * (self.n_heads if heads else 1), eps=cfg.qk_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim * (self.n_kv_heads if heads else 1), eps=cfg.qk_norm_eps)
        if cfg.output_gate:
            self.gate_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=cfg.qkv_bias)

    def project(self, x):
        """Un-rotated q [b, t, heads, hd], k and v [b, t, kv_heads, hd] (q and k normalised with qk_norm)."""
        b, t, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.cfg.qk_norm and self.cfg.qk_norm_scope == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(b, t, self.n_heads, self.head_dim), k.view(b, t, self.n_kv_heads, self.head_dim)
        if self.cfg.qk_norm and self.cfg.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)

    def output(self, out, x):
        """out_proj of the heads' outputs out [b, t, heads, hd], each gated by sigmoid(W_g x) with output_gate."""
        b, t = out.shape[:2]
        if self.cfg.output_gate:
            out = out * torch.sigmoid(self.gate_proj(x).view(b, t, self.n_heads, self.head_dim))
        return self.out_proj(out.reshape(b, t, self.n_heads * self.head_dim))

    def _positions(self, start: int, end: int, device, row_start=None):
        """Absolute positions [start, end); with `row_start` [batch] (a left-padded batch, see
        `_attend_left_padded`) per row, counted from the row's first token: [batch, end - start]."""
        positions = torch.arange(start, end, device=device)
        if row_start is not None:
            positions = (positions[None] - row_start[:, None]).clamp(min=0)
        return positions

    def _rope(self, start: int, end: int, device, row_start=None):
        """cos, sin [(batch,) end - start, rope_dim] at `_positions(start, end, device, row_start)`."""
        return rope_cos_sin(self._positions(start, end, device, row_start), self.rope_dim, self.cfg.rope_base)

    def _rotate(self, q, k, positions):
        """q and k rotated at `positions` ([length] or [batch, length]); unchanged with rope_base null. Every path
        (one pass, cache, packed documents, context parallel) comes here with its queries' own positions, so
        logn_length's query scale is applied here too."""
        if self.cfg.logn_length is not None:
            q = q * self._logn_scale(positions).to(q.dtype)
        if self.cfg.rope_base is None:
            return q, k
        cos, sin = rope_cos_sin_half(positions, self.rope_dim, self.cfg.rope_base)
        return apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)

    def _logn_scale(self, positions):
        """max(1, log n / log logn_length) [(batch,) length, 1, 1], n the keys each query sees (in float64)."""
        keys = positions.to(torch.float64) + 1
        window = getattr(self.cfg, "window", None)
        if window is not None:
            keys = keys.clamp(max=window)
        return (keys.log() / math.log(self.cfg.logn_length)).clamp(min=1)[..., None, None]

    def _attend(self, q, k, v, seq_idx=None):
        return attention(q, k, v, causal=True, scale=self.cfg.scale, seq_idx=seq_idx)

    def _ring(self) -> Optional[int]:
        """The cache's ring size (swa: the window), None for a cache that keeps every key."""
        return None

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            return self._forward_cp(x, cp, cache)
        b, t, _ = x.shape
        start = 0 if cache is None else cache.pos
        row_start = None if cache is None else cache.row_start
        q, k, v = self.project(x)
        positions = self._positions(start, start + t, x.device, row_start) if seq_idx is None \
            else document_positions(seq_idx)
        q, k = self._rotate(q, k, positions)
        if cache is not None:
            out = self._attend_cached(q, k, v, cache)
        elif seq_idx is None:
            out = self._attend(q, k, v)
        else:
            out = self._attend(q, k, v, seq_idx)
        return self.output(out, x)

    def _attend_cached(self, q, k, v, cache: AttentionCache):
        """The t new tokens' attention through the cache, which they join (written in place)."""
        t, end, row_start = q.shape[1], cache.pos + q.shape[1], cache.row_start
        if t == 1:
            cache.append(k, v)
            return self._attend_decode(q, cache)
        if cache.kept == 0:
            keys, values = k, v
            cache.append(k, v)
        elif cache.ring is None:
            cache.append(k, v)
            keys, values = cache.k, cache.v        # views of the buffers: [0, end) in time order
        else:
            # the chunk's keys go into slots its first queries still read: read the window first
            keys = torch.cat([cache.k, k.to(cache.keys.dtype)], 1)
            values = torch.cat([cache.v, v.to(cache.values.dtype)], 1)
            cache.append(k, v)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if row_start is None:
            return self._attend(q, keys, values)
        return self._attend_left_padded(q, keys, values, end, row_start)

    def _attend_decode(self, q, cache: AttentionCache):
        """One query per row against the cache's written slots (its own key among them), read in place.
        Every slot is within the window (a ring holds exactly the window), so only a left-padded batch's
        padding slots are masked (`key_mask`). The query heads that share a kv head are SDPA's query rows:
        GQA without repeating K and V (with one query there is no causal order to keep)."""
        b, _, h, d = q.shape
        keys, values = cache.slots("keys"), cache.slots("values")
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        mask = None if cache.key_mask is None else cache.slots("key_mask")[:, None, None, :]
        out = F.scaled_dot_product_attention(q.reshape(b, keys.shape[1], h // keys.shape[1], d), keys, values,
                                             attn_mask=mask, scale=self.cfg.scale)
        return out.reshape(b, 1, h, d)

    def _forward_cp(self, x, cp, cache=None):
        """Context parallel (x: this rank's shard): the ring over ranks (swa: a halo exchange)."""
        return attention_cp(self, x, cp, cache)

    def project_rotated(self, x, positions):
        """q, k rotated at `positions` [length] (global positions of a cp shard), v; all [b, t, heads, hd]."""
        q, k, v = self.project(x)
        return (*self._rotate(q, k, positions), v)

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> AttentionCache:
        return AttentionCache.empty(batch_size, self.n_kv_heads, self.head_dim, device, dtype, ring=self._ring())

    def init_left_padded_cache(self, row_start, device=None, dtype=torch.float32) -> Optional[AttentionCache]:
        """The padded batch prefills at once: RoPE at each row's own positions and `_attend_left_padded`
        masking the padding keys give every row what it gives alone. A family that brings its own forward
        (selective, infini) prefills row by row (None)."""
        if type(self).forward is not CausalSelfAttention.forward:
            return None
        cache = self.init_cache(len(row_start), device, dtype)
        cache.row_start = row_start
        return cache

    def merge_left_padded(self, caches: Sequence[AttentionCache], row_start, length: int) -> AttentionCache:
        """K and V left-padded with zeros to the longest row; forward masks the padding keys by `row_start`
        and rotates each row's queries and keys at its own positions (`_attend_left_padded`)."""
        return AttentionCache.left_padded(caches, row_start, length)

    def _attend_left_padded(self, q, k, v, end: int, row_start):
        """Attention for a left-padded batch decoding through one cache (zoo.hf): row r's own tokens begin
        at position row_start[r] of the shared timeline, the cached keys before it are padding and stay
        masked, so each row attends exactly as it would alone. q holds positions [end - Lq, end), k and v
        the last Lk. The mask is dense, [batch, Lq, Lk]: meant for decoding steps, where Lq is 1."""
        lq, lk = q.shape[1], k.shape[1]
        q_pos = torch.arange(end - lq, end, device=q.device)[:, None]
        k_pos = torch.arange(end - lk, end, device=q.device)[None, :]
        visible = k_pos <= q_pos
        window = getattr(self.cfg, "window", None)
        if window is not None:
            visible = visible & (k_pos > q_pos - window)
        # a query at a padding position (none while decoding) sees itself, so no row of the softmax is empty
        visible = (visible[None] & (k_pos[None] >= row_start[:, None, None])) | (k_pos == q_pos)[None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=visible[:, None], scale=self.cfg.scale,
                                             enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    def _cached_tokens(self, seq_len: int) -> int:
        return seq_len

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * batch_size * self._cached_tokens(seq_len) * self.n_kv_heads * self.head_dim * elem


@register_block("attn", config=AttnConfig)
class Attention(CausalSelfAttention):
    """Full causal attention; fast path `F.scaled_dot_product_attention`."""


@register_block("blockwise", config=BlockwiseConfig)
class BlockwiseAttention(CausalSelfAttention):
    """Exact causal attention by query/key blocks with online softmax; memory linear in length."""

    def _attend(self, q, k, v, seq_idx=None):
        return blockwise_attention(q, k, v, causal=True, scale=self.cfg.scale, block_size=self.cfg.block_size,
                                   seq_idx=seq_idx)


@register_block("ring", config=BlockwiseConfig)
class RingAttention(BlockwiseAttention):
    """Exact causal attention; spread over a ring of ranks under context parallel, blockwise on one."""


@register_block("swa", config=SwaConfig)
class SlidingWindowAttention(CausalSelfAttention):
    """Each query sees the `window` most recent keys (itself included); the cache keeps window - 1."""

    def _forward_cp(self, x, cp, cache=None):
        return swa_cp(self, x, cp, cache)   # a halo exchange, not the ring of the other attentions

    def _attend(self, q, k, v, seq_idx=None):
        return blockwise_attention(q, k, v, causal=True, window=self.cfg.window, scale=self.cfg.scale,
                                   block_size=self.cfg.block_size, seq_idx=seq_idx)

    def _ring(self) -> int:
        return self.cfg.window

    def _cached_tokens(self, seq_len: int) -> int:
        return min(seq_len, self.cfg.window - 1)
