"""The mixture-of-experts feed-forward, `ffn: {type: moe, experts: E, top_k: k, ...}` (zoo.ops.moe for the
math): a linear router, softmax over all experts, top-k SwiGLU experts, an optional shared SwiGLU expert
that every token goes through (optionally scaled by a sigmoid gate per token), and the load-balancing
auxiliary loss.

Load balancing (Switch Transformer, arXiv 2101.03961, eq. 4-6; transformers' `load_balancing_loss_func`):

    aux = aux_loss_weight * E * sum_e f_e * P_e,
    f_e = (top-k slots routed to e) / tokens,   P_e = mean over tokens of softmax(router_logits)_e

f counts all k slots (sum_e f_e = k, so a uniform router gives aux = weight * k); its gradient flows
through P only. The statistics are the layer's own: each MoE layer adds its term to the model's
aux_loss. (transformers pools the counts and probabilities of all MoE layers before the product, which
equals this for one MoE layer and differs for several; its Jamba adds it only with output_router_logits.)

Per token, so a cache, streaming and packed documents (seq_idx) change nothing. Under context parallel
the token counts and probability sums are summed over the group before the product (the probability
sums with an identity backward, as the model's cross-entropy), so every rank holds the one-process
value and the ranks' gradients sum to the one-process gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.distributed import all_reduce_sum
from zoo.ops.moe import expert_counts, moe_swiglu, route, route_sigmoid

__all__ = ["MoeFeedForward", "check_moe_fields"]


def check_moe_fields(cfg) -> None:
    """The `moe` fields of an FfnConfig (raises ValueError starting with the field name)."""
    if cfg.experts is None or isinstance(cfg.experts, bool) or cfg.experts < 1:
        raise ValueError(f"experts: type moe needs the number of experts (an integer >= 1), got {cfg.experts!r}")
    if isinstance(cfg.top_k, bool) or not 1 <= cfg.top_k <= cfg.experts:
        raise ValueError(f"top_k: must be in [1, experts={cfg.experts}], got {cfg.top_k!r}")
    if cfg.shared_hidden is not None and cfg.shared_hidden < 1:
        raise ValueError(f"shared_hidden: must be null (no shared expert) or >= 1, got {cfg.shared_hidden}")
    if cfg.router not in ("softmax", "sigmoid"):
        raise ValueError(f"router: {cfg.router!r}; allowed: softmax, sigmoid")
    if cfg.n_group < 1 or cfg.experts % cfg.n_group or not 1 <= cfg.topk_group <= cfg.n_group:
        raise ValueError(f"n_group: {cfg.n_group} must divide experts {cfg.experts}, with 1 <= topk_group "
                         f"({cfg.topk_group}) <= n_group")
    if cfg.n_group > 1 and cfg.router != "sigmoid":
        raise ValueError("n_group: grouped routing is the sigmoid router's (router: sigmoid)")
    if cfg.n_group > 1 and cfg.experts // cfg.n_group < 2:
        raise ValueError(f"n_group: each group needs at least 2 experts (a group scores by its best two), got "
                         f"{cfg.experts // cfg.n_group}")
    if not cfg.bias_update_rate >= 0:
        raise ValueError(f"bias_update_rate: must be >= 0, got {cfg.bias_update_rate}")
    if cfg.bias_update_rate and cfg.router != "sigmoid":
        raise ValueError("bias_update_rate: moves the sigmoid router's correction bias (router: sigmoid)")
    if cfg.shared_gate and cfg.shared_hidden is None:
        raise ValueError("shared_gate: gates the shared expert, which needs shared_hidden")
    if not cfg.aux_loss_weight >= 0:
        raise ValueError(f"aux_loss_weight: must be >= 0, got {cfg.aux_loss_weight}")
    if cfg.bias:
        raise ValueError("bias: type moe has no biases (router and experts are bias-free)")
    if cfg.chunk is not None:
        raise ValueError(f"chunk: the blockwise FFN is not implemented for type moe, got {cfg.chunk}")


class MoeFeedForward(nn.Module):
    """x [batch, length, d_model] -> (y, aux_loss). Parameters: `router` [E, d], `gate_up` [E, 2h, d],
    `down` [E, d, h] (transformers' router.weight, experts.gate_up_proj, experts.down_proj), and with
    `shared_hidden` a SwiGLU `shared` (gate_proj, up_proj, out_proj), gated with `shared_gate` by
    sigmoid(shared_gate x) per token."""

    def __init__(self, d_model: int, cfg, hidden: int):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(d_model, cfg.experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(cfg.experts, 2 * hidden, d_model))
        self.down = nn.Parameter(torch.empty(cfg.experts, d_model, hidden))
        self.shared = _SharedExpert(d_model, cfg.shared_hidden) if cfg.shared_hidden else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_gate else None
        if cfg.router == "sigmoid":   # adjusted outside the gradient (aux-loss-free balancing), saved with the weights
            self.register_buffer("correction_bias", torch.zeros(cfg.experts))
        if cfg.bias_update_rate:      # top-k slots per expert since the last update (training forwards only)
            self.register_buffer("load", torch.zeros(cfg.experts), persistent=False)
        self.init_weights(0.02, 1.0)

    @torch.no_grad()
    def init_weights(self, std: float, out_scale: float) -> None:
        """The stacked experts as the model's linears (ZooLM.reset_parameters): N(0, std), the output
        projection scaled by `out_scale` like every residual `out_proj`."""
        nn.init.normal_(self.gate_up, std=std)
        nn.init.normal_(self.down, std=std * out_scale)

    def forward(self, x: torch.Tensor, cp=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        cfg = self.cfg
        flat = x.reshape(-1, x.shape[-1])
        if cfg.router == "sigmoid":
            probs, weights, experts = route_sigmoid(self.router(flat), cfg.top_k, self.correction_bias, cfg.n_group,
                                                    cfg.topk_group, cfg.normalize_top_k, cfg.routed_scaling)
        else:
            probs, weights, experts = route(self.router(flat), cfg.top_k, cfg.normalize_top_k)
        if cfg.bias_update_rate and self.training:
            self.load += expert_counts(experts, cfg.experts).to(self.load.dtype)
        y = moe_swiglu(flat, weights, experts, self.gate_up, self.down).view_as(x)
        if self.shared is not None:
            shared = self.shared(x)
            y = y + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * shared)
        aux = None
        if cfg.aux_loss_weight > 0:
            aux = cfg.aux_loss_weight * self._balance(probs, experts, cp)
        return y, aux

    @torch.no_grad()
    def update_correction_bias(self, group=None) -> None:
        """One step of aux-loss-free balancing (DeepSeek-V3, arXiv 2412.19437, section 2.1.2): with the load counted
        since the last call (summed over `group`, every rank of data and context parallel, so that all ranks move
        their biases alike), bias_e -= rate * sign(load_e - mean load); then the count restarts. Activation
        checkpointing's recomputed forwards count every expert twice, which leaves the signs as they are."""
        if not self.cfg.bias_update_rate:
            return
        load = self.load if group is None else all_reduce_sum(self.load.clone(), group)
        self.correction_bias -= self.cfg.bias_update_rate * torch.sign(load - load.mean())
        self.load.zero_()

    def _balance(self, probs: torch.Tensor, experts: torch.Tensor, cp) -> torch.Tensor:
        """E * sum_e f_e P_e over all tokens (of every rank under cp); see the module docstring."""
        n = self.cfg.experts
        counts = expert_counts(experts, n).to(probs.dtype)
        tokens = probs.new_tensor([probs.shape[0]])
        stats = torch.cat([probs.sum(0), counts, tokens])
        if cp is not None:
            stats = all_reduce_sum(stats, cp.group)   # one collective; counts and tokens carry no gradient
        prob_sum, counts, tokens = stats[:n], stats[n:2 * n], stats[2 * n]
        return n * (counts.detach() / tokens) @ (prob_sum / tokens)


class _SharedExpert(nn.Module):
    """A SwiGLU every token goes through, beside the routed experts (DeepSeekMoE's shared expert)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.out_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.out_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
