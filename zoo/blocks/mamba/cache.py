"""The Mamba blocks' cache: convolution and SSM state, a fixed size per row whatever the length."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.blocks.base import BlockCache


@dataclass
class MambaCache(BlockCache):
    """conv [batch, channels, d_conv - 1]: the convolution's last inputs; ssm: the recurrent state,
    [batch, d_inner, d_state] (mamba) or [batch, heads, head_dim, d_state] (mamba2). Neither has a notion
    of position, so the left-padding merge is `MambaCache.stack`: decoding the stacked rows is the
    batched recurrence, exact row by row since rows never mix."""
    conv: torch.Tensor
    ssm: torch.Tensor
