"""xLSTMForCausalLM (xLSTM-7B's architecture, transformers' native kernels): every layer the mLSTM (zoo's `mlstm`:
q / k of qk_dim_factor d_model, v of v_dim_factor, soft-capped gates, per-head layer norm, output gate) followed by
a SwiGLU of ffn_proj_factor d_model rounded up to ffn_round_up_to_multiple_of (its width read from the weights);
RMSNorms, an output norm, the logits
soft-capped at output_logit_soft_cap. The fused weight mode (which transformers cannot initialise) and biases on
the RMSNorms (use_bias) are refused by name."""
from __future__ import annotations

from zoo.convert import register_converter, tied


@register_converter("xLSTMForCausalLM")
def xlstm(hf) -> tuple[dict, dict]:
    c = hf.config
    if c.weight_mode != "single":
        raise ValueError(f"weight_mode: {c.weight_mode!r}; convertible: single")
    if c.use_bias:
        raise ValueError("use_bias: the xLSTM's RMSNorms then carry biases, which zoo's RMSNorm has not")
    if c.embedding_dim != c.hidden_size:
        raise ValueError(f"embedding_dim: {c.embedding_dim} must equal hidden_size {c.hidden_size}")
    up = hf.backbone.blocks[0].ffn.proj_up.weight.shape[0]   # transformers' rounding of ffn_proj_factor d_model
    block = {"type": "mlstm", "n_heads": c.num_heads, "qk_dim_factor": float(c.qk_dim_factor),
             "v_dim_factor": float(c.v_dim_factor), "gate_soft_cap": c.gate_soft_cap, "norm_eps": c.norm_eps,
             "eps": c.eps, "chunk_size": int(c.chunk_size)}
    recipe = {
        "name": "xlstm-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_blocks, "vocab_size": c.vocab_size, "pattern": "M",
                  "norm_eps": c.norm_eps, "tie_embeddings": tied(hf), "logit_softcap": c.output_logit_soft_cap,
                  "blocks": {"M": block}, "ffn": {"type": "swiglu", "hidden": up}},
        "train": {"seq_len": 2048},
    }
    names = {"backbone.embeddings.weight": "embed.weight", "backbone.out_norm.weight": "norm.weight"}
    if not tied(hf):
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(c.num_blocks):
        src, dst = f"backbone.blocks.{i}.", f"layers.{i}."
        m = dst + "mixer."
        names[src + "norm_mlstm.weight"] = dst + "mixer_norm.weight"
        names[src + "norm_ffn.weight"] = dst + "ffn_norm.weight"
        for p in ("q", "k", "v", "ogate_preact", "out_proj"):
            names[f"{src}mlstm_layer.{p}.weight"] = f"{m}{p}.weight"
        for p in ("igate_preact", "fgate_preact"):
            for kind in ("weight", "bias"):
                names[f"{src}mlstm_layer.{p}.{kind}"] = f"{m}{p}.{kind}"
        names[src + "mlstm_layer.multihead_norm.weight"] = m + "norm_weight"
        for hf_name, zoo_name in (("proj_up_gate", "gate_proj"), ("proj_up", "up_proj"), ("proj_down", "out_proj")):
            names[f"{src}ffn.{hf_name}.weight"] = f"{dst}ffn.{zoo_name}.weight"
    return recipe, names
