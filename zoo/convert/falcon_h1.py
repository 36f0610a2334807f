"""FalconH1ForCausalLM (TII's Falcon-H1, arXiv 2507.22448): in every layer Mamba-2 and attention run in parallel on
the same normed input (zoo's `parallel` block, Mamba-2 first as transformers sums them), then a SwiGLU.

Falcon-H1's muP multipliers, and where each goes:
- folded into weights, exact because each multiplies a linear map's input or output: attention_in_multiplier
  (q, k, v weights), key_multiplier (k weight and bias), ssm_in_multiplier and ssm_multipliers (the per-row
  `mup_vector` over in_proj's z, x, B, C, dt rows), mlp_multipliers (gate_proj; down_proj);
- the branches' out_scale: ssm_out_multiplier, attention_out_multiplier (the parallel block's per-branch scales);
- model fields: embedding_multiplier, lm_head_multiplier -> logits_divisor = 1 / lm_head_multiplier (the
  embedding may be the LM head, so neither folds in every checkpoint).
The Mamba-2 width is mamba_n_heads x mamba_d_head; mamba_rms_norm false -> the mixer's `norm: false` (y * silu(z))."""
from __future__ import annotations

from zoo.convert import Scaled, _rope_base, outer_names, register_converter
from zoo.convert import tied as is_tied
from zoo.convert.hybrid import dt_limit, mamba2_names, require_silu

_MAMBA, _ATTN = "layers.{i}.mixer.branches.0.", "layers.{i}.mixer.branches.1."


def _mup_vector(c, d_inner: int):
    """One factor per in_proj output row (transformers' compute_mup_vector): z, x, B, C, dt."""
    import torch
    gs = c.mamba_n_groups * c.mamba_d_state
    sizes = (d_inner, d_inner, gs, gs, c.mamba_n_heads)
    return torch.cat([torch.full((n,), float(m)) for n, m in zip(sizes, c.ssm_multipliers)])


@register_converter("FalconH1ForCausalLM")
def falcon_h1(hf) -> tuple[dict, dict]:
    c = hf.config
    tied = is_tied(hf)
    require_silu(c, "hidden_act")
    d_inner = c.mamba_n_heads * c.mamba_d_head
    if (c.mamba_d_ssm or c.mamba_expand * c.hidden_size) != d_inner:
        raise ValueError(f"mamba_d_ssm: {c.mamba_d_ssm} != mamba_n_heads x mamba_d_head = {d_inner}")
    if c.mamba_rms_norm and c.mamba_norm_before_gate:
        raise ValueError("mamba_norm_before_gate: true with mamba_rms_norm: zoo's gated norm is rmsnorm(y * silu(z)) "
                         "(norm after the gate); only mamba_norm_before_gate false converts")
    if bool(c.mamba_proj_bias) != bool(c.projectors_bias):
        raise ValueError(f"projectors_bias: {c.projectors_bias} differs from mamba_proj_bias {c.mamba_proj_bias}; "
                         f"zoo's mamba2 `bias` covers in_proj and out_proj together")
    if len(c.ssm_multipliers) != 5 or len(c.mlp_multipliers) != 2:
        raise ValueError(f"ssm_multipliers / mlp_multipliers: expected 5 and 2 numbers, got {list(c.ssm_multipliers)}, "
                         f"{list(c.mlp_multipliers)}")
    params = c.rope_parameters or {}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_parameters.partial_rotary_factor: Falcon-H1 rotates all of head_dim, "
                         f"got {params['partial_rotary_factor']}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    mamba = {"type": "mamba2", "out_scale": float(c.ssm_out_multiplier), "d_state": c.mamba_d_state,
             "d_conv": c.mamba_d_conv, "head_dim": c.mamba_d_head, "n_heads": c.mamba_n_heads,
             "n_groups": c.mamba_n_groups, "chunk_size": c.mamba_chunk_size, "conv_bias": bool(c.mamba_conv_bias),
             "bias": bool(c.mamba_proj_bias), "norm": bool(c.mamba_rms_norm), "norm_eps": c.rms_norm_eps,
             "dt_limit": dt_limit(c.time_step_limit)}
    attn = {"type": "attn", "out_scale": float(c.attention_out_multiplier), "n_heads": c.num_attention_heads,
            "n_kv_heads": c.num_key_value_heads, "head_dim": head_dim, "rope_base": _rope_base(c),
            "qkv_bias": bool(c.attention_bias), "out_bias": bool(c.attention_bias)}
    recipe = {
        "name": "falcon-h1-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "P", "norm_eps": c.rms_norm_eps, "tie_embeddings": tied,
                  "embedding_multiplier": float(c.embedding_multiplier),
                  "logits_divisor": 1.0 / float(c.lm_head_multiplier),
                  "blocks": {"P": {"type": "parallel", "branches": [mamba, attn]}},
                  "ffn": {"type": "swiglu", "hidden": c.intermediate_size, "bias": bool(c.mlp_bias)}},
        "train": {"seq_len": min(int(c.max_position_embeddings), 2048)},
    }
    names = outer_names(hf, "model.final_layernorm.weight")
    mup = _mup_vector(c, d_inner)
    a_in, key = float(c.attention_in_multiplier), float(c.key_multiplier)
    gate, down = (float(m) for m in c.mlp_multipliers)
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        m_dst, a_dst = _MAMBA.format(i=i), _ATTN.format(i=i)
        names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
        names[src + "pre_ff_layernorm.weight"] = dst + "ffn_norm.weight"
        # Mamba-2: in_proj(x * ssm_in) * mup = (mup * ssm_in * W) x + mup * b
        names.update(mamba2_names(src + "mamba.", m_dst, bool(c.mamba_conv_bias), bool(c.mamba_proj_bias)))
        if not c.mamba_rms_norm:
            del names[src + "mamba.norm.weight"]
        names[src + "mamba.in_proj.weight"] = Scaled(m_dst + "in_proj.weight", mup * float(c.ssm_in_multiplier))
        if c.mamba_proj_bias:
            names[src + "mamba.in_proj.bias"] = Scaled(m_dst + "in_proj.bias", mup)
        # attention: q, k, v of (x * attention_in); k times key_multiplier (weight and bias)
        for p, w_scale, b_scale in (("q_proj", a_in, 1.0), ("k_proj", a_in * key, key), ("v_proj", a_in, 1.0)):
            names[f"{src}self_attn.{p}.weight"] = Scaled(f"{a_dst}{p}.weight", w_scale)
            if c.attention_bias:
                names[f"{src}self_attn.{p}.bias"] = Scaled(f"{a_dst}{p}.bias", b_scale)
        for k in ("weight", "bias") if c.attention_bias else ("weight",):
            names[f"{src}self_attn.o_proj.{k}"] = f"{a_dst}out_proj.{k}"
        # SwiGLU: up(x) * silu(gate(x) * gate_m), then down(.) * down_m
        for k in ("weight", "bias") if c.mlp_bias else ("weight",):
            names[f"{src}feed_forward.gate_proj.{k}"] = Scaled(f"{dst}ffn.gate_proj.{k}", gate)
            names[f"{src}feed_forward.up_proj.{k}"] = f"{dst}ffn.up_proj.{k}"
            names[f"{src}feed_forward.down_proj.{k}"] = Scaled(f"{dst}ffn.out_proj.{k}", down)
    return recipe, names
