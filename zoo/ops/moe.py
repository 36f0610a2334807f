"""Mixture of experts: top-k routing over SwiGLU experts (Switch Transformer, arXiv 2101.03961;
Mixtral, arXiv 2401.04088; Jamba, arXiv 2403.19887).

    probs = softmax(router_logits)                 # over all E experts
    w, e  = topk(probs, k)                         # Jamba / Mixtral-as-released: w left as they are;
                                                   # normalize=True: w / sum(w) (Mixtral, Qwen-MoE)
    y_t   = sum_j w_tj * expert_{e_tj}(x_t),   expert_e(x) = W_down[e] (silu(W_gate[e] x) * W_up[e] x)

Shapes: x [tokens, d]; router_logits [tokens, E]; gate_up [E, 2 * hidden, d] (gate rows first, then up:
transformers' `experts.gate_up_proj`); down [E, d, hidden]; weights, experts [tokens, k].

`moe_swiglu` gathers each expert's tokens and runs only them (work ~ k / E of the dense product);
`moe_swiglu_ref` is its twin: every expert on every token, the outputs masked by the combine weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["route", "moe_swiglu", "moe_swiglu_ref", "expert_counts"]


def route(router_logits: torch.Tensor, top_k: int, normalize: bool = False):
    """(probs [tokens, E] in at least float32, weights [tokens, k] in the logits' dtype, experts [tokens, k]).

    probs is the softmax over all experts (the load-balancing loss reads it); weights are the top-k of
    those probabilities, renormalised to sum to 1 only with `normalize`."""
    probs = torch.softmax(router_logits.to(accumulation_dtype(router_logits)), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, weights.to(router_logits.dtype), experts


def route_sigmoid(router_logits: torch.Tensor, top_k: int, bias: torch.Tensor, n_group: int = 1, topk_group: int = 1,
                  normalize: bool = True, scaling: float = 1.0):
    """DeepSeek-V3's router (and Kimi Linear's): scores = sigmoid(logits); experts are chosen by scores + `bias`
    (the correction bias that balances load without a loss), first the `topk_group` of `n_group` groups whose two
    best biased scores sum highest, then the top_k within them; weights are the chosen experts' unbiased scores,
    renormalised with `normalize` (+1e-20), times `scaling`. Returns (scores / their sum over experts, the
    load-balancing loss's probabilities), weights, experts, as `route`."""
    scores = torch.sigmoid(router_logits.to(accumulation_dtype(router_logits)))
    choice = scores + bias.to(scores.dtype)
    tokens, n = choice.shape
    if n_group > 1:
        groups = choice.view(tokens, n_group, n // n_group).topk(2, dim=-1)[0].sum(-1)       # [tokens, groups]
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, dim=-1)[1], 1.0)
        choice = choice.masked_fill(keep.repeat_interleave(n // n_group, dim=1) == 0, float("-inf"))
    experts = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, experts)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    probs = scores / scores.sum(-1, keepdim=True)
    return probs, (weights * scaling).to(router_logits.dtype), experts


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[E] int64: how many of the tokens' top-k slots each expert holds."""
    return torch.bincount(experts.flatten(), minlength=n_experts)


def _swiglu(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def moe_swiglu(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """y [tokens, d] = sum_j weights[:, j] * expert_{experts[:, j]}(x): the (token, slot) pairs sorted by
    expert, each expert run once on its contiguous run of gathered tokens, the results scattered back."""
    n_tokens, k = experts.shape
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    gathered = x[token]
    outs = [_swiglu(part, gate_up[e], down[e]) for e, part in enumerate(gathered.split(counts)) if counts[e]]
    acc = accumulation_dtype(x)
    ys = torch.cat(outs).to(acc) * weights.flatten()[order, None].to(acc)
    return x.new_zeros(n_tokens, x.shape[1], dtype=acc).index_add(0, token, ys).to(x.dtype)


def moe_swiglu_ref(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """The twin of `moe_swiglu`: every expert on every token ([tokens, E, d]), combined by a dense
    [tokens, E] matrix that holds the top-k weights and zeros elsewhere."""
    gate, up = torch.einsum("td,ehd->teh", x, gate_up).chunk(2, dim=-1)
    every = torch.einsum("teh,edh->ted", F.silu(gate) * up, down)
    combine = x.new_zeros(x.shape[0], gate_up.shape[0], dtype=weights.dtype).scatter_add(1, experts, weights)
    return torch.einsum("ted,te->td", every, combine.to(every.dtype))
