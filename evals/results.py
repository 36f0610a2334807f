"""The results store of a comparison: results.json's cells, how they are keyed and looked up, and the readings of a
cell that the report, the findings and the recall report share (issue 28: one module they all import, none of them
each other's private helpers).

    results = {"meta": {...}, "recipes": {name: {...}}, "cells": {cell_key(recipe, eval, scheme, context): {...}}}
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from evals.bootstrap import proportion_interval
from zoo.train.run_dir import move_aside


def cell_key(recipe: str, eval_name: str, scheme: str, context) -> str:
    return f"{recipe}|{eval_name}|{scheme}|{'doc' if context is None else context}"


def cells(results: dict, eval_name: str, scheme: Optional[str] = None) -> list:
    return [c for c in results.get("cells", {}).values()
            if c["eval"] == eval_name and (scheme is None or c["scheme"] == scheme)]


def recipes(results: dict) -> list:
    return list(results.get("recipes", {}))


def lookup(results: dict, recipe, eval_name, scheme, context) -> Optional[dict]:
    return results.get("cells", {}).get(cell_key(recipe, eval_name, scheme, context))


def contexts(cs: list) -> list:
    return sorted({c["context"] for c in cs if isinstance(c["context"], int)})


def bpb_interval(c: dict) -> Optional[tuple]:
    """A cell's (or bucket's) bits/byte interval; None where it has none (results from before issue 16)."""
    iv = c.get("bits_per_byte_ci")
    if not iv or any(v is None or math.isnan(v) for v in iv):
        return None
    return tuple(iv)


def throughput_range(c: dict, clock: str = "wall") -> tuple:
    """(value, (median, best)) in tokens per second of `clock` (wall / cpu): the best repeat and the
    range the repeats spanned; no range for a single-repeat or older cell."""
    best, med = ((c.get("tokens_per_s"), c.get("tokens_per_s_median")) if clock == "wall"
                 else (c.get("tokens_per_cpu_s"), c.get("tokens_per_cpu_s_median")))
    return best, ((med, best) if med is not None and best is not None and c.get("repeats", 1) > 1 else None)


def verdict_difference(c: dict, row: dict) -> tuple:
    """(difference, interval, against what) that an extrapolation cell's verdict read for one bucket row."""
    if c.get("basis") == "bounded history" and "vs_bounded" in row:
        return row["vs_bounded"], row["vs_bounded_ci"], f"history cut to {c.get('train_len')}"
    return row["difference"], row["difference_ci"], (c.get("reference") or {}).get("label", "reference")


def passkey_accuracy(cell: dict) -> tuple:
    """(mean accuracy, (lo, hi) or None) of a passkey cell: the Wilson 95% interval over its prompts (n_trials at
    each depth) when the cell records how many it asked."""
    acc = cell["accuracy"]
    mean = sum(acc) / len(acc)
    n = cell.get("n_trials")
    if not n:
        return mean, None
    return mean, proportion_interval(round(sum(acc) * n), n * len(acc))


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def pct(value: tuple) -> str:
    mean, iv = value
    return f"{100 * mean:.0f}%" + (f" [{100 * iv[0]:.0f}, {100 * iv[1]:.0f}]" if iv else "")


# -- the file, and whose it is --------------------------------------------------------------------------------------

def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"meta": {}, "recipes": {}, "cells": {}}


def save_results(path: Path, results: dict):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)  # a kill mid-write leaves the previous file, never half of one


def attach_mqar(results: dict, path) -> None:
    """Carry the runs of `zoo recall mqar`'s results.json into results["mqar"] (offline measurements: the
    report says where they come from)."""
    try:
        sweep = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--mqar-results: {path} is not a readable results.json of `zoo recall mqar` ({err})") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list):
        raise ValueError(f"--mqar-results: {path} holds no list of runs (expected `zoo recall mqar`'s results.json)")
    results["mqar"] = {"source": str(path), "meta": sweep.get("meta", {}), "runs": sweep["runs"]}


def attach_ruler(results: dict, path) -> None:
    """Carry the runs of `zoo recall ruler`'s results.json into results["ruler"] (offline, like MQAR)."""
    try:
        runs = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--ruler-results: {path} is not a readable results.json of `zoo recall ruler` ({err})") from None
    if not isinstance(runs, dict) or not isinstance(runs.get("runs"), list) or \
            not all(isinstance(r, dict) and "cells" in r for r in runs["runs"]):
        raise ValueError(f"--ruler-results: {path} holds no runs with cells (expected `zoo recall ruler`'s results.json)")
    results["ruler"] = {"source": str(path), "meta": runs.get("meta", {}), "runs": runs["runs"]}


def setup_of(resolved, args) -> dict:
    """What the cells of a comparison depend on: each recipe as sized (or the checkpoint it was given as), and the
    training budget of the recipes trained here."""
    setup = {r.name: {"recipe": r.to_dict(), "checkpoint": str(c) if c else None} for r, c in resolved}
    if any(c is None for _, c in resolved):
        setup["--budget"] = args.budget
    return json.loads(json.dumps(setup))   # as results.json holds it (tuples as lists)


def own_results(out: Path, results: dict, resolved, args, say) -> dict:
    """The results to continue: those in --out when they are this comparison's (the same recipes and settings), a
    fresh start with --overwrite (the old ones moved aside), an error otherwise: a comparison never reports cells
    of other models beside its own."""
    setup = setup_of(resolved, args)
    held = results.get("meta", {}).get("setup")
    if not results.get("cells") or held == setup:
        results.setdefault("meta", {})["setup"] = setup
        return results
    if held is None:
        difference = "results.json from before comparisons recorded their setup"
    else:
        key = next(k for k in sorted(set(held) | set(setup)) if held.get(k) != setup.get(k))
        difference = (f"{key}: not in this comparison" if key not in setup else f"{key}: not in the one in --out"
                      if key not in held else f"{key}: {_first_difference(held[key], setup[key])}")
    if not args.overwrite:
        raise ValueError(f"--out: {out} holds a comparison of other recipes or settings ({difference}); rerun the "
                         "same comparison to resume it, give another --out, or --overwrite to move it aside")
    moved = move_aside(out, [p.name for p in out.iterdir() if not p.name.startswith("replaced-")
                             and p.name != "compare.lock"])
    say(f"overwrite: moved the previous comparison in {out} ({difference}) to {moved}")
    fresh = {"meta": {**results["meta"], "setup": setup}, "recipes": {}, "cells": {}}
    return fresh


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path or 'value'} was {a!r}, now {b!r}"

