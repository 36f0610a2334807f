"""The config of a shared block (recipe fields under `model.shared_blocks.<name>`): attention's, plus the input and
the per-use adapters."""
from __future__ import annotations

from dataclasses import dataclass

from zoo.blocks.attention.config import AttnConfig


@dataclass
class SharedBlockConfig(AttnConfig):
    # the block reads concat(hidden, the token embeddings), 2 d_model wide (Zamba's "global" input: every use
    # sees the embeddings again however deep it sits); false: the hidden state alone, d_model wide. head_dim
    # defaults to that input width / n_heads
    concat_embeddings: bool = True
    # each use's low-rank adapter (LoRA, W x + B A x) on the shared q, k, v projections (Zamba2's
    # use_shared_attention_adapter); 0: none
    adapter_rank: int = 0
    # each use's adapter on the FFN's gate and up projections, one A for both (Zamba2's gate_up adapter); 0: none
    ffn_adapter_rank: int = 0

    def __post_init__(self):
        super().__post_init__()
        for name in ("adapter_rank", "ffn_adapter_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: must be an integer >= 0 (0: no adapter), got {value!r}")

    def width(self, d_model: int) -> int:
        """The width of the block's input (what its q/k/v read): 2 d_model with concat_embeddings."""
        return 2 * d_model if self.concat_embeddings else d_model

    def check(self, d_model: int, seq_len: int, ffn=None) -> None:
        super().check(self.width(d_model), seq_len)
        if ffn is not None and ffn.type in ("moe", "none"):
            raise ValueError(f"ffn.type: {ffn.type!r}; a shared block's FFN is dense (geglu, mlp, relu2, swiglu)")
        if ffn is not None and self.ffn_adapter_rank and ffn.chunk is not None:
            raise ValueError("ffn_adapter_rank: an FFN with per-use adapters runs whole; set ffn.chunk: null")

    def width_step(self) -> int:
        """d_model steps that keep the input width's heads whole and even."""
        step = super().width_step()
        return step // 2 if self.concat_embeddings and step % 2 == 0 else step
