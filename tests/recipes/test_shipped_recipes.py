"""Every shipped recipe builds, runs forward and backward, and starts near the uniform loss."""
import math
from pathlib import Path

import pytest
import torch

import zoo

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml")
                 if not p.name.startswith("_"))


def test_there_are_recipes():
    assert {"transformer", "swa", "masformer", "blockwise", "ring", "infini", "selective", "taipan", "mamba",
            "mamba2", "samba", "jamba"} <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds_and_steps(path):
    torch.manual_seed(0)
    model = zoo.build_model(path)
    vocab = model.recipe.model.vocab_size
    ids = torch.randint(0, vocab, (2, 96))
    out = model(ids, labels=ids)
    total = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    total.backward()
    assert abs(out.loss.item() - math.log(vocab)) < 0.1, f"initial loss {out.loss.item():.3f} vs ln V {math.log(vocab):.3f}"
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
