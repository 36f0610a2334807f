"""KimiLinearForCausalLM (Moonshot's Kimi Linear): per `layer_types`, Kimi Delta Attention ("linear_attention": the
`kda` block, its forget gate low rank per channel, its output gate low rank through a sigmoid) or NoPE multi-head
latent attention ("full_attention": the `mla` block); per `mlp_layer_types` a SwiGLU ("dense") or a MoE
("sparse") routed by DeepSeek-V3's sigmoid router (correction bias, grouped top-k, routed scaling) beside
n_shared_experts' worth of shared SwiGLU."""
from __future__ import annotations

from zoo.convert.hybrid import layer_kinds, require_silu
from zoo.convert import Transformed, outer_names, register_converter, tied

KINDS = {"linear_attention": "K", "full_attention": "M"}


@register_converter("KimiLinearForCausalLM")
def kimi_linear(hf) -> tuple[dict, dict]:
    c = hf.config
    require_silu(c, "hidden_act")
    types, mlps = layer_kinds(c, KINDS), layer_kinds(c, {"dense": None, "sparse": None}, "mlp_layer_types")
    if "sparse" in mlps and c.n_shared_experts < 1:
        raise ValueError(f"n_shared_experts: {c.n_shared_experts} (zoo's MoE converts with one shared SwiGLU of "
                         "n_shared_experts x moe_intermediate_size)")
    kda = {"type": "kda", "n_heads": c.linear_num_heads, "head_k_dim": c.linear_head_dim,
           "head_v_dim": c.linear_head_dim, "d_conv": c.linear_conv_kernel_dim, "decay_rank": c.linear_head_dim,
           "output_gate_rank": c.linear_head_dim, "output_gate_act": "sigmoid", "norm_eps": c.rms_norm_eps}
    mla = {"type": "mla", "n_heads": c.num_attention_heads, "q_lora_rank": c.q_lora_rank,
           "kv_lora_rank": c.kv_lora_rank, "qk_nope_head_dim": c.qk_nope_head_dim,
           "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim, "bias": bool(c.attention_bias)}
    moe = {"type": "moe", "experts": c.num_local_experts, "top_k": c.num_experts_per_tok, "router": "sigmoid",
           "n_group": c.n_group, "topk_group": c.topk_group, "normalize_top_k": bool(c.norm_topk_prob),
           "routed_scaling": float(c.routed_scaling_factor), "hidden": c.moe_intermediate_size,
           "shared_hidden": c.moe_intermediate_size * c.n_shared_experts, "aux_loss_weight": 0.0}
    dense = {"type": "swiglu", "hidden": c.intermediate_size}
    letters = [KINDS[t] if m == "sparse" else KINDS[t].lower() for t, m in zip(types, mlps)]
    blocks = {letter: {**(kda if letter.upper() == "K" else mla), "ffn": moe if letter.isupper() else dense}
              for letter in sorted(set(letters))}
    recipe = {
        "name": "kimi-linear-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "".join(letters), "norm_eps": c.rms_norm_eps,
                  "tie_embeddings": tied(hf), "blocks": blocks},
        "train": {"seq_len": 2048},
    }
    names = outer_names(hf)
    for i, (kind, mlp) in enumerate(zip(types, mlps)):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
        names[src + "post_attention_layernorm.weight"] = dst + "ffn_norm.weight"
        a, m = src + "self_attn.", dst + "mixer."
        if kind == "linear_attention":
            for p in ("q_proj", "k_proj", "v_proj", "b_proj"):
                names[f"{a}{p}.weight"] = f"{m}{p}.weight"
            names[a + "conv1d.weight"] = m + "conv1d.weight"
            names[a + "forget_gate.f_a_proj.weight"] = m + "f_a_proj.weight"
            names[a + "forget_gate.f_b_proj.weight"] = m + "f_b_proj.weight"
            names[a + "forget_gate.dt_bias"] = m + "dt_bias"
            names[a + "forget_gate.A_log"] = Transformed((m + "A_log",), lambda w: (w.reshape(-1),))
            names[a + "g_a_proj.weight"] = m + "z_a_proj.weight"
            names[a + "g_b_proj.weight"] = m + "z_b_proj.weight"
            names[a + "o_norm.weight"] = m + "o_norm.weight"
            names[a + "o_proj.weight"] = m + "out_proj.weight"
        else:
            if c.q_lora_rank is None:
                names[a + "q_proj.weight"] = m + "q_proj.weight"
            else:
                names[a + "q_a_proj.weight"] = m + "q_a_proj.weight"
                names[a + "q_a_layernorm.weight"] = m + "q_a_norm.weight"
                names[a + "q_b_proj.weight"] = m + "q_b_proj.weight"
            names[a + "kv_a_proj_with_mqa.weight"] = m + "kv_a_proj.weight"
            names[a + "kv_a_layernorm.weight"] = m + "kv_a_norm.weight"
            names[a + "kv_b_proj.weight"] = m + "kv_b_proj.weight"
            names[a + "o_proj.weight"] = m + "out_proj.weight"
            for k in ("bias",) if c.attention_bias else ():
                names[a + "kv_a_proj_with_mqa." + k] = m + "kv_a_proj." + k
                names[a + "o_proj." + k] = m + "out_proj." + k
                if c.q_lora_rank is not None:
                    names[a + "q_a_proj." + k] = m + "q_a_proj." + k
        f = src + "mlp."
        if mlp == "sparse":
            names[f + "gate.weight"] = dst + "ffn.router.weight"
            names[f + "gate.e_score_correction_bias"] = dst + "ffn.correction_bias"
            names[f + "experts.gate_up_proj"] = dst + "ffn.gate_up"
            names[f + "experts.down_proj"] = dst + "ffn.down"
            for hf_name, zoo_name in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "out_proj")):
                names[f"{f}shared_experts.{hf_name}.weight"] = f"{dst}ffn.shared.{zoo_name}.weight"
        else:
            for hf_name, zoo_name in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "out_proj")):
                names[f"{f}{hf_name}.weight"] = f"{dst}ffn.{zoo_name}.weight"
    return recipe, names
