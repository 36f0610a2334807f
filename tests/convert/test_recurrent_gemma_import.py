"""RecurrentGemmaForCausalLM imported: logits within 1e-4 of transformers' (float32) and greedy generate equal, on
random small configs (recurrent and local-attention layers in several patterns, MQA and GQA, a window shorter than
the prompt, attention biases, lru_width unlike hidden_size, a soft-cap that bites)."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits, randomised

transformers = pytest.importorskip("transformers")
V = 97


def make(block_types, n_layers, **kw):
    cfg = transformers.RecurrentGemmaConfig(**{
        "vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": n_layers,
        "num_attention_heads": 4, "num_key_value_heads": 1, "attention_window_size": 8,
        "block_types": list(block_types), "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None, **kw})
    torch.manual_seed(0)
    return randomised(transformers.RecurrentGemmaForCausalLM(cfg).eval(), norm_centre=0.0)   # (1 + w) norms


@pytest.mark.parametrize("block_types,n_layers,kw", [
    (("recurrent", "recurrent", "attention"), 3, {}),
    (("recurrent", "attention"), 4, {"num_key_value_heads": 2, "attention_bias": True, "lru_width": 24}),
    (("attention", "recurrent"), 2, {"logits_soft_cap": 2.0, "conv1d_width": 3,
                                     "rope_parameters": {"rope_theta": 500.0, "partial_rotary_factor": 0.75,
                                                         "rope_type": "default"}}),
])
def test_logits_and_generate_equal_transformers(block_types, n_layers, kw):
    hf = make(block_types, n_layers, **kw)
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)
    assert model.recipe.model.pattern == "".join("R" if t == "recurrent" else "A" for t in
                                                 (list(block_types) * n_layers)[:n_layers])


def test_refuses_another_activation():
    hf = make(("recurrent", "attention"), 2, hidden_activation="relu")
    from zoo.convert import from_transformers
    with pytest.raises(ValueError, match="hidden_activation: zoo's rglru gate branch and geglu use gelu_pytorch_tanh"):
        from_transformers(hf)
