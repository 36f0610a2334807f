"""Packed documents: what `seq_idx` means and the helpers every op and block reads it with.

seq_idx [batch, length] holds integer document ids of sequences packed back to back. A document is a
maximal run of equal consecutive ids: a change of id starts a new document, so ids may repeat
non-adjacently ([5, 5, 2, 5] is three documents), as mamba_ssm's `seq_idx` and `zoo.ops.ssd` read
them. With seq_idx every op and block gives each token what its document alone, starting at its own
position 0, would give: attention does not cross a boundary, recurrent state and convolution
history are zeroed at one, and rotary positions restart at each document's first token.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["check_seq_idx", "document_number", "document_positions", "document_spans", "per_document",
           "check_block_documents", "reject_streaming"]


def check_seq_idx(seq_idx: torch.Tensor, batch: int, length: int, name: str = "seq_idx") -> None:
    if seq_idx.is_floating_point() or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer dtype, got {seq_idx.dtype}")
    if tuple(seq_idx.shape) != (batch, length):
        raise ValueError(f"{name}: expected shape {(batch, length)} (batch, length), got {tuple(seq_idx.shape)}")


def check_block_documents(x: torch.Tensor, seq_idx, cache=None, cp=None) -> None:
    """A block's checks on seq_idx for its input x [batch, length, d_model] (see `reject_streaming`)."""
    if seq_idx is not None:
        check_seq_idx(seq_idx, x.shape[0], x.shape[1])
        reject_streaming(seq_idx, cache, cp)


def reject_streaming(seq_idx, cache=None, cp=None) -> None:
    """Blocks take seq_idx for whole packed rows only: a cache would have to carry a document boundary
    across calls, and context parallel the ids across ranks; neither is supported."""
    if seq_idx is None:
        return
    if cache is not None:
        raise ValueError("seq_idx: packed documents do not stream through a cache (the cache continues one "
                         "sequence); pass either cache or seq_idx, not both")
    if cp is not None:
        raise ValueError("seq_idx: packed documents are not supported under context parallel; "
                         "pass either cp or seq_idx, not both")


def document_number(seq_idx: torch.Tensor) -> torch.Tensor:
    """[b, l] ids -> int64 [b, l]: how many id changes precede each position (0 for the first document).

    Non-decreasing along each row, so "same document" becomes a plain equality and "key block
    entirely before the query block's documents" a comparison of two entries."""
    changes = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return F.pad(changes.cumsum(1), (1, 0))


def document_positions(seq_idx: torch.Tensor) -> torch.Tensor:
    """[b, l] ids -> int64 [b, l]: each token's position inside its document (0 at every document start)."""
    b, length = seq_idx.shape
    idx = torch.arange(length, device=seq_idx.device).expand(b, length)
    starts = _starts(seq_idx)
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values


def document_spans(seq_idx: torch.Tensor) -> List[List[Tuple[int, int]]]:
    """Per batch row, the [start, end) of each document, in order (one host sync)."""
    length = seq_idx.shape[1]
    spans = []
    for row in _starts(seq_idx).cpu():
        s = row.nonzero()[:, 0].tolist()
        spans.append(list(zip(s, s[1:] + [length])))
    return spans


def per_document(fn: Callable[..., torch.Tensor], seq_idx: torch.Tensor, *tensors: Optional[torch.Tensor],
                 spans: Optional[List[List[Tuple[int, int]]]] = None):
    """Run `fn` on each document alone and stitch the results back: out[r, s:e] = fn(*(t[r:r+1, s:e])).

    tensors are [batch, length, ...] (None passes through as None); fn returns one [batch', length', ...]
    tensor. The exact path for ops whose document masking would be costly to fuse: packed training rows
    hold few documents, so this is a handful of calls per row. When every row has the same boundaries
    each document runs for the whole batch at once. `spans`: `document_spans(seq_idx)` if already known."""
    if seq_idx.numel() == 0:
        return fn(*tensors)
    spans = document_spans(seq_idx) if spans is None else spans
    cut = lambda rows, s, e: [None if t is None else t[rows, s:e] for t in tensors]
    if all(row == spans[0] for row in spans):
        return torch.cat([fn(*cut(slice(None), s, e)) for s, e in spans[0]], dim=1)
    return torch.cat([torch.cat([fn(*cut(slice(r, r + 1), s, e)) for s, e in row], dim=1)
                      for r, row in enumerate(spans)], dim=0)


def _starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """[b, l] bool: the token starts a document."""
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts
