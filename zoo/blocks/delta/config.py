"""Config of the delta-rule blocks `deltanet`, `gated_deltanet` and `kda` (recipe fields under `model.blocks.<letter>`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DeltaConfig:
    n_heads: int = 4                   # heads of the recurrence (and of v)
    n_k_heads: Optional[int] = None    # q / k heads, each shared by n_heads / n_k_heads heads (Qwen3-Next: 16 : 32)
    head_k_dim: int = 32
    head_v_dim: Optional[int] = None   # default head_k_dim
    d_conv: int = 4                    # the short causal convolution on q, k, v (with SiLU); 1: none
    conv_bias: bool = False
    qk_l2norm: bool = True             # q and k normalised to unit length inside the op (eps 1e-6)
    allow_neg_eigval: bool = False     # beta = 2 sigmoid(.) in (0, 2) instead of sigmoid(.) (OLMo-Hybrid)
    output_gate: bool = True           # rmsnorm(o) * act(z), z a projection of the input; false: rmsnorm(o)
    output_gate_act: str = "silu"      # act: silu (Qwen3-Next, OLMo-Hybrid) or sigmoid (Kimi Linear)
    output_gate_rank: Optional[int] = None   # z through a rank-r bottleneck (Kimi Linear: head_k_dim); null: full
    norm_eps: float = 1e-5
    decay_rank: Optional[int] = None    # kda: the low-rank per-channel decay projection's width (default head_k_dim)
    a_init_min: float = 1.0            # the decay rate A per head starts uniform in [a_init_min, a_init_max]
    a_init_max: float = 16.0
    dt_min: float = 0.001              # softplus(. + dt_bias) starts log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    # of the chunked op (results agree across chunk sizes up to rounding); null: the fastest measured on CPU, 32, or
    # 16 for kda (the op's forward + backward, 4 heads of 64, one thread, at 4K / 16K: head decay 0.13 / 0.55 s at
    # 64, 0.10 / 0.41 at 32, 0.11 / 0.47 at 16; channel decay at 4K 1.1 s at 64, 1.0 at 32, 0.59 at 16)
    chunk_size: Optional[int] = None

    def __post_init__(self):
        for name in ("n_heads", "head_k_dim", "d_conv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        for name in ("n_k_heads", "head_v_dim", "decay_rank", "output_gate_rank", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: must be null or an integer >= 1, got {value!r}")
        if self.n_k_heads is not None and self.n_heads % self.n_k_heads:
            raise ValueError(f"n_k_heads: must divide n_heads {self.n_heads}, got {self.n_k_heads}")
        if self.output_gate_act not in ("silu", "sigmoid"):
            raise ValueError(f"output_gate_act: {self.output_gate_act!r}; allowed: silu, sigmoid")
        if self.output_gate_rank is not None and not self.output_gate:
            raise ValueError("output_gate_rank: sizes the output gate, which output_gate: false turns off")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: must be > 0, got {self.norm_eps}")
        if not 0 < self.a_init_min <= self.a_init_max:
            raise ValueError(f"a_init_min: must satisfy 0 < a_init_min <= a_init_max = {self.a_init_max}, "
                             f"got {self.a_init_min}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min: must satisfy 0 < dt_min <= dt_max = {self.dt_max}, got {self.dt_min}")

    @property
    def k_heads(self) -> int:
        return self.n_k_heads or self.n_heads

    @property
    def v_dim(self) -> int:
        return self.head_v_dim or self.head_k_dim

    def width_step(self) -> int:
        """The multiple of model.d_model this block builds at: any (its widths are heads x head dims)."""
        return 1
