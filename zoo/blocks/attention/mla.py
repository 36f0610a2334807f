"""Multi-head latent attention (`mla`, DeepSeek-V2, arXiv 2405.04434), as Kimi Linear's full-attention layers use
it: keys and values are expanded per head from one compressed latent per token, and the cache keeps the latent.

    q = W_q x                       (or W_qb rmsnorm(W_qa x) with q_lora_rank)       [heads, nope + rope]
    c, k_rope = split(W_kva x)      c: [kv_lora_rank] latent, k_rope: [rope] shared by the heads
    k_nope, v = split(W_kvb rmsnorm(c))                                              [heads, nope], [heads, v_dim]
    k = [k_nope | k_rope]           softmax scale (nope + rope)^-1/2, causal
    y = W_o attention(q, k, v)

The rope part is not rotated (Kimi Linear's MLA is NoPE; `rope_base` other than null is refused: DeepSeek's
rotated variant is not implemented). The cache holds the normalised latent and k_rope, (kv_lora_rank + rope)
numbers a token instead of 2 x heads x head_dim: the point of MLA. Context parallel: each rank expands its own
tokens' keys and values (no positions, so nothing but the shard is needed) and runs the ring (zoo.distributed.ring),
exact as for `attn`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.base import Block, BlockCache
from zoo.distributed.halo import refuse_cache
from zoo.distributed.ring import ring_attention
from zoo.ops.attention import attention
from zoo.ops.documents import check_block_documents
from zoo.registry import register_block

__all__ = ["MLAConfig", "MLACache", "MultiHeadLatentAttention"]


@dataclass
class MLAConfig:
    n_heads: int = 4
    q_lora_rank: Optional[int] = None   # null: q = W_q x; else a rank-r bottleneck with an RMSNorm
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16          # the key part shared by every head (not rotated: NoPE)
    v_head_dim: int = 32
    rope_base: Optional[float] = None   # must be null: only the NoPE form is implemented
    norm_eps: float = 1e-6              # of the latents' RMSNorms
    bias: bool = False                  # on the latent projections and the output projection

    def __post_init__(self):
        for name in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if isinstance(self.qk_rope_head_dim, bool) or self.qk_rope_head_dim < 0:
            raise ValueError(f"qk_rope_head_dim: must be an integer >= 0, got {self.qk_rope_head_dim!r}")
        if self.q_lora_rank is not None and (isinstance(self.q_lora_rank, bool) or self.q_lora_rank < 1):
            raise ValueError(f"q_lora_rank: must be null or an integer >= 1, got {self.q_lora_rank!r}")
        if self.rope_base is not None:
            raise ValueError(f"rope_base: {self.rope_base} (rotating the shared key part, DeepSeek's MLA) is not "
                             "implemented; allowed: null (NoPE, Kimi Linear's MLA)")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: must be > 0, got {self.norm_eps}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def width_step(self) -> int:
        return 1   # every width is heads x head dims of its own


@dataclass
class MLACache(BlockCache):
    """latent [batch, tokens, kv_lora_rank] (normalised) and k_rope [batch, tokens, qk_rope_head_dim]: every
    token seen, compressed. Grows by concatenation."""
    latent: torch.Tensor
    k_rope: torch.Tensor


@register_block("mla", config=MLAConfig)
class MultiHeadLatentAttention(Block):
    supports_seq_idx = True
    supports_cp = True

    def __init__(self, d_model: int, cfg: MLAConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        h = cfg.n_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.bias)
        self.kv_a_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.out_proj = nn.Linear(h * cfg.v_head_dim, d_model, bias=cfg.bias)

    def forward(self, x, *, cache: Optional[MLACache] = None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            refuse_cache(cache, "mla")
        b, t, _ = x.shape
        cfg = self.cfg
        latent, k_rope = self.latents(x)
        if cache is not None:
            cache.latent = torch.cat([cache.latent, latent.to(cache.latent.dtype)], 1)
            cache.k_rope = torch.cat([cache.k_rope, k_rope.to(cache.k_rope.dtype)], 1)
            latent, k_rope = cache.latent.to(x.dtype), cache.k_rope.to(x.dtype)
        q = self.queries(x)
        k, v = self.expand(latent, k_rope)
        # the op wants one head dim for k and v: zero columns change neither the scores nor the kept outputs
        width = max(cfg.qk_head_dim, cfg.v_head_dim)
        q, k, v_wide = (F.pad(y, (0, width - y.shape[-1])) for y in (q, k, v))
        if cp is not None:   # this rank's shard: its keys and values meet every query on the ring
            out = ring_attention(q, k, v_wide, cp, causal=True, scale=cfg.qk_head_dim ** -0.5)
        else:
            out = attention(q, k, v_wide, causal=True, scale=cfg.qk_head_dim ** -0.5, seq_idx=seq_idx)
        return self.out_proj(out[..., :cfg.v_head_dim].reshape(b, t, cfg.n_heads * cfg.v_head_dim))

    def queries(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        return q.view(b, t, self.cfg.n_heads, self.cfg.qk_head_dim)

    def latents(self, x):
        """(the normalised latent [b, t, kv_lora_rank], the shared key part [b, t, rope]): what the cache keeps."""
        latent, k_rope = self.kv_a_proj(x).split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], -1)
        return self.kv_a_norm(latent), k_rope

    def expand(self, latent, k_rope):
        """k [b, T, heads, nope + rope] and v [b, T, heads, v_dim] from the latents of T tokens."""
        cfg = self.cfg
        b, T, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, T, cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], -1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(b, T, cfg.n_heads, cfg.qk_rope_head_dim)], -1)
        return k, v

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> MLACache:
        cfg = self.cfg
        return MLACache(torch.zeros(batch_size, 0, cfg.kv_lora_rank, device=device, dtype=dtype),
                        torch.zeros(batch_size, 0, cfg.qk_rope_head_dim, device=device, dtype=dtype))

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return batch_size * seq_len * (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim) * elem
