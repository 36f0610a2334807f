"""Config of the infini block (recipe fields under `model.blocks.<letter>`)."""
from __future__ import annotations

from dataclasses import dataclass

from zoo.blocks.attention.config import AttnConfig, refuse_attention_options


@dataclass
class InfiniConfig(AttnConfig):
    segment_len: int = 128        # tokens per segment: local attention span and memory-update stride
    delta_rule: bool = True       # write only what the memory does not already return; False: linear update
    # Learning-rate multiplier of the per-head gate logit beta. Adam moves a parameter by about lr per
    # step, which suits weights of scale init_std (0.02) but leaves a logit that must travel O(1) to
    # specialise a head (the paper reports trained gates near 0 or 1) at 0.5 for most of a short run. We
    # found no value in the paper; 10 is our choice, not a tuned optimum (1.0 disables the hook).
    gate_lr_mult: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        refuse_attention_options(self, "infini")
        if isinstance(self.segment_len, bool) or self.segment_len < 1:
            raise ValueError(f"segment_len: must be an integer >= 1, got {self.segment_len}")
        if not self.gate_lr_mult > 0:
            raise ValueError(f"gate_lr_mult: must be > 0, got {self.gate_lr_mult}")
