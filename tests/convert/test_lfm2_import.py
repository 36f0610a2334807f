"""Lfm2ForCausalLM imported: logits within 1e-4 of transformers' (float32) and greedy generate equal, on random
small configs (short convolutions with and without bias, attention with q/k norm, tied or not)."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits, randomised

transformers = pytest.importorskip("transformers")
V = 97


def make(layer_types, **kw):
    cfg = transformers.Lfm2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=len(layer_types),
                                  num_attention_heads=4, num_key_value_heads=2, layer_types=list(layer_types),
                                  pad_token_id=0, bos_token_id=None, eos_token_id=None, max_position_embeddings=256,
                                  **kw)
    torch.manual_seed(0)
    return randomised(transformers.Lfm2ForCausalLM(cfg).eval())


@pytest.mark.parametrize("layer_types,kw", [
    (["conv", "conv", "full_attention", "conv"], {}),
    (["full_attention", "conv"], {"conv_bias": True, "conv_L_cache": 4, "tie_word_embeddings": False}),
])
def test_logits_and_generate_equal_transformers(layer_types, kw):
    hf = make(layer_types, **kw)
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)


@pytest.mark.parametrize("kw", [{}, {"use_expert_bias": False, "norm_topk_prob": False, "routed_scaling_factor": 2.0}])
def test_lfm2_moe_equals_transformers(kw):
    cfg = transformers.Lfm2MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=12, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention", "conv", "conv"],
        num_dense_layers=1, num_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=None,
        eos_token_id=None, max_position_embeddings=256, **kw)
    torch.manual_seed(0)
    hf = randomised(transformers.Lfm2MoeForCausalLM(cfg).eval())
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)
    assert model.recipe.model.pattern == "cACC"
