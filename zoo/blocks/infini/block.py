"""The infini block (package docstring)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from zoo.blocks.attention import CausalSelfAttention
from zoo.blocks.base import RowGroups
from zoo.blocks.infini.cache import InfiniCache
from zoo.blocks.infini.config import InfiniConfig
from zoo.blocks.infini.cp import infini_cp
from zoo.ops.dtypes import accumulation_dtype
from zoo.ops.documents import check_block_documents, document_positions, per_document
from zoo.ops.infini import infini_attention
from zoo.ops.rope import apply_rope, rope_cos_sin, rope_cos_sin_half
from zoo.registry import register_block


@register_block("infini", config=InfiniConfig)
class InfiniAttention(CausalSelfAttention):
    """Segment-local attention + compressive memory, mixed per head by sigmoid(gate)."""

    def __init__(self, d_model: int, cfg: InfiniConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        # beta = 0: an even mix of memory and local attention at the start.
        self.gate = nn.Parameter(torch.zeros(self.n_heads))
        self.gate._lr_mult = cfg.gate_lr_mult
        self.gate._no_weight_decay = True   # decay would pull every head toward the 50/50 mix
        self.gate._no_reinit = True

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        """seq_idx (packed documents): each document runs alone (`per_document`), so its segments and
        its memory start at its first token, as they would for the document by itself. Exact, at one
        op call per document: fusing it would mean segment boundaries and memory resets at every
        document start inside the batched segment layout, which packed rows of few documents do not need."""
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            return infini_cp(self, x, cp, cache)
        b, t, _ = x.shape
        start = 0 if cache is None else cache.pos
        q, k, v = self.project(x)
        impl = self.kernels.get("infini", "auto")
        if cache is None and seq_idx is None:
            # RoPE inside the op: q, k rotate on their way into its tiles, no rotated copies here.
            cos, sin = rope_cos_sin_half(torch.arange(t, device=x.device), self.head_dim, self.cfg.rope_base)
            out = infini_attention(q, k, v, self.gate, segment_len=self.cfg.segment_len, delta_rule=self.cfg.delta_rule,
                                   rope=(cos, sin), impl=impl)
            return self.out_proj(out.reshape(b, t, self.n_heads * self.head_dim))
        # row_start: a left-padded batch decoding through one cache (zoo.hf), RoPE at each row's positions
        row_start = None if cache is None else cache.row_start
        if seq_idx is None:
            cos, sin = self._rope(start, start + t, x.device, row_start)
        else:
            cos, sin = rope_cos_sin(document_positions(seq_idx), self.head_dim, self.cfg.rope_base)
        q_local, k_local = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kw = dict(segment_len=self.cfg.segment_len, delta_rule=self.cfg.delta_rule, q_local=q_local, k_local=k_local,
                  impl=impl)
        if seq_idx is not None:
            out = per_document(lambda q_, k_, v_, ql, kl: infini_attention(
                q_, k_, v_, self.gate, segment_len=self.cfg.segment_len, delta_rule=self.cfg.delta_rule,
                q_local=ql, k_local=kl, impl=kw["impl"]), seq_idx, q, k, v, q_local, k_local)
        else:
            pk, pv = cache.k.to(q.dtype), cache.v.to(q.dtype)
            cos_p, sin_p = self._rope(start - pk.shape[1], start, x.device, row_start)
            out, (M, z) = infini_attention(q, k, v, self.gate, memory=(cache.M, cache.z),
                                           prefix=(pk, pv, apply_rope(pk, cos_p, sin_p)), return_memory=True, **kw)
            seen_k, seen_v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
            tail = seen_k.shape[1] % self.cfg.segment_len
            # clone: a view would pin the whole chunk in memory; the op already folded the rest into M
            cache.k = seen_k[:, seen_k.shape[1] - tail:].to(cache.k.dtype).clone()
            cache.v = seen_v[:, seen_v.shape[1] - tail:].to(cache.v.dtype).clone()
            cache.M, cache.z, cache.pos = M, z, start + t
        return self.out_proj(out.reshape(b, t, self.n_heads * self.head_dim))

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> InfiniCache:
        mem = accumulation_dtype(dtype)
        hk, d = self.n_kv_heads, self.head_dim
        return InfiniCache(torch.zeros(batch_size, hk, d, d, device=device, dtype=mem),
                           torch.zeros(batch_size, hk, d, device=device, dtype=mem),
                           torch.empty(batch_size, 0, hk, d, device=device, dtype=dtype),
                           torch.empty(batch_size, 0, hk, d, device=device, dtype=dtype))

    def merge_left_padded(self, caches: Sequence[InfiniCache], row_start, length: int) -> RowGroups:
        """Rows grouped by segment phase (`InfiniCache.by_phase`), each group decoded batched."""
        return InfiniCache.by_phase(caches, row_start, length, self.cfg.segment_len)

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        """(M, z) plus the k, v of the unfinished segment after `seq_len` tokens: seq_len % segment_len
        of them. The peak over a stream is at segment_len - 1 unfinished tokens."""
        hk, d = self.n_kv_heads, self.head_dim
        mem = torch.empty((), dtype=accumulation_dtype(dtype)).element_size() * (d * d + d)
        partial = torch.empty((), dtype=dtype).element_size() * 2 * d * (seq_len % self.cfg.segment_len)
        return batch_size * hk * (mem + partial)


