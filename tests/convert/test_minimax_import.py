"""MiniMaxForCausalLM imported: logits within 1e-4 of transformers' (float32) and greedy generate equal, on random
small configs (lightning and full attention in several patterns, MiniMax's residual factors, a sliding window,
untied or tied heads); changed decay buffers and router jitter are refused by name."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits, randomised
from zoo.convert import from_transformers

transformers = pytest.importorskip("transformers")
V = 97


def make(layer_types, **kw):
    cfg = transformers.MiniMaxConfig(**{
        "vocab_size": V, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": len(layer_types),
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "block_size": 8, "layer_types": list(layer_types), "pad_token_id": 0, "bos_token_id": None,
        "eos_token_id": None, "max_position_embeddings": 512, **kw})
    torch.manual_seed(0)
    return randomised(transformers.MiniMaxForCausalLM(cfg).eval())


@pytest.mark.parametrize("layer_types,kw", [
    (["linear_attention", "full_attention", "linear_attention", "linear_attention"], {}),
    (["full_attention", "linear_attention", "linear_attention"],
     {"full_attn_alpha_factor": 0.7, "full_attn_beta_factor": 1.3, "linear_attn_alpha_factor": 1.5,
      "linear_attn_beta_factor": 0.5, "mlp_alpha_factor": 0.9, "mlp_beta_factor": 1.1, "sliding_window": 8,
      "tie_word_embeddings": True}),
])
def test_logits_and_generate_equal_transformers(layer_types, kw):
    hf = make(layer_types, **kw)
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)
    assert model.recipe.model.pattern == "".join("L" if t == "linear_attention" else "A" for t in layer_types)


def test_refuses_changed_slopes_and_router_jitter():
    hf = make(["linear_attention", "full_attention"])
    with torch.no_grad():
        hf.model.layers[0].self_attn.slope_rate.mul_(2)
    with pytest.raises(ValueError, match="slope_rate: layer 0's decay rates"):
        from_transformers(hf)
    with pytest.raises(ValueError, match="router_jitter_noise: 0.1"):
        from_transformers(make(["linear_attention"], router_jitter_noise=0.1))
