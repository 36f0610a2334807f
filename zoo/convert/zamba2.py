"""Zamba2ForCausalLM (Zyphra's Zamba2): Mamba-2 layers without FFNs, and "hybrid" layers where a shared transformer
block (attention on concat(hidden, embeddings), 2 hidden_size wide, then a gated MLP; no residuals inside) feeds the
Mamba-2 layer's input through the layer's own `linear`. There are num_mem_blocks shared blocks, used in turn by the
hybrid layers; each use has its own LoRA adapters on the MLP's gate_up projection (always) and on q, k, v
(use_shared_attention_adapter). In zoo: model.shared_blocks S0.. (zoo.blocks.shared), a letter per block for the
layers using it.

Transformers ties the later uses' modules to the first's, each tensor then read under every layer's name and landing
once; but only with tie_word_embeddings (5.24 skips every tie without it), when each hybrid layer keeps a block of
its own. The import follows the weights, not the config: the uses whose blocks are the same tensors share one zoo
block, and an adapter slot no use of a layer's block reads is dropped."""
from __future__ import annotations

from zoo.convert import _rope_base, outer_names, register_converter, tied
from zoo.convert.hybrid import dt_limit, layer_kinds, mamba2_names

KINDS = {"mamba": "M", "linear_attention": "M", "hybrid": "H"}
USE_LETTERS = "HIJKLNOPQRSTUVWXYZ"   # the letter of the layers using shared block b
GELU = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


def _ffn(c) -> dict:
    if c.hidden_act == "silu":
        kind = {"type": "swiglu"}
    elif c.hidden_act in GELU:
        kind = {"type": "geglu", "gelu": GELU[c.hidden_act]}
    else:
        raise ValueError(f"hidden_act: {c.hidden_act!r}; zoo's gated FFNs take silu, gelu, gelu_pytorch_tanh, "
                         f"gelu_new")
    return {**kind, "hidden": c.intermediate_size, "bias": bool(c.add_bias_linear)}


@register_converter("Zamba2ForCausalLM")
def zamba2(hf) -> tuple[dict, dict]:
    c = hf.config
    types = layer_kinds(c, KINDS, "layers_block_type")
    hybrid = [i for i, t in enumerate(types) if t == "hybrid"]
    block_of = _blocks_by_weights(hf, hybrid)
    if len(set(block_of.values())) > len(USE_LETTERS):
        raise ValueError(f"num_mem_blocks: at most {len(USE_LETTERS)} distinct shared blocks convert, got "
                         f"{len(set(block_of.values()))}")
    mamba = {"type": "mamba2", "d_state": c.mamba_d_state, "d_conv": c.mamba_d_conv, "expand": c.mamba_expand,
             "head_dim": c.mamba_headdim, "n_heads": c.n_mamba_heads, "n_groups": c.mamba_ngroups,
             "chunk_size": c.chunk_size, "conv_bias": True, "bias": bool(c.add_bias_linear),
             "norm_eps": 1e-5,   # Zamba2's gated norm has its own eps, not rms_norm_eps
             "dt_limit": dt_limit((c.time_step_min, float("inf"))), "ffn": "none"}
    head_dim = c.attention_head_dim
    shared = {"n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads, "head_dim": head_dim,
              "scale": (head_dim / 2) ** -0.5,   # Zamba's: the concatenated input doubles the head dimension
              "rope_base": _rope_base(c) if c.use_mem_rope else None, "concat_embeddings": True,
              "adapter_rank": c.adapter_rank if c.use_shared_attention_adapter else 0,
              "ffn_adapter_rank": c.adapter_rank, "ffn": _ffn(c)}
    used = sorted(set(block_of.values()))
    blocks = {"M": mamba} if "M" in {KINDS[t] for t in types} else {}
    blocks.update({USE_LETTERS[b]: {**mamba, "shared": f"S{b}"} for b in used})
    recipe = {
        "name": "zamba2-import",
        "model": {"d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
                  "pattern": "".join(USE_LETTERS[block_of[i]] if i in block_of else "M" for i in range(len(types))),
                  "norm_eps": c.rms_norm_eps, "tie_embeddings": tied(hf), "blocks": blocks,
                  "shared_blocks": {f"S{b}": shared for b in used}},
        "train": {"seq_len": min(int(c.max_position_embeddings), 2048)},
    }
    names = outer_names(hf, "model.final_layernorm.weight")
    for i, kind in enumerate(types):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        if kind == "hybrid":
            names.update(_shared_names(c, src + "shared_transformer.", f"shared.S{block_of[i]}.", hybrid,
                                       hybrid.index(i), block_of))
            names[src + "linear.weight"] = dst + "shared_use.proj.weight"
            src += "mamba_decoder."
        names[src + "input_layernorm.weight"] = dst + "mixer_norm.weight"
        names.update(mamba2_names(src + "mamba.", dst + "mixer.", True, bool(c.add_bias_linear)))
    return recipe, names


def _blocks_by_weights(hf, hybrid: list) -> dict:
    """hybrid layer -> its zoo shared block, numbered in order of first use: one per distinct set of weights."""
    ids = [id(hf.model.layers[i].shared_transformer.self_attn.q_proj.weight) for i in hybrid]
    return {layer: list(dict.fromkeys(ids)).index(ids[use]) for use, layer in enumerate(hybrid)}


def _shared_names(c, src: str, dst: str, hybrid: list, use: int, block_of: dict) -> dict:
    """The shared block's tensors under one hybrid layer's name, and the adapter slots its lists hold (one per use
    of its block_id): those of the uses that share its weights land on their layers, the rest is never read."""
    names = {src + "input_layernorm.weight": dst + "in_norm.weight",
             src + "pre_ff_layernorm.weight": dst + "ffn_norm.weight",
             src + "feed_forward.gate_up_proj.weight": (dst + "ffn.gate_proj.weight", dst + "ffn.up_proj.weight"),
             src + "feed_forward.down_proj.weight": dst + "ffn.out_proj.weight"}
    if c.add_bias_linear:
        names[src + "feed_forward.gate_up_proj.bias"] = (dst + "ffn.gate_proj.bias", dst + "ffn.up_proj.bias")
        names[src + "feed_forward.down_proj.bias"] = dst + "ffn.out_proj.bias"
    for p in ("q", "k", "v"):
        names[f"{src}self_attn.{p}_proj.weight"] = f"{dst}attention.{p}_proj.weight"
    names[src + "self_attn.o_proj.weight"] = dst + "attention.out_proj.weight"
    for j, layer in enumerate(hybrid):
        if j % c.num_mem_blocks != use % c.num_mem_blocks:
            continue   # an Identity slot: no tensors
        at = f"layers.{layer}.shared_use." if block_of[layer] == block_of[hybrid[use]] else None
        for k, part in enumerate(("down", "up")):
            names[f"{src}feed_forward.gate_up_proj_adapter_list.{j}.{k}.weight"] = \
                at and f"{at}ffn_adapter.{part}.weight"
            if c.use_shared_attention_adapter:
                for p in ("q", "k", "v"):
                    names[f"{src}self_attn.linear_{p}_adapter_list.{j}.{k}.weight"] = at and f"{at}{p}.{part}.weight"
    return names
