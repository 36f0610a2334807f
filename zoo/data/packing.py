"""Packed sequences: windows cut from back-to-back documents, with document ids for masking.

`pack_batch(tokens, doc_ids)` turns windows [batch, seq_len] into the model's inputs:
- `input_ids` int64 [batch, seq_len];
- `labels` int64 [batch, seq_len], aligned with input_ids (ZooLM shifts: position t predicts
  labels[t + 1], so labels[:, 0] is never a target);
- with document ids (`train.cross_doc: false`): `seq_idx` int32 [batch, seq_len], the document of each
  token renumbered from 0 in every row (non-decreasing, as mamba_ssm's `seq_idx`), which resets SSM
  state and masks attention at document starts; and the label of each document's first token inside
  the window is IGNORE_INDEX, because the token before it, the previous document's last, may not
  predict it when documents must not see each other.
Without document ids (`cross_doc: true`) the model attends and carries state across documents and learns
to predict a document's first token from the end-of-document token before it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

IGNORE_INDEX = -100   # F.cross_entropy's default ignore_index


def pack_batch(tokens: np.ndarray, doc_ids: Optional[np.ndarray] = None) -> dict:
    """tokens, doc_ids: [batch, seq_len] integer arrays (doc_ids non-decreasing along each row)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens: expected [batch, seq_len], got shape {tokens.shape}")
    input_ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if doc_ids is None:
        return batch
    if doc_ids.shape != tokens.shape:
        raise ValueError(f"doc_ids: shape {doc_ids.shape} differs from tokens {tokens.shape}")
    doc = torch.from_numpy(np.ascontiguousarray(doc_ids, dtype=np.int64))
    starts = doc[:, 1:] != doc[:, :-1]
    batch["labels"][:, 1:][starts] = IGNORE_INDEX
    batch["seq_idx"] = (doc - doc[:, :1]).to(torch.int32)
    return batch
