"""Mamba-2 block fields for imported hybrids (issue 19): the inner width from n_heads x head_dim
(Nemotron-H, Falcon-H1), the gated RMSNorm's eps, no output norm (Falcon-H1 mamba_rms_norm: false) and
the step-size clamp dt_limit (Nemotron-H). Each against the loop-over-time ops in float64, outputs and
every gradient; the cache contract, state bytes and the recipe errors that name the field."""
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import assert_block_matches, assert_close, cache_bytes, check_cache_contract
from zoo.config import RecipeError
from zoo.ops.conv import causal_conv1d_ref
from zoo.ops.ssd import ssd_scan_ref
from zoo.registry import get_block

D_MODEL = 16
CASES = {
    # 3 heads of 8: d_inner 24, which expand x d_model cannot give
    "n_heads": {"d_state": 4, "head_dim": 8, "n_heads": 3, "chunk_size": 5},
    "n_heads_groups": {"d_state": 4, "head_dim": 4, "n_heads": 6, "n_groups": 3, "chunk_size": 4, "expand": 1},
    "norm_eps": {"d_state": 6, "head_dim": 8, "chunk_size": 5, "norm_eps": 0.5},
    "no_norm": {"d_state": 6, "head_dim": 8, "n_groups": 2, "chunk_size": 5, "norm": False},
    "dt_limit": {"d_state": 5, "head_dim": 8, "chunk_size": 4, "dt_limit": [0.3, 1.2]},
    "dt_floor": {"d_state": 5, "head_dim": 4, "n_heads": 5, "chunk_size": 3, "dt_limit": [0.4, math.inf],
                 "norm_eps": 1e-3},
}


def make(case, dtype=torch.float64):
    entry = get_block("mamba2")
    block = entry.cls(D_MODEL, entry.config(**CASES[case]), layer_idx=0).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


def reference(block, x):
    """The mixer written out: the width from the config, steps clamped by hand, the norm with its eps."""
    b, length, _ = x.shape
    cfg = block.cfg
    h = cfg.n_heads or cfg.expand * D_MODEL // cfg.head_dim
    d_inner, g, n = h * cfg.head_dim, cfg.n_groups, cfg.d_state
    z, xBC, dt = block.in_proj(x).split([d_inner, d_inner + 2 * g * n, h], dim=-1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), block.conv1d.weight[:, 0], block.conv1d.bias,
                            activation="silu").transpose(1, 2)
    xs, B, C = xBC.split([d_inner, g * n, g * n], dim=-1)
    steps = F.softplus(dt + block.dt_bias).clamp(*cfg.dt_limit)
    y = ssd_scan_ref(xs.reshape(b, length, h, cfg.head_dim), steps, -block.A_log.exp(), B.reshape(b, length, g, n),
                     C.reshape(b, length, g, n), D=block.D)
    gated = y.reshape(b, length, d_inner) * F.silu(z)
    if cfg.norm:
        grouped = gated.reshape(b, length, g, -1)
        gated = (grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).reshape(b, length, -1)
        gated = gated * block.norm.weight
    return block.out_proj(gated)


def test_the_fields_change_the_block():
    assert make("n_heads").d_inner == 24 and make("n_heads").in_proj.out_features == 24 + 24 + 8 + 3
    assert make("no_norm").norm is None and "norm.weight" not in dict(make("no_norm").named_parameters())
    block = make("dt_limit")
    steps = block.step_sizes(torch.randn(2, 9, block.n_heads, dtype=torch.float64))
    assert steps.min() >= 0.3 and steps.max() <= 1.2


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [1, 13])
def test_block_matches_reference(case, length):
    torch.manual_seed(0)
    block = make(case)
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64, requires_grad=True)
    if case.startswith("dt_"):  # the clamp is active on some steps and not on others
        steps = F.softplus(block.split_input(x)[2] + block.dt_bias)
        lo, hi = block.cfg.dt_limit
        assert length == 1 or ((steps < lo).any() or (steps > hi).any()) and ((steps > lo) & (steps < hi)).any()
    assert_block_matches(block, x, reference, 1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_cache_contract(case):
    torch.manual_seed(1)
    block = make(case)
    check_cache_contract(block, torch.randn(2, 17, D_MODEL, dtype=torch.float64), tol=1e-10,
                         splits=((1,), (3, 5), (17,)))


@pytest.mark.parametrize("case", ["n_heads", "no_norm"])
def test_state_bytes_is_the_cache_size(case):
    block = make(case)
    cache = block.init_cache(2, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        block(torch.randn(2, 7, D_MODEL, dtype=torch.float64), cache=cache)
    assert cache_bytes(cache) == block.state_bytes(7, 2, torch.float32)


def test_packed_documents():
    """seq_idx with a clamp: each document alone equals its slice of the packed run."""
    torch.manual_seed(2)
    block = make("dt_floor")
    x = torch.randn(1, 12, D_MODEL, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = block(x, seq_idx=seq_idx)
        alone = torch.cat([block(x[:, :5]), block(x[:, 5:])], 1)
    assert_close(packed, alone, 1e-10)


def test_recipe_round_trips_and_builds():
    raw = {"model": {"d_model": 32, "n_layers": 2, "vocab_size": 40, "pattern": "M",
                     "blocks": {"M": {"type": "mamba2", "d_state": 8, "head_dim": 8, "n_heads": 5, "norm": False,
                                      "dt_limit": [0.001, math.inf], "norm_eps": 1e-6, "ffn": "none"}}},
           "train": {"seq_len": 16}}
    recipe = zoo.load_recipe(raw)
    again = zoo.load_recipe(recipe.to_dict())
    assert again.layers[0].cfg == recipe.layers[0].cfg and recipe.layers[0].cfg.dt_limit == [0.001, math.inf]
    model = zoo.build_model(recipe)
    assert model.layers[0].mixer.d_inner == 40
    ids = torch.randint(0, 40, (2, 9))
    model(ids, labels=ids).loss.backward()


@pytest.mark.parametrize("fields,message", [
    ({"n_heads": 0}, "model.blocks.M.n_heads: must be >= 1, got 0"),
    ({"n_heads": 4, "n_groups": 3}, "model.blocks.M.n_groups: 3 does not divide n_heads 4"),
    ({"norm_eps": 0.0}, "model.blocks.M.norm_eps: must be > 0"),
    ({"dt_limit": [0.1]}, "model.blocks.M.dt_limit: must be [lo, hi]"),
    ({"dt_limit": [0.5, 0.1]}, "model.blocks.M.dt_limit: must be [lo, hi]"),
    ({"norm": "maybe"}, "model.blocks.M.norm"),
])
def test_recipe_errors_name_the_field(fields, message):
    raw = {"model": {"d_model": 32, "n_layers": 1, "pattern": "M", "blocks": {"M": {"type": "mamba2", **fields}}}}
    with pytest.raises(RecipeError) as err:
        zoo.load_recipe(raw)
    assert str(err.value).startswith(message), str(err.value)
