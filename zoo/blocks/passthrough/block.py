"""The `none` block: no mixer (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from zoo.blocks.base import Block, BlockCache
from zoo.ops.documents import check_block_documents
from zoo.registry import register_block


@dataclass
class NoMixerConfig:
    """No fields: the layer's feed-forward is set by the letter's `ffn` (or model.ffn)."""

    def width_step(self) -> int:
        return 1


@dataclass
class NoMixerCache(BlockCache):
    """rows [batch, 0]: no state; the empty tensor keeps the batch size for row selection and merges."""
    rows: torch.Tensor


@register_block("none", config=NoMixerConfig)
class NoMixer(Block):
    supports_seq_idx = True
    supports_cp = True
    passthrough = True

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        check_block_documents(x, seq_idx, cache, cp)
        # x * 0 rather than zeros_like: the output stays in autograd's graph (a zero gradient), so a
        # backward through the block alone works as for any other block
        return x * 0

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> NoMixerCache:
        return NoMixerCache(torch.zeros(batch_size, 0, device=device, dtype=dtype))

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        return 0

    def merge_left_padded(self, caches: Sequence[NoMixerCache], row_start, length: int) -> NoMixerCache:
        return NoMixerCache.stack(caches)
