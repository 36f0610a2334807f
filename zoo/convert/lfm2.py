"""Lfm2ForCausalLM and Lfm2MoeForCausalLM (Liquid AI's LFM2): per `layer_types`, a gated short convolution ("conv":
the `short_conv` block) or attention with per-head q/k RMSNorm ("full_attention"), each with a SwiGLU (w1 gate, w3
up, w2 down; its width read from the weights, after LFM2's own adjustment of intermediate_size) or, in LFM2-MoE past
its first num_dense_layers, a MoE routed by sigmoid scores (an expert bias for the choice, renormalised, routed
scaling: zoo's `router: sigmoid` with one group; transformers adds 1e-6 to the renormalising sum, zoo 1e-20, a
relative difference below 1e-6 in the weights). The final norm is `embedding_norm`."""
from __future__ import annotations

from zoo.convert import _rope_base, outer_names, register_converter, tied
from zoo.convert.hybrid import layer_kinds

KINDS = {"conv": "C", "full_attention": "A"}


@register_converter("Lfm2ForCausalLM")
@register_converter("Lfm2MoeForCausalLM")
def lfm2(hf) -> tuple[dict, dict]:
    c = hf.config
    types = layer_kinds(c, KINDS)
    dense_layers = getattr(c, "num_dense_layers", len(types)) if getattr(c, "num_experts", 0) else len(types)
    head_dim = c.hidden_size // c.num_attention_heads
    attn = {"type": "attn", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
            "head_dim": head_dim, "rope_base": _rope_base(c), "qk_norm": True, "qk_norm_eps": c.norm_eps}
    conv = {"type": "short_conv", "d_conv": c.conv_L_cache, "bias": bool(c.conv_bias)}
    dense = {"type": "swiglu", "hidden": hf.model.layers[0].feed_forward.w1.weight.shape[0]} if dense_layers else None
    moe = None
    if dense_layers < len(types):
        moe = {"type": "moe", "experts": c.num_experts, "top_k": c.num_experts_per_tok, "router": "sigmoid",
               "normalize_top_k": bool(c.norm_topk_prob), "routed_scaling": float(c.routed_scaling_factor),
               "hidden": c.moe_intermediate_size, "aux_loss_weight": 0.0}
    # a letter per (mixer, feed-forward): upper case with the MoE, lower case with the SwiGLU
    letters = [KINDS[t] if i >= dense_layers else KINDS[t].lower() for i, t in enumerate(types)]
    blocks = {letter: {**(conv if letter.upper() == "C" else attn), "ffn": moe if letter.isupper() else dense}
              for letter in sorted(set(letters))}
    recipe = {
        "name": "lfm2-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "".join(letters), "norm_eps": c.norm_eps, "tie_embeddings": tied(hf),
                  "blocks": blocks},
        "train": {"seq_len": min(int(c.max_position_embeddings), 2048)},
    }
    names = outer_names(hf, "model.embedding_norm.weight")
    for i, kind in enumerate(types):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        m = dst + "mixer."
        names[src + "operator_norm.weight"] = dst + "mixer_norm.weight"
        names[src + "ffn_norm.weight"] = dst + "ffn_norm.weight"
        if kind == "conv":
            for p in ("in_proj", "out_proj"):
                for k in ("weight", "bias") if c.conv_bias else ("weight",):
                    names[f"{src}conv.{p}.{k}"] = f"{m}{p}.{k}"
            names[src + "conv.conv.weight"] = m + "conv1d.weight"
            if c.conv_bias:
                names[src + "conv.conv.bias"] = m + "conv1d.bias"
        else:
            a = src + "self_attn."
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                names[f"{a}{p}.weight"] = f"{m}{p}.weight"
            names[a + "q_layernorm.weight"] = m + "q_norm.weight"
            names[a + "k_layernorm.weight"] = m + "k_norm.weight"
        f = src + "feed_forward."
        if i >= dense_layers:
            names[f + "gate.weight"] = dst + "ffn.router.weight"
            names[f + "experts.gate_up_proj"] = dst + "ffn.gate_up"
            names[f + "experts.down_proj"] = dst + "ffn.down"
            if c.use_expert_bias:
                names[f + "expert_bias"] = dst + "ffn.correction_bias"
        else:
            for hf_name, zoo_name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "out_proj")):
                names[f"{f}{hf_name}.weight"] = f"{dst}ffn.{zoo_name}.weight"
    return recipe, names
