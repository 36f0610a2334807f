"""What the hybrid importers (Bamba, Nemotron-H) share: the Mamba-2 mixer's tensors, the attention projections,
and the check that zoo's `attn` has the RoPE variant a checkpoint needs (partial RoPE, or none)."""
from __future__ import annotations

import dataclasses
import math

from zoo.blocks.attention.config import AttnConfig

MAMBA2_PARAMS = ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")


def shares_head(hf) -> bool:
    """Whether the LM head is the embedding: what the model does, not what tie_word_embeddings says
    (transformers' NemotronHForCausalLM keeps its own lm_head even with tie_word_embeddings true)."""
    return hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()


def require_silu(c, field: str) -> None:
    if getattr(c, field) != "silu":
        raise ValueError(f"{field}: zoo's Mamba-2 convolution and its SwiGLU use silu, got {getattr(c, field)!r}")


def mamba2_names(src: str, dst: str, conv_bias: bool, proj_bias: bool) -> dict:
    names = {f"{src}{p}": f"{dst}{p}" for p in MAMBA2_PARAMS}
    if conv_bias:
        names[f"{src}conv1d.bias"] = f"{dst}conv1d.bias"
    if proj_bias:
        names.update({f"{src}{p}.bias": f"{dst}{p}.bias" for p in ("in_proj", "out_proj")})
    return names


def attn_names(src: str, dst: str, bias: bool) -> dict:
    names = {}
    for hf_name, zoo_name in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj")):
        for kind in ("weight", "bias") if bias else ("weight",):
            names[f"{src}{hf_name}.{kind}"] = f"{dst}{zoo_name}.{kind}"
    return names


def dt_limit(limit) -> list:
    lo, hi = (float(v) for v in limit)
    return [lo, math.inf if hi == math.inf else hi]


def check_attn_supports(field: str, value, hf_field: str) -> None:
    """Refuse, naming the transformers field, when zoo's `attn` cannot take {field: value} yet."""
    fields = {f.name for f in dataclasses.fields(AttnConfig)}
    try:
        if field not in fields:
            raise ValueError(f"attn has no field {field}")
        AttnConfig(**{field: value})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{hf_field}: zoo's attn block cannot express it yet ({field}: {value!r}: {err})") from None
