"""Differentiable collectives for context parallel.

Gradient convention (what makes the parameter gradients of W ranks add up to the single-process ones):
each rank's backward computes its share of the gradient of the one global objective, and the shares are
summed over the group afterwards (DDP/FSDP over the cp x dp mesh, or `all_reduce_grads`). Hence:
- `all_gather`'s backward is its adjoint, a sum over ranks: a tensor every rank used gets every rank's
  gradient back;
- `all_reduce_sum` returns the global value on every rank but its backward is the identity, for values
  every rank holds replicated (the loss, Taipan's capacity term): each rank's backward then reaches only
  its own contribution, once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_reduce_sum", "all_reduce_grads"]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        # gloo has no reduce-scatter: sum the whole stack and keep this rank's slice
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """[W, *x.shape]: every rank's x (equal shapes), differentiable (backward sums over ranks)."""
    if dist.get_world_size(group) == 1:
        return x[None]
    return _AllGather.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of x over the group on every rank; backward passes the gradient to this rank's x only."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


@torch.no_grad()
def all_reduce_grads(module: torch.nn.Module, group=None) -> None:
    """Sum every parameter gradient over the group (what DDP over the cp ranks would do)."""
    if dist.get_world_size(group) == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
