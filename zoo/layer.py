"""One layer of the stack, and the norm it uses: x = x + mixer(norm(x)); x = x + ffn(norm(x)).

Its own module (not zoo.model) so that zoo.memory can build a layer on the meta device to count its weights
while zoo.model imports zoo.memory to check a model fits before building it: layer < memory < model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from zoo.blocks.base import AuxLoss, split_aux
from zoo.blocks.ffn import build_ffn
from zoo.blocks.shared import SharedLayerCache, SharedUse
from zoo.ops.norm import RMSNorm
from zoo.registry import get_block

__all__ = ["RMSNorm", "ZooLayer"]


class ZooLayer(nn.Module):
    """A mixer and its FFN, each around a norm and a residual; with `spec.shared`, a use of a shared block first
    (zoo.blocks.shared), whose output joins the mixer's input. The layer is also what the model caches by: its
    hooks (init_cache, state_bytes, the left-padding merges, reorder_cache) are its mixer's, joined with the
    shared attention's for a layer with a shared block."""

    def __init__(self, d_model: int, spec, layer_idx: int, norm_eps: float, kernels=None,
                 residual_multiplier: float = 1.0, zero_centred_norm: bool = False, shared_blocks=None):
        """shared_blocks: name -> zoo.blocks.shared.SharedBlock, the model's (needed when spec.shared is set)."""
        super().__init__()
        self.block_type = spec.type
        self.residual_multiplier = residual_multiplier   # Granite: x + multiplier * sublayer(norm(x))
        block = get_block(spec.type).cls
        # a layer without a mixer (`none`) has no mixer norm: it adds zeros and the layer is its FFN alone
        self.mixer_norm = nn.Identity() if block.passthrough else RMSNorm(d_model, norm_eps, zero_centred_norm)
        self.mixer = block(d_model, spec.cfg, layer_idx, kernels=kernels)
        # a composite block names its parts (`parallel(attn+mamba2)`) in the layer table and in refusals
        self.block_type = getattr(self.mixer, "name", spec.type)
        self.ffn = build_ffn(d_model, spec.ffn)
        self.ffn_norm = RMSNorm(d_model, norm_eps, zero_centred_norm) if self.ffn is not None else None
        self.post_norm = spec.norm_position == "post"   # the norms after the sublayers, not before
        self.normed_residual = spec.residual_scale if spec.norm_position == "normed" else None
        self.shared_use, self._shared = None, None
        if spec.shared is not None:
            if shared_blocks is None or spec.shared not in shared_blocks:
                raise ValueError(f"shared_blocks: layer {layer_idx} uses shared block {spec.shared!r}, not given")
            block = shared_blocks[spec.shared]
            self.shared_use = SharedUse(d_model, block)
            self._shared = (block,)   # a tuple: the model holds the block's weights, once, not every layer using it
            self.block_type = f"{self.block_type}+shared({spec.shared})"

    def forward(self, x, cache=None, cp=None, seq_idx=None, embeddings=None) -> tuple[torch.Tensor, AuxLoss]:
        """(the layer's output, the block's and the FFN's auxiliary losses summed, or None). embeddings: the
        model's token embeddings, which a shared block reads beside x."""
        if self.normed_residual is not None:
            return self._normed(x, cache, cp, seq_idx)
        post = self.post_norm
        inp = x
        if self.shared_use is not None:
            shared_cache = None if cache is None else cache.attention
            cache = None if cache is None else cache.mixer
            inp = x + self.shared_use(self._shared[0], x, embeddings, cache=shared_cache, cp=cp, seq_idx=seq_idx)
        y, aux = self.mixer.run(inp if post else self.mixer_norm(inp), cache=cache, cp=cp, seq_idx=seq_idx)
        x = x + self._scaled(self.mixer_norm(y) if post else y)
        if self.ffn is not None:
            # an FFN is per token: seq_idx and a cache change nothing; cp only its statistics (MoE balance)
            y, ffn_aux = split_aux(self.ffn(x if post else self.ffn_norm(x), cp=cp))
            x = x + self._scaled(self.ffn_norm(y) if post else y)
            if ffn_aux is not None:
                aux = ffn_aux if aux is None else aux + ffn_aux
        return x, aux

    def _normed(self, x, cache, cp, seq_idx) -> tuple[torch.Tensor, AuxLoss]:
        """MiniMax's layer: x = a n + b mixer(n) with n = norm(x), then the same around the FFN."""
        a, b, a_ffn, b_ffn = self.normed_residual
        n = self.mixer_norm(x)
        y, aux = self.mixer.run(n, cache=cache, cp=cp, seq_idx=seq_idx)
        x = a * n + b * y
        if self.ffn is not None:
            n = self.ffn_norm(x)
            y, ffn_aux = split_aux(self.ffn(n, cp=cp))
            x = a_ffn * n + b_ffn * y
            if ffn_aux is not None:
                aux = ffn_aux if aux is None else aux + ffn_aux
        return x, aux

    def _scaled(self, y):
        return y if self.residual_multiplier == 1 else y * self.residual_multiplier

    # -- the cache hooks (zoo.blocks.base.Block's), for the layer ----------------------------------------

    def _parts(self):
        return [self.mixer] if self.shared_use is None else [self.mixer, self._shared[0].attention]

    def _joined(self, caches):
        return caches[0] if self.shared_use is None else SharedLayerCache(list(caches))

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32):
        return self._joined([b.init_cache(batch_size, device, dtype) for b in self._parts()])

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        return sum(b.state_bytes(seq_len, batch_size, dtype) for b in self._parts())

    def init_left_padded_cache(self, row_start, device=None, dtype=torch.float32):
        caches = [b.init_left_padded_cache(row_start, device, dtype) for b in self._parts()]
        return None if any(c is None for c in caches) else self._joined(caches)

    def merge_left_padded(self, caches, row_start, length: int):
        if self.shared_use is None:
            return self.mixer.merge_left_padded(caches, row_start, length)
        return self._joined([b.merge_left_padded([c.branches[i] for c in caches], row_start, length)
                             for i, b in enumerate(self._parts())])

    def reorder_cache(self, cache, indices: torch.Tensor):
        if self.shared_use is None:
            return self.mixer.reorder_cache(cache, indices)
        return self._joined([b.reorder_cache(c, indices) for b, c in zip(self._parts(), cache.branches)])
