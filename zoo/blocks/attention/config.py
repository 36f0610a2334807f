"""Configs of the attention blocks (recipe fields under `model.blocks.<letter>`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class AttnConfig:
    n_heads: int = 4
    n_kv_heads: Optional[int] = None   # GQA: kv heads shared by n_heads / n_kv_heads query heads
    head_dim: Optional[int] = None     # default d_model // n_heads
    rope_base: float = 10000.0
    qkv_bias: bool = False
    out_bias: bool = False

    def __post_init__(self):
        if self.n_heads < 1:
            raise ValueError(f"n_heads: must be >= 1, got {self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads: must divide n_heads {self.n_heads}, got {self.n_kv_heads}")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ValueError(f"head_dim: must be an even number >= 2 (rotary pairs), got {self.head_dim}")
        if self.rope_base <= 1:
            raise ValueError(f"rope_base: must be > 1, got {self.rope_base}")

    def check(self, d_model: int, seq_len: int) -> None:
        """Checks that need the model's width and the training length."""
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide model.d_model {d_model}")
        if self.head_dim is None and (d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads: head_dim d_model/n_heads = {d_model // self.n_heads} must be even (rotary pairs)")


@dataclass
class BlockwiseConfig(AttnConfig):
    block_size: int = 128   # query and key block length of the online-softmax loop

    def __post_init__(self):
        super().__post_init__()
        if self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")


@dataclass
class SwaConfig(BlockwiseConfig):
    window: int = 256       # keys a query sees, itself included (flash-attn window_size=(window-1, 0))

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"window: must be >= 1, got {self.window}")

    def check(self, d_model: int, seq_len: int) -> None:
        super().check(d_model, seq_len)
        if self.window > seq_len:
            raise ValueError(f"window: {self.window} exceeds train.seq_len {seq_len} (use `attn` for full attention)")
