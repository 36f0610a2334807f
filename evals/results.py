"""The results store of a comparison: results.json's cells, how they are keyed and looked up, and the readings of a
cell that the report, the findings and the recall report share (issue 28: one module they all import, none of them
each other's private helpers).

    results = {"meta": {...}, "recipes": {name: {...}}, "cells": {cell_key(recipe, eval, scheme, context): {...}}}
"""
from __future__ import annotations

import math
from typing import Optional

from evals.bootstrap import proportion_interval


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
