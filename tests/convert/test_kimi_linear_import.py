"""KimiLinearForCausalLM imported: logits within 1e-4 of transformers' (float32) and greedy generate equal, on
random small configs (KDA with low-rank forget and output gates, NoPE MLA with and without a low-rank q, dense and
sparse MLPs with DeepSeek-V3's sigmoid router, grouped top-k and a correction bias)."""
import pytest
import torch

from tests.convert.convert_helpers import compare_generate, compare_logits

transformers = pytest.importorskip("transformers")
V = 97
A, L = "full_attention", "linear_attention"


def make(layer_types, mlp_types, q_lora=None, groups=1, **kw):
    cfg = transformers.KimiLinearConfig(
        vocab_size=V, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
        num_hidden_layers=len(layer_types), layer_types=list(layer_types), mlp_layer_types=list(mlp_types),
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=8, q_lora_rank=q_lora, qk_rope_head_dim=4,
        qk_nope_head_dim=6, v_head_dim=5, num_experts=4, num_experts_per_token=2, num_expert_group=groups,
        topk_group=1, linear_num_heads=2, linear_head_dim=8, linear_conv_kernel_dim=4, pad_token_id=0,
        bos_token_id=None, eos_token_id=None, rms_norm_eps=1e-5, **kw)
    torch.manual_seed(0)
    hf = transformers.KimiLinearForCausalLM(cfg).eval()
    with torch.no_grad():   # every path visible: norms, decays, gates, experts and the router's bias
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.normal_(1.0, 0.3)
            elif name.endswith(("dt_bias", "A_log")) or "experts" in name:
                p.normal_(0.0, 0.3)
            elif p.dim() == 2:
                p.normal_(0.0, 0.1)
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return hf


@pytest.mark.parametrize("layer_types,mlp_types,kw", [
    ([L, L, L, A], ["dense", "sparse", "sparse", "sparse"], {}),
    ([A, L], ["sparse", "dense"], {"q_lora": 6}),
    ([L, A, L], ["sparse", "sparse", "sparse"], {"groups": 2, "tie_word_embeddings": True}),
])
def test_logits_and_generate_equal_transformers(layer_types, mlp_types, kw):
    hf = make(layer_types, mlp_types, **kw)
    model = compare_logits(hf, V)
    compare_generate(hf, model, V)
