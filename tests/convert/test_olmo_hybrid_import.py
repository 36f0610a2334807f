"""OlmoHybridForCausalLM imported: logits within 1e-4 of transformers' (float32) and greedy generate equal, on
random small configs (Gated DeltaNet with negative eigenvalues, post-norm OLMo 2 attention with q/k norm over all
heads, RoPE or none)."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits

transformers = pytest.importorskip("transformers")
V = 97
A, L = "full_attention", "linear_attention"


def make(layer_types, neg=True, k_heads=2, rope=True, **kw):
    cfg = transformers.OlmoHybridConfig(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=len(layer_types),
        layer_types=list(layer_types), num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=k_heads,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6, linear_allow_neg_eigval=neg,
        pad_token_id=0, eos_token_id=None, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"} if rope else None, **kw)
    torch.manual_seed(0)
    hf = transformers.OlmoHybridForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.normal_(1.0, 0.3)
            elif name.endswith(("dt_bias", "A_log")):
                p.normal_(0.0, 0.3)
            elif p.dim() == 2:
                p.normal_(0.0, 0.1)
    return hf


@pytest.mark.parametrize("layer_types,kw", [
    ([L, L, L, A], {}),
    ([A, L], {"neg": False, "k_heads": 4, "rope": False}),
    ([L, A, L], {"tie_word_embeddings": True}),
])
def test_logits_and_generate_equal_transformers(layer_types, kw):
    hf = make(layer_types, **kw)
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)
    attn = model.recipe.model.blocks["A"]
    assert attn["norm_position"] == "post" and attn["qk_norm_scope"] == "all"
    assert model.recipe.model.blocks["G"]["allow_neg_eigval"] == kw.get("neg", True)
