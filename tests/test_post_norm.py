"""A letter's `norm_position: post`: x + norm(mixer(x)), x + norm(ffn(x)) (OLMo 2's and OLMo-Hybrid's attention
layers), beside pre-norm letters; through the cache; named in errors; round-tripped by the recipe."""
import pytest
import torch

import zoo
from tests.helpers import assert_close

RECIPE = {"name": "post-norm", "model": {"d_model": 16, "n_layers": 2, "vocab_size": 40, "pattern": "PA",
          "blocks": {"P": {"type": "attn", "n_heads": 2, "norm_position": "post"}, "A": {"type": "gated_deltanet",
                                                                              "n_heads": 2, "head_k_dim": 8}}},
          "train": {"seq_len": 32}}


def test_post_norm_layer_is_the_sum_written_out():
    torch.manual_seed(0)
    model = zoo.build_model(RECIPE).double()
    layer = model.layers[0]
    assert layer.post_norm and not model.layers[1].post_norm
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    h = x + layer.mixer_norm(layer.mixer(x))
    want = h + layer.ffn_norm(layer.ffn(h))
    got, _ = layer(x)
    assert_close(got, want, 1e-12)


def test_post_norm_streams_through_the_cache_and_round_trips():
    torch.manual_seed(1)
    model = zoo.build_model(RECIPE).double().eval()
    ids = torch.randint(0, 40, (2, 13))
    with torch.no_grad():
        whole = model(ids).logits
        cache = model.init_cache(2)
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(13)], 1)
    assert_close(steps, whole, 1e-10, "token by token")
    again = zoo.load_recipe(model.recipe.to_dict())
    assert again.layers[0].norm_position == "post" and again.layers[1].norm_position == "pre"
    assert "norm_position" not in again.to_dict()["model"]["blocks"]["A"]   # pre-norm recipes read as before


def test_a_bad_norm_position_names_the_field():
    bad = {**RECIPE, "model": {**RECIPE["model"], "blocks": {**RECIPE["model"]["blocks"],
                                                             "P": {"type": "attn", "n_heads": 2, "norm_position": "sandwich"}}}}
    with pytest.raises(zoo.RecipeError, match=r"model.blocks.P.norm_position: 'sandwich'; allowed: pre, post"):
        zoo.load_recipe(bad)


def test_zero_centred_norms_scale_by_one_plus_weight():
    """model.zero_centred_norm: every layer and the final RMSNorm start at w = 0 and scale by 1 + w, in training
    (zoo.ops.norm) and in evaluation alike."""
    recipe = {**RECIPE, "model": {**RECIPE["model"], "zero_centred_norm": True}}
    model = zoo.build_model(recipe).double()
    norms = [model.norm] + [n for layer in model.layers for n in (layer.mixer_norm, layer.ffn_norm)]
    assert all(n.zero_centred and torch.all(n.weight == 0) for n in norms)
    with torch.no_grad():
        model.norm.weight.normal_(0.0, 0.3)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.norm.eps) * (1 + model.norm.weight)
    assert_close(model.norm(x), want, 1e-12, "training path")
    with torch.no_grad():
        assert_close(model.norm(x), want, 1e-12, "evaluation path")
