"""MistralForCausalLM -> ZooLM: sliding-window attention on every layer (windows shorter and longer than
the prompt, and none), GQA, tied and untied; logits within 1e-4 of transformers' and greedy generate equal."""
import pytest
import torch

from zoo.convert import from_transformers
from zoo.hf import ZooForCausalLM

transformers = pytest.importorskip("transformers")
VOCAB = 97


def mistral(window, tied=False, kv_heads=2, head_dim=None, layers=2):
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                                     vocab_size=VOCAB, tie_word_embeddings=tied, sliding_window=window,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("window,tied,kv_heads,head_dim", [(5, False, 2, None), (11, True, 1, 24),
                                                           (None, False, 4, None), (4096, True, 2, None)])
def test_logits_and_greedy_generate_match_transformers(window, tied, kv_heads, head_dim):
    hf = mistral(window, tied, kv_heads, head_dim)
    model = from_transformers(hf).eval()
    block = model.recipe.layers[0]
    assert block.type == ("attn" if window is None else "swa")
    assert window is None or block.cfg.window == window
    assert model.recipe.model.tie_embeddings == tied
    ids = torch.randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        want, got = hf(ids).logits, model(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4

    prompt = torch.randint(1, VOCAB, (1, 7))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert ZooForCausalLM.from_zoo(model).generate(prompt, **kw).tolist() == hf.generate(prompt, **kw).tolist()


def test_window_longer_than_the_default_training_length_imports():
    model = from_transformers(mistral(4096, layers=1))
    assert model.recipe.train.seq_len >= 4096


def test_non_silu_is_refused():
    cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, vocab_size=VOCAB, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        from_transformers(transformers.MistralForCausalLM(cfg))
