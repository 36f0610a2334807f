"""RecurrentGemmaForCausalLM (Google's RecurrentGemma, the Griffin architecture): per `block_types` (cycled over
the layers), the RG-LRU recurrent block ("recurrent": zoo's `rglru`) or local multi-query attention
("attention": `swa` with `attention_window_size`, RoPE on partial_rotary_factor of each head, a bias on the output
projection), each followed by a GeGLU with biases (`geglu`, width intermediate_size / 2). Gemma's conventions:
RMSNorms scale by 1 + w (`zero_centred_norm`), the embedding is multiplied by sqrt(hidden_size) rounded to
bfloat16 as transformers keeps it (`embedding_multiplier`), the logits are soft-capped (`logit_softcap`), the
head is tied."""
from __future__ import annotations

import torch

from zoo.convert import _rope_base, outer_names, register_converter, tied
from zoo.convert.hybrid import layer_kinds

KINDS = {"linear_attention": "R", "sliding_attention": "A"}
RGLRU_PARAMS = ("input_gate_weight", "input_gate_bias", "recurrent_gate_weight", "recurrent_gate_bias",
                "recurrent_param")


@register_converter("RecurrentGemmaForCausalLM")
def recurrent_gemma(hf) -> tuple[dict, dict]:
    c = hf.config
    if c.hidden_activation != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation: zoo's rglru gate branch and geglu use gelu_pytorch_tanh, got "
                         f"{c.hidden_activation!r}")
    types = layer_kinds(c, KINDS, "layers_block_type")
    head_dim = c.head_dim
    rotary = int(head_dim * (c.rope_parameters or {}).get("partial_rotary_factor", 1.0))
    attn = {"type": "swa", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
            "head_dim": head_dim, "window": c.attention_window_size, "rope_base": _rope_base(c),
            "rope_dim": rotary if rotary < head_dim else None, "qkv_bias": bool(c.attention_bias), "out_bias": True}
    recurrent = {"type": "rglru", "lru_width": c.lru_width, "n_heads": c.num_attention_heads,
                 "d_conv": c.conv1d_width, "bias": True}
    recipe = {
        "name": "recurrent-gemma-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "".join(KINDS[t] for t in types), "norm_eps": c.rms_norm_eps,
                  "zero_centred_norm": True, "tie_embeddings": tied(hf),
                  "embedding_multiplier": float(torch.tensor(c.hidden_size ** 0.5, dtype=torch.bfloat16)),
                  "logit_softcap": float(c.logits_soft_cap),
                  "blocks": {"R": recurrent, "A": attn},
                  "ffn": {"type": "geglu", "hidden": c.intermediate_size // 2, "bias": True}},
        "train": {"seq_len": max(2048, c.attention_window_size)},
    }
    names = outer_names(hf, "model.final_norm.weight")
    for i, kind in enumerate(types):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        t, m = src + "temporal_block.", dst + "mixer."
        names[src + "temporal_pre_norm.weight"] = dst + "mixer_norm.weight"
        names[src + "channel_pre_norm.weight"] = dst + "ffn_norm.weight"
        if kind == "linear_attention":
            for hf_name, zoo_name in (("linear_x", "linear_x"), ("linear_y", "linear_y"), ("linear_out", "out_proj"),
                                      ("conv_1d", "conv1d")):
                for k in ("weight", "bias"):
                    names[f"{t}{hf_name}.{k}"] = f"{m}{zoo_name}.{k}"
            for p in RGLRU_PARAMS:
                names[f"{t}rg_lru.{p}"] = m + p
        else:
            for p in ("q_proj", "k_proj", "v_proj"):
                for k in ("weight", "bias") if c.attention_bias else ("weight",):
                    names[f"{t}{p}.{k}"] = f"{m}{p}.{k}"
            for k in ("weight", "bias"):
                names[f"{t}o_proj.{k}"] = f"{m}out_proj.{k}"
        for hf_name, zoo_name in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "out_proj")):
            for k in ("weight", "bias"):
                names[f"{src}mlp_block.{hf_name}.{k}"] = f"{dst}ffn.{zoo_name}.{k}"
    return recipe, names
