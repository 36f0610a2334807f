"""Configs of the Mamba blocks (recipe fields under `model.blocks.<letter>`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Union


@dataclass
class MambaConfig:
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Union[int, str] = "auto"   # "auto": ceil(d_model / 16)
    dt_min: float = 0.001               # initial step sizes are log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False                  # in_proj and out_proj
    # Jamba (arXiv 2403.19887): RMSNorms on dt (before dt_proj), B and C after x_proj, which keep them
    # bounded at scale (transformers' dt_layernorm, b_layernorm, c_layernorm)
    dt_bc_norm: bool = False
    dt_bc_norm_eps: float = 1e-6

    def __post_init__(self):
        _at_least_one(self, "d_state", "d_conv", "expand")
        if not self.dt_bc_norm_eps > 0:
            raise ValueError(f"dt_bc_norm_eps: must be > 0, got {self.dt_bc_norm_eps}")
        if self.dt_rank != "auto" and (isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int)
                                       or self.dt_rank < 1):
            raise ValueError(f"dt_rank: must be 'auto' or an integer >= 1, got {self.dt_rank!r}")
        _check_dt_range(self)

    def width_step(self) -> int:
        """The multiple of model.d_model this block builds at: any (its widths are expand x d_model)."""
        return 1


@dataclass
class Mamba2Config:
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 32
    n_groups: int = 1                   # B and C are shared by n_heads / n_groups heads
    # The SSD scan's chunk. Measured on this CPU (benchmarks/bench_ssm.py shapes: d_model 256, head_dim 64,
    # d_state 64; float32, one thread, fwd + bwd CPU s), op / mixer: chunk 32: 0.086 / 0.29 at 4K, 0.44 / 1.34
    # at 16K; 64: 0.085 / 0.30, 0.35 / 1.26; 128: 0.10 / 0.30, 0.41 / 1.33; 256: 0.15 / 0.34, 0.60 / 1.57.
    chunk_size: int = 64
    conv_bias: bool = True
    bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_init_min: float = 1.0             # -A per head is uniform in [a_init_min, a_init_max]
    a_init_max: float = 16.0
    # the inner width as n_heads x head_dim rather than expand x d_model (Nemotron-H, Falcon-H1); null: expand
    n_heads: Optional[int] = None
    norm: bool = True                   # the gated RMSNorm; false: y * silu(z) alone (Falcon-H1 mamba_rms_norm)
    norm_eps: float = 1e-5              # the gated RMSNorm's eps
    # step sizes clamped to [lo, hi] after the softplus, as mamba_ssm's dt_limit (Nemotron-H: [time_step_min, inf])
    dt_limit: List[float] = field(default_factory=lambda: [0.0, math.inf])
    UNBOUNDED = ("dt_limit",)            # not a field: the recipe check lets dt_limit's hi be .inf

    def __post_init__(self):
        _at_least_one(self, "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size")
        if self.n_heads is not None:
            _at_least_one(self, "n_heads")
        _check_dt_range(self)
        if not 0 < self.a_init_min <= self.a_init_max:
            raise ValueError(f"a_init_min: must satisfy 0 < a_init_min <= a_init_max = {self.a_init_max}, "
                             f"got {self.a_init_min}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: must be > 0, got {self.norm_eps}")
        if len(self.dt_limit) != 2 or not 0 <= self.dt_limit[0] < self.dt_limit[1]:
            raise ValueError(f"dt_limit: must be [lo, hi] with 0 <= lo < hi (hi may be .inf), got {list(self.dt_limit)}")

    @property
    def clamps_dt(self) -> bool:
        return tuple(self.dt_limit) != (0.0, math.inf)

    def check(self, d_model: int, seq_len: int) -> None:
        """Checks that need the model's width."""
        self.heads(d_model)

    def width_step(self) -> int:
        """The multiple of model.d_model this block builds at: expand x d_model splits into whole heads of
        head_dim, n_groups of them; any width when n_heads fixes the inner width."""
        if self.n_heads is not None:
            return 1
        unit = self.head_dim * self.n_groups
        return unit // math.gcd(self.expand, unit)

    def inner(self, d_model: int) -> int:
        """The inner width d_inner: n_heads x head_dim when n_heads is set, else expand x d_model."""
        return self.n_heads * self.head_dim if self.n_heads is not None else self.expand * d_model

    def heads(self, d_model: int) -> int:
        if self.n_heads is not None:
            if self.n_heads % self.n_groups:
                raise ValueError(f"n_groups: {self.n_groups} does not divide n_heads {self.n_heads}")
            return self.n_heads
        d_inner = self.expand * d_model
        if d_inner % self.head_dim:
            raise ValueError(f"head_dim: {self.head_dim} does not divide expand * model.d_model = {d_inner}")
        n_heads = d_inner // self.head_dim
        if n_heads % self.n_groups:
            raise ValueError(f"n_groups: {self.n_groups} does not divide the {n_heads} heads "
                             f"(expand * model.d_model / head_dim)")
        return n_heads


def _at_least_one(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value!r}")


def _check_dt_range(cfg):
    if not 0 < cfg.dt_min <= cfg.dt_max:
        raise ValueError(f"dt_min: must satisfy 0 < dt_min <= dt_max = {cfg.dt_max}, got {cfg.dt_min}")
    if cfg.dt_init_floor < 0:
        raise ValueError(f"dt_init_floor: must be >= 0, got {cfg.dt_init_floor}")
