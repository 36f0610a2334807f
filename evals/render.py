"""Markdown tables and matplotlib figures as every report section writes them."""
from __future__ import annotations

import math
from pathlib import Path


def interval(iv, signed: bool = False) -> str:
    """"[lo, hi]" to three decimals; signed: with + and - (a difference)."""
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"[{f.format(iv[0])}, {f.format(iv[1])}]"


def log2_middle(lo: int, hi: int) -> float:
    """Where a bucket [lo, hi) sits on a log axis (its geometric middle; lo 0 counts as 1)."""
    return math.sqrt(max(lo, 1) * hi)


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
