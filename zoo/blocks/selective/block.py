"""The selective block (package docstring)."""
from __future__ import annotations

from typing import Sequence

import torch

from zoo.blocks.attention import CausalSelfAttention
from zoo.blocks.selective.cache import SelectiveCache
from zoo.ops.dtypes import accumulation_dtype
from zoo.blocks.selective.config import SelectiveConfig
from zoo.blocks.selective.cp import selective_cp
from zoo.ops.documents import check_block_documents, document_positions, per_document
from zoo.ops.selective import selective_attention, selective_keep_index, selective_memory
from zoo.registry import register_block


@register_block("selective", config=SelectiveConfig)
class SelectiveAttention(CausalSelfAttention):
    """Causal attention minus accumulated selection F; the cache keeps K, V and each key's F.
    forward returns (output, memory loss) when it computes that loss (training, mem_loss_weight > 0,
    no cache), the output otherwise."""

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        """seq_idx (packed documents): each document runs alone (`per_document`), so its first token
        is the BOS column that selection never touches and F accumulates from its own queries only,
        as for the document by itself. Exact, at one op call per document (packed rows hold few)."""
        check_block_documents(x, seq_idx, cache, cp)
        wants_mem_loss = self.training and self.cfg.mem_loss_weight > 0 and cache is None
        if cp is not None:
            if wants_mem_loss:
                raise ValueError("mem_loss_weight: the memory loss is not computed under context parallelism; "
                                 "set it to 0 or train without cp")
            return selective_cp(self, x, cp, cache)
        b, t, _ = x.shape
        start = 0 if cache is None else cache.pos
        q, k, v = self.project(x)
        if seq_idx is None:
            # row_start: a left-padded batch decoding through one cache (zoo.hf), RoPE at each row's positions
            positions = self._positions(start, start + t, x.device, None if cache is None else cache.row_start)
        else:
            positions = document_positions(seq_idx)
        q, k = self._rotate(q, k, positions)
        aux = self._memory_loss(q, k, seq_idx) if wants_mem_loss else None
        impl = self.kernels.get("selective_attention", "auto")
        if seq_idx is not None:
            out = per_document(lambda q_, k_, v_: selective_attention(q_, k_, v_, block_size=self.cfg.block_size,
                                                                      impl=impl), seq_idx, q, k, v)
        elif cache is None:
            out = selective_attention(q, k, v, block_size=self.cfg.block_size, impl=impl)
        else:
            out = self._through_cache(q, k, v, cache)
            cache.pos = start + t
        out = self.out_proj(out.reshape(b, t, self.n_heads * self.head_dim))
        return out if aux is None else (out, aux)

    def _memory_loss(self, q, k, seq_idx):
        memory = lambda q_, k_: selective_memory(q_, k_, tau=self.cfg.mem_loss_tau, block_size=self.cfg.block_size)
        kept = memory(q, k) if seq_idx is None else per_document(memory, seq_idx, q, k)
        return self.cfg.mem_loss_weight * (kept.max(1).values / q.shape[1]).mean()

    def _through_cache(self, q, k, v, cache: SelectiveCache):
        """The chunk's tokens join the cache's buffers in place; the op reads them as views. Under a KV
        budget the kept keys are compacted in place after each step's eviction."""
        budget, t = self.cfg.kv_budget, q.shape[1]
        impl = self.kernels.get("selective_attention", "auto")
        outs, i = [], 0
        while i < t:
            n = t - i
            if budget is not None:
                # A step appends, attends, then evicts down to the budget. Up to budget + 1 keys no
                # eviction falls between this chunk's tokens, so one call equals token-by-token decoding.
                n = max(1, min(n, budget + 1 - cache.held))
            old = cache.held
            if budget is not None:
                cache.reserve(old + n, limit=budget + 1)
            cache.write(n, keys=k[:, i:i + n].transpose(1, 2), values=v[:, i:i + n].transpose(1, 2),
                        key_scores=cache.key_scores.new_zeros(1, 1).expand(q.shape[0], n))
            keys, values = cache.k.to(q.dtype), cache.v.to(q.dtype)
            out, scores = selective_attention(q[:, i:i + n], keys, values, scores=cache.key_scores[:, :old],
                                              block_size=self.cfg.block_size, return_scores=True, impl=impl)
            cache.key_scores[:, :cache.held].copy_(scores)
            if budget is not None and cache.held > budget:
                self._evict(cache, budget)
            outs.append(out)
            i += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    @staticmethod
    def _evict(cache: SelectiveCache, budget: int) -> None:
        """Keep the `budget` keys `selective_keep_index` picks, compacted into slots [0, budget) in order."""
        keep = selective_keep_index(cache.scores, budget)                  # [batch, budget], ascending
        for name in ("keys", "values"):
            buf = cache.slots(name)
            idx = keep[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
            kept = torch.gather(buf, 2, idx)
            getattr(cache, name)[:, :, :budget].copy_(kept)
        cache.key_scores[:, :budget].copy_(torch.gather(cache.scores, 1, keep))
        cache.held = budget

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> SelectiveCache:
        return SelectiveCache.empty(batch_size, self.n_kv_heads, self.head_dim, device, dtype)

    def merge_left_padded(self, caches: Sequence[SelectiveCache], row_start, length: int) -> SelectiveCache:
        """[first key, padding, the rest] per row (`SelectiveCache.left_padded`)."""
        return SelectiveCache.left_padded(caches, row_start, length)

    def _cached_tokens(self, seq_len: int) -> int:
        return seq_len if self.cfg.kv_budget is None else min(seq_len, self.cfg.kv_budget)

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        """K, V and the accumulated F of min(seq_len, kv_budget) keys."""
        scores = batch_size * self._cached_tokens(seq_len) * torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
        return super().state_bytes(seq_len, batch_size, dtype) + scores
