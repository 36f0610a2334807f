"""OlmoHybridForCausalLM (AI2's OLMo-Hybrid): per `layer_types`, a Gated DeltaNet layer ("linear_attention", pre-norm)
or an OLMo 2 attention layer ("full_attention": post-norm, x + norm(attn(x)) and x + norm(mlp(x)), q and k
RMSNorm over all heads' channels; RoPE, or none when rope_theta is unset as in the released checkpoints), each
with a SwiGLU. The delta rule's beta is 2 sigmoid(.) with linear_allow_neg_eigval; its gated output norm uses
eps 1e-5 whatever rms_norm_eps is (fla's default, kept by transformers)."""
from __future__ import annotations

from zoo.convert.hybrid import layer_kinds, require_silu
from zoo.convert import outer_names, register_converter

KINDS = {"linear_attention": "G", "full_attention": "A"}
OUTPUT_NORM_EPS = 1e-5


@register_converter("OlmoHybridForCausalLM")
def olmo_hybrid(hf) -> tuple[dict, dict]:
    c = hf.config
    require_silu(c, "hidden_act")
    types = layer_kinds(c, KINDS)
    rope = c.rope_parameters or {}
    if rope.get("rope_theta") is not None and rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters: rope_type {rope.get('rope_type')!r} (convertible: 'default')")
    if c.linear_num_value_heads % c.linear_num_key_heads:
        raise ValueError(f"linear_num_key_heads: {c.linear_num_key_heads} does not divide linear_num_value_heads "
                         f"{c.linear_num_value_heads}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    theta = rope.get("rope_theta")
    attn = {"type": "attn", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
            "head_dim": head_dim, "rope_base": None if theta is None else float(theta),
            "qkv_bias": bool(c.attention_bias), "out_bias": bool(c.attention_bias), "qk_norm": True,
            "qk_norm_scope": "all", "qk_norm_eps": c.rms_norm_eps, "norm_position": "post"}
    gdn = {"type": "gated_deltanet", "n_heads": c.linear_num_value_heads, "n_k_heads": c.linear_num_key_heads,
           "head_k_dim": c.linear_key_head_dim, "head_v_dim": c.linear_value_head_dim,
           "d_conv": c.linear_conv_kernel_dim, "allow_neg_eigval": bool(c.linear_allow_neg_eigval),
           "norm_eps": OUTPUT_NORM_EPS}
    recipe = {
        "name": "olmo-hybrid-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "".join(KINDS[t] for t in types), "norm_eps": c.rms_norm_eps,
                  "tie_embeddings": bool(c.tie_word_embeddings),
                  "blocks": {KINDS[k]: spec for k, spec in (("linear_attention", gdn), ("full_attention", attn))
                             if k in types},
                  "ffn": {"type": "swiglu", "hidden": c.intermediate_size}},
        "train": {"seq_len": min(int(c.max_position_embeddings), 2048)},
    }
    names = outer_names(hf)
    for i, kind in enumerate(types):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        m = dst + "mixer."
        if kind == "full_attention":   # post-norm: the norms after attention and after the MLP
            names[src + "post_attention_layernorm.weight"] = dst + "mixer_norm.weight"
            names[src + "post_feedforward_layernorm.weight"] = dst + "ffn_norm.weight"
            a = src + "self_attn."
            for hf_name, zoo_name in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                                      ("o_proj", "out_proj")):
                for k in ("weight", "bias") if c.attention_bias else ("weight",):
                    names[f"{a}{hf_name}.{k}"] = f"{m}{zoo_name}.{k}"
            names[a + "q_norm.weight"] = m + "q_norm.weight"
            names[a + "k_norm.weight"] = m + "k_norm.weight"
        else:
            names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
            names[src + "post_attention_layernorm.weight"] = dst + "ffn_norm.weight"
            a = src + "linear_attn."
            for p in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj"):
                names[f"{a}{p}.weight"] = f"{m}{p}.weight"
            names[a + "g_proj.weight"] = m + "z_proj.weight"
            names[a + "o_proj.weight"] = m + "out_proj.weight"
            names[a + "o_norm.weight"] = m + "o_norm.weight"
            for p in ("conv1d.weight", "dt_bias", "A_log"):
                names[a + p] = m + p
        for hf_name, zoo_name in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "out_proj")):
            names[f"{src}mlp.{hf_name}.weight"] = f"{dst}ffn.{zoo_name}.weight"
    return recipe, names
