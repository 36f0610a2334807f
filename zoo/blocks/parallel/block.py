"""The `parallel` block: branches on one input, summed with per-branch output scales (package docstring)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from zoo.blocks.base import Block
from zoo.blocks.parallel.cache import ParallelCache
from zoo.blocks.parallel.config import ParallelConfig
from zoo.registry import get_block, register_block


@register_block("parallel", config=ParallelConfig)
class ParallelBlock(Block):
    """y = sum_i out_scale_i * branch_i(x); auxiliary losses summed unscaled. The branches are built through the
    registry (the one block that composes others: it knows them by their recipe names, as the model does)."""

    def __init__(self, d_model: int, cfg: ParallelConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        specs = cfg.branch_configs()
        self.branches = nn.ModuleList(get_block(kind).cls(d_model, c, layer_idx, kernels=kernels)
                                      for kind, _, c in specs)
        self.branch_types = [kind for kind, _, _ in specs]
        self.out_scales = [scale for _, scale, _ in specs]
        # capabilities are the branches' together (instance attributes over Block's class defaults)
        self.supports_seq_idx = all(b.supports_seq_idx for b in self.branches)
        self.supports_cp = all(b.supports_cp for b in self.branches)
        # what the layer table and the model's refusals call this layer
        self.name = f"parallel({'+'.join(self.branch_types)})"

    def _refuse(self, what: str, capability: str, use: str):
        missing = [f"{i} ({kind})" for i, (kind, b) in enumerate(zip(self.branch_types, self.branches))
                   if not getattr(b, capability)]
        if missing:
            raise ValueError(f"{what}: not supported by branch {', '.join(missing)} of the parallel block; {use}")

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        if cp is not None:
            self._refuse("cp", "supports_cp", "run it on one process")
        if seq_idx is not None:
            self._refuse("seq_idx", "supports_seq_idx", "use train.cross_doc: true")
        y, aux = None, None
        for i, (branch, scale) in enumerate(zip(self.branches, self.out_scales)):
            out, a = branch.run(x, cache=None if cache is None else cache.branches[i], cp=cp, seq_idx=seq_idx)
            out = out if scale == 1 else out * scale
            y = out if y is None else y + out
            if a is not None:
                aux = a if aux is None else aux + a
        return y if aux is None else (y, aux)

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> ParallelCache:
        return ParallelCache([b.init_cache(batch_size, device, dtype) for b in self.branches])

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        return sum(b.state_bytes(seq_len, batch_size, dtype) for b in self.branches)

    def merge_left_padded(self, caches: Sequence[ParallelCache], row_start, length: int) -> ParallelCache:
        return ParallelCache([b.merge_left_padded([c.branches[i] for c in caches], row_start, length)
                              for i, b in enumerate(self.branches)])

    def reorder_cache(self, cache: ParallelCache, indices: torch.Tensor) -> ParallelCache:
        return ParallelCache([b.reorder_cache(c, indices) for b, c in zip(self.branches, cache.branches)])
