"""Granite's model-level multipliers (issue 19): model.embedding_multiplier scales the embedding output,
model.residual_multiplier each sublayer's output before its residual add, model.logits_divisor divides the
logits. Against the stack written out by hand in float64; streaming through the cache; validation."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import assert_close
from zoo.blocks.base import split_aux
from zoo.config import RecipeError

RECIPE = {
    "model": {"d_model": 32, "n_layers": 3, "vocab_size": 40, "pattern": "ASM",
              "blocks": {"A": {"type": "attn", "n_heads": 4, "rope_base": None, "scale": 0.3},
                         "S": {"type": "swa", "n_heads": 2, "window": 4, "block_size": 3},
                         "M": {"type": "mamba2", "d_state": 8, "head_dim": 16, "chunk_size": 4, "ffn": "none"}},
              "ffn": {"type": "swiglu", "hidden": 48},
              "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_divisor": 8.0},
    "train": {"seq_len": 32},
}


def build(**model):
    torch.manual_seed(0)
    raw = {**RECIPE, "model": {**RECIPE["model"], **model}}
    m = zoo.build_model(zoo.load_recipe(raw)).double()
    for p in m.parameters():   # weights of order 1 so that every multiplier moves the logits visibly
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return m


def by_hand(model, ids):
    c = model.recipe.model
    x = model.embed(ids) * c.embedding_multiplier
    for layer in model.layers:
        x = x + c.residual_multiplier * split_aux(layer.mixer(layer.mixer_norm(x)))[0]
        if layer.ffn is not None:
            x = x + c.residual_multiplier * split_aux(layer.ffn(layer.ffn_norm(x)))[0]
    return model.lm_head(model.norm(x)) / c.logits_divisor


@pytest.mark.parametrize("tie", [False, True])
def test_multipliers_match_the_stack_by_hand(tie):
    model = build(tie_embeddings=tie)
    ids = torch.randint(0, 40, (2, 13))
    with torch.no_grad():
        got, want = model(ids).logits, by_hand(model, ids)
        plain = build(tie_embeddings=tie, embedding_multiplier=1.0, residual_multiplier=1.0, logits_divisor=1.0)
        assert plain(ids).logits.sub(got).abs().max() > 1e-2   # the fields do something
    assert_close(got, want, 1e-12)


def test_loss_uses_the_divided_logits():
    model = build()
    ids = torch.randint(0, 40, (2, 9))
    out = model(ids, labels=ids)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    assert_close(out.loss, want, 1e-12)


def test_streaming_through_the_cache_equals_whole():
    model = build().eval()
    ids = torch.randint(0, 40, (2, 15))
    with torch.no_grad():
        whole = model(ids).logits
        cache = model.init_cache(2)
        parts = [model(ids[:, s:e], cache=cache).logits for s, e in ((0, 1), (1, 6), (6, 7), (7, 15))]
    assert_close(torch.cat(parts, 1), whole, 1e-10)


@pytest.mark.parametrize("field", ["embedding_multiplier", "residual_multiplier", "logits_divisor"])
@pytest.mark.parametrize("value", [0.0, -2.0])
def test_non_positive_multipliers_are_refused_naming_the_field(field, value):
    with pytest.raises(RecipeError, match=rf"model\.{field}: must be > 0"):
        zoo.load_recipe({**RECIPE, "model": {**RECIPE["model"], field: value}})


def test_recipe_round_trips_the_multipliers():
    recipe = zoo.load_recipe(RECIPE)
    again = zoo.load_recipe(recipe.to_dict())
    assert (again.model.embedding_multiplier, again.model.residual_multiplier, again.model.logits_divisor) == \
        (12.0, 0.22, 8.0)
