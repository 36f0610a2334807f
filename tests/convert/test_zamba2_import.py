"""Zamba2ForCausalLM imported: logits within 1e-4 of transformers' (float32) and greedy generate equal, on random
small configs: one or two shared blocks in turn, attention adapters on or off, RoPE on or off, GQA, exact or tanh
GELU or SiLU, biases, untied heads (where transformers 5.24 leaves every hybrid layer a block of its own: zoo follows
the weights); the shared weights land once; an activation zoo lacks is refused by name."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits, randomised
from zoo.convert import from_transformers

transformers = pytest.importorskip("transformers")
V = 97
TYPES = ["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba", "hybrid"]


def make(types=TYPES, **kw):
    cfg = transformers.Zamba2Config(**{
        "vocab_size": V, "hidden_size": 16, "num_hidden_layers": len(types), "layers_block_type": list(types),
        "mamba_d_state": 8, "n_mamba_heads": 4, "mamba_ngroups": 2, "num_attention_heads": 4,
        "intermediate_size": 24, "adapter_rank": 3, "chunk_size": 8, "pad_token_id": 0, **kw})
    torch.manual_seed(0)
    return randomised(transformers.Zamba2ForCausalLM(cfg).eval())


@pytest.mark.parametrize("types,kw,shared", [
    (TYPES, {}, 1),
    (TYPES, {"num_mem_blocks": 2, "use_shared_attention_adapter": True, "use_mem_rope": True,
             "hidden_act": "gelu_pytorch_tanh"}, 2),
    (["hybrid", "mamba", "hybrid"], {"add_bias_linear": True, "hidden_act": "silu", "num_key_value_heads": 2,
                                     "use_mem_rope": True, "time_step_min": 0.05}, 1),
    (TYPES, {"tie_word_embeddings": False, "num_mem_blocks": 2, "use_shared_attention_adapter": True}, 4),
])
def test_logits_and_generate_equal_transformers(types, kw, shared):
    hf = make(types, **kw)
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)
    assert len(model.shared) == shared
    uses = [layer for layer in model.layers if layer.shared_use is not None]
    assert len(uses) == types.count("hybrid")


def test_the_shared_weights_land_once():
    hf = make(num_mem_blocks=2)
    model = from_transformers(hf)
    first = hf.model.layers[1].shared_transformer
    assert hf.model.layers[4].shared_transformer.self_attn.q_proj.weight is first.self_attn.q_proj.weight
    torch.testing.assert_close(model.shared["S0"].attention.q_proj.weight, first.self_attn.q_proj.weight)
    # use 2 (layer 4) is block 0's second use: its adapter from the slot transformers keeps for it
    torch.testing.assert_close(model.layers[4].shared_use.ffn_adapter.down.weight,
                               first.feed_forward.gate_up_proj_adapter_list[2][0].weight)
    assert sum(k.startswith("shared.") and k.endswith("q_proj.weight") for k in model.state_dict()) == 2


def test_refuses_an_activation_zoo_lacks():
    with pytest.raises(ValueError, match=r"hidden_act: 'relu'; zoo's gated FFNs take silu, gelu"):
        from_transformers(make(hidden_act="relu"))
