"""RULER's synthetic tasks (zoo.data.ruler) on a model, and their table, heat map and finding in the report.

    grid = ruler_grid(model, ["niah_single", "vt"], lengths=[1024, 4096], n_trials=8)

Each prompt is decoded greedily through the model's cache (evals.recall.greedy_answer) for the task's budget, the
generation read as text, and scored as RULER scores: the fraction of the expected strings it contains. A cell
(task, length) pools the answers of its prompts: hits of refs, with a Wilson interval (the prompts of a task expect
the same number of answers, so the pooled rate is the mean of RULER's per-prompt scores).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from evals.bootstrap import proportion_interval
from evals.recall import greedy_answer
from evals.render import pyplot
from zoo.data.ruler import check_tasks, ruler_sample, score
from zoo.data.synthetic import default_tokenizer


@torch.no_grad()
def ruler_grid(model, tasks: Sequence[str], lengths: Sequence[int], n_trials: int, seed: int = 0, tokenizer=None,
               device=None) -> list:
    """One cell per (task, length): {"task", "length", "trials", "hits", "refs", "score", "interval", "example"};
    prompt i of a cell from seed [seed, i]."""
    check_tasks(tasks)
    if n_trials < 1:
        raise ValueError(f"n_trials: must be >= 1, got {n_trials}")
    tok = default_tokenizer(tokenizer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for task in tasks:
            for length in lengths:
                hits = refs = 0
                example = None
                for i in range(n_trials):
                    s = ruler_sample(task, length, [seed, i], tok)
                    ids = greedy_answer(model, torch.tensor([s.input_ids], device=device), s.max_new_tokens)
                    text = tok.decode(ids[0].tolist())
                    hits, refs = hits + score(text, s.answers), refs + len(s.answers)
                    example = example or {"answers": s.answers, "generated": text[:200]}
                out.append({"task": task, "length": length, "trials": n_trials, "hits": hits, "refs": refs,
                            "score": hits / refs, "interval": list(proportion_interval(hits, refs)),
                            "example": example})
    finally:
        model.train(was_training)
    return out


def _cells(results: dict) -> dict:
    """(model, task) -> {length: cell} from results["ruler"] (`zoo recall ruler`'s results.json)."""
    grid = {}
    for run in (results.get("ruler") or {}).get("runs", []):
        for cell in run["cells"]:
            grid.setdefault((run["model"], cell["task"]), {})[cell["length"]] = cell
    return grid


def ruler_table(results: dict) -> Optional[str]:
    """The heat map as a table: a row per (model, task), a column per length; score % [95% interval]."""
    grid = _cells(results)
    if not grid:
        return None
    lengths = sorted({n for row in grid.values() for n in row})
    lines = ["| model | task | " + " | ".join(f"{n:,}" for n in lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    for (model, task), row in grid.items():
        cells = [f"{100 * row[n]['score']:.0f}% [{100 * row[n]['interval'][0]:.0f}, {100 * row[n]['interval'][1]:.0f}]"
                 if n in row else "-" for n in lengths]
        lines.append(f"| {model} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ruler_text(results: dict) -> str:
    meta = (results.get("ruler") or {}).get("meta", {})
    return (f"RULER's synthetic tasks (zoo.data.ruler; no downloads: the repeated-sentence haystack for its essay "
            f"ones), {meta.get('trials', '?')} prompts per cell, greedy decoding; score: the share of the expected "
            f"strings generated, [95% Wilson interval over the answers]. From `{meta.get('command', '?')}` "
            f"({(results.get('ruler') or {}).get('source', '?')}).")


def plot_ruler(results: dict, path: Path) -> Optional[Path]:
    """The heat map: (model, task) against length, colour the score."""
    grid = _cells(results)
    if not grid:
        return None
    plt = pyplot()
    rows = list(grid)
    lengths = sorted({n for row in grid.values() for n in row})
    data = [[100 * grid[r][n]["score"] if n in grid[r] else float("nan") for n in lengths] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3.5, 0.35 * len(rows) + 1.5), layout="constrained")
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_yticks(range(len(rows)), [f"{m} · {t}" for m, t in rows], fontsize=8)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 50 else "k")
    fig.colorbar(im, ax=ax, label="score (%)")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_title("RULER synthetic tasks", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def ruler_finding(results: dict) -> Optional[str]:
    """Per length, the task scores summed over tasks per model: who retrieves at all, and where scores fall."""
    grid = _cells(results)
    if not grid:
        return None
    models = sorted({m for m, _ in grid})
    per = {}
    for (model, task), row in grid.items():
        for n, c in row.items():
            h, r = per.get((model, n), (0, 0))
            per[(model, n)] = (h + c["hits"], r + c["refs"])
    lengths = sorted({n for _, n in per})
    text = "; ".join(f"{m} " + "/".join(f"{100 * per[(m, n)][0] / per[(m, n)][1]:.0f}%" if (m, n) in per else "-"
                                        for n in lengths) for m in models)
    best = max(models, key=lambda m: sum(per.get((m, n), (0, 1))[0] for n in lengths))
    if all(per[k][0] == 0 for k in per):
        return f"RULER (all tasks pooled) at {'/'.join(f'{n:,}' for n in lengths)} tokens: {text}: no model scores."
    return f"RULER (all tasks pooled) at {'/'.join(f'{n:,}' for n in lengths)} tokens: {text}; most hits: {best}."
