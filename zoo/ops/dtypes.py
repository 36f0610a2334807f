"""The precision every op accumulates in: at least float32 whatever the input (style.md), float64 kept as is."""
from __future__ import annotations

from typing import Union

import torch


def accumulation_dtype(x: Union[torch.Tensor, torch.dtype]) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything narrower (bf16 / fp16 sums lose ~2 digits)."""
    dtype = x.dtype if isinstance(x, torch.Tensor) else x
    return torch.float64 if dtype == torch.float64 else torch.float32
