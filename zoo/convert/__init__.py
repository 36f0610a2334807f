"""Import transformers checkpoints into ZooLM: the same weights, the same logits.

    zoo.convert.from_transformers(hf_model) -> ZooLM     # LlamaForCausalLM, MambaForCausalLM, Mamba2ForCausalLM

Llama, Mamba and Mamba-2 convert here; each further model family has its own module in this package that
registers its converter with `@register_converter("XForCausalLM")` and is imported when zoo.convert is
(every module of the package, found by name: adding a family needs no edit here).

Each converter writes the equivalent recipe (so the result trains, saves and evaluates like any other
zoo model) and copies every tensor under an explicit name map; a tensor left over on either side is
an error, so a silent partial import cannot happen.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Union

import torch

from zoo.config import load_recipe
from zoo.convert.hybrid import require_silu
from zoo.model import ZooLM


def _rope_base(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type: only 'default' RoPE converts exactly, got {params['rope_type']!r}")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _llama(hf) -> tuple[dict, dict]:
    c = hf.config
    # Mistral's config (converted on this path, zoo/convert/mistral.py) has neither field: no biases
    attention_bias, mlp_bias = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
    recipe = {
        "name": "llama-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "A", "norm_eps": c.rms_norm_eps, "tie_embeddings": bool(c.tie_word_embeddings),
                  "blocks": {"A": {"type": "attn", "n_heads": c.num_attention_heads,
                                   "n_kv_heads": c.num_key_value_heads,
                                   "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                                   "rope_base": _rope_base(c), "qkv_bias": attention_bias,
                                   "out_bias": attention_bias}},
                  "ffn": {"type": "swiglu", "hidden": c.intermediate_size, "bias": mlp_bias}},
        "train": {"seq_len": min(int(getattr(c, "max_position_embeddings", 2048)), 2048)},
    }
    require_silu(c, "hidden_act")
    names = outer_names(hf)
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
        names[src + "post_attention_layernorm.weight"] = dst + "ffn_norm.weight"
        for p in ("q_proj", "k_proj", "v_proj"):
            for kind in ("weight", "bias") if attention_bias else ("weight",):
                names[f"{src}self_attn.{p}.{kind}"] = f"{dst}mixer.{p}.{kind}"
        for kind in ("weight", "bias") if attention_bias else ("weight",):
            names[f"{src}self_attn.o_proj.{kind}"] = f"{dst}mixer.out_proj.{kind}"
        for hf_name, zoo_name in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "out_proj")):
            for kind in ("weight", "bias") if mlp_bias else ("weight",):
                names[f"{src}mlp.{hf_name}.{kind}"] = f"{dst}ffn.{zoo_name}.{kind}"
    return recipe, names


def _mamba_common(c, block: dict, mixer_params: list) -> tuple[dict, dict]:
    recipe = {"name": f"{block['type']}-import",
              "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                        "pattern": "M", "norm_eps": c.layer_norm_epsilon,
                        "tie_embeddings": bool(c.tie_word_embeddings), "blocks": {"M": {**block, "ffn": "none"}}},
              "train": {"seq_len": 2048}}
    names = {"backbone.embeddings.weight": "embed.weight", "backbone.norm_f.weight": "norm.weight"}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(c.num_hidden_layers):
        names[f"backbone.layers.{i}.norm.weight"] = f"layers.{i}.mixer_norm.weight"
        for p in mixer_params:  # zoo's Mamba mixers keep mamba_ssm's parameter names
            names[f"backbone.layers.{i}.mixer.{p}"] = f"layers.{i}.mixer.{p}"
    return recipe, names


def _conv_and_proj_params(c) -> list:
    params = ["in_proj.weight", "conv1d.weight", "out_proj.weight", "A_log", "D"]
    params += ["conv1d.bias"] if c.use_conv_bias else []
    params += ["in_proj.bias", "out_proj.bias"] if c.use_bias else []
    return params


def _silu_only(c):
    # zoo's Mamba mixers gate with silu, as mamba_ssm does; transformers lets hidden_act change it
    require_silu(c, "hidden_act")


def _mamba(hf) -> tuple[dict, dict]:
    return _mamba_common(hf.config, *mamba1_block(hf.config))


def mamba1_block(c) -> tuple[dict, list]:
    """(the `mamba` block spec, its mixer's parameter names) of a MambaConfig-like config (Mamba, Falcon Mamba)."""
    _silu_only(c)
    if c.intermediate_size != c.expand * c.hidden_size:
        raise ValueError(f"intermediate_size: {c.intermediate_size} != expand * hidden_size; zoo derives it")
    block = {"type": "mamba", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
             "dt_rank": int(c.time_step_rank), "conv_bias": bool(c.use_conv_bias), "bias": bool(c.use_bias)}
    return block, _conv_and_proj_params(c) + ["x_proj.weight", "dt_proj.weight", "dt_proj.bias"]


def _mamba2(hf) -> tuple[dict, dict]:
    c = hf.config
    _silu_only(c)
    if tuple(c.time_step_limit) != (0.0, float("inf")):
        raise ValueError(f"time_step_limit: only the unclamped (0, inf) converts exactly, got {c.time_step_limit}")
    if c.expand * c.hidden_size != c.num_heads * c.head_dim:
        raise ValueError(f"num_heads: {c.num_heads} x head_dim {c.head_dim} != expand x hidden_size")
    block = {"type": "mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
             "head_dim": c.head_dim, "n_groups": c.n_groups, "chunk_size": c.chunk_size,
             "conv_bias": bool(c.use_conv_bias), "bias": bool(c.use_bias),
             "norm_eps": c.layer_norm_epsilon}   # transformers' gated norm takes the model's eps too
    params = _conv_and_proj_params(c) + ["dt_bias", "norm.weight"]
    return _mamba_common(c, block, params)


@dataclass(frozen=True)
class Scaled:
    """A names-map target whose tensor is copied times `factor`: a number, or a vector with one factor per row
    (dim 0). A multiplier on a linear map's input or output folded into its weight, where that is exact."""
    name: str
    factor: Union[float, torch.Tensor]

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        f = self.factor
        if isinstance(f, torch.Tensor):
            f = f.to(value).reshape(-1, *[1] * (value.dim() - 1))
        return value * f


@dataclass(frozen=True)
class Transformed:
    """A names-map target for a tensor that is rearranged on its way in: `fn(tensor)` returns one tensor per
    name in `names`, in order (Qwen3-Next's projections, interleaved per head group; a zero-centred norm's
    1 + w)."""
    names: tuple
    fn: Callable


CONVERTERS: dict[str, Callable] = {"LlamaForCausalLM": _llama, "MambaForCausalLM": _mamba,
                                   "Mamba2ForCausalLM": _mamba2}


def register_converter(hf_class_name: str):
    def deco(fn):
        CONVERTERS[hf_class_name] = fn
        return fn
    return deco


@torch.no_grad()
def from_transformers(hf_model) -> ZooLM:
    kind = type(hf_model).__name__
    if kind not in CONVERTERS:
        raise ValueError(f"from_transformers: no converter for {kind} (supported: {', '.join(sorted(CONVERTERS))})")
    recipe_dict, names = CONVERTERS[kind](hf_model)
    # a model on the meta device (built for its shapes) has no weights to copy: the import is the zoo model's
    # structure on the meta device, every name and shape still checked
    meta = any(p.is_meta for p in hf_model.parameters())
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = ZooLM(load_recipe(recipe_dict))
    src = hf_model.state_dict()
    dst = model.state_dict()
    unused = sorted(set(src) - set(names) - _tied_aliases(hf_model))
    if unused:
        raise ValueError(f"from_transformers: {kind} tensors with no place in the zoo model: {unused[:5]}")
    for hf_name, zoo_names in names.items():
        if zoo_names is None:   # a tensor transformers holds but its forward never reads (the converter says why)
            continue
        if isinstance(zoo_names, Transformed):
            _copy_transformed(hf_name, zoo_names, src, dst, meta)
            continue
        # a tuple of zoo names: the tensor splits into that many equal parts along dim 0, in order (a fused
        # projection whose output transformers chunks, e.g. Granite's shared_mlp.input_linear -> gate, up)
        zoo_names = zoo_names if isinstance(zoo_names, tuple) else (zoo_names,)
        scaled = {n.name: n for n in zoo_names if isinstance(n, Scaled)}
        zoo_names = tuple(n.name if isinstance(n, Scaled) else n for n in zoo_names)
        if hf_name not in src or any(n not in dst for n in zoo_names):
            missing = hf_name if hf_name not in src else next(n for n in zoo_names if n not in dst)
            raise ValueError(f"from_transformers: missing tensor {missing}")
        parts = src[hf_name].chunk(len(zoo_names), dim=0) if len(zoo_names) > 1 else (src[hf_name],)
        for zoo_name, value in zip(zoo_names, parts):
            if value.shape != dst[zoo_name].shape:
                raise ValueError(f"from_transformers: {hf_name} {tuple(src[hf_name].shape)} does not fit "
                                 f"{', '.join(zoo_names)} {tuple(dst[zoo_name].shape)}")
            if not meta:
                dst[zoo_name].copy_(scaled[zoo_name].apply(value) if zoo_name in scaled else value)
    return model.to(next(hf_model.parameters()).dtype)


def _copy_transformed(hf_name: str, target: Transformed, src: dict, dst: dict, meta: bool) -> None:
    missing = [n for n in target.names if n not in dst]
    if hf_name not in src or missing:
        raise ValueError(f"from_transformers: missing tensor {hf_name if hf_name not in src else missing[0]}")
    parts = target.fn(src[hf_name])
    for zoo_name, value in zip(target.names, parts):
        if value.shape != dst[zoo_name].shape:
            raise ValueError(f"from_transformers: {hf_name} {tuple(src[hf_name].shape)} does not fit "
                             f"{', '.join(target.names)} {tuple(dst[zoo_name].shape)}")
        if not meta:
            dst[zoo_name].copy_(value)


def tied(hf_model) -> bool:
    """Whether the model's output embedding IS its input embedding (the config's tie_word_embeddings is not
    enough: KimiLinearForCausalLM keeps two tensors whatever it says)."""
    out, inp = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def outer_names(hf_model, final_norm: str = "model.norm.weight") -> dict:
    """The names map of the tensors around the layers: the embedding, the final norm (`final_norm`, as the model
    calls it) and the LM head unless it is the embedding (`tied`: the weights decide, not the config)."""
    names = {"model.embed_tokens.weight": "embed.weight", final_norm: "norm.weight"}
    if not tied(hf_model):
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _tied_aliases(hf_model) -> set:
    return {"lm_head.weight"} if tied(hf_model) else set()


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
