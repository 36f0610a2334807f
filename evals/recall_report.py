"""The recall part of report.md: MQAR by width and key-value pairs (the offline sweep of `zoo recall mqar`,
carried into results.json under "mqar"), and the computed sentences on passkey and MQAR.

results["mqar"] = {"source": path, "meta": {...}, "runs": [mqar_eval records with d_model, seed]}. A point of
the figure is one (recipe, d_model, kv pairs): the mean accuracy over seeds, the seeds' range as its spread.
Two recipes are *separated* at a point when their seed ranges do not overlap, the report's rule for ranking
(`evals.bootstrap.best_and_ties` with the range as the interval).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from evals.bootstrap import best_and_ties
from evals.render import pyplot as _pyplot, table as _table
from evals.results import cells, passkey_accuracy, pct as _pct


def _kv_accuracies(run: dict) -> dict:
    return run.get("by_kv_pairs") or {run["num_kv_pairs"]: {"accuracy": run["accuracy"]}}


def mqar_best_lr(results: dict) -> dict:
    """{(recipe, d_model): lr}: the learning rate of the sweep's grid whose runs score best on average (over seeds
    and key-value counts), Zoology's rule; None for runs that recorded no lr."""
    scores = {}
    for run in results.get("mqar", {}).get("runs", []):
        accs = [r["accuracy"] for r in _kv_accuracies(run).values()]
        scores.setdefault((run["recipe"], run["d_model"]), {}).setdefault(run.get("lr"), []).extend(accs)
    return {key: max(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr])) for key, by_lr in scores.items()}


def mqar_points(results: dict) -> dict:
    """{(recipe, d_model, kv): [accuracy per seed]} from results["mqar"]["runs"] at each (recipe, d_model)'s best
    learning rate (mixed-count runs give a point per count)."""
    best, points = mqar_best_lr(results), {}
    for run in results.get("mqar", {}).get("runs", []):
        if run.get("lr") != best[(run["recipe"], run["d_model"])]:
            continue
        for kv, r in _kv_accuracies(run).items():
            points.setdefault((run["recipe"], run["d_model"], int(kv)), []).append(r["accuracy"])
    return points


def _axes(points: dict) -> tuple:
    recipes = list(dict.fromkeys(r for r, _, _ in points))
    return recipes, sorted({w for _, w, _ in points}), sorted({k for _, _, k in points})


def mqar_table(results: dict) -> str:
    """One row per (recipe, d_model); per kv count: mean accuracy over seeds [min, max]."""
    points = mqar_points(results)
    if not points:
        return ""
    recipes, widths, kvs = _axes(points)
    best_lr, grid = mqar_best_lr(results), len(_lrs(results)) > 1
    rows = []
    for w in widths:
        best = {kv: best_and_ties({r: (sum(a) / len(a), (min(a), max(a))) for r in recipes
                                   if (a := points.get((r, w, kv)))}, lower_is_better=False) for kv in kvs}
        for r in recipes:
            row = [r, str(w)] + ([f"{best_lr[(r, w)]:g}" if best_lr.get((r, w)) is not None else "-"] if grid else [])
            for kv in kvs:
                a = points.get((r, w, kv))
                if not a:
                    row.append("-")
                    continue
                top, ties = best[kv]
                mark = "**" if r == top else ""
                row.append(f"{mark}{100 * sum(a) / len(a):.0f}%{mark} [{100 * min(a):.0f}, {100 * max(a):.0f}]"
                           + (" ≈" if r in ties else ""))
            rows.append(row)
    return _table(["recipe", "d_model"] + (["best lr"] if grid else []) + [f"{kv} kv pairs" for kv in kvs], rows)


def _lrs(results: dict) -> list:
    return sorted({r["lr"] for r in results.get("mqar", {}).get("runs", []) if r.get("lr") is not None})


def mqar_text(results: dict) -> str:
    m = results.get("mqar", {})
    meta, runs = m.get("meta", {}), m.get("runs", [])
    if not runs:
        return ""
    seeds, lrs = sorted({r["seed"] for r in runs}), _lrs(results)
    lr_text = (f" at each learning rate of {', '.join(f'{lr:g}' for lr in lrs)} (each recipe and width shown at "
               "the one that scores best on average, as Zoology does)" if len(lrs) > 1
               else f" at learning rate {lrs[0]:g}" if lrs else "")
    return (f"Zoology's multi-query associative recall (arXiv 2312.04927) in miniature, measured offline by "
            f"`{meta.get('command', 'zoo recall mqar')}` (commit {meta.get('commit', '?')}; results {m.get('source')}): "
            f"each recipe as a {meta.get('layers', '?')}-layer model per d_model, trained from scratch for "
            f"{meta.get('steps', '?')} steps of {meta.get('batch_size', '?')} sequences of {meta.get('seq_len', '?')} "
            f"tokens mixing the key-value counts{lr_text}, vocabulary {meta.get('vocab_size', '?')} (chance "
            f"{100 / (meta.get('vocab_size', 2) - meta.get('vocab_size', 2) // 2):.1f}%), seeds {seeds}; scored on "
            "held-out sequences at each count. Cells: accuracy over every query, mean over seeds [min, max]; bold: "
            "the best at that width and count; ≈: its seed range overlaps the best's, so the two are not ranked.")


def plot_mqar(results: dict, path: Path, title: str = "") -> Optional[Path]:
    """Zoology's figure: accuracy against d_model, a panel per kv count, a line per recipe (seed range shaded)."""
    points = mqar_points(results)
    if not points:
        return None
    recipes, widths, kvs = _axes(points)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(kvs), figsize=(3.4 * len(kvs) + 1, 3.3), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, kv in zip(axes[0], kvs):
        for r in recipes:
            ws = [w for w in widths if (r, w, kv) in points]
            accs = [points[(r, w, kv)] for w in ws]
            mean = [100 * sum(a) / len(a) for a in accs]
            line, = ax.plot(ws, mean, marker="o", label=r)
            ax.fill_between(ws, [100 * min(a) for a in accs], [100 * max(a) for a in accs], alpha=0.2,
                            color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_title(f"{kv} key-value pairs", fontsize=10)
        ax.set_xlabel("d_model")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title or "MQAR accuracy by model width (mean over seeds, range shaded)", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def mqar_finding(results: dict) -> Optional[str]:
    """Per kv count at the widest width that two recipes reached (a sweep may be partial): the best recipe and
    which others its seed range separates from."""
    points = mqar_points(results)
    if not points:
        return None
    recipes, widths, kvs = _axes(points)
    shared = [w for w in widths if len({r for r, w2, _ in points if w2 == w}) > 1]
    if not shared:
        return None
    widths = shared
    parts = []
    for kv in kvs:
        got = {r: points[(r, w, kv)] for r in recipes for w in widths[-1:] if (r, w, kv) in points}
        if len(got) < 2:
            continue
        top, ties = best_and_ties({r: (sum(a) / len(a), (min(a), max(a))) for r, a in got.items()},
                                  lower_is_better=False)
        below = [r for r in got if r != top and r not in ties]
        text = f"{kv} pairs: {top} {100 * sum(got[top]) / len(got[top]):.0f}%"
        if ties:
            text += f" (not separated from {', '.join(ties)})"
        if below:
            text += ", above " + ", ".join(f"{r} {100 * sum(got[r]) / len(got[r]):.0f}%" for r in below)
        parts.append(text)
    if not parts:
        return None
    return (f"MQAR at d_model {widths[-1]} (mean over seeds; ranked only where the seeds' ranges do not overlap): "
            + "; ".join(parts) + ".")


def passkey_finding(results: dict) -> Optional[str]:
    """Per recipe, the mean accuracy at each prompt length: as multiples of its fine-tune's length when the
    cells come from fine-tunes (each recipe its own length), else at the lengths; the best at 4x (the
    issue's goal) or, without it, at the longest, with the recipes its interval does not separate it from."""
    pk = cells(results, "passkey")
    if not pk:
        return None
    by, tuned = {}, {}
    for c in pk:
        scale = c.get("finetune_len")
        if scale:
            tuned[c["recipe"]] = scale
        key = c["context"] / scale if scale else c["context"]
        by.setdefault(c["recipe"], {})[key] = passkey_accuracy(c)
    keys = sorted({k for acc in by.values() for k in acc})
    label = (lambda k: f"{k:g}x") if tuned else str
    rows = "; ".join(f"{r}" + (f" (fine-tuned at {tuned[r]:,})" if r in tuned else "") + " "
                     + "/".join(f"{100 * acc[k][0]:.0f}%" if k in acc else "-" for k in keys) for r, acc in by.items())
    head = ("Passkey after a fine-tune, accuracy at " if tuned else "Passkey (no fine-tune), accuracy at ") + \
        "/".join(map(label, keys)) + (" its length" if tuned else " tokens")
    at = 4 if tuned and 4 in keys else keys[-1]
    got = {r: acc[at] for r, acc in by.items() if at in acc}
    best, ties = best_and_ties(got, lower_is_better=False)
    if best is None or got[best][0] == 0:
        return f"{head}: {rows}; none retrieves at {label(at)}."
    tail = f"; best at {label(at)}: {best} {_pct(got[best])}"
    if ties:
        tail += " (95% interval over the prompts; not separated from " + ", ".join(
            f"{r} {_pct(got[r])}" for r in ties) + ")"
    elif got[best][1]:
        tail += " (95% interval over the prompts)"
    return f"{head}: {rows}{tail}."
