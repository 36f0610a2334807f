"""MistralForCausalLM: Llama's layer with sliding-window attention on every layer (`sliding_window` keys,
the query's own included: transformers' mask keeps k > q - sliding_window, zoo's `swa` window), or full
attention when sliding_window is null. No biases (MistralConfig has no attention_bias / mlp_bias)."""
from __future__ import annotations

from zoo.convert import _llama, register_converter


@register_converter("MistralForCausalLM")
def mistral(hf) -> tuple[dict, dict]:
    c = hf.config
    if getattr(c, "layer_types", None) and any(t != "full_attention" and t != "sliding_attention"
                                               for t in c.layer_types):
        raise ValueError(f"layer_types: only full / sliding attention layers convert, got {sorted(set(c.layer_types))}")
    recipe, names = _llama(hf)
    recipe["name"] = "mistral-import"
    window = c.sliding_window
    if window is not None:
        block = recipe["model"]["blocks"]["A"]
        block.update(type="swa", window=int(window))
        # An imported model needs no training context; the recipe's train.seq_len only has to admit the
        # window (swa refuses a window longer than train.seq_len).
        recipe["train"]["seq_len"] = max(recipe["train"]["seq_len"], int(window))
    return recipe, names
