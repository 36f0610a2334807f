"""Configs of the attention blocks (recipe fields under `model.blocks.<letter>`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class AttnConfig:
    n_heads: int = 4
    n_kv_heads: Optional[int] = None   # GQA: kv heads shared by n_heads / n_kv_heads query heads
    head_dim: Optional[int] = None     # default d_model // n_heads
    rope_base: Optional[float] = 10000.0   # null: no positional embedding (NoPE, as Granite-4.0-H's attention)
    # partial RoPE: rotate only the first rope_dim of each head's dims (half-split pairs within them, as
    # transformers' partial_rotary_factor: Bamba rotates head_dim / 2); None: all of head_dim
    rope_dim: Optional[int] = None
    scale: Optional[float] = None         # softmax scale of q.k; None: 1 / sqrt(head_dim)
    qkv_bias: bool = False
    out_bias: bool = False
    # Qwen3-Next's gated attention: RMSNorm over each head's q and k before RoPE (weights [head_dim], shared by
    # the heads), and the output of each head times sigmoid(W_g x) before the output projection
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    qk_norm_scope: str = "head"   # "head": over each head's dims (Qwen3); "all": over all heads' (OLMo 2 / Hybrid)
    output_gate: bool = False
    # log-length scaling: a query that sees n > logn_length keys (n = its position + 1, at most the window) has q
    # times log(n) / log(logn_length), so attention over many keys stays as sharp as over logn_length (Qwen's logn
    # attention; Scalable-Softmax, Nakanishi 2025, arXiv 2501.19399); None: off
    logn_length: Optional[int] = None

    def __post_init__(self):
        if self.n_heads < 1:
            raise ValueError(f"n_heads: must be >= 1, got {self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads: must divide n_heads {self.n_heads}, got {self.n_kv_heads}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim: must be >= 1, got {self.head_dim}")
        if self.head_dim is not None and self._rotates_all() and self.head_dim % 2:
            raise ValueError(f"head_dim: must be even when RoPE rotates all of it (rotary pairs; see rope_dim, "
                             f"rope_base), got {self.head_dim}")
        if self.rope_base is not None and not self.rope_base > 1:
            raise ValueError(f"rope_base: must be null (no RoPE) or > 1, got {self.rope_base}")
        if self.rope_dim is not None:
            if isinstance(self.rope_dim, bool) or self.rope_dim < 2 or self.rope_dim % 2:
                raise ValueError(f"rope_dim: must be null (all of head_dim) or an even number >= 2 (rotary pairs), "
                                 f"got {self.rope_dim}")
            if self.rope_base is None:
                raise ValueError(f"rope_dim: {self.rope_dim} given with rope_base null (no RoPE); drop one of them")
            if self.head_dim is not None and self.rope_dim > self.head_dim:
                raise ValueError(f"rope_dim: {self.rope_dim} exceeds head_dim {self.head_dim}")
        if self.qk_norm_scope not in ("head", "all"):
            raise ValueError(f"qk_norm_scope: {self.qk_norm_scope!r}; allowed: head, all")
        if not self.qk_norm_eps > 0:
            raise ValueError(f"qk_norm_eps: must be > 0, got {self.qk_norm_eps}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale: must be null (1 / sqrt(head_dim)) or > 0, got {self.scale}")
        if self.logn_length is not None and (isinstance(self.logn_length, bool) or self.logn_length < 2):
            raise ValueError(f"logn_length: must be null (off) or an integer >= 2, got {self.logn_length!r}")

    def check(self, d_model: int, seq_len: int) -> None:
        """Checks that need the model's width and the training length."""
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide model.d_model {d_model}")
        head_dim = self.head_dim or d_model // self.n_heads
        if self.head_dim is None and self._rotates_all() and head_dim % 2:
            raise ValueError(f"n_heads: head_dim d_model/n_heads = {head_dim} must be even (rotary pairs)")
        if self.rope_dim is not None and self.rope_dim > head_dim:
            raise ValueError(f"rope_dim: {self.rope_dim} exceeds head_dim {head_dim}")

    def width_step(self) -> int:
        """The multiple of model.d_model this block builds at: heads of an even head dimension (rotary
        pairs) when head_dim follows d_model; any width when head_dim is fixed."""
        return 2 * self.n_heads if self.head_dim is None else 1

    def _rotates_all(self) -> bool:
        return self.rope_base is not None and self.rope_dim is None


def refuse_attention_options(cfg: AttnConfig, block: str) -> None:
    """For the attention-derived families (infini, selective) that rotate all of head_dim at the default
    scale: the `attn` options they do not implement are an error naming the field, never ignored."""
    if cfg.rope_base is None:
        raise ValueError(f"rope_base: null (no RoPE) is not supported by the {block} block")
    for name in ("rope_dim", "scale", "logn_length"):
        if getattr(cfg, name) is not None:
            raise ValueError(f"{name}: not supported by the {block} block (only by attn, blockwise, ring, swa)")
    for name in ("qk_norm", "output_gate"):
        if getattr(cfg, name):
            raise ValueError(f"{name}: not supported by the {block} block (only by attn, blockwise, ring, swa)")


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
