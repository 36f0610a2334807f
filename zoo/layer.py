"""One layer of the stack, and the norm it uses: x = x + mixer(norm(x)); x = x + ffn(norm(x)).

Its own module (not zoo.model) so that zoo.memory can build a layer on the meta device to count its weights
while zoo.model imports zoo.memory to check a model fits before building it: layer < memory < model.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.blocks.base import AuxLoss, split_aux
from zoo.blocks.ffn import build_ffn
from zoo.ops.norm import rms_norm
from zoo.registry import get_block

__all__ = ["RMSNorm", "ZooLayer"]


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same state dict) whose training path is `zoo.ops.norm.rms_norm`, with a
    hand-written backward (3.1 ms against 5.2 ms forward + backward at [16, 256, 192]); without gradients
    (evaluation, decoding) torch's fused kernel, one call where a decoding step cannot afford seven.

    zero_centred: the scale is 1 + weight, weight starting at 0 (Qwen3-Next, Gemma): weight decay then pulls
    the scale toward 1, not 0."""

    def __init__(self, dim: int, eps: Optional[float] = None, zero_centred: bool = False):
        super().__init__(dim, eps=eps)
        self.zero_centred = zero_centred
        if zero_centred:
            nn.init.zeros_(self.weight)

    def forward(self, x):
        weight = self.weight + 1 if self.zero_centred else self.weight
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return rms_norm(x, weight, eps)
        return F.rms_norm(x, self.normalized_shape, weight, eps)


class ZooLayer(nn.Module):
    def __init__(self, d_model: int, spec, layer_idx: int, norm_eps: float, kernels=None,
                 residual_multiplier: float = 1.0, zero_centred_norm: bool = False):
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

    def forward(self, x, cache=None, cp=None, seq_idx=None) -> tuple[torch.Tensor, AuxLoss]:
        """(the layer's output, the block's and the FFN's auxiliary losses summed, or None)."""
        if self.normed_residual is not None:
            return self._normed(x, cache, cp, seq_idx)
        post = self.post_norm
        y, aux = self.mixer.run(x if post else self.mixer_norm(x), cache=cache, cp=cp, seq_idx=seq_idx)
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
