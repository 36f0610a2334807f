"""Infini-attention block (`infini`): Munkhdalai, Faruqui & Gopal, "Leave No Context Behind: Efficient
Infinite Context Transformers with Infini-attention", arXiv 2404.07143.

Per segment of `segment_len` tokens: causal softmax attention inside the segment, retrieval from a
compressive memory (M, z) built from all earlier segments, a learned per-head gate mixing the two,
then the memory update, linear or delta rule (section 2.1 of the paper). The math lives in
`zoo.ops.infini`; this module owns the projections, the gate and the cache.

RoPE is applied on the local path only: the memory path reads and writes the un-rotated q, k, since
the paper puts no positional encoding on it and a memory summed over segments has no single
position to rotate to.

Cache: (M, z) in float32 (float64 for a float64 model: the op's accumulation dtype) plus the k, v
of the unfinished segment (fewer than `segment_len` tokens), so streaming holds constant memory
whatever the length. The cached k is un-rotated; its rotated copy for the local path is recomputed
from the known positions rather than stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from zoo.blocks.attention import AttnConfig, CausalSelfAttention
from zoo.blocks.base import BlockCache, RowGroups
from zoo.ops.documents import check_block_documents, document_positions, per_document
from zoo.distributed.infini import infini_cp
from zoo.ops.infini import infini_attention
from zoo.ops.rope import apply_rope, rope_cos_sin
from zoo.registry import register_block


@dataclass
class InfiniConfig(AttnConfig):
    segment_len: int = 128        # tokens per segment: local attention span and memory-update stride
    delta_rule: bool = True       # write only what the memory does not already return; False: linear update
    # Learning-rate multiplier of the per-head gate logit beta. Adam moves a parameter by about lr per
    # step, which suits weights of scale init_std (0.02) but leaves a logit that must travel O(1) to
    # specialise a head (the paper reports trained gates near 0 or 1) at 0.5 for most of a short run. We
    # found no value in the paper; 10 is our choice, not a tuned optimum (1.0 disables the hook).
    gate_lr_mult: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.segment_len, bool) or self.segment_len < 1:
            raise ValueError(f"segment_len: must be an integer >= 1, got {self.segment_len}")
        if not self.gate_lr_mult > 0:
            raise ValueError(f"gate_lr_mult: must be > 0, got {self.gate_lr_mult}")


@dataclass
class InfiniCache(BlockCache):
    """The compressive memory M [batch, kv_heads, d, d], z [batch, kv_heads, d] (float32, float64 for a
    float64 model) and the un-rotated k, v [batch, n, kv_heads, d] of the unfinished segment
    (n = pos % segment_len); `row_start` as `AttentionCache`'s."""
    M: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0
    row_start: Optional[torch.Tensor] = None


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
        q, k, v = self._project(x)
        # row_start: a left-padded batch decoding through one cache (zoo.hf), RoPE at each row's positions
        row_start = None if cache is None else cache.row_start
        if seq_idx is None:
            cos, sin = self._rope(start, start + t, x.device, row_start)
        else:
            cos, sin = rope_cos_sin(document_positions(seq_idx), self.head_dim, self.cfg.rope_base)
        q_local, k_local = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kw = dict(segment_len=self.cfg.segment_len, delta_rule=self.cfg.delta_rule, q_local=q_local, k_local=k_local,
                  impl=self.kernels.get("infini", "auto"))
        if seq_idx is not None:
            out = per_document(lambda q_, k_, v_, ql, kl: infini_attention(
                q_, k_, v_, self.gate, segment_len=self.cfg.segment_len, delta_rule=self.cfg.delta_rule,
                q_local=ql, k_local=kl, impl=kw["impl"]), seq_idx, q, k, v, q_local, k_local)
        elif cache is None:
            out = infini_attention(q, k, v, self.gate, **kw)
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
        mem = _memory_dtype(dtype)
        hk, d = self.n_kv_heads, self.head_dim
        return InfiniCache(torch.zeros(batch_size, hk, d, d, device=device, dtype=mem),
                           torch.zeros(batch_size, hk, d, device=device, dtype=mem),
                           torch.empty(batch_size, 0, hk, d, device=device, dtype=dtype),
                           torch.empty(batch_size, 0, hk, d, device=device, dtype=dtype))

    def merge_left_padded(self, caches: Sequence[InfiniCache], row_start, length: int) -> RowGroups:
        """Rows grouped by segment phase. A row's segment boundaries (where its unfinished segment is folded
        into the memory) fall at its own length modulo segment_len, and zoo.ops.infini takes one phase per
        call; a group's unfinished segments have one length, so its caches stack exactly, and the groups
        never change while decoding (every row advances one token per step). RoPE reads `row_start`."""
        groups = {}
        for r in range(len(caches)):
            groups.setdefault(int(length - row_start[r]) % self.cfg.segment_len, []).append(r)
        out = []
        for rows in groups.values():
            rows = torch.tensor(rows, device=row_start.device)
            stacked = InfiniCache.stack([caches[r] for r in rows.tolist()])
            stacked.pos, stacked.row_start = length, row_start[rows]
            out.append((rows, stacked))
        return RowGroups(out)

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        """(M, z) plus the k, v of the unfinished segment after `seq_len` tokens: seq_len % segment_len
        of them. The peak over a stream is at segment_len - 1 unfinished tokens."""
        hk, d = self.n_kv_heads, self.head_dim
        mem = torch.empty((), dtype=_memory_dtype(dtype)).element_size() * (d * d + d)
        partial = torch.empty((), dtype=dtype).element_size() * 2 * d * (seq_len % self.cfg.segment_len)
        return batch_size * hk * (mem + partial)


def _memory_dtype(dtype: torch.dtype) -> torch.dtype:
    # The op accumulates in float64 for float64 inputs and in float32 otherwise; the memory stays there.
    return torch.float64 if dtype == torch.float64 else torch.float32
