"""`rglru`: the recurrent block of Griffin and Hawk (De et al., arXiv 2402.19427, figure 2; RecurrentGemma):

    y = gelu_tanh(W_y x)                                  the gate branch
    u = causal_depthwise_conv(W_x x)                      kernel d_conv, with bias, no activation
    h = rg_lru(u, gates_x(u), gates_a(u), lam)            zoo.ops.rglru; the gates block-diagonal over n_heads
    out = W_out (h * y)

The gates are n_heads independent [width / n_heads]^2 linear maps with biases (RecurrentGemma's input_gate_* and
recurrent_gate_*). The cache is the conv's last d_conv - 1 inputs, the [width] state, and per row whether its
sequence has started (its first token is a reset: a = 0, input unscaled). Context parallel in cp.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.base import Block, BlockCache
from zoo.blocks.mamba.cp import conv_cp
from zoo.blocks.rglru.cp import rglru_cp
from zoo.distributed.halo import refuse_cache
from zoo.ops.conv import causal_conv1d, causal_conv1d_update
from zoo.ops.documents import check_block_documents
from zoo.ops.rglru import rg_lru
from zoo.registry import register_block

__all__ = ["RGLRUBlock", "RGLRUCache", "RGLRUConfig"]


@dataclass
class RGLRUConfig:
    lru_width: Optional[int] = None   # channels of the recurrence (RecurrentGemma's lru_width); null: d_model
    n_heads: int = 4                  # diagonal blocks of the gates (RecurrentGemma: num_attention_heads)
    d_conv: int = 4                   # the causal depthwise convolution's kernel (conv1d_width)
    c: float = 8.0                    # a_t = a^(c r_t) (the paper's constant)
    bias: bool = True                 # on W_x, W_y, W_out and the convolution (RecurrentGemma has them)
    chunk_size: int = 16              # of the chunked scan (results agree across sizes up to rounding)

    def __post_init__(self):
        for name in ("n_heads", "d_conv", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.lru_width is not None:
            if isinstance(self.lru_width, bool) or not isinstance(self.lru_width, int) or self.lru_width < 1:
                raise ValueError(f"lru_width: must be null or an integer >= 1, got {self.lru_width!r}")
            if self.lru_width % self.n_heads:
                raise ValueError(f"lru_width: {self.lru_width} must be divisible by n_heads {self.n_heads}")
        if not self.c > 0:
            raise ValueError(f"c: must be > 0, got {self.c}")

    def check(self, d_model: int, seq_len: int) -> None:
        """Checks that need the model's width."""
        if self.lru_width is None and d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} must divide model.d_model {d_model} (lru_width null: the "
                             "width is d_model)")

    def width(self, d_model: int) -> int:
        return self.lru_width or d_model

    def width_step(self) -> int:
        return self.n_heads if self.lru_width is None else 1


@dataclass
class RGLRUCache(BlockCache):
    """conv [batch, width, d_conv - 1]: the conv's last inputs; state [batch, width]: h; started [batch] bool:
    whether the row's sequence has begun (its next token is then no reset)."""
    conv: torch.Tensor
    state: torch.Tensor
    started: torch.Tensor


@register_block("rglru", config=RGLRUConfig)
class RGLRUBlock(Block):
    supports_seq_idx = True
    supports_cp = True

    def __init__(self, d_model: int, cfg: RGLRUConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        w = self.width = cfg.width(d_model)
        h, bw = cfg.n_heads, w // cfg.n_heads
        self.linear_x = nn.Linear(d_model, w, bias=cfg.bias)
        self.linear_y = nn.Linear(d_model, w, bias=cfg.bias)
        self.conv1d = nn.Conv1d(w, w, cfg.d_conv, groups=w, bias=cfg.bias)
        # Griffin's initialisation: gates N(0, 1 / block width) scaled by 0.01 in variance, zero biases; a = e^{-
        # softplus(lam)} uniform in [0.9, 0.999] at r = 1/c (RecurrentGemma's _init_weights)
        std = math.sqrt(0.01 / bw)
        self.input_gate_weight = nn.Parameter(torch.randn(h, bw, bw) * std)
        self.input_gate_bias = nn.Parameter(torch.zeros(h, bw))
        self.recurrent_gate_weight = nn.Parameter(torch.randn(h, bw, bw) * std)
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(h, bw))
        a = torch.empty(w).uniform_(0.9, 0.999)
        self.recurrent_param = nn.Parameter(torch.log(torch.expm1(-torch.log(a))))   # softplus(lam) = -log a
        self.out_proj = nn.Linear(w, d_model, bias=cfg.bias)

    def forward(self, x, *, cache: Optional[RGLRUCache] = None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        y = F.gelu(self.linear_y(x), approximate="tanh")
        u = self.linear_x(x).transpose(1, 2)                                   # [b, width, t]
        weight, bias, impl = self.conv1d.weight[:, 0], self.conv1d.bias, self.kernels.get("causal_conv1d", "auto")
        if cp is not None:
            refuse_cache(cache, "rglru")
            u = conv_cp(u, weight, bias, cp, impl, activation=None).transpose(1, 2)
            return self.out_proj((rglru_cp(self, u, cp) * y).to(x.dtype))
        if cache is None:
            u = causal_conv1d(u, weight, bias, seq_idx=seq_idx, impl=impl).transpose(1, 2)
            h = rg_lru(u, *self.gates(u), self.recurrent_param, self.cfg.c, seq_idx=seq_idx,
                       chunk_size=self.cfg.chunk_size)
            return self.out_proj(h.to(x.dtype) * y)
        if u.shape[-1] == 1 and not torch.is_grad_enabled() and self.cfg.d_conv > 1:
            u = causal_conv1d_update(u[..., 0], cache.conv, weight, bias)[..., None]   # tail shifted in place
        else:
            u, tail = causal_conv1d(u, weight, bias, initial_states=cache.conv, return_final_states=True, impl=impl)
            cache.conv = tail.to(cache.conv.dtype)
        u = u.transpose(1, 2)
        h, last = rg_lru(u, *self.gates(u), self.recurrent_param, self.cfg.c, initial_state=cache.state,
                         return_final_state=True, first=~cache.started, chunk_size=self.cfg.chunk_size)
        cache.state = last.to(cache.state.dtype)
        cache.started = torch.ones_like(cache.started)
        return self.out_proj(h.to(x.dtype) * y)

    def gates(self, u):
        """(gate_x, gate_a) logits [b, t, width]: the block-diagonal maps of the conv's output u [b, t, width]."""
        b, t, w = u.shape
        heads = u.view(b, t, self.cfg.n_heads, w // self.cfg.n_heads)
        return tuple((torch.einsum("bthi,hio->btho", heads, weight) + bias).reshape(b, t, w)
                     for weight, bias in ((self.input_gate_weight, self.input_gate_bias),
                                          (self.recurrent_gate_weight, self.recurrent_gate_bias)))

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> RGLRUCache:
        return RGLRUCache(torch.zeros(batch_size, self.width, self.cfg.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch_size, self.width, device=device, dtype=dtype),
                          torch.zeros(batch_size, dtype=torch.bool, device=device))

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return batch_size * (self.width * self.cfg.d_conv * elem + 1)    # conv tail + state, and the started flag

    def merge_left_padded(self, caches: Sequence[RGLRUCache], row_start, length: int) -> RGLRUCache:
        return RGLRUCache.stack(caches)   # fixed-size per row, no positions: rows never mix
