"""What the hybrid importers share: the checks of their activation and layer types, the Mamba-2 mixer's tensors, the
attention projections, and the check that zoo's `attn` has the RoPE variant a checkpoint needs (partial RoPE, or
none). Whether the LM head is the embedding: `zoo.convert.tied`."""
from __future__ import annotations

import dataclasses
import math

from zoo.blocks.attention.config import AttnConfig

MAMBA2_PARAMS = ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")


def require_silu(c, field: str) -> None:
    if getattr(c, field) != "silu":
        raise ValueError(f"{field}: zoo's mixers' convolutions and its SwiGLU use silu, got {getattr(c, field)!r}")


def layer_kinds(c, kinds: dict, field: str = "layer_types") -> list:
    """The config's per-layer types, each one of `kinds` (an error naming the field and the allowed ones)."""
    types = list(getattr(c, field))
    bad = sorted(set(types) - set(kinds))
    if bad:
        raise ValueError(f"{field}: {bad} (convertible: {', '.join(kinds)})")
    return types


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
