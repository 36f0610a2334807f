"""A shared block's weights (`SharedBlock`, held once by the model) and one layer's use of it (`SharedUse`: its
adapters and output projection). Zamba2's hybrid layer i with shared block S:

    t = proj_i(S(concat(x, embeddings); adapters_i))      S: attention then FFN, each after an RMSNorm, no residual
    x = x + mixer_i(norm(x + t))                           t joins the mixer's input, not the residual stream

The attention is zoo's CausalSelfAttention reading the block's input width and writing d_model, so its cache,
left padding, packed documents and context parallel (the ring) are attention's own; each use keeps its own K/V
cache. A use's adapters are added to the shared projections for the duration of its call (`AdaptedLinear`)."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn as nn

from zoo.blocks.attention.block import CausalSelfAttention
from zoo.blocks.ffn import FeedForward
from zoo.ops.norm import RMSNorm


class AdaptedLinear(nn.Linear):
    """A shared linear map to which the use running it adds its low-rank term: W x + b + delta(x)."""

    delta: Optional[Callable] = None   # a plain function, so the use's adapter is not registered here

    def forward(self, x):
        y = super().forward(x)
        return y if self.delta is None else y + self.delta(x)


class LowRank(nn.Module):
    """B A x, rank r (LoRA without a scale: Zamba2's adapters). `up` may feed several projections at once (the
    FFN's gate and up, one A for both), its rows split evenly between them."""

    def __init__(self, d_in: int, rank: int, d_out: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)

    def forward(self, x):
        return self.up(self.down(x))


class SharedAttention(CausalSelfAttention):
    """CausalSelfAttention from the block's input width to d_model, with adaptable q, k, v projections."""

    def __init__(self, width: int, d_model: int, cfg, kernels=None):
        super().__init__(width, cfg, layer_idx=-1, kernels=kernels)
        bias = cfg.qkv_bias
        self.q_proj = AdaptedLinear(width, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = AdaptedLinear(width, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = AdaptedLinear(width, self.n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=cfg.out_bias)


class SharedBlock(nn.Module):
    """The weights of one `model.shared_blocks` entry: input norm, attention, FFN norm, FFN (ZooLM.shared[name])."""

    def __init__(self, d_model: int, spec, norm_eps: float, zero_centred_norm: bool = False, kernels=None):
        super().__init__()
        cfg = spec.cfg
        self.name, self.cfg, self.ffn_cfg = spec.name, cfg, spec.ffn
        self.width = cfg.width(d_model)
        self.in_norm = RMSNorm(self.width, norm_eps, zero_centred_norm)
        self.attention = SharedAttention(self.width, d_model, cfg, kernels)
        self.ffn_norm = RMSNorm(d_model, norm_eps, zero_centred_norm)
        self.ffn = FeedForward(d_model, spec.ffn)

    def forward(self, u, use: "SharedUse", cache=None, cp=None, seq_idx=None):
        """u [batch, length, width] -> [batch, length, d_model] with `use`'s adapters (cache: that use's)."""
        with use.adapting(self.attention):
            a, _ = self.attention.run(self.in_norm(u), cache=cache, cp=cp, seq_idx=seq_idx)
        n = self.ffn_norm(a)
        gate = self.ffn.gate_proj(n) if self.ffn.gated else None
        up = self.ffn.up_proj(n)
        if use.ffn_adapter is not None:
            delta = use.ffn_adapter(n)
            if gate is None:
                up = up + delta
            else:
                dg, du = delta.chunk(2, dim=-1)
                gate, up = gate + dg, up + du
        return self.ffn.out_proj(self.ffn.activate(gate, up))


class SharedUse(nn.Module):
    """One layer's use of a shared block: its adapters (q, k, v; the FFN's gate and up) and its output projection
    `proj` (d_model -> d_model, Zamba2's per-layer `linear`). The block itself is the model's (`ZooLM.shared`)."""

    def __init__(self, d_model: int, block: SharedBlock):
        super().__init__()
        att, cfg, ffn = block.attention, block.cfg, block.ffn
        r, rf = cfg.adapter_rank, cfg.ffn_adapter_rank
        self.q = LowRank(block.width, r, att.q_proj.out_features) if r else None
        self.k = LowRank(block.width, r, att.k_proj.out_features) if r else None
        self.v = LowRank(block.width, r, att.v_proj.out_features) if r else None
        hidden = ffn.up_proj.out_features
        self.ffn_adapter = LowRank(d_model, rf, (2 if ffn.gated else 1) * hidden) if rf else None
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.concat = cfg.concat_embeddings

    @contextlib.contextmanager
    def adapting(self, attention: SharedAttention):
        """attention's q, k, v projections with this use's adapters added, for the duration of the block."""
        pairs = [(attention.q_proj, self.q), (attention.k_proj, self.k), (attention.v_proj, self.v)]
        for linear, adapter in pairs:
            linear.delta = None if adapter is None else adapter.forward
        try:
            yield
        finally:
            for linear, _ in pairs:
                linear.delta = None

    def forward(self, block: SharedBlock, x, embeddings, cache=None, cp=None, seq_idx=None):
        """proj(block(concat(x, embeddings))): what this layer adds to its mixer's input."""
        u = torch.cat([x, embeddings], dim=-1) if self.concat else x
        return self.proj(block(u, self, cache=cache, cp=cp, seq_idx=seq_idx))


__all__ = ["AdaptedLinear", "LowRank", "SharedAttention", "SharedBlock", "SharedUse"]
