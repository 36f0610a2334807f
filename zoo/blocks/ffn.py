"""Feed-forward sublayers: GELU MLP, SwiGLU (arXiv 2002.05202), a mixture of SwiGLU experts (`moe`,
zoo/blocks/moe.py), or none.

`chunk` computes the FFN over sequence chunks with recomputation in backward (Blockwise Parallel
Transformer, arXiv 2305.19370, section 3): the hidden activations of only one chunk are alive at a
time, so the FFN's activation memory stops growing with d_hidden x length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zoo.blocks.moe import MoeFeedForward, check_moe_fields
from zoo.ops.swiglu import swiglu
from zoo.registry import unknown_name_message

FFN_TYPES = ("geglu", "mlp", "moe", "none", "relu2", "swiglu")
GELU_FORMS = ("exact", "tanh")


@dataclass
class FfnConfig:
    type: str = "swiglu"          # relu2: out(relu(up(x))^2), not gated (Primer, arXiv 2109.08668; Nemotron-H)
    #                               geglu: out(gelu_tanh(gate(x)) * up(x)) (Gemma, RecurrentGemma)
    mult: float = 4.0              # hidden = mult * d_model (SwiGLU: 2/3 of it, rounded up to `multiple_of`)
    hidden: Optional[int] = None   # exact hidden size; overrides mult (used when importing checkpoints)
    multiple_of: int = 8
    bias: bool = False
    gelu: str = "tanh"             # geglu and mlp: GELU's tanh approximation (Gemma) or "exact" (erf; Zamba2)
    chunk: Optional[int] = None    # sequence chunk length for blockwise FFN; None = whole sequence
    # type moe (zoo/blocks/moe.py): `hidden` / `mult` size each expert; the rest is ignored by other types
    experts: Optional[int] = None  # routed experts E
    top_k: int = 2                 # experts per token
    normalize_top_k: bool = False  # renormalise the top-k probabilities to sum 1 (Mixtral); False: Jamba
    shared_hidden: Optional[int] = None   # hidden size of a shared SwiGLU expert every token uses; None: none
    shared_gate: bool = False      # the shared expert's output times sigmoid(w . x), a scalar per token (Qwen3-Next)
    # "softmax" over all experts (Mixtral, Jamba, Qwen); "sigmoid": DeepSeek-V3's (Kimi Linear): sigmoid scores,
    # chosen with a correction bias (a buffer) in the best topk_group of n_group groups, times routed_scaling
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    # sigmoid router: after each optimizer step the correction bias moves by this much towards balance, down for
    # experts above the mean load and up for those below (DeepSeek-V3's aux-loss-free balancing: 0.001); 0: fixed
    bias_update_rate: float = 0.0
    aux_loss_weight: float = 0.01  # load-balancing loss weight (Switch Transformer); 0 disables it

    def __post_init__(self):
        if self.type not in FFN_TYPES:
            raise ValueError("type: " + unknown_name_message("ffn type", self.type, list(FFN_TYPES)))
        if self.mult <= 0:
            raise ValueError(f"mult: must be > 0, got {self.mult}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"hidden: must be >= 1, got {self.hidden}")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of: must be >= 1, got {self.multiple_of}")
        if self.gelu not in GELU_FORMS:
            raise ValueError(f"gelu: {self.gelu!r}; allowed: {', '.join(GELU_FORMS)}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk: must be >= 1 or null, got {self.chunk}")
        if self.type == "moe":
            check_moe_fields(self)

    def hidden_size(self, d_model: int) -> int:
        if self.hidden is not None:
            return self.hidden
        h = self.mult * d_model
        if self.type in ("swiglu", "geglu", "moe"):
            h = 2 * h / 3  # keeps a gated FFN's parameter count equal to the GELU MLP's
        return int(-(-int(h) // self.multiple_of) * self.multiple_of)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, cfg: FfnConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_size(d_model)
        self.gated = cfg.type in ("swiglu", "geglu")
        self.up_proj = nn.Linear(d_model, hidden, bias=cfg.bias)
        self.gate_proj = nn.Linear(d_model, hidden, bias=cfg.bias) if self.gated else None
        self.out_proj = nn.Linear(hidden, d_model, bias=cfg.bias)

    def _ffn(self, x):
        return self.out_proj(self.activate(self.gate_proj(x) if self.gated else None, self.up_proj(x)))

    def activate(self, gate, up):
        """The hidden activation from the projections' outputs (gate None for the ungated types): apart from
        `_ffn` so that a shared FFN can add a per-use adapter to them first (zoo.blocks.shared)."""
        approximate = "tanh" if self.cfg.gelu == "tanh" else "none"
        if self.cfg.type == "geglu":
            return F.gelu(gate, approximate=approximate) * up
        if self.gated:
            return swiglu(gate, up)
        if self.cfg.type == "relu2":
            return F.relu(up).square()
        return F.gelu(up, approximate=approximate)

    def forward(self, x, cp=None):
        """x [batch, length, d_model] -> the same shape; per token, so `cp` (context parallel) changes nothing."""
        chunk = self.cfg.chunk
        if chunk is None or x.shape[1] <= chunk:
            return self._ffn(x)
        parts = []
        for piece in x.split(chunk, dim=1):
            if torch.is_grad_enabled() and piece.requires_grad:
                parts.append(checkpoint(self._ffn, piece, use_reentrant=False))
            else:
                parts.append(self._ffn(piece))
        return torch.cat(parts, dim=1)


def build_ffn(d_model: int, cfg: FfnConfig) -> Optional[nn.Module]:
    """The FFN of a layer: forward(x, cp=None) -> output, or (output, aux_loss) for `moe`."""
    if cfg.type == "moe":
        return MoeFeedForward(d_model, cfg, cfg.hidden_size(d_model))
    return None if cfg.type == "none" else FeedForward(d_model, cfg)
