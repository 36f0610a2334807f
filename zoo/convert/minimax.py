"""MiniMaxForCausalLM (MiniMax-01 / MiniMax-Text): per `layer_types`, lightning attention ("linear_attention": zoo's
`lightning`, its slopes scaled by the layer's depth) or full attention ("full_attention": `attn`, GQA, RoPE over the
whole head; `swa` with sliding_window), each followed by a Mixtral-style MoE (softmax router, top-k renormalised,
SwiGLU experts). MiniMax's layer keeps the normed input as the residual and scales both terms: n = norm(x),
x = alpha n + beta sublayer(n), with its own factors for the two attention kinds and the MLP (zoo's
`norm_position: normed` with `residual_scale`). transformers' lightning layers hold their slopes and decay factors
as buffers; they are checked against the formula (a changed buffer is refused) and not copied."""
from __future__ import annotations

import torch

from zoo.blocks.lightning.block import slopes
from zoo.convert import Transformed, _rope_base, outer_names, register_converter, tied
from zoo.convert.hybrid import layer_kinds, require_silu

KINDS = {"linear_attention": "L", "full_attention": "A"}
DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


@register_converter("MiniMaxForCausalLM")
def minimax(hf) -> tuple[dict, dict]:
    c = hf.config
    require_silu(c, "hidden_act")
    if c.router_jitter_noise:
        raise ValueError(f"router_jitter_noise: {c.router_jitter_noise} (training noise on the MoE input) is not "
                         "expressed by zoo's MoE; allowed: 0")
    types = layer_kinds(c, KINDS)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = {"type": "swa" if c.sliding_window else "attn", "n_heads": c.num_attention_heads,
            "n_kv_heads": c.num_key_value_heads, "head_dim": head_dim, "rope_base": _rope_base(c),
            **({"window": c.sliding_window} if c.sliding_window else {}), "norm_position": "normed",
            "residual_scale": [float(c.full_attn_alpha_factor), float(c.full_attn_beta_factor),
                               float(c.mlp_alpha_factor), float(c.mlp_beta_factor)]}
    lightning = {"type": "lightning", "n_heads": c.num_attention_heads, "head_dim": head_dim,
                 "decay_layers": c.num_hidden_layers, "norm_position": "normed",
                 "residual_scale": [float(c.linear_attn_alpha_factor), float(c.linear_attn_beta_factor),
                                    float(c.mlp_alpha_factor), float(c.mlp_beta_factor)]}
    recipe = {
        "name": "minimax-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "".join(KINDS[t] for t in types), "norm_eps": c.rms_norm_eps,
                  "tie_embeddings": tied(hf), "blocks": {"L": lightning, "A": attn},
                  "ffn": {"type": "moe", "experts": c.num_local_experts, "top_k": c.num_experts_per_tok,
                          "hidden": c.intermediate_size, "normalize_top_k": True,
                          "aux_loss_weight": float(c.router_aux_loss_coef)}},
        "train": {"seq_len": max(2048, c.sliding_window or 0)},
    }
    names = outer_names(hf)
    for i, kind in enumerate(types):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        a, m = src + "self_attn.", dst + "mixer."
        names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
        names[src + "post_attention_layernorm.weight"] = dst + "ffn_norm.weight"
        if kind == "linear_attention":
            _check_decays(hf.model.layers[i].self_attn, i, c.num_hidden_layers)
            for p in ("qkv_proj", "output_gate", "out_proj", "norm"):
                names[f"{a}{p}.weight"] = f"{m}{p}.weight"
            for buf in DECAY_BUFFERS:   # recomputed by the block from its slopes
                names[a + buf] = Transformed((), lambda t: ())
        else:
            for p in ("q_proj", "k_proj", "v_proj"):
                names[f"{a}{p}.weight"] = f"{m}{p}.weight"
            names[a + "o_proj.weight"] = m + "out_proj.weight"
        names[src + "mlp.gate.weight"] = dst + "ffn.router.weight"
        names[src + "mlp.experts.gate_up_proj"] = dst + "ffn.gate_up"
        names[src + "mlp.experts.down_proj"] = dst + "ffn.down"
    return recipe, names


def _check_decays(layer, index: int, n_layers: int) -> None:
    rate = layer.slope_rate
    if rate.is_meta:
        return
    want = slopes(rate.numel(), index, n_layers).to(rate.dtype)
    if not torch.allclose(rate.flatten(), want, rtol=1e-5, atol=0):
        raise ValueError(f"slope_rate: layer {index}'s decay rates {rate.flatten().tolist()} are not MiniMax's "
                         f"formula ({want.tolist()}), the only slopes the lightning block computes")
