"""The attention blocks: `attn`, `blockwise`, `ring` and `swa` (package docstring). The math lives in
zoo.ops.attention; the context-parallel paths (the ring; swa's halo exchange) in `cp.py`."""
from __future__ import annotations

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
from zoo.ops.rope import apply_rope, rope_cos_sin
from zoo.registry import register_block


class CausalSelfAttention(Block):
    """q/k/v projections, RoPE, an attention op, output projection; cache = rotated K/V.

    RoPE rotates the first `rope_dim` dims of each head (all by default; none with `rope_base: null`);
    `scale` overrides the softmax scale 1 / sqrt(head_dim) (Granite's attention_multiplier).
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

    def _project(self, x):
        """Un-rotated q [b, t, heads, hd], k and v [b, t, kv_heads, hd]."""
        b, t, _ = x.shape
        return (self.q_proj(x).view(b, t, self.n_heads, self.head_dim),
                self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim),
                self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim))

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
        """q and k rotated at `positions` ([length] or [batch, length]); unchanged with rope_base null."""
        if self.cfg.rope_base is None:
            return q, k
        cos, sin = rope_cos_sin(positions, self.rope_dim, self.cfg.rope_base)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def _attend(self, q, k, v, seq_idx=None):
        return attention(q, k, v, causal=True, scale=self.cfg.scale, seq_idx=seq_idx)

    def _kept(self, t: torch.Tensor) -> torch.Tensor:
        """The part of the K/V history the cache must keep for future queries."""
        return t

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            return self._forward_cp(x, cp, cache)
        b, t, _ = x.shape
        start = 0 if cache is None else cache.pos
        row_start = None if cache is None else cache.row_start
        q, k, v = self._project(x)
        positions = self._positions(start, start + t, x.device, row_start) if seq_idx is None \
            else document_positions(seq_idx)
        q, k = self._rotate(q, k, positions)
        if cache is not None:
            k = torch.cat([cache.k, k.to(cache.k.dtype)], dim=1)
            v = torch.cat([cache.v, v.to(cache.v.dtype)], dim=1)
            cache.k, cache.v, cache.pos = self._kept(k), self._kept(v), start + t
            k, v = k.to(q.dtype), v.to(q.dtype)
        if row_start is None:
            out = self._attend(q, k, v) if seq_idx is None else self._attend(q, k, v, seq_idx)
        else:
            out = self._attend_left_padded(q, k, v, start + t, row_start)
        return self.out_proj(out.reshape(b, t, self.n_heads * self.head_dim))

    def _forward_cp(self, x, cp, cache=None):
        """Context parallel (x: this rank's shard): the ring over ranks (swa: a halo exchange)."""
        return attention_cp(self, x, cp, cache)

    def _project_rotated(self, x, positions):
        """q, k rotated at `positions` [length] (global positions of a cp shard), v; all [b, t, heads, hd]."""
        q, k, v = self._project(x)
        return (*self._rotate(q, k, positions), v)

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> AttentionCache:
        empty = torch.empty(batch_size, 0, self.n_kv_heads, self.head_dim, device=device, dtype=dtype)
        return AttentionCache(empty, empty.clone())

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

    def _kept(self, t):
        keep = self.cfg.window - 1
        # clone: a view would pin the whole concatenated history in memory
        return t[:, t.shape[1] - keep:].clone() if t.shape[1] > keep else t

    def _cached_tokens(self, seq_len: int) -> int:
        return min(seq_len, self.cfg.window - 1)
