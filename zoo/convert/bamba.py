"""BambaForCausalLM (IBM's Bamba): Mamba-2 or attention per layer (`attn_layer_indices`), a SwiGLU after
every mixer, partial RoPE (head_dim / 2 rotated) in attention, the gated norm's eps from rms_norm_eps."""
from __future__ import annotations

from zoo.convert import outer_names, register_converter
from zoo.convert import tied as is_tied
from zoo.convert.hybrid import attn_names, check_attn_supports, dt_limit, mamba2_names, require_silu


@register_converter("BambaForCausalLM")
def bamba(hf) -> tuple[dict, dict]:
    c = hf.config
    tied = is_tied(hf)
    require_silu(c, "hidden_act")
    if c.z_loss_coefficient:
        raise ValueError(f"z_loss_coefficient: zoo's loss has no z-loss, got {c.z_loss_coefficient}")
    types = c.layers_block_type
    head_dim = c.hidden_size // c.num_attention_heads
    params = c.rope_parameters or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type: only 'default' RoPE converts exactly, got {params['rope_type']!r}")
    attn = {"type": "attn", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
            "head_dim": head_dim, "rope_base": float(params.get("rope_theta", 10000.0)),
            "qkv_bias": bool(c.attention_bias), "out_bias": bool(c.attention_bias)}
    rope_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if rope_dim != head_dim and "full_attention" in types:
        check_attn_supports("rope_dim", rope_dim, "partial_rotary_factor")
        attn["rope_dim"] = rope_dim
    mamba = {"type": "mamba2", "d_state": c.mamba_d_state, "d_conv": c.mamba_d_conv, "expand": c.mamba_expand,
             "head_dim": c.mamba_d_head, "n_heads": c.mamba_n_heads, "n_groups": c.mamba_n_groups,
             "chunk_size": c.mamba_chunk_size, "conv_bias": bool(c.mamba_conv_bias), "bias": bool(c.mamba_proj_bias),
             "norm_eps": c.rms_norm_eps, "dt_limit": dt_limit(c.time_step_limit)}
    recipe = {
        "name": "bamba-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "".join("A" if t == "full_attention" else "M" for t in types),
                  "norm_eps": c.rms_norm_eps, "tie_embeddings": tied,
                  "blocks": {letter: spec for letter, spec, kind in (("M", mamba, "linear_attention"),
                                                                      ("A", attn, "full_attention")) if kind in types},
                  "ffn": {"type": "swiglu", "hidden": c.intermediate_size, "bias": bool(c.mlp_bias)}},
        "train": {"seq_len": min(int(c.max_position_embeddings), 2048)},
    }
    names = outer_names(hf, "model.final_layernorm.weight")
    for i, kind in enumerate(types):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
        names[src + "pre_ff_layernorm.weight"] = dst + "ffn_norm.weight"
        if kind == "full_attention":
            names.update(attn_names(src + "self_attn.", dst + "mixer.", bool(c.attention_bias)))
        else:
            names.update(mamba2_names(src + "mamba.", dst + "mixer.", bool(c.mamba_conv_bias), bool(c.mamba_proj_bias)))
        for hf_name, zoo_name in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "out_proj")):
            for k in ("weight", "bias") if c.mlp_bias else ("weight",):
                names[f"{src}feed_forward.{hf_name}.{k}"] = f"{dst}ffn.{zoo_name}.{k}"
    return recipe, names
