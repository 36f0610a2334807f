"""The delta-rule blocks: `deltanet` (no decay), `gated_deltanet` (a decay per head, Gated DeltaNet / Qwen3-Next)
and `kda` (a decay per key channel, Kimi Delta Attention). One mixer, three decays:

    q, k, v = silu(short causal conv([W_q x | W_k x | W_v x]))     (q, k shared by n_heads / n_k_heads heads)
    beta = sigmoid(W_b x)   (x 2 with allow_neg_eigval)
    g = -exp(A_log) softplus(W_a x + dt_bias)        (gated_deltanet: per head; kda: per channel, W_a low rank)
    o = delta_rule(q, k, v, beta, g)                  (zoo.ops.delta; q, k l2-normalised inside)
    y = W_o (rmsnorm_per_head(o) * act(W_z x))        (act silu or sigmoid; W_z low rank with output_gate_rank;
                                                       without output_gate: rmsnorm_per_head(o))

The cache holds the convolution's tail and the [heads, d_k, d_v] state: a fixed size per row.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.base import Block
from zoo.blocks.delta.cache import DeltaCache
from zoo.blocks.delta.config import DeltaConfig
from zoo.blocks.delta.cp import delta_cp
from zoo.ops.conv import causal_conv1d, causal_conv1d_update
from zoo.ops.delta import delta_rule
from zoo.ops.documents import check_block_documents
from zoo.ops.dtypes import accumulation_dtype
from zoo.registry import register_block

__all__ = ["DeltaNetBlock", "GatedDeltaNetBlock", "KDABlock", "HeadRMSNorm"]


class HeadRMSNorm(nn.Module):
    """rmsnorm over each head's d_v channels with one weight [d_v] shared by the heads, then * act(z) when a
    gate is given (norm before gate, as Qwen3-Next's and Kimi Linear's gated RMSNorm); in float32 or float64."""

    def __init__(self, dim: int, eps: float, act: str = "silu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.act = eps, F.silu if act == "silu" else torch.sigmoid

    def forward(self, o, z=None):
        acc = accumulation_dtype(o.dtype)
        y = o.to(acc) * torch.rsqrt(o.to(acc).pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(acc)
        return y if z is None else y * self.act(z.to(acc))


class _DeltaBlock(Block):
    supports_seq_idx = True
    supports_cp = True
    decay: Optional[str] = None   # None, "head" or "channel": the op's g

    def __init__(self, d_model: int, cfg: DeltaConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        if cfg.decay_rank is not None and self.decay != "channel":
            raise ValueError("decay_rank: only the kda block has a low-rank per-channel decay")
        h, hk, dk, dv = cfg.n_heads, cfg.k_heads, cfg.head_k_dim, cfg.v_dim
        self.chunk_size = cfg.chunk_size or (16 if self.decay == "channel" else 32)   # DeltaConfig.chunk_size
        self.key_dim, self.value_dim = hk * dk, h * dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias)
        self.b_proj = nn.Linear(d_model, h, bias=False)
        if self.decay is not None:
            self.A_log = nn.Parameter(torch.empty(h).uniform_(cfg.a_init_min, cfg.a_init_max).log())
            width = h if self.decay == "head" else h * dk
            self.dt_bias = nn.Parameter(_initial_dt_bias(width, cfg))
            for p in (self.A_log, self.dt_bias):
                p._no_reinit = True
                p._no_weight_decay = True
        if self.decay == "head":
            self.a_proj = nn.Linear(d_model, h, bias=False)
        elif self.decay == "channel":
            rank = cfg.decay_rank or dk
            self.f_a_proj = nn.Linear(d_model, rank, bias=False)
            self.f_b_proj = nn.Linear(rank, h * dk, bias=False)
        self.z_proj = self.z_a_proj = self.z_b_proj = None
        if cfg.output_gate and cfg.output_gate_rank:
            self.z_a_proj = nn.Linear(d_model, cfg.output_gate_rank, bias=False)
            self.z_b_proj = nn.Linear(cfg.output_gate_rank, self.value_dim, bias=False)
        elif cfg.output_gate:
            self.z_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.o_norm = HeadRMSNorm(dv, cfg.norm_eps, cfg.output_gate_act)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def forward(self, x, *, cache: Optional[DeltaCache] = None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            return delta_cp(self, x, cp, cache)
        cfg = self.cfg
        q, k, v = self.qkv(x, cache, seq_idx)
        o = delta_rule(q, k, v, self.beta(x), self.log_decay(x), initial_state=None if cache is None else cache.state,
                       output_final_state=cache is not None, qk_l2norm=cfg.qk_l2norm, seq_idx=seq_idx,
                       chunk_size=self.chunk_size, impl=self.kernels.get("delta_rule", "auto"))
        if cache is not None:
            o, state = o
            cache.state = state.to(cache.state.dtype)
        return self.output(o, x)

    # -- the steps of forward (public: a context-parallel path or a caller composing its own reuses them) --

    def qkv(self, x, cache=None, seq_idx=None):
        """q, k [b, t, n_heads, d_k] (k heads repeated over the heads that share them), v [b, t, n_heads, d_v]:
        the projections through the short convolution and SiLU, continuing from and updating cache.conv."""
        mixed = self.projections(x)
        weight, impl = self.conv1d.weight[:, 0], self.kernels.get("causal_conv1d", "auto")
        if cache is not None and mixed.shape[-1] == 1 and not torch.is_grad_enabled() and self.cfg.d_conv > 1:
            # a decoding step: one window product, the tail shifted in place (zoo.ops.conv)
            out = causal_conv1d_update(mixed[..., 0], cache.conv, weight, self.conv1d.bias, activation="silu")
            return self.heads(out[:, None])
        if cache is None:
            mixed = causal_conv1d(mixed, weight, self.conv1d.bias, activation="silu", seq_idx=seq_idx, impl=impl)
        else:
            mixed, tail = causal_conv1d(mixed, weight, self.conv1d.bias, initial_states=cache.conv,
                                        return_final_states=True, activation="silu", impl=impl)
            cache.conv = tail.to(cache.conv.dtype)
        return self.heads(mixed.transpose(1, 2))

    def projections(self, x):
        """The q | k | v channels [b, c, t] the short convolution reads (the cp path convolves them by halos)."""
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1).transpose(1, 2)

    def heads(self, mixed):
        """q, k [b, t, n_heads, d_k] and v [b, t, n_heads, d_v] from the convolved q | k | v channels [b, t, c]."""
        b, t, _ = mixed.shape
        cfg = self.cfg
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], -1)
        q, k = (y.reshape(b, t, cfg.k_heads, cfg.head_k_dim) for y in (q, k))
        if cfg.k_heads != cfg.n_heads:
            q, k = (y.repeat_interleave(cfg.n_heads // cfg.k_heads, dim=2) for y in (q, k))
        return q, k, v.reshape(b, t, cfg.n_heads, cfg.v_dim)

    def beta(self, x):
        beta = torch.sigmoid(self.b_proj(x).to(accumulation_dtype(x.dtype)))
        return 2 * beta if self.cfg.allow_neg_eigval else beta

    def log_decay(self, x):
        """g (<= 0): None, [b, t, heads] or [b, t, heads, d_k]."""
        if self.decay is None:
            return None
        acc = accumulation_dtype(x.dtype)
        rate = self.A_log.to(acc).exp()
        if self.decay == "head":
            return -rate * F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc))
        b, t, _ = x.shape
        gate = self.f_b_proj(self.f_a_proj(x)).to(acc) + self.dt_bias.to(acc)
        return -rate[:, None] * F.softplus(gate.view(b, t, self.cfg.n_heads, self.cfg.head_k_dim))

    def output(self, o, x):
        """out_proj of the per-head normalised (and gated) delta-rule output o [b, t, heads, d_v]."""
        b, t = o.shape[:2]
        z = (self.z_proj(x) if self.z_proj is not None else self.z_b_proj(self.z_a_proj(x)) if self.z_a_proj
             is not None else None)
        z = None if z is None else z.view(b, t, self.cfg.n_heads, self.cfg.v_dim)
        return self.out_proj(self.o_norm(o, z).reshape(b, t, self.value_dim).to(x.dtype))

    # -- the cache ------------------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> DeltaCache:
        cfg = self.cfg
        return DeltaCache(torch.zeros(batch_size, self.conv_dim, cfg.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch_size, cfg.n_heads, cfg.head_k_dim, cfg.v_dim, device=device,
                                      dtype=accumulation_dtype(dtype)))

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        cfg = self.cfg
        conv = self.conv_dim * (cfg.d_conv - 1) * torch.empty((), dtype=dtype).element_size()
        state = cfg.n_heads * cfg.head_k_dim * cfg.v_dim * torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
        return batch_size * (conv + state)

    def merge_left_padded(self, caches: Sequence[DeltaCache], row_start, length: int) -> DeltaCache:
        # the conv tail and the state have a fixed size per row and no position: the batched recurrence over the
        # stacked rows is each row's own
        return DeltaCache.stack(caches)


def _initial_dt_bias(size: int, cfg: DeltaConfig) -> torch.Tensor:
    """softplus^-1 of step sizes log-uniform in [dt_min, dt_max], as Mamba-2 and Gated DeltaNet start them."""
    dt = torch.exp(torch.rand(size) * (torch.tensor(cfg.dt_max).log() - torch.tensor(cfg.dt_min).log())
                   + torch.tensor(cfg.dt_min).log())
    return dt + torch.log(-torch.expm1(-dt))


@register_block("deltanet", config=DeltaConfig)
class DeltaNetBlock(_DeltaBlock):
    """DeltaNet (arXiv 2406.06484): the delta rule without decay."""
    name = "deltanet"
    decay = None


@register_block("gated_deltanet", config=DeltaConfig)
class GatedDeltaNetBlock(_DeltaBlock):
    """Gated DeltaNet (arXiv 2412.06464), Qwen3-Next's linear attention: a scalar decay per head and token."""
    name = "gated_deltanet"
    decay = "head"


@register_block("kda", config=DeltaConfig)
class KDABlock(_DeltaBlock):
    """Kimi Delta Attention (Kimi Linear, 2025): a decay per key channel, from a low-rank projection."""
    name = "kda"
    decay = "channel"
