"""Long-context training on CPU: tokens/s and peak memory per rank of one training step (forward, backward, AdamW)
at each length and ring size W, for the compared recipes at ~1M parameters (sized as `zoo pretrain` sizes them).

Each cell is W fresh gloo processes, one torch thread each, batch 1, the zigzag layout
(evals.context_parallel.cp_cell): `seconds` is the slowest rank's step, tokens/s = length / seconds (the ring
trains one sequence of `length` tokens per step), `peak` the largest rank's peak RSS above its warmed-up baseline.
`--checkpointing` turns on train.activation_checkpointing (recompute each layer in the backward).

    .venv/bin/python benchmarks/bench_long_train.py                                  # 2K-16K, W 1 and 2
    .venv/bin/python benchmarks/bench_long_train.py --recipes mamba2 --lengths 8192 --checkpointing
"""
from __future__ import annotations

import argparse

from benchmarks.harness import Table, command_line, print_summary
from evals.runs import resolve
from zoo.sizing import match_params
from evals.context_parallel import cp_cell


def sized(name: str, overrides: list) -> dict:
    import zoo
    recipe, _ = resolve(name, overrides)
    extra, _ = match_params(recipe, 1_000_000)
    return zoo.load_recipe(recipe.to_dict(), extra).to_dict()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="transformer,swa,mamba2,taipan,samba")
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--world-sizes", default="1,2")
    ap.add_argument("--checkpointing", action="store_true", help="train.activation_checkpointing=true")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    args = ap.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    worlds = [int(v) for v in args.world_sizes.split(",")]
    print(f"one training step, batch 1, float32, 1 thread per rank, zigzag; activation checkpointing "
          f"{'on' if args.checkpointing else 'off'}; tokens/s and peak MiB of the largest rank")
    table = Table(["recipe", "length"] + [f"W={w} tok/s" for w in worlds] + [f"W={w} MiB/rank" for w in worlds],
                  stream=True)
    summary = {}
    for name in args.recipes.split(","):
        over = [f"train.seq_len={max(lengths)}", f"train.activation_checkpointing={str(args.checkpointing).lower()}"]
        recipe = sized(name, over)
        for length in lengths:
            cells = {w: cp_cell(recipe, length, w, optimizer_step=True, evaluate=False, timeout=args.timeout)
                     for w in worlds}
            speed = [f"{length / c['seconds']:,.0f}" if c["status"] == "ok" else c["status"] for c in cells.values()]
            mem = [f"{c['peak_bytes'] / 2**20:,.0f}" if c["status"] == "ok" else c["status"] for c in cells.values()]
            table.add([name, length] + speed + mem)
            summary[f"{name}@{length}"] = {f"W{w}": {k: c.get(k) for k in ("status", "seconds", "peak_bytes",
                                                                         "per_rank_peak_bytes")}
                                           for w, c in cells.items()}
    print_summary({"bench": "long_train", "command": command_line(), "checkpointing": args.checkpointing,
                   "results": summary})


if __name__ == "__main__":
    main()
