"""xLSTMForCausalLM imported (transformers' native kernels): logits within 1e-4 of transformers' (float32) and
greedy decoding equal to the argmax of its forward on random small configs (head counts and dimension factors, gate and logit caps, tied or
not); the weight modes and biases zoo cannot express are refused by name."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits
from zoo.convert import from_transformers

transformers = pytest.importorskip("transformers")
V = 97


def make(**kw):
    cfg = transformers.xLSTMConfig(**{"vocab_size": V, "hidden_size": 32, "num_heads": 4, "num_hidden_layers": 2,
                                      "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None, **kw})
    torch.manual_seed(0)
    hf = transformers.xLSTMForCausalLM(cfg).float().eval()
    with torch.no_grad():   # norms away from 1, larger weights, gate biases that open and close
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 2.0)
    return hf


@pytest.mark.parametrize("kw", [{}, {"num_heads": 2, "qk_dim_factor": 0.25, "v_dim_factor": 0.5, "gate_soft_cap": 4.0,
                                     "output_logit_soft_cap": 3.0, "tie_word_embeddings": True, "num_hidden_layers": 3}])
def test_logits_and_generate_equal_transformers(kw):
    hf = make(**kw)
    model = compare_logits(hf, V)
    # transformers' own generate cannot decode these (its cache allocates C as d_qk x d_qk, d_v differing): zoo's
    # cached decoding against the argmax of transformers' full forward, token by token
    compare_generate(hf, model, V, hf_generate=False)


def test_refuses_what_zoo_cannot_express():
    hf = make()
    hf.config.use_bias = True
    with pytest.raises(ValueError, match="use_bias: the xLSTM's RMSNorms"):
        from_transformers(hf)
