"""The delta-rule blocks' cache: the short convolution's last inputs and the [heads, d_k, d_v] state."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.blocks.base import BlockCache


@dataclass
class DeltaCache(BlockCache):
    """conv [batch, 2 * q/k width + v width, d_conv - 1]: the convolution's last inputs (q | k | v channels);
    state [batch, heads, d_k, d_v] in float32 (float64 for float64 models), the recurrence's. Neither has a
    position, so a left-padded batch merges by `DeltaCache.stack`: rows never mix."""
    conv: torch.Tensor
    state: torch.Tensor
