"""KV-memory saving of selective attention's context pruning at equal perplexity (Leviathan, Kalman &
Matias, arXiv 2410.02703, "Context Pruning"), on the built-in corpus (stdlib, byte tokens).

    .venv/bin/python benchmarks/bench_selective_pruning.py --contexts 512 --train     # train if absent, evaluate

Per context C: a small `selective` model and a plain `transformer` of the same shape (the paper's
reference "without selective attention") are trained with the same overrides, then the selective
model's validation perplexity is measured with every selective layer's `kv_budget` set to K for a
decreasing grid of K (the same validation windows for every K). The cache holds at most K keys per
layer, evicting the keys with the largest accumulated selection F (zoo.ops.selective); a budget
K >= C never evicts and equals the unpruned model. Reported per context: the smallest K whose
perplexity is no worse (within --tol-nats) than (a) the unpruned selective model and (b) the transformer, and the KV
saving factor C / K (the paper's figure: attention-module memory of the model without selective
attention over that of the pruned selective model, at the same validation perplexity).

Scoring: disjoint windows of C + 1 tokens from the validation documents at least that long (split
order), the first --max-windows of them; every window starts from an empty cache and is fed whole,
the block attending at once until its cache is full and token by token after that (so the result is
that of decoding); all C targets of a window are scored. Perplexity = exp(mean NLL per byte-token).

Differences from the paper (which trains ~100M-parameter models on C4): tiny models trained for a
few minutes of one CPU core on ~1.6M tokens; one budget shared by all layers first (the paper sets
per-layer budgets), then a greedy per-layer pass that halves one layer's budget at a time while the
perplexity stays no worse. `--mem-loss EPS` trains the selective model with the paper's auxiliary
memory loss (`mem_loss_weight` of the `selective` block, tau = 1); without it the selective model
learns from the language-modelling loss alone.

    .venv/bin/python benchmarks/bench_selective_pruning.py --contexts 512 1024 2048 --train --mem-loss 0.1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import zoo
from benchmarks.harness import ROOT, Table, command_line, print_summary
from zoo.blocks.selective import SelectiveAttention
from zoo.train.checkpoint import latest_checkpoint
from zoo.data import prepared_data

RECIPES = ("selective", "transformer")
N_LAYERS = 4


def train_overrides(context: int, steps: int, mem_loss: float = 0.0) -> list[str]:
    # Same tokens per step at every context (4096), so longer contexts see as many tokens.
    # mem_loss: the paper's eps, averaged over the layers, so each layer's weight is eps / N_LAYERS.
    return ["model.d_model=128", f"model.n_layers={N_LAYERS}", f"train.seq_len={context}",
            f"train.batch_size={max(1, 4096 // context)}", f"train.max_steps={steps}",
            f"train.warmup_steps={max(1, steps // 10)}", "train.eval_every=100", "train.eval_batches=4",
            f"train.save_every={steps}", "train.log_every=50",
            *([f"model.blocks.A.mem_loss_weight={mem_loss / N_LAYERS}"] if mem_loss else [])]


def ensure_trained(recipe: str, context: int, steps: int, runs: Path, train: bool, mem_loss: float = 0.0) -> Path:
    mem_loss = mem_loss if recipe == "selective" else 0.0   # the transformer has nothing to prune
    out = runs / (f"selective-mem{mem_loss:g}-{context}" if mem_loss else f"{recipe}-{context}")
    if latest_checkpoint(out / "checkpoints") is None:
        if not train:
            sys.exit(f"no checkpoint under {out}: pass --train to train it ({recipe}, context {context})")
        cmd = [sys.executable, str(ROOT / "scripts/train.py"), str(ROOT / f"recipes/{recipe}.yaml"),
               *train_overrides(context, steps, mem_loss), "--out", str(out), "--no-progress"]
        print("training: " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return latest_checkpoint(out / "checkpoints")


def val_windows(model, context: int, max_windows: int) -> torch.Tensor:
    data = prepared_data(model.recipe, root=str(ROOT / "data"), log=lambda *a, **k: None)
    file = data.val.file
    tokens, offsets = file.tokens, np.asarray(file.offsets)
    wins = []
    for d in range(len(offsets) - 1):
        doc = np.asarray(tokens[offsets[d]:offsets[d + 1]])
        for s in range(0, len(doc) - context, context):   # windows of context + 1 tokens
            wins.append(doc[s:s + context + 1].astype(np.int64))
            if len(wins) == max_windows:
                return torch.from_numpy(np.stack(wins))
    return torch.from_numpy(np.stack(wins))


def selective_layers(model) -> list:
    return [layer.mixer for layer in model.layers if isinstance(layer.mixer, SelectiveAttention)]


def set_budgets(model, budgets) -> None:
    for mixer, k in zip(selective_layers(model), budgets):
        # one config object per layer, so layers can hold different budgets
        mixer.cfg = dataclasses.replace(mixer.cfg, kv_budget=k)


@torch.no_grad()
def mean_nll(model, windows: torch.Tensor, batch_size: int, through_cache: bool) -> float:
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        ids = windows[b:b + batch_size]
        cache = model.init_cache(ids.shape[0]) if through_cache else None
        logits = model(ids[:, :-1], cache=cache).logits
        total += F.cross_entropy(logits.double().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


class PrunedNLL:
    """Mean NLL of the selective model under per-layer budgets, memoised on disk (keyed by checkpoint,
    windows and budgets), so a re-run, e.g. once the reference model has trained, repeats nothing."""

    def __init__(self, model, windows, batch_size: int, ckpt: Path):
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.path = Path(ckpt).parent.parent / "pruning_nll.json"
        self.prefix = f"{Path(ckpt).resolve()}|{windows.shape[0]}x{windows.shape[1]}|"
        self.memo = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __call__(self, budgets) -> float:
        key = self.prefix + ",".join(map(str, budgets))
        if key not in self.memo:
            set_budgets(self.model, budgets)
            self.memo[key] = mean_nll(self.model, self.windows, self.batch_size, through_cache=True)
            self.path.write_text(json.dumps(self.memo, indent=0))
        return self.memo[key]


def budget_grid(context: int, smallest: int, ratio: float) -> list[int]:
    """context, then `ratio` apart (rounded) down to `smallest`."""
    grid, k = [], float(context)
    while k >= smallest:
        grid.append(round(k))
        k = k / ratio
    return sorted(set(grid), reverse=True)


def evaluate_context(args, context: int, runs: Path) -> dict:
    refs = ["selective"] + [r for r in args.references if r != "selective"]
    ckpt = {r: ensure_trained(r, context, args.steps, runs, args.train, args.mem_loss) for r in refs}
    models = {r: zoo.load_checkpoint(ckpt[r]).eval() for r in refs}
    sel = models["selective"]
    n_layers = len(selective_layers(sel))
    windows = val_windows(sel, context, args.max_windows)
    t0 = time.time()
    ref = {r: mean_nll(models[r], windows, args.batch_size, through_cache=False) for r in refs}
    pruned = PrunedNLL(sel, windows, args.batch_size, ckpt["selective"])
    print(f"\ncontext {context}: {len(windows)} windows x {context} targets; checkpoints "
          f"{', '.join(f'{r}: {ckpt[r]}' for r in refs)}")
    print("unpruned validation perplexity: " + ", ".join(f"{r} {math.exp(ref[r]):.4f}" for r in refs), flush=True)

    curve = {}
    print()
    table = Table(["kv_budget K (every layer)", "KV saving C/K", "ppl", "vs unpruned selective", "vs transformer"],
                  align="rrrrr", stream=True)
    for k in budget_grid(context, args.smallest_budget, args.grid_ratio):
        curve[k] = pruned([k] * n_layers)
        vs = [f"{math.exp(curve[k] - ref[r]) - 1:+.2%}" if r in ref else "-" for r in RECIPES]
        table.add([k, f"{context / k:.1f}x", f"{math.exp(curve[k]):.4f}", vs[0], vs[1]])
    # K = context never evicts: through the cache it must equal the whole-sequence forward.
    exact_gap = abs(curve[context] - ref["selective"])

    result = {"context": context, "mem_loss": args.mem_loss, "windows": len(windows),
              **{f"ppl_{r}": math.exp(ref[r]) for r in refs},
              "ppl_by_budget": {k: round(math.exp(v), 5) for k, v in curve.items()},
              "no_eviction_vs_whole_nll_gap": exact_gap}
    for name in refs:
        ok = [k for k, v in curve.items() if v <= ref[name] + args.tol_nats]
        if not ok:
            result[f"vs_{name}"] = None
            continue
        uniform = min(ok)
        budgets = [uniform] * n_layers
        # Greedy per-layer pass, as the paper's per-layer budgets: halve one layer at a time (deepest
        # first is no better a priori; we go in layer order) while the perplexity stays no worse.
        if args.per_layer:
            for i in range(n_layers):
                while budgets[i] // 2 >= args.smallest_budget:
                    trial = budgets[:i] + [budgets[i] // 2] + budgets[i + 1:]
                    if pruned(trial) <= ref[name] + args.tol_nats:
                        budgets = trial
                    else:
                        break
        result[f"vs_{name}"] = {"uniform_budget": uniform, "uniform_saving": context / uniform,
                                "per_layer_budgets": budgets if args.per_layer else None,
                                "per_layer_saving": (context * n_layers / sum(budgets)) if args.per_layer else None}
    set_budgets(sel, [None] * n_layers)
    print(f"\nno-eviction cache run vs whole forward: |mean NLL gap| {exact_gap:.2e} nats "
          f"(evaluation took {time.time() - t0:.0f} s)")
    for name in refs:
        r = result[f"vs_{name}"]
        ref_name = "the unpruned selective model" if name == "selective" else "the transformer"
        if r is None:
            print(f"no budget on the grid reaches the perplexity of {ref_name}")
            continue
        line = f"equal to {ref_name}: smallest uniform K = {r['uniform_budget']} -> {r['uniform_saving']:.1f}x less KV"
        if args.per_layer:
            line += f"; per-layer greedy {r['per_layer_budgets']} -> {r['per_layer_saving']:.1f}x"
        print(line)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512])
    ap.add_argument("--train", action="store_true", help="train the models that have no checkpoint yet")
    ap.add_argument("--steps", type=int, default=400, help="training steps (4096 tokens each)")
    ap.add_argument("--runs", default="runs/pruning", help="run directories <recipe>-<context> live here")
    ap.add_argument("--max-windows", type=int, default=64, help="validation windows scored per context")
    ap.add_argument("--batch-size", type=int, default=64, help="windows per forward (past the budget the "
                    "cache steps token by token, so one wide batch costs little more than one window)")
    ap.add_argument("--tol-nats", type=float, default=1e-4,
                    help="'no worse' allows this much mean NLL (1e-4 nats = 0.01%% ppl: rounding, not a loss)")
    ap.add_argument("--smallest-budget", type=int, default=4)
    ap.add_argument("--grid-ratio", type=float, default=math.sqrt(2), help="ratio between successive budgets")
    ap.add_argument("--no-per-layer", dest="per_layer", action="store_false",
                    help="skip the greedy per-layer budget pass")
    ap.add_argument("--mem-loss", type=float, default=0.0, metavar="EPS",
                    help="train the selective model with the paper's memory loss, weight EPS averaged over its "
                         "layers (run directory selective-mem<EPS>-<context>); 0: language-modelling loss only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--references", nargs="+", choices=RECIPES, default=list(RECIPES),
                    help="perplexities to match (selective, the unpruned model itself, is always loaded)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"command: `{command_line()}`")
    print(f"CPU, {args.threads} thread(s), torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    runs = (ROOT / args.runs) if not Path(args.runs).is_absolute() else Path(args.runs)
    results = [evaluate_context(args, c, runs) for c in args.contexts]
    print_summary(results)


if __name__ == "__main__":
    main()
