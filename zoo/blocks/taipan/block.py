"""The taipan block (package docstring)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.base import Block
from zoo.blocks.taipan.cache import TaipanCache
from zoo.blocks.taipan.config import TaipanConfig
from zoo.blocks.taipan.cp import taipan_cp
from zoo.ops.documents import check_block_documents, document_positions, per_document
from zoo.ops.rope import apply_rope_half, rope_cos_sin_half
from zoo.ops.dtypes import accumulation_dtype
from zoo.ops.taipan import compact_rows, put_rows, take_rows, selective_window_attention
from zoo.registry import register_block


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
            return taipan_cp(self, x, cp, cache)
        b, t, _ = x.shape
        acc = accumulation_dtype(x.dtype)
        start = 0 if cache is None else cache.pos
        alpha, mask, hard, aux, rows = self.route(x)
        q, k, v = self.project(x, rows)
        if self.cfg.rope_base is not None:
            positions = (torch.arange(start, start + t, device=x.device) if seq_idx is None
                         else document_positions(seq_idx))
            if cache is not None and cache.row_start is not None:
                # a left-padded batch decoding through one cache (zoo.hf): positions count from each row's
                # first token; its padding keys need no mask, they are cached as unselected
                positions = (positions[None] - cache.row_start[:, None]).clamp(min=0)
            cos, sin = rope_cos_sin_half(positions, self.head_dim, self.cfg.rope_base)
            q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        if cache is None:
            o = self._attend(q, k, v, hard, rows, seq_idx)
        elif t == 1 and not self.training:
            cache.append(k, v, hard)
            o = self._attend_decode(q, cache)
        else:
            # the chunk's keys go into ring slots its first queries still read: read the window first
            keys = torch.cat([cache.k, k.to(cache.keys.dtype)], dim=1).to(q.dtype)
            values = torch.cat([cache.v, v.to(cache.values.dtype)], dim=1).to(q.dtype)
            selected = torch.cat([cache.selected, hard], dim=1)
            cache.append(k, v, hard)
            o = self._attend(q, keys, values, selected, rows, None)
        y = self.output(o.reshape(b, t, -1), rows)
        out = ((mask * alpha)[..., None] * (y.to(acc) - x.to(acc))).to(x.dtype)
        return out if aux is None else (out, aux)

    def route(self, x, noise=None, share=None):
        """The gate (section 3.1): (alpha [b, t], the selection mask [b, t] in the accumulation dtype, straight-
        through in training, its hard flags, the capacity loss or None, the rows attended or None for all).

        In training the Gumbel noise [b, t, 2] comes from `noise(shape)` (default: drawn here) and each row's
        selected share from `share(mask)` (default: its mean over t): the cp path draws the noise for the whole
        sequence and sums the share over the ranks, so both equal the single process's."""
        acc = accumulation_dtype(x.dtype)
        logits = self.gate(x).to(acc)                                    # s_i, eq. 1
        gap = logits[..., 1] - logits[..., 0]
        alpha = torch.sigmoid(gap)                                       # softmax(s_i)[1], eq. 5
        if not self.training:
            hard = gap > 0
            return alpha, hard.to(acc), hard, None, hard
        draw = noise or (lambda shape: -torch.empty(shape, device=x.device, dtype=acc).exponential_().log())
        gumbel = draw(logits.shape)
        noisy = (gap + gumbel[..., 1] - gumbel[..., 0]) / self.cfg.tau
        hard = noisy > 0                                                 # argmax of eq. 2
        soft = torch.sigmoid(noisy)                                      # softmax((s + g) / tau)[1]
        mask = hard.to(acc) + soft - soft.detach()                       # straight-through
        selected = mask.mean(1) if share is None else share(mask)
        aux = self.cfg.aux_loss_weight * (self.cfg.capacity - selected).pow(2).mean()
        return alpha, mask, hard, aux, None

    def project(self, x, rows):
        """q, k, v [b, t, heads, head_dim]; with `rows`, computed only there and zero elsewhere."""
        b, t, _ = x.shape
        if rows is None:
            return tuple(p(x).view(b, t, self.n_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        idx, ok = compact_rows(rows)
        xs = take_rows(x, idx)
        return tuple(put_rows(p(xs).view(b, -1, self.n_heads, self.head_dim), idx, ok, t)
                     for p in (self.q_proj, self.k_proj, self.v_proj))

    def output(self, o, rows):
        if rows is None:
            return self.out_proj(o)
        idx, ok = compact_rows(rows)
        return put_rows(self.out_proj(take_rows(o, idx)), idx, ok, o.shape[1])

    def _attend(self, q, k, v, selected, rows, seq_idx):
        """The op over keys [b, Lk, heads, d] whose last Lq are the queries' own positions."""
        if seq_idx is None:
            return selective_window_attention(q, k, v, selected, self.cfg.window, rows=rows,
                                              block_size=self.cfg.block_size)
        return per_document(lambda q_, k_, v_, sel, rows_: selective_window_attention(
            q_, k_, v_, sel, self.cfg.window, rows=rows_, block_size=self.cfg.block_size),
            seq_idx, q, k, v, selected, rows)

    def _attend_decode(self, q, cache: TaipanCache):
        """One query per row against the ring's slots, read in place: every slot is within the window (the
        ring holds exactly it), so the query sees the selected ones and its own (eq. 4). Accumulates as
        the op does (float32 for narrower inputs)."""
        b, _, h, d = q.shape
        acc = accumulation_dtype(q.dtype)
        keys, values = cache.slots("keys"), cache.slots("values")
        visible = cache.slots("key_selected").clone()
        visible[:, (cache.pos - 1) % cache.ring] = True
        out = F.scaled_dot_product_attention(q.transpose(1, 2).to(acc), keys.to(acc), values.to(acc),
                                             attn_mask=visible[:, None, None, :])
        return out.transpose(1, 2).to(q.dtype)

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> TaipanCache:
        return TaipanCache.empty(batch_size, self.n_heads, self.head_dim, self.cfg.window, device, dtype)

    def merge_left_padded(self, caches: Sequence[TaipanCache], row_start, length: int) -> TaipanCache:
        """K, V and flags left-padded with unselected slots (`TaipanCache.left_padded`)."""
        return TaipanCache.left_padded(caches, row_start, length)

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        kept = min(seq_len, self.cfg.window - 1)
        # K and V per position, plus one bool selection flag
        return batch_size * kept * (2 * self.n_heads * self.head_dim * elem + 1)
