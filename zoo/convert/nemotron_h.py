"""NemotronHForCausalLM (NVIDIA's Nemotron-H): one sublayer per layer, by `layers_block_type`: Mamba-2
(width mamba_num_heads x mamba_head_dim, steps clamped below at time_step_min), attention without RoPE,
a relu2 MLP (a zoo layer whose mixer is `none`), or MoE (refused: see below)."""
from __future__ import annotations

import math

from zoo.convert import register_converter
from zoo.convert import tied as is_tied
from zoo.convert.hybrid import attn_names, check_attn_supports, mamba2_names, require_silu

LETTERS = {"linear_attention": "M", "full_attention": "A", "mlp": "F", "moe": "E"}


@register_converter("NemotronHForCausalLM")
def nemotron_h(hf) -> tuple[dict, dict]:
    c = hf.config
    tied = is_tied(hf)
    types = list(c.layers_block_type)
    if "moe" in types:
        # relu2 experts behind a DeepSeek-V3 router (sigmoid scores, score-correction bias, group top-k,
        # routed scaling) with a shared expert; zoo's `moe` FFN has SwiGLU experts and a softmax router
        raise ValueError("layers_block_type: 'moe' layers do not convert: Nemotron-H's relu2 experts and DeepSeek-V3 "
                         "router have no zoo FFN (zoo's moe has SwiGLU experts and a softmax router)")
    require_silu(c, "mamba_hidden_act")
    if c.mlp_hidden_act != "relu2":
        raise ValueError(f"mlp_hidden_act: only relu2 converts (zoo's relu2 FFN), got {c.mlp_hidden_act!r}")
    blocks = {}
    if "linear_attention" in types:
        blocks["M"] = {"type": "mamba2", "d_state": c.ssm_state_size, "d_conv": c.conv_kernel,
                       "head_dim": c.mamba_head_dim, "n_heads": c.mamba_num_heads, "n_groups": c.n_groups,
                       "chunk_size": c.chunk_size, "conv_bias": bool(c.use_conv_bias), "bias": bool(c.use_bias),
                       "norm_eps": c.layer_norm_epsilon,
                       # transformers' mixer clamps the steps to (time_step_min, inf) whatever time_step_limit says
                       "dt_limit": [float(c.time_step_min), math.inf], "ffn": "none"}
    if "full_attention" in types:
        check_attn_supports("rope_base", None, "layers_block_type: full_attention (no RoPE)")
        # NemotronHAttention's projections have no bias, whatever attention_bias says
        blocks["A"] = {"type": "attn", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
                       "head_dim": c.head_dim, "rope_base": None, "ffn": "none"}
    if "mlp" in types:
        blocks["F"] = {"type": "none", "ffn": {"type": "relu2", "hidden": c.intermediate_size,
                                               "bias": bool(c.mlp_bias)}}
    recipe = {
        "name": "nemotron-h-import",
        "model": {"d_model": c.hidden_size, "n_layers": len(types), "vocab_size": c.vocab_size,
                  "pattern": "".join(LETTERS[t] for t in types), "norm_eps": c.layer_norm_epsilon,
                  "tie_embeddings": tied, "blocks": blocks},
        "train": {"seq_len": min(int(c.max_position_embeddings), 2048)},
    }
    names = {"model.embeddings.weight": "embed.weight", "model.norm_f.weight": "norm.weight"}
    if not tied:
        names["lm_head.weight"] = "lm_head.weight"
    for i, kind in enumerate(types):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        if kind == "mlp":
            names[src + "norm.weight"] = dst + "ffn_norm.weight"
            for hf_name, zoo_name in (("up_proj", "up_proj"), ("down_proj", "out_proj")):
                for k in ("weight", "bias") if c.mlp_bias else ("weight",):
                    names[f"{src}mixer.{hf_name}.{k}"] = f"{dst}ffn.{zoo_name}.{k}"
            continue
        names[src + "norm.weight"] = dst + "mixer_norm.weight"
        if kind == "full_attention":
            names.update(attn_names(src + "mixer.", dst + "mixer.", False))
        else:
            names.update(mamba2_names(src + "mixer.", dst + "mixer.", bool(c.use_conv_bias), bool(c.use_bias)))
    return recipe, names
