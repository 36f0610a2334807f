"""Config of the selective block (recipe fields under `model.blocks.<letter>`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from zoo.blocks.attention.config import AttnConfig, refuse_attention_options


@dataclass
class SelectiveConfig(AttnConfig):
    block_size: int = 128              # queries per step of the memory-efficient path
    kv_budget: Optional[int] = None    # cached keys kept at inference; None: no pruning (exact)
    mem_loss_weight: float = 0.0       # w of the memory loss (module docstring); 0: off
    mem_loss_tau: float = 1.0          # F at which a key counts as gone in that loss

    def __post_init__(self):
        super().__post_init__()
        refuse_attention_options(self, "selective")
        if isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"block_size: must be an integer >= 1, got {self.block_size}")
        if self.kv_budget is not None and (isinstance(self.kv_budget, bool) or self.kv_budget < 1):
            raise ValueError(f"kv_budget: must be null (no pruning) or an integer >= 1 (the first token is "
                             f"always kept), got {self.kv_budget}")
        if not self.mem_loss_weight >= 0:
            raise ValueError(f"mem_loss_weight: must be >= 0 (0 turns the memory loss off), got {self.mem_loss_weight}")
        if not self.mem_loss_tau > 0:
            raise ValueError(f"mem_loss_tau: must be > 0, got {self.mem_loss_tau}")
