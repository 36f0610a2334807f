"""Cross-entropy over the vocabulary, in blocks of rows.

    cross_entropy(logits [N, V], targets [N]) = mean over rows with targets != ignore_index of
                                                logsumexp(logits_i) - logits_i[target_i]

The same value as `F.cross_entropy(logits.float(), targets, ignore_index=...)` (mean reduction), up
to float32 rounding (the sums run in another order), without what that costs on long rows: F.cross_entropy
keeps the [N, V] float32 log-probabilities for backward (and a low-precision caller first makes a
float32 copy of the logits); here forward keeps one float32 logsumexp per row and backward rebuilds
softmax block by block, writing the gradient in the logits' dtype. A caller shifting labels for
next-token prediction can pad the targets with ignore_index instead of slicing the logits, which
would copy them (and zero-fill their gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from zoo.ops.dtypes import accumulation_dtype

__all__ = ["cross_entropy", "cross_entropy_ref"]

# Elements of one block's float32 temporaries: 1 Mi (4 MiB), whatever the vocabulary size.
_BLOCK_ELEMENTS = 1 << 20


def cross_entropy(logits, targets, ignore_index: int = -100):
    """Mean cross-entropy of logits [N, V] against integer targets [N], rows whose target is ignore_index
    left out (nan when every row is); computed in at least float32, returned as a float32 (or float64) scalar."""
    _check(logits, targets)
    return _CrossEntropy.apply(logits, targets, ignore_index)


def cross_entropy_ref(logits, targets, ignore_index: int = -100):
    """The twin: F.cross_entropy on the logits made at least float32."""
    _check(logits, targets)
    return F.cross_entropy(logits.to(accumulation_dtype(logits)), targets, ignore_index=ignore_index)


class _CrossEntropy(torch.autograd.Function):
    """Forward: per row lse = logsumexp(logits), loss = sum over kept rows (lse - logit[target]) / kept.
    Backward: dlogits = (softmax - onehot(target)) * dloss / kept on kept rows, 0 on ignored ones."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        acc = accumulation_dtype(logits)
        keep = targets != ignore_index
        safe = torch.where(keep, targets, 0)
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        picked = torch.empty_like(lse)
        for rows in _row_blocks(logits):
            block = logits[rows].to(acc)
            torch.logsumexp(block, -1, out=lse[rows])
            picked[rows] = block.gather(1, safe[rows, None])[:, 0]
        kept = keep.sum()
        loss = (lse - picked).masked_fill_(~keep, 0).sum() / kept
        ctx.save_for_backward(logits, safe, keep, lse, kept)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, safe, keep, lse, kept = ctx.saved_tensors
        acc = lse.dtype
        grad = torch.empty_like(logits)
        # per row: dloss / kept where the row counts, 0 where it is ignored
        scale = keep.to(acc) * (dloss.to(acc) / kept)
        for rows in _row_blocks(logits):
            p = torch.sub(logits[rows].to(acc), lse[rows, None]).exp_()   # a new tensor: logits stay as they are
            p.scatter_add_(1, safe[rows, None], p.new_full((p.shape[0], 1), -1.0))
            grad[rows] = p.mul_(scale[rows, None])
        return grad, None, None


def _row_blocks(logits):
    rows = max(1, _BLOCK_ELEMENTS // max(1, logits.shape[1]))
    return [slice(i, min(i + rows, logits.shape[0])) for i in range(0, logits.shape[0], rows)]


def _check(logits, targets):
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [rows, vocab], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:1])} (one per row), got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected an integer dtype, got {targets.dtype}")
