"""`lightning`: MiniMax's lightning attention (MiniMax-01, arXiv 2501.08313; Qin et al., Lightning Attention-2,
arXiv 2401.04658): linear attention whose state decays by a fixed factor per head,

    q, k, v = split(act(W_qkv x))                       per head, [head_dim] each (act: silu)
    S_t = e^{-s_h} S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t           no normalisation, no correction
    y = W_out (sigmoid(W_g x) * rmsnorm(o))

with the slopes of ALiBi, s_h = 2^{-8 (h + 1) / heads}, scaled per layer in MiniMax by
1 - layer / (decay_layers - 1) + 1e-5 (`decay_layers`: the model's depth; null: no scaling). That recurrence is
the SSD scan of Mamba-2 with dt = 1, A = -s, B = k and C = q (one group per head), so the op is zoo.ops.ssd's
`ssd_scan`, its chunked form, its reference twin and its kernels; MiniMax's block-wise intra / inter computation
is the same chunking. The cache is the [heads, head_dim, head_dim] state; packed documents through the scan's
seq_idx; context parallel by state passing (cp.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.base import Block, BlockCache
from zoo.blocks.lightning.cp import lightning_cp
from zoo.ops.documents import check_block_documents
from zoo.ops.ssd import ssd_scan
from zoo.registry import register_block

__all__ = ["LightningBlock", "LightningCache", "LightningConfig"]

ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}


@dataclass
class LightningConfig:
    n_heads: int = 4
    head_dim: Optional[int] = None        # null: d_model // n_heads
    act: str = "silu"                     # on the q | k | v projection (MiniMax's hidden_act)
    decay_layers: Optional[int] = None    # MiniMax's per-layer slope scale uses the model's depth; null: none
    norm_eps: float = 1e-6                # of the output RMSNorm over all heads
    chunk_size: int = 64                  # of the SSD scan (results agree across chunk sizes up to rounding)

    def __post_init__(self):
        for name in ("n_heads", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        for name in ("head_dim", "decay_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: must be null or an integer >= 1, got {value!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act: {self.act!r}; allowed: {', '.join(ACTIVATIONS)}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: must be > 0, got {self.norm_eps}")

    def check(self, d_model: int, seq_len: int) -> None:
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide model.d_model {d_model} (head_dim null)")

    def width_step(self) -> int:
        return self.n_heads if self.head_dim is None else 1


def slopes(n_heads: int, layer_idx: int, decay_layers: Optional[int]) -> torch.Tensor:
    """[heads] decay rates s_h (MiniMax's get_slope_rate)."""
    rate = (1 / 2 ** (8 / n_heads)) ** (torch.arange(n_heads, dtype=torch.float64) + 1)
    if decay_layers is not None:
        rate = rate * (1 - layer_idx / (decay_layers - 1 + 1e-5) + 1e-5)
    return rate


@dataclass
class LightningCache(BlockCache):
    """state [batch, heads, head_dim (v), head_dim (k)] (the SSD scan's layout)."""
    state: torch.Tensor


@register_block("lightning", config=LightningConfig)
class LightningBlock(Block):
    supports_seq_idx = True
    supports_cp = True

    def __init__(self, d_model: int, cfg: LightningConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        self.head_dim = cfg.head_dim or d_model // cfg.n_heads
        inner = cfg.n_heads * self.head_dim
        self.qkv_proj = nn.Linear(d_model, 3 * inner, bias=False)
        self.output_gate = nn.Linear(d_model, inner, bias=False)
        self.norm = nn.RMSNorm(inner, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        self.register_buffer("slope", slopes(cfg.n_heads, layer_idx, cfg.decay_layers).float(), persistent=False)

    def heads(self, x):
        """q, k, v [b, t, heads, head_dim] of x."""
        b, t, _ = x.shape
        qkv = ACTIVATIONS[self.cfg.act](self.qkv_proj(x)).view(b, t, self.cfg.n_heads, 3 * self.head_dim)
        return qkv.split(self.head_dim, dim=-1)

    def scan(self, q, k, v, initial_state=None, seq_idx=None, final: bool = False):
        """The recurrence as the SSD scan: o [b, t, heads, head_dim] (and the state after, with `final`)."""
        dt = torch.ones(q.shape[:3], dtype=q.dtype, device=q.device)
        return ssd_scan(v, dt, -self.slope.to(q.dtype), k, q, self.cfg.chunk_size, initial_states=initial_state,
                        seq_idx=seq_idx, return_final_states=final, impl=self.kernels.get("ssd", "auto"))

    def output(self, o, x):
        b, t = o.shape[:2]
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * self.norm(o.reshape(b, t, -1).to(x.dtype)))

    def forward(self, x, *, cache: Optional[LightningCache] = None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            return lightning_cp(self, x, cp, cache)
        q, k, v = self.heads(x)
        if cache is None:
            return self.output(self.scan(q, k, v, seq_idx=seq_idx), x)
        if x.shape[1] == 1:   # a decoding step: the recurrence itself, without the chunked scan's setup
            o, cache.state = self.step(q[:, 0], k[:, 0], v[:, 0], cache.state.to(q.dtype))
            return self.output(o[:, None], x)
        o, cache.state = self.scan(q, k, v, initial_state=cache.state.to(q.dtype), final=True)
        return self.output(o, x)

    def step(self, q, k, v, state):
        """One token: q, k, v [b, heads, head_dim], state [b, heads, d_v, d_k] -> (o [b, heads, d_v], new state)."""
        decay = torch.exp(-self.slope.to(q.dtype))[None, :, None, None]
        state = decay * state + v[..., :, None] * k[..., None, :]
        return torch.einsum("bhvk,bhk->bhv", state, q), state

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> LightningCache:
        h, d = self.cfg.n_heads, self.head_dim
        return LightningCache(torch.zeros(batch_size, h, d, d, device=device, dtype=dtype))

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        return batch_size * self.cfg.n_heads * self.head_dim ** 2 * torch.empty((), dtype=dtype).element_size()

    def merge_left_padded(self, caches: Sequence[LightningCache], row_start, length: int) -> LightningCache:
        return LightningCache.stack(caches)   # a fixed-size state per row, no positions: rows never mix
