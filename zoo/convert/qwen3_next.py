"""Qwen3NextForCausalLM, Qwen3_5ForCausalLM and Qwen3_5MoeForCausalLM (the text models): per `layer_types`, a
Gated DeltaNet ("linear_attention") or gated attention ("full_attention"), then a sparse MoE with a
sigmoid-gated shared expert, or a SwiGLU (Qwen3.5; Qwen3-Next's `mlp_only_layers` and the layers between
`decoder_sparse_step`s).

What moves on the way in:
- every RMSNorm of the model is zero-centred, x * (1 + w): the model's with `model.zero_centred_norm` (the weights
  copied as they are), attention's q/k norms by taking 1 + w as their weight (the same float32 product); the
  gated norm after the delta rule is a plain one;
- Qwen3-Next's in_proj_qkvz holds, per key head g, [q_g | k_g | v_g | z_g] (v and z for the value heads g
  shares) and in_proj_ba [b_g | a_g]; Qwen3.5's in_proj_qkv holds [q | k | v]: split into zoo's q, k, v, z, b
  and a projections;
- q_proj holds, per attention head, [q_h | gate_h]: split into q_proj and the output gate's gate_proj.
"""
from __future__ import annotations

import torch

from zoo.convert.hybrid import layer_kinds, require_silu
from zoo.convert import Transformed, _rope_base, outer_names, register_converter

KINDS = {"linear_attention": "G", "full_attention": "A"}


def _zero_centred(w: torch.Tensor) -> tuple:
    return ((1.0 + w.float()).to(w.dtype),)


def _per_group(widths: list, groups: int):
    """Split [groups * sum(widths), d] rows, laid out per group as [part_0 | part_1 | ...], into one tensor per
    part with the groups concatenated in order."""
    def split(w):
        parts = w.view(groups, sum(widths), *w.shape[1:]).split(widths, dim=1)
        return tuple(p.reshape(groups * p.shape[1], *w.shape[1:]) for p in parts)
    return split


def _moe_layer(c, i: int) -> bool:
    experts, step = getattr(c, "num_experts", 0) or 0, getattr(c, "decoder_sparse_step", 1)
    return i not in getattr(c, "mlp_only_layers", []) and experts > 0 and (i + 1) % step == 0


@register_converter("Qwen3NextForCausalLM")
def qwen3_next(hf) -> tuple[dict, dict]:
    return _qwen_hybrid(hf, "qwen3-next-import", fused=True)


@register_converter("Qwen3_5ForCausalLM")
def qwen3_5(hf) -> tuple[dict, dict]:
    return _qwen_hybrid(hf, "qwen3.5-import", fused=False)


@register_converter("Qwen3_5MoeForCausalLM")
def qwen3_5_moe(hf) -> tuple[dict, dict]:
    return _qwen_hybrid(hf, "qwen3.5-moe-import", fused=False)


def _qwen_hybrid(hf, name: str, fused: bool) -> tuple[dict, dict]:
    c = hf.config
    require_silu(c, "hidden_act")
    types = layer_kinds(c, KINDS)
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters: rope_type {rope.get('rope_type')!r} (convertible: 'default')")
    if c.linear_num_value_heads % c.linear_num_key_heads:
        raise ValueError(f"linear_num_key_heads: {c.linear_num_key_heads} does not divide linear_num_value_heads "
                         f"{c.linear_num_value_heads}")
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    rope_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    attn = {"type": "attn", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
            "head_dim": head_dim, "rope_base": _rope_base(c), "rope_dim": None if rope_dim == head_dim else rope_dim,
            "qkv_bias": bool(c.attention_bias), "out_bias": bool(c.attention_bias), "qk_norm": True,
            "qk_norm_eps": c.rms_norm_eps, "output_gate": True}
    gdn = {"type": "gated_deltanet", "n_heads": c.linear_num_value_heads, "n_k_heads": c.linear_num_key_heads,
           "head_k_dim": c.linear_key_head_dim, "head_v_dim": c.linear_value_head_dim,
           "d_conv": c.linear_conv_kernel_dim, "norm_eps": c.rms_norm_eps}
    letters = [KINDS[t] if _moe_layer(c, i) else KINDS[t].lower() for i, t in enumerate(types)]
    moe = dense = None
    if any(letter.isupper() for letter in letters):   # Qwen3.5-MoE's router always renormalises its top-k
        moe = {"type": "moe", "experts": c.num_experts, "top_k": c.num_experts_per_tok,
               "normalize_top_k": bool(getattr(c, "norm_topk_prob", True)), "hidden": c.moe_intermediate_size,
               "shared_hidden": c.shared_expert_intermediate_size, "shared_gate": True,
               "aux_loss_weight": float(c.router_aux_loss_coef or 0.0)}
    if any(letter.islower() for letter in letters):
        dense = {"type": "swiglu", "hidden": c.intermediate_size}
    # a letter per (mixer, feed-forward): upper case with the MoE, lower case with the SwiGLU
    blocks = {}
    for letter in sorted(set(letters)):
        blocks[letter] = {**(gdn if letter.upper() == "G" else attn), "ffn": moe if letter.isupper() else dense}
    recipe = {
        "name": name,
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "".join(letters), "norm_eps": c.rms_norm_eps, "zero_centred_norm": True,
                  "tie_embeddings": bool(c.tie_word_embeddings), "blocks": blocks},
        "train": {"seq_len": min(int(c.max_position_embeddings), 2048)},
    }
    names = outer_names(hf)
    hk, hv = c.linear_num_key_heads, c.linear_num_value_heads
    dk, vg = c.linear_key_head_dim, hv // hk * c.linear_value_head_dim
    for i, kind in enumerate(types):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
        names[src + "post_attention_layernorm.weight"] = dst + "ffn_norm.weight"
        m = dst + "mixer."
        if kind == "full_attention":
            a = src + "self_attn."
            names[a + "q_proj.weight"] = Transformed((m + "q_proj.weight", m + "gate_proj.weight"),
                                                     _per_group([head_dim, head_dim], c.num_attention_heads))
            if c.attention_bias:
                names[a + "q_proj.bias"] = Transformed((m + "q_proj.bias", m + "gate_proj.bias"),
                                                       _per_group([head_dim, head_dim], c.num_attention_heads))
            for hf_name, zoo_name in (("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj")):
                for k in ("weight", "bias") if c.attention_bias else ("weight",):
                    names[f"{a}{hf_name}.{k}"] = f"{m}{zoo_name}.{k}"
            names[a + "q_norm.weight"] = Transformed((m + "q_norm.weight",), _zero_centred)
            names[a + "k_norm.weight"] = Transformed((m + "k_norm.weight",), _zero_centred)
        else:
            a = src + "linear_attn."
            if fused:
                names[a + "in_proj_qkvz.weight"] = Transformed(
                    tuple(m + f"{p}_proj.weight" for p in "qkvz"), _per_group([dk, dk, vg, vg], hk))
                names[a + "in_proj_ba.weight"] = Transformed(
                    (m + "b_proj.weight", m + "a_proj.weight"), _per_group([hv // hk, hv // hk], hk))
            else:
                names[a + "in_proj_qkv.weight"] = Transformed(
                    tuple(m + f"{p}_proj.weight" for p in "qkv"), _per_group([hk * dk, hk * dk, hk * vg], 1))
                names.update({a + f"in_proj_{p}.weight": m + f"{p}_proj.weight" for p in "zba"})
            for p in ("conv1d.weight", "dt_bias", "A_log", "out_proj.weight"):
                names[a + p] = m + p
            names[a + "norm.weight"] = m + "o_norm.weight"
        f = src + "mlp."
        if _moe_layer(c, i):
            names[f + "gate.weight"] = dst + "ffn.router.weight"
            names[f + "experts.gate_up_proj"] = dst + "ffn.gate_up"
            names[f + "experts.down_proj"] = dst + "ffn.down"
            for hf_name, zoo_name in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "out_proj")):
                names[f"{f}shared_expert.{hf_name}.weight"] = f"{dst}ffn.shared.{zoo_name}.weight"
            names[f + "shared_expert_gate.weight"] = dst + "ffn.shared_gate.weight"
        else:
            for hf_name, zoo_name in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "out_proj")):
                names[f"{f}{hf_name}.weight"] = f"{dst}ffn.{zoo_name}.weight"
    return recipe, names
