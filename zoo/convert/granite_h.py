"""GraniteMoeHybridForCausalLM (IBM Granite-4.0-H): per `layer_types`, a Mamba-2 mixer ("linear_attention")
or attention ("full_attention"), then a SwiGLU (`shared_mlp`), plus routed experts when num_local_experts > 0
(zoo's `moe` FFN with the SwiGLU as its shared expert; the router's softmax over the top-k logits is zoo's
normalize_top_k). Attention has no RoPE unless position_embedding_type is "rope", and attention_multiplier
is its softmax scale. The muP multipliers map to model fields: embedding_multiplier, residual_multiplier,
logits_scaling -> logits_divisor. They stay fields even where folding into weights would be exact (the
embedding multiplier of an untied model): the same recipe then covers tied and untied checkpoints, and
further training sees Granite's parametrisation rather than rescaled weights."""
from __future__ import annotations

import math

from zoo.convert import _rope_base, outer_names, register_converter
from zoo.convert.hybrid import require_silu

KINDS = {"linear_attention": "M", "full_attention": "A"}
MAMBA2_PARAMS = ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")


@register_converter("GraniteMoeHybridForCausalLM")
def granite_h(hf) -> tuple[dict, dict]:
    c = hf.config
    require_silu(c, "hidden_act")
    types = list(c.layer_types)
    bad = sorted(set(types) - set(KINDS))
    if bad:
        raise ValueError(f"layer_types: {bad} (convertible: {', '.join(KINDS)})")
    position = c.position_embedding_type
    if position not in (None, "nope", "rope"):
        raise ValueError(f"position_embedding_type: {position!r} (convertible: null, 'nope', 'rope')")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = {"type": "attn", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
            "head_dim": head_dim, "rope_base": _rope_base(c) if position == "rope" else None,
            "scale": float(c.attention_multiplier),
            "qkv_bias": bool(c.attention_bias), "out_bias": bool(c.attention_bias)}
    lo, hi = (float(v) for v in c.time_step_limit)
    mamba = {"type": "mamba2", "d_state": c.mamba_d_state, "d_conv": c.mamba_d_conv, "expand": c.mamba_expand,
             "head_dim": c.mamba_d_head, "n_heads": c.mamba_n_heads, "n_groups": c.mamba_n_groups,
             "chunk_size": c.mamba_chunk_size, "conv_bias": bool(c.mamba_conv_bias), "bias": bool(c.mamba_proj_bias),
             "norm_eps": c.rms_norm_eps, "dt_limit": [lo, math.inf if hi == math.inf else hi]}
    moe = (c.num_local_experts or 0) > 0
    if moe:
        ffn = {"type": "moe", "experts": c.num_local_experts, "top_k": c.num_experts_per_tok,
               "normalize_top_k": True, "hidden": c.intermediate_size, "shared_hidden": c.shared_intermediate_size,
               "aux_loss_weight": float(c.router_aux_loss_coef or 0.0)}
    else:
        ffn = {"type": "swiglu", "hidden": c.shared_intermediate_size}
    recipe = {
        "name": "granite-h-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "".join(KINDS[t] for t in types), "norm_eps": c.rms_norm_eps,
                  "tie_embeddings": bool(c.tie_word_embeddings),
                  "embedding_multiplier": float(c.embedding_multiplier),
                  "residual_multiplier": float(c.residual_multiplier), "logits_divisor": float(c.logits_scaling),
                  "blocks": {KINDS[kind]: spec for kind, spec in (("linear_attention", mamba), ("full_attention", attn))
                             if kind in types},
                  "ffn": ffn},
        "train": {"seq_len": min(int(c.max_position_embeddings), 2048)},
    }
    names = outer_names(hf)
    shared = "ffn.shared." if moe else "ffn."
    for i, kind in enumerate(types):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
        names[src + "post_attention_layernorm.weight"] = dst + "ffn_norm.weight"
        if kind == "full_attention":
            for hf_name, zoo_name in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                                      ("o_proj", "out_proj")):
                for k in ("weight", "bias") if c.attention_bias else ("weight",):
                    names[f"{src}self_attn.{hf_name}.{k}"] = f"{dst}mixer.{zoo_name}.{k}"
        else:
            params = MAMBA2_PARAMS + (("conv1d.bias",) if c.mamba_conv_bias else ()) \
                + (("in_proj.bias", "out_proj.bias") if c.mamba_proj_bias else ())
            names.update({f"{src}mamba.{p}": f"{dst}mixer.{p}" for p in params})
        # shared_mlp.input_linear holds [gate; up]: transformers chunks its output in two, act(first) * second
        names[src + "shared_mlp.input_linear.weight"] = (f"{dst}{shared}gate_proj.weight",
                                                          f"{dst}{shared}up_proj.weight")
        names[src + "shared_mlp.output_linear.weight"] = f"{dst}{shared}out_proj.weight"
        if moe:
            names[src + "block_sparse_moe.router.weight"] = dst + "ffn.router.weight"
            names[src + "block_sparse_moe.experts.gate_up_proj"] = dst + "ffn.gate_up"
            names[src + "block_sparse_moe.experts.down_proj"] = dst + "ffn.down"
    return recipe, names
