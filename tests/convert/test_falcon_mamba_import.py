"""FalconMambaForCausalLM imported: logits within 1e-4 of transformers' (float32) and greedy generate equal (Mamba-1
with weightless dt / B / C RMSNorms: zoo's dt_bc_norm with unit weights)."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits

transformers = pytest.importorskip("transformers")
V = 97


@pytest.mark.parametrize("kw", [{}, {"use_conv_bias": False, "mixer_rms_eps": 1e-3, "tie_word_embeddings": False}])
def test_logits_and_generate_equal_transformers(kw):
    cfg = transformers.FalconMambaConfig(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                         conv_kernel=4, time_step_rank=4, pad_token_id=0, bos_token_id=None,
                                         eos_token_id=None, **kw)
    torch.manual_seed(0)
    hf = transformers.FalconMambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("D", "norm.weight", "norm_f.weight", ".bias")):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)
    assert model.recipe.model.blocks["M"]["dt_bc_norm"]
