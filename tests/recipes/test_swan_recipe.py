"""recipes/swan.yaml: sliding-window RoPE layers around global NoPE layers (layers 1 and 5), with the transformer's
weights (a trained transformer converts by continued training), and global layers that read a token no window
reaches."""
import torch

import zoo

SMALL = ["model.d_model=32", "model.n_layers=6"]
WINDOW = ["model.blocks.S.window=8", "model.blocks.S.block_size=4"]


def build(name, overrides=()):
    return zoo.build_model(zoo.load_recipe(f"recipes/{name}.yaml", SMALL + list(overrides)))


def test_swan_layers():
    model = build("swan", WINDOW)
    assert [type(layer.mixer).__name__ for layer in model.layers] == \
        ["SlidingWindowAttention", "Attention"] + ["SlidingWindowAttention"] * 3 + ["Attention"]
    for i in (1, 5):
        cfg = model.layers[i].mixer.cfg
        assert cfg.rope_base is None and cfg.logn_length == 4096


def test_swan_loads_the_transformers_weights():
    """`zoo pretrain swan --init-from pretrained/transformer`: the same tensors, another computation."""
    torch.manual_seed(0)
    full = build("transformer")
    swan = build("swan", WINDOW)
    swan.load_state_dict(full.state_dict(), strict=True)
    ids = torch.randint(0, 256, (2, 29))
    with torch.no_grad():
        a, b = swan(ids).logits, full(ids).logits
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-5)   # one key: RoPE or not, the same
    assert (a[:, 1:] - b[:, 1:]).abs().amax() > 1e-3


def test_global_layers_read_past_every_window():
    """A token 28 back (windows of 8) changes the last logits through the global layers alone: with every
    layer windowed it does not."""
    torch.manual_seed(0)
    swan = build("swan", WINDOW)
    windowed = build("swan", WINDOW + ["model.pattern=S"])
    ids = torch.randint(0, 256, (1, 29))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 256
    with torch.no_grad():
        assert (swan(ids).logits[0, -1] - swan(other).logits[0, -1]).abs().amax() > 1e-4
        torch.testing.assert_close(windowed(ids).logits[0, -1], windowed(other).logits[0, -1])
