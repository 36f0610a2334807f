"""`mlstm`: xLSTM's mLSTM layer as xLSTM-7B has it (Beck et al., arXiv 2503.13427; transformers' xLSTMLayer):

    q, k = W_q x, W_k x   [heads, qk_dim / heads]       v = W_v x   [heads, v_dim / heads]
    i, f = cap(W_i x), cap(W_f x)                        one gate pre-activation per head, soft-capped: c tanh(./c)
    h = mlstm(q, k, v, i, f)                             zoo.ops.mlstm (exponential input gate, stabilised)
    y = W_out (sigmoid(W_o x) * layernorm_per_head(h))

qk_dim = qk_dim_factor d_model, v_dim = v_dim_factor d_model. The cache is the memory (C, n, m) per head; packed
documents through the op's seq_idx (each starts from the empty memory); context parallel in cp.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.base import Block, BlockCache
from zoo.blocks.mlstm.cp import mlstm_cp
from zoo.ops.documents import check_block_documents
from zoo.ops.mlstm import mlstm
from zoo.registry import register_block

__all__ = ["MLSTMBlock", "MLSTMCache", "MLSTMConfig"]


@dataclass
class MLSTMConfig:
    n_heads: int = 4
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    gate_soft_cap: Optional[float] = 15.0   # the gates' pre-activations cap * tanh(. / cap); null: none
    norm_eps: float = 1e-6                   # of the per-head layer norm
    eps: float = 1e-6                        # of the op's denominator
    bias: bool = False                       # on the q / k / v / o projections, the norm and the output
    chunk_size: int = 64

    def __post_init__(self):
        for name in ("n_heads", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        for name in ("qk_dim_factor", "v_dim_factor", "norm_eps", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.gate_soft_cap is not None and not self.gate_soft_cap > 0:
            raise ValueError(f"gate_soft_cap: must be null or > 0, got {self.gate_soft_cap}")

    def dims(self, d_model: int) -> tuple:
        return int(d_model * self.qk_dim_factor), int(d_model * self.v_dim_factor)

    def check(self, d_model: int, seq_len: int) -> None:
        for name, dim in zip(("qk_dim_factor", "v_dim_factor"), self.dims(d_model)):
            if dim < self.n_heads or dim % self.n_heads:
                raise ValueError(f"{name}: d_model x {getattr(self, name)} = {dim} must be a positive multiple of "
                                 f"n_heads {self.n_heads}")

    def width_step(self) -> int:
        return 2 * self.n_heads


@dataclass
class MLSTMCache(BlockCache):
    """C [b, heads, d_k, d_v], n [b, heads, d_k], m [b, heads]: the op's state (zeros: nothing seen)."""
    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


def _cap(x, cap):
    return x if cap is None else cap * torch.tanh(x / cap)


@register_block("mlstm", config=MLSTMConfig)
class MLSTMBlock(Block):
    supports_seq_idx = True
    supports_cp = True

    def __init__(self, d_model: int, cfg: MLSTMConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        qk, v = self.qk_dim, self.v_dim = cfg.dims(d_model)
        self.q = nn.Linear(d_model, qk, bias=cfg.bias)
        self.k = nn.Linear(d_model, qk, bias=cfg.bias)
        self.v = nn.Linear(d_model, v, bias=cfg.bias)
        self.ogate_preact = nn.Linear(d_model, v, bias=cfg.bias)
        self.igate_preact = nn.Linear(d_model, cfg.n_heads, bias=True)
        self.fgate_preact = nn.Linear(d_model, cfg.n_heads, bias=True)
        self.norm_weight = nn.Parameter(torch.ones(v))
        self.norm_bias = nn.Parameter(torch.zeros(v)) if cfg.bias else None
        self.out_proj = nn.Linear(v, d_model, bias=cfg.bias)

    def inputs(self, x):
        """q, k, v [b, t, heads, d], i, f [b, t, heads] of x."""
        b, t, _ = x.shape
        h, cap = self.cfg.n_heads, self.cfg.gate_soft_cap
        return (self.q(x).view(b, t, h, -1), self.k(x).view(b, t, h, -1), self.v(x).view(b, t, h, -1),
                _cap(self.igate_preact(x), cap), _cap(self.fgate_preact(x), cap))

    def output(self, h, x):
        b, t = h.shape[:2]
        h = F.layer_norm(h, h.shape[-1:], eps=self.cfg.norm_eps).reshape(b, t, -1).to(x.dtype)   # in the op's accumulation dtype
        h = h * self.norm_weight + (self.norm_bias if self.norm_bias is not None else 0)
        return self.out_proj(torch.sigmoid(self.ogate_preact(x)) * h)

    def forward(self, x, *, cache: Optional[MLSTMCache] = None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            return mlstm_cp(self, x, cp, cache)
        q, k, v, i, f = self.inputs(x)
        kw = dict(eps=self.cfg.eps, chunk_size=self.cfg.chunk_size)
        if cache is None:
            return self.output(mlstm(q, k, v, i, f, seq_idx=seq_idx, **kw), x)
        h, (C, n, m) = mlstm(q, k, v, i, f, initial_state=(cache.C, cache.n, cache.m), return_final_state=True, **kw)
        cache.C, cache.n, cache.m = C.to(cache.C.dtype), n.to(cache.n.dtype), m.to(cache.m.dtype)
        return self.output(h, x)

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> MLSTMCache:
        h = self.cfg.n_heads
        dk, dv = self.qk_dim // h, self.v_dim // h
        z = lambda *s: torch.zeros(batch_size, h, *s, device=device, dtype=dtype)   # noqa: E731
        return MLSTMCache(z(dk, dv), z(dk), z())

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        h = self.cfg.n_heads
        dk, dv = self.qk_dim // h, self.v_dim // h
        return batch_size * h * (dk * dv + dk + 1) * torch.empty((), dtype=dtype).element_size()

    def merge_left_padded(self, caches: Sequence[MLSTMCache], row_start, length: int) -> MLSTMCache:
        return MLSTMCache.stack(caches)   # a fixed-size state per row, no positions: rows never mix
