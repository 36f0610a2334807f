"""Scale a recipe to a parameter count: the sizes `zoo compare` and `zoo pretrain --match-params` train at.

    overrides, n = match_params(recipe, 1_000_000)   # ["model.d_model=112", "model.ffn.mult=4.192", ...], 1,004,976
    zoo.load_recipe(recipe.to_dict(), overrides)

d_model moves in steps every block accepts (each block config's `width_step()`: heads that divide it with an
even head dimension, an inner width in whole heads); where those steps are coarse, the feed-forward width
(a float multiple) closes the gap.
"""
from __future__ import annotations

import math

from zoo.config import RecipeError, load_recipe
from zoo.model import build_model


def width_step(recipe) -> int:
    """The d_model multiple every layer's block builds at."""
    return math.lcm(1, *(spec.cfg.width_step() for spec in [*recipe.layers, *recipe.shared.values()]))


def ffn_overrides(recipe, mult: float) -> list:
    """Set the feed-forward width `mult` of the default FFN and of every block (and shared block) that inherits it
    (a loaded recipe spells each block's FFN out, so the default alone would change nothing)."""
    default = recipe.model.ffn
    if default.type == "none" or default.hidden is not None:
        return []
    model = recipe.to_dict()["model"]
    out = [f"model.{key}.{name}.ffn.mult={mult}" for key in ("blocks", "shared_blocks")
           for name, block in model[key].items()
           if isinstance(block.get("ffn"), dict) and block["ffn"].get("type") != "none"
           and block["ffn"].get("hidden") is None and block["ffn"].get("mult") == default.mult]
    return [f"model.ffn.mult={mult}"] + out if out else []


def params_at(recipe, d_model: int, ffn_mult=None) -> int:
    """Parameters of `recipe` at this width; 0 where the recipe is invalid at it (a width too narrow for a
    fixed field, e.g. rope_dim above the head dimension), so the search grows past it."""
    overrides = [f"model.d_model={d_model}"] + (ffn_overrides(recipe, ffn_mult) if ffn_mult is not None else [])
    try:
        return build_model(load_recipe(recipe.to_dict(), overrides)).num_params()["total"]
    except RecipeError:
        return 0


def match_params(recipe, target: int, tolerance: float = 0.02) -> tuple:
    """(overrides, params) that bring `recipe` closest to `target` parameters.

    First d_model, over multiples of `width_step`: parameters grow with d_model, so a binary search finds
    the first multiple at or above the target and its predecessor is the other candidate. At small widths
    those steps are coarse (d_model 112 -> 120 with 4 heads is +15% parameters), so when the closest one
    still misses by more than `tolerance` and the recipe has feed-forward layers, their width (model.ffn.mult,
    a float) is then searched the same way at that d_model. A recipe without either stays off target, and
    the printed sizes say by how much."""
    step = width_step(recipe)
    lo, hi = 1, 1
    while params_at(recipe, hi * step) < target:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if params_at(recipe, mid * step) < target:
            lo = mid + 1
        else:
            hi = mid
    d, n = min(((k * step, params_at(recipe, k * step)) for k in {max(1, hi - 1), hi}),
               key=lambda c: (c[1] == 0, abs(c[1] - target)))   # never a width the recipe refuses
    overrides = [f"model.d_model={d}"]
    if abs(n - target) <= tolerance * target or not ffn_overrides(recipe, 1.0):
        return overrides, n
    lo_m, hi_m = 0.25, 4 * recipe.model.ffn.mult
    for _ in range(30):
        mid_m = (lo_m + hi_m) / 2
        if params_at(recipe, d, mid_m) < target:
            lo_m = mid_m
        else:
            hi_m = mid_m
    mult, n_m = min(((m, params_at(recipe, d, m)) for m in (round(lo_m, 4), round(hi_m, 4))),
                    key=lambda c: abs(c[1] - target))
    if abs(n_m - target) < abs(n - target):
        return overrides + ffn_overrides(recipe, mult), n_m
    return overrides, n
