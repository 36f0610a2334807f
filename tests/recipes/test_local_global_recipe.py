"""recipes/local-global.yaml is recipes/transformer.yaml with five of every six layers' attention windowed: the same
weights give the same logits up to the window's length, and other logits past it."""
import torch

import zoo

SMALL = ["model.d_model=32", "model.n_layers=6"]


def test_local_global_is_the_transformer_with_windowed_layers():
    torch.manual_seed(0)
    local = zoo.build_model(zoo.load_recipe("recipes/local-global.yaml", SMALL + ["model.blocks.S.window=16",
                                                                                  "model.blocks.S.block_size=8"]))
    full = zoo.build_model(zoo.load_recipe("recipes/transformer.yaml", SMALL))
    full.load_state_dict(local.state_dict())
    assert [type(layer.mixer).__name__ for layer in local.layers] == ["SlidingWindowAttention"] * 5 + \
        ["Attention"]
    ids = torch.randint(0, 256, (2, 41))
    with torch.no_grad():
        a, b = local(ids).logits, full(ids).logits
    torch.testing.assert_close(a[:, :16], b[:, :16], rtol=1e-5, atol=1e-5)
    assert (a[:, 16:] - b[:, 16:]).abs().amax() > 1e-3
