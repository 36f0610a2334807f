"""JambaForCausalLM (AI21's Jamba, arXiv 2403.19887) -> ZooLM.

Layer i is attention when i % attn_layer_period == attn_layer_offset, else Mamba-1 with RMSNorms on dt, B
and C (`mamba` with dt_bc_norm); its FFN is a mixture of num_experts SwiGLU experts (top
num_experts_per_tok of the softmax over all experts, not renormalised) when
i % expert_layer_period == expert_layer_offset and num_experts > 1, else a dense SwiGLU. Jamba's attention
has no positional embedding (`attn` with rope_base null).

The recipe has one letter per (mixer, FFN) kind: A attention + SwiGLU, E attention + MoE, M Mamba + SwiGLU,
N Mamba + MoE, and the pattern is one period (the lcm of the two layer periods) when it tiles the depth.

router_aux_loss_coef becomes the MoE's aux_loss_weight (zoo always reports the balance loss in
`aux_loss`, apart from `loss`; transformers adds it to its loss only with output_router_logits, and
pools the router statistics of all MoE layers where zoo sums one term per layer: zoo.blocks.moe). Logits
and generation are the same. A config field zoo would compute differently is an error naming it.
"""
from __future__ import annotations

import math

from zoo.convert import outer_names, register_converter

_KINDS = {("attention", False): "A", ("attention", True): "E", ("mamba", False): "M", ("mamba", True): "N"}
_MAMBA_PARAMS = ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
                 "out_proj.weight", "dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight"]


def _check(c) -> None:
    if c.hidden_act != "silu":
        raise ValueError(f"hidden_act: zoo's Mamba convolution and SwiGLU use silu, got {c.hidden_act!r}")
    if c.attention_dropout:
        raise ValueError(f"attention_dropout: zoo's attention has no dropout, got {c.attention_dropout}")


def _layer_kinds(c) -> list[str]:
    moe = [c.num_experts > 1 and i % c.expert_layer_period == c.expert_layer_offset
           for i in range(c.num_hidden_layers)]
    return [_KINDS[(kind, m)] for kind, m in zip(c.layers_block_type, moe)]


def _pattern(letters: list[str], c) -> str:
    period = math.lcm(c.attn_layer_period, c.expert_layer_period)
    if len(letters) % period == 0 and letters == letters[:period] * (len(letters) // period):
        return "".join(letters[:period])
    return "".join(letters)


@register_converter("JambaForCausalLM")
def jamba(hf) -> tuple[dict, dict]:
    c = hf.config
    _check(c)
    letters = _layer_kinds(c)
    dense = {"type": "swiglu", "hidden": c.intermediate_size}
    moe = {"type": "moe", "experts": c.num_experts, "top_k": c.num_experts_per_tok, "hidden": c.intermediate_size,
           "normalize_top_k": False, "aux_loss_weight": float(c.router_aux_loss_coef)}
    attn = {"type": "attn", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, "rope_base": None}
    mamba = {"type": "mamba", "d_state": c.mamba_d_state, "d_conv": c.mamba_d_conv, "expand": c.mamba_expand,
             "dt_rank": int(c.mamba_dt_rank), "conv_bias": bool(c.mamba_conv_bias), "bias": bool(c.mamba_proj_bias),
             "dt_bc_norm": True, "dt_bc_norm_eps": c.rms_norm_eps}
    blocks = {"A": {**attn, "ffn": dense}, "E": {**attn, "ffn": moe},
              "M": {**mamba, "ffn": dense}, "N": {**mamba, "ffn": moe}}
    recipe = {"name": "jamba-import",
              "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                        "pattern": _pattern(letters, c), "norm_eps": c.rms_norm_eps,
                        "tie_embeddings": bool(c.tie_word_embeddings), "ffn": dense,
                        "blocks": {k: v for k, v in blocks.items() if k in letters}},
              "train": {"seq_len": min(int(c.max_position_embeddings), 2048)}}

    names = outer_names(hf, "model.final_layernorm.weight")
    mamba_params = _MAMBA_PARAMS + (["conv1d.bias"] if c.mamba_conv_bias else [])
    mamba_params += ["in_proj.bias", "out_proj.bias"] if c.mamba_proj_bias else []
    for i, letter in enumerate(letters):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
        names[src + "pre_ff_layernorm.weight"] = dst + "ffn_norm.weight"
        if letter in "AE":
            for hf_name, zoo_name in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                                      ("o_proj", "out_proj")):
                names[f"{src}self_attn.{hf_name}.weight"] = f"{dst}mixer.{zoo_name}.weight"
        else:
            names.update({f"{src}mamba.{p}": f"{dst}mixer.{p}" for p in mamba_params})
        ff = src + "feed_forward."
        if letter in "EN":
            names.update({ff + "router.weight": dst + "ffn.router.weight",
                          ff + "experts.gate_up_proj": dst + "ffn.gate_up", ff + "experts.down_proj": dst + "ffn.down"})
        else:
            names.update({f"{ff}{h}.weight": f"{dst}ffn.{z}.weight"
                          for h, z in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "out_proj"))})
    return recipe, names
