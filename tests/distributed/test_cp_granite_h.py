"""A Granite-4.0-H-shaped model under context parallel: mamba2 and attn layers, attention without RoPE at
a scale override and with partial RoPE, an MoE FFN, the embedding / residual / logits multipliers; local
logits, the loss and aux loss, and the summed parameter gradients equal one process's (float64, 1e-10)."""
import pytest

from tests.distributed.test_cp_model import TOL, VOCAB, _model_vs_single

RECIPE = {
    "name": "granite-h-cp",
    "model": {"d_model": 16, "n_layers": 3, "vocab_size": VOCAB, "pattern": "MAP", "init_std": 0.2,
              "blocks": {"M": {"type": "mamba2", "d_state": 4, "head_dim": 8, "chunk_size": 3},
                         "A": {"type": "attn", "n_heads": 2, "rope_base": None, "scale": 0.7},
                         "P": {"type": "swa", "n_heads": 2, "window": 3, "block_size": 2, "rope_dim": 4}},
              "ffn": {"type": "moe", "experts": 3, "top_k": 2, "normalize_top_k": True, "hidden": 8,
                      "shared_hidden": 8},
              "embedding_multiplier": 3.0, "residual_multiplier": 0.5, "logits_divisor": 2.0},
    "train": {"seq_len": 64},
}


@pytest.mark.parametrize("w", (1, 2, 3))
def test_granite_h_shaped_model_under_context_parallel(ranks, w):
    for rank, worst in enumerate(ranks.run(w, _model_vs_single, RECIPE, (2 * w + 1, 5 * w + 2))):
        bad = {k: v for k, v in worst.items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"
