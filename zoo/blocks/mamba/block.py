"""The Mamba mixers, `mamba` and `mamba2` (package docstring for the equations)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.base import Block
from zoo.blocks.mamba.cache import MambaCache
from zoo.blocks.mamba.config import Mamba2Config, MambaConfig
from zoo.blocks.mamba.cp import mamba2_cp, mamba_cp
from zoo.ops.conv import causal_conv1d, causal_conv1d_update
from zoo.ops.documents import check_block_documents
from zoo.ops.norm import gated_rms_norm
from zoo.ops.ssd import ssd_scan, ssd_state_update
from zoo.ops.ssm import selective_scan, selective_scan_step
from zoo.registry import register_block


class _Mixer(Block):
    """What the two Mamba mixers share: packed documents, context parallel, a position-free cache."""

    supports_seq_idx = True
    supports_cp = True

    def merge_left_padded(self, caches: Sequence[MambaCache], row_start, length: int) -> MambaCache:
        # conv and SSM states have a fixed size per row and no position: decoding the stacked rows is
        # the batched recurrence, exact row by row since rows never mix
        return MambaCache.stack(caches)


@register_block("mamba", config=MambaConfig)
class MambaBlock(_Mixer):
    """The Mamba-1 mixer: selective SSM with a [d_inner, d_state] diagonal A and a gate."""

    def __init__(self, d_model: int, cfg: MambaConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        self.d_inner = cfg.expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if cfg.dt_rank == "auto" else cfg.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=cfg.bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, cfg.d_conv, groups=self.d_inner, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        if cfg.dt_bc_norm:
            self.dt_layernorm = nn.RMSNorm(self.dt_rank, eps=cfg.dt_bc_norm_eps)
            self.b_layernorm = nn.RMSNorm(cfg.d_state, eps=cfg.dt_bc_norm_eps)
            self.c_layernorm = nn.RMSNorm(cfg.d_state, eps=cfg.dt_bc_norm_eps)
        # S4D-real initialisation (arXiv 2206.11893): A = -(1, 2, ..., d_state) in every channel
        A = torch.arange(1, cfg.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=cfg.bias)
        with torch.no_grad():
            # dt_proj's weight at the scale that keeps dt_proj(dt) O(1) (mamba_ssm's "random" init)
            bound = self.dt_rank ** -0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            self.dt_proj.bias.copy_(_initial_dt_bias(self.d_inner, cfg))
        for p in (self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D):
            p._no_reinit = True
        for p in (self.A_log, self.D):
            p._no_weight_decay = True   # decay toward 0 would change the dynamics, not only the scale

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            return mamba_cp(self, x, cp, cache)
        xs, z = self.split_input(x)
        xs = _conv(self.conv1d, xs, cache, seq_idx, self.kernels.get("causal_conv1d", "auto"))
        dt, B, C = self.ssm_inputs(xs)
        A = -torch.exp(_float(self.A_log))
        if cache is not None and x.shape[1] == 1:
            y, state = selective_scan_step(cache.ssm, xs[..., 0], dt[..., 0], A, B[:, 0], C[:, 0], self.D,
                                           z[..., 0], self.dt_proj.bias, dt_softplus=True)
            y = y[..., None]
        else:
            y = selective_scan(xs, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D, z, self.dt_proj.bias,
                               delta_softplus=True, return_last_state=cache is not None,
                               initial_state=None if cache is None else cache.ssm, seq_idx=seq_idx,
                               impl=self.kernels.get("selective_scan", "auto"))
            if cache is not None:
                y, state = y
        if cache is not None:
            cache.ssm = state.to(cache.ssm.dtype)
        return self.out_proj(y.transpose(1, 2))

    def split_input(self, x):
        """x, z [b, d_inner, l] from the input [b, l, d_model] (x before the convolution)."""
        return self.in_proj(x).transpose(1, 2).chunk(2, dim=1)

    def ssm_inputs(self, xs):
        """dt [b, d_inner, l] (dt_proj without its bias, which the scan adds as delta_bias) and B, C
        [b, l, d_state] from the convolution's output xs [b, d_inner, l] (with `dt_bc_norm`, each normalised
        first; per token, so the cache and the cp path, which call this too, need nothing more)."""
        n = self.cfg.d_state
        dt, B, C = self.x_proj(xs.transpose(1, 2)).split([self.dt_rank, n, n], dim=-1)
        if self.cfg.dt_bc_norm:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return F.linear(dt, self.dt_proj.weight).transpose(1, 2), B, C

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> MambaCache:
        return MambaCache(torch.zeros(batch_size, self.d_inner, self.cfg.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch_size, self.d_inner, self.cfg.d_state, device=device, dtype=dtype))

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return batch_size * self.d_inner * (self.cfg.d_conv - 1 + self.cfg.d_state) * elem


@register_block("mamba2", config=Mamba2Config)
class Mamba2Block(_Mixer):
    """The Mamba-2 mixer: heads with a scalar decay each (SSD), grouped B and C, gated RMSNorm."""

    def __init__(self, d_model: int, cfg: Mamba2Config, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        self.n_heads = cfg.heads(d_model)
        self.d_inner = cfg.inner(d_model)
        self.conv_dim = self.d_inner + 2 * cfg.n_groups * cfg.d_state
        # in_proj packs [z, x, B, C, dt], as in mamba_ssm
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=cfg.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(_initial_dt_bias(self.n_heads, cfg))
        A = torch.empty(self.n_heads).uniform_(cfg.a_init_min, cfg.a_init_max)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // cfg.n_groups, cfg.norm_eps) if cfg.norm else None
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=cfg.bias)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_reinit = True
            p._no_weight_decay = True

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        if cp is not None:
            return mamba2_cp(self, x, cp, cache)
        b, length, _ = x.shape
        if cache is not None and length == 1 and not torch.is_grad_enabled():
            return self._decode_step(x, cache)
        h, p, n = self.n_heads, self.cfg.head_dim, self.cfg.d_state
        z, xBC, dt = self.split_input(x)
        xBC = _conv(self.conv1d, xBC.transpose(1, 2), cache, seq_idx,
                    self.kernels.get("causal_conv1d", "auto")).transpose(1, 2)
        xs, B, C = self.split_heads(xBC)
        A = -torch.exp(_float(self.A_log))
        dt, dt_bias, dt_softplus = self.scan_dt(dt)
        if cache is not None and length == 1:
            # Heads flattened into channels, A and dt repeated over head_dim: the Mamba-1 step.
            per_head = lambda t: None if t is None else t.repeat_interleave(p, dim=-1)
            y, state = selective_scan_step(cache.ssm.flatten(1, 2), xs[:, 0].reshape(b, h * p), per_head(dt[:, 0]),
                                           per_head(A)[:, None].expand(h * p, n), B[:, 0], C[:, 0], per_head(self.D),
                                           None, per_head(dt_bias), dt_softplus=dt_softplus)
            y, state = y[:, None], state.view(b, h, p, n)
        else:
            y = ssd_scan(xs, dt, A, B, C, self.cfg.chunk_size, D=self.D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                         initial_states=None if cache is None else cache.ssm, seq_idx=seq_idx,
                         return_final_states=cache is not None, impl=self.kernels.get("ssd", "auto"))
            if cache is not None:
                y, state = y
            y = y.reshape(b, length, self.d_inner)
        if cache is not None:
            cache.ssm = state.to(cache.ssm.dtype)
        return self.output(y, z)

    def _decode_step(self, x, cache):
        """One token without autograd, the cache's conv and SSM states updated in place: the conv step and
        the state update as one window product and one per-head decay (zoo.ops.conv.causal_conv1d_update,
        zoo.ops.ssd.ssd_state_update), no per-step repeat of A, dt and D over head_dim."""
        b = x.shape[0]
        g, n = self.cfg.n_groups, self.cfg.d_state
        z, xBC, dt = self.split_input(x[:, 0])
        xBC = causal_conv1d_update(xBC, cache.conv, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        xs, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        dt, dt_bias, dt_softplus = self.scan_dt(dt)
        y = ssd_state_update(cache.ssm, xs.reshape(b, self.n_heads, self.cfg.head_dim), dt,
                             -torch.exp(_float(self.A_log)), B.reshape(b, g, n), C.reshape(b, g, n), self.D,
                             dt_bias=dt_bias, dt_softplus=dt_softplus)
        return self.output(y.view(b, 1, self.d_inner), z[:, None])

    def split_input(self, x):
        """z [b, l, d_inner], xBC [b, l, conv_dim] (before the convolution), dt [b, l, heads]."""
        return self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def step_sizes(self, dt):
        """The step sizes softplus(dt + dt_bias), clamped to cfg.dt_limit, in dt's dtype."""
        steps = F.softplus(dt + self.dt_bias.to(dt.dtype))
        return steps.clamp(*self.cfg.dt_limit) if self.cfg.clamps_dt else steps

    def scan_dt(self, dt):
        """(dt, dt_bias, dt_softplus) for the scans: the projection, its bias and softplus left to the op, or
        with a dt_limit the clamped step sizes themselves (the ops take no limit)."""
        if not self.cfg.clamps_dt:
            return dt, self.dt_bias, True
        return self.step_sizes(_float(dt)), None, False

    def split_heads(self, xBC):
        """x [b, l, heads, head_dim] and B, C [b, l, groups, d_state] from the convolution's output."""
        b, length, _ = xBC.shape
        g, n = self.cfg.n_groups, self.cfg.d_state
        xs, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        return (xs.reshape(b, length, self.n_heads, self.cfg.head_dim), B.reshape(b, length, g, n),
                C.reshape(b, length, g, n))

    def output(self, y, z):
        """out_proj(rmsnorm(y * silu(z))) of y, z [b, l, d_inner]; without the norm out_proj(y * silu(z))."""
        if self.norm is None:
            acc = _float(y).dtype
            return self.out_proj((y.to(acc) * F.silu(z.to(acc))).to(y.dtype))
        return self.out_proj(self.norm(y, z))

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> MambaCache:
        cfg = self.cfg
        return MambaCache(torch.zeros(batch_size, self.conv_dim, cfg.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch_size, self.n_heads, cfg.head_dim, cfg.d_state, device=device, dtype=dtype))

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        cfg = self.cfg
        return batch_size * (self.conv_dim * (cfg.d_conv - 1) + self.d_inner * cfg.d_state) * elem


class GatedRMSNorm(nn.Module):
    """rmsnorm(y * silu(z)) * weight over groups of `group_size` channels: Mamba-2's output norm
    (norm_before_gate=False), per group so that it is unchanged under tensor parallel over groups."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y, z):
        return gated_rms_norm(y, z, self.weight, self.group_size, self.eps)


def _conv(conv: nn.Conv1d, x, cache, seq_idx=None, impl="auto"):
    """Depthwise causal conv + SiLU of x [b, c, l], continuing from and updating cache.conv."""
    weight = conv.weight[:, 0]
    if cache is None:
        return causal_conv1d(x, weight, conv.bias, activation="silu", seq_idx=seq_idx, impl=impl)
    out, states = causal_conv1d(x, weight, conv.bias, initial_states=cache.conv, return_final_states=True,
                                activation="silu", impl=impl)
    cache.conv = states.to(cache.conv.dtype)
    return out


def _initial_dt_bias(size: int, cfg) -> torch.Tensor:
    """softplus^-1 of step sizes log-uniform in [dt_min, dt_max] (floored), so that
    softplus(dt_proj(.) + bias) starts in that range, as mamba_ssm initialises it."""
    dt = torch.exp(torch.rand(size) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
    dt = dt.clamp(min=cfg.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def _float(t: torch.Tensor) -> torch.Tensor:
    """At least float32: exp(A_log) and the norm's statistics lose too much in half precision."""
    return t if t.dtype == torch.float64 else t.float()
