"""Config of the taipan block (recipe fields under `model.blocks.<letter>`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TaipanConfig:
    n_heads: int = 4
    head_dim: Optional[int] = None     # default d_model // n_heads
    window: int = 128                  # sequence positions a query spans, itself included (section 3.2)
    capacity: float = 0.15             # C: target fraction of tokens selected (eq. 7; the paper's value)
    tau: float = 1.0                   # Gumbel-softmax temperature of the backward relaxation (eq. 3)
    aux_loss_weight: float = 1.0       # lambda in L = L_CE + lambda L_constraint
    rope_base: Optional[float] = None  # None: no positional embedding, as the paper; a number: RoPE
    block_size: int = 128              # queries per step of the attention op

    def __post_init__(self):
        if isinstance(self.n_heads, bool) or self.n_heads < 1:
            raise ValueError(f"n_heads: must be an integer >= 1, got {self.n_heads}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim: must be null or an integer >= 1, got {self.head_dim}")
        if self.head_dim is not None and self.rope_base is not None and self.head_dim % 2:
            raise ValueError(f"head_dim: must be even with rope_base set (rotary pairs), got {self.head_dim}")
        if isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window: must be an integer >= 1, got {self.window}")
        if not 0 < self.capacity < 1:
            raise ValueError(f"capacity: must be in (0, 1) (fraction of tokens attended), got {self.capacity}")
        if not self.tau > 0:
            raise ValueError(f"tau: must be > 0, got {self.tau}")
        if not self.aux_loss_weight >= 0:
            raise ValueError(f"aux_loss_weight: must be >= 0, got {self.aux_loss_weight}")
        if self.rope_base is not None and not self.rope_base > 1:
            raise ValueError(f"rope_base: must be null (no positional embedding) or > 1, got {self.rope_base}")
        if isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"block_size: must be an integer >= 1, got {self.block_size}")

    def width_step(self) -> int:
        """The multiple of model.d_model this block builds at: heads of an even head dimension (rotary
        pairs) when head_dim follows d_model; any width when head_dim is fixed."""
        return 2 * self.n_heads if self.head_dim is None else 1

    def check(self, d_model: int, seq_len: int) -> None:
        """Checks that need the model's width and the training length."""
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide model.d_model {d_model}")
        if self.head_dim is None and self.rope_base is not None and (d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads: head_dim d_model/n_heads = {d_model // self.n_heads} must be even "
                             f"with rope_base set (rotary pairs)")
        if self.window > seq_len:
            raise ValueError(f"window: {self.window} exceeds train.seq_len {seq_len}")
