"""from_transformers: small randomly initialised transformers models (no downloads) give equal logits."""
import pytest
import torch

from zoo.convert import from_transformers

transformers = pytest.importorskip("transformers")


def _compare(hf, vocab, tol=1e-4):
    hf.eval()
    model = from_transformers(hf).eval()
    ids = torch.randint(0, vocab, (2, 37))
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"relative logit error {err:.2e}"
    return model


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_llama(tied, bias):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, tie_word_embeddings=tied,
                                   attention_bias=bias, mlp_bias=bias, rope_theta=500.0)
    torch.manual_seed(0)
    model = _compare(transformers.LlamaForCausalLM(cfg), 101)
    assert model.recipe.layers[0].cfg.rope_base == 500.0 and model.recipe.model.tie_embeddings == tied


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_mamba(tied, bias):
    cfg = transformers.MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=2, vocab_size=97, expand=2,
                                   conv_kernel=4, time_step_rank=6, tie_word_embeddings=tied, use_bias=bias)
    torch.manual_seed(0)
    _compare(transformers.MambaForCausalLM(cfg), 97)


@pytest.mark.parametrize("groups", [1, 2])
def test_mamba2(groups):
    cfg = transformers.Mamba2Config(hidden_size=64, state_size=16, num_hidden_layers=2, vocab_size=97, expand=2,
                                    head_dim=16, num_heads=8, n_groups=groups, chunk_size=16, conv_kernel=4)
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial D, dt_bias and norm weights, so the test sees every path
        for layer in hf.backbone.layers:
            layer.mixer.D.normal_()
            layer.mixer.norm.weight.normal_(1.0, 0.2)
    _compare(hf, 97)


def test_unknown_model_class():
    with pytest.raises(ValueError, match="no converter for Linear"):
        from_transformers(torch.nn.Linear(2, 2))


def test_a_model_on_the_meta_device_converts_to_its_structure():
    cfg = transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=61, expand=2,
                                   conv_kernel=4, time_step_rank=4)
    with torch.device("meta"):
        hf = transformers.MambaForCausalLM(cfg)
    model = from_transformers(hf)
    assert next(model.parameters()).is_meta
    real = from_transformers(transformers.MambaForCausalLM(cfg))
    assert model.num_params() == real.num_params()
    assert {n: p.shape for n, p in model.state_dict().items()} == {n: p.shape for n, p in real.state_dict().items()}
