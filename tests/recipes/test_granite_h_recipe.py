"""recipes/granite-h.yaml: Granite-4.0-H's layer pattern (nine Mamba-2 layers to one NoPE attention layer)
with its multipliers builds, describes itself, and a few optimizer steps on one batch lower the loss."""
from pathlib import Path

import torch

import zoo

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "granite-h.yaml"


def test_granite_h_pattern_and_fields():
    recipe = zoo.load_recipe(RECIPE)
    assert [s.type for s in recipe.layers].count("attn") == 1 and len(recipe.layers) == 10
    attn = next(s.cfg for s in recipe.layers if s.type == "attn")
    assert attn.rope_base is None and attn.scale is not None
    assert recipe.model.embedding_multiplier != 1 and recipe.model.residual_multiplier != 1
    assert recipe.model.logits_divisor != 1


def test_granite_h_trains_a_few_steps():
    torch.manual_seed(0)
    model = zoo.build_model(RECIPE, ["model.d_model=64", "model.blocks.M.d_state=16", "model.blocks.M.head_dim=16",
                                     "model.ffn.hidden=128", "train.seq_len=64"])
    assert "attn" in model.describe(context=64)
    ids = torch.randint(0, 256, (4, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
