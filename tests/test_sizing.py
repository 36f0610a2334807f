"""zoo.sizing: a recipe scaled to a parameter count, in d_model steps each block config states."""
import pytest

import zoo
from zoo.registry import list_blocks, get_block, register_block
from zoo.sizing import match_params, params_at, width_step

TINY_ATTN = {"name": "tiny-attn", "model": {"d_model": 32, "n_layers": 2, "vocab_size": 256, "pattern": "A",
                                            "ffn": {"type": "swiglu", "mult": 2},
                                            "blocks": {"A": {"type": "attn", "n_heads": 2}}}}


def _params(recipe, overrides):
    return zoo.build_model(zoo.load_recipe(recipe.to_dict(), overrides)).num_params()["total"]


def test_match_params_within_two_percent():
    attn = zoo.load_recipe(TINY_ATTN)
    step = width_step(attn)
    assert step == 4  # 2 heads, even head_dim
    target = 1_000_000
    overrides, n = match_params(attn, target)
    [d_set] = overrides  # fine enough at this width: d_model alone
    d = int(d_set.split("=")[1])
    assert d % step == 0 and n == params_at(attn, d)
    assert abs(n - target) / target < 0.02
    # no other multiple of the step is closer (parameters grow with d_model, so neighbours suffice)
    for other in (d - step, d + step):
        assert abs(params_at(attn, other) - target) >= abs(n - target)


def test_match_params_tunes_the_ffn_when_d_model_steps_are_coarse():
    attn = zoo.load_recipe(TINY_ATTN)
    target = 58_000  # between d_model 44 (55,132) and 48 (61,680): both miss by more than 2%
    overrides, n = match_params(attn, target)
    assert overrides[0] == "model.d_model=44" and overrides[1].startswith("model.ffn.mult=")
    assert overrides[2].startswith("model.blocks.A.ffn.mult=")
    assert abs(n - target) / target < 0.02 and n == _params(attn, overrides)


def test_match_params_grows_past_widths_a_fixed_field_forbids():
    """bamba fixes rope_dim 32: below 4 heads x 32 the recipe is invalid, and the search must grow past it."""
    bamba = zoo.load_recipe("recipes/bamba.yaml")
    assert params_at(bamba, width_step(bamba)) == 0
    overrides, n = match_params(bamba, 2_000_000)
    assert abs(n - 2_000_000) / 2_000_000 < 0.02 and n == _params(bamba, overrides)
    # a target below the narrowest valid width: the narrowest valid one, not an invalid one closer in count
    overrides, n = match_params(bamba, 100_000)
    assert n > 0 and n == _params(bamba, overrides)


# off: a width the block refuses (None where the step is a choice, not a need: taipan without RoPE takes odd
# head dimensions, and its step keeps them even as attention's does)
@pytest.mark.parametrize("block,fields,step,off", [
    ("attn", {"n_heads": 4}, 8, 12),                            # 4 heads of 3: not rotary pairs
    ("attn", {"n_heads": 4, "head_dim": 16}, 1, None),          # head_dim fixed: heads do not divide d_model
    ("swa", {"n_heads": 3, "window": 8}, 6, 9),
    ("taipan", {"n_heads": 2, "window": 8}, 4, None),
    ("mamba", {}, 1, None),
    ("mamba2", {"head_dim": 32, "expand": 2}, 16, 24),           # 2 d / 32 whole heads
    ("mamba2", {"head_dim": 16, "expand": 2, "n_groups": 2}, 16, 24),   # and the heads split into 2 groups
    ("mamba2", {"head_dim": 32, "n_heads": 6}, 1, None),        # the inner width is n_heads x head_dim
    ("parallel", {"branches": [{"type": "attn", "n_heads": 3}, {"type": "mamba2", "head_dim": 8}]}, 12, 18),
    ("none", {}, 1, None),
])
def test_each_block_states_its_width_step_and_builds_at_every_multiple(block, fields, step, off):
    cfg = get_block(block).config(**fields)
    assert cfg.width_step() == step
    for k in (1, 2, 3):   # every multiple passes the block's own checks
        if hasattr(cfg, "check"):
            cfg.check(d_model=k * step * (8 if step == 1 else 1), seq_len=64)
    if off is not None:
        with pytest.raises(ValueError):
            cfg.check(d_model=off, seq_len=64)


def test_every_registered_block_has_a_width_step_and_a_block_without_one_is_refused():
    for name in list_blocks():
        assert isinstance(get_block(name).config().width_step(), int), name
    from dataclasses import dataclass

    @dataclass
    class NoStep:
        width: int = 4

    with pytest.raises(TypeError, match=r"register_block\('nostep'\): .*NoStep needs a width_step\(\) method"):
        register_block("nostep", config=NoStep)
    assert "nostep" not in list_blocks()
