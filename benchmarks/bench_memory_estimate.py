"""The training memory estimate against what a model keeps for backward, recipe by recipe.

For every recipe in recipes/ (at its own widths, `train.seq_len` set to `--length`): zoo.memory's activation
estimate for a batch of `--batch` x `--length` tokens, and what the model's training forward on such a batch
keeps for backward (saved_tensors_hooks: every saved tensor's storage once, the weights left out). A ratio
below 1 means the estimate would let through a run that does not fit. Memory, not time: it may run beside
anything.

    .venv/bin/python benchmarks/bench_memory_estimate.py                       # 2 x 1,024 tokens
    .venv/bin/python benchmarks/bench_memory_estimate.py --length 2048 --recipes kimi-linear zamba2
"""
from __future__ import annotations

import argparse

import torch

import zoo
from benchmarks.harness import ROOT, Table, command_line, print_summary
from zoo.memory import estimate_memory, kept_for_backward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--recipes", nargs="*", help="names in recipes/ (default: all)")
    args = parser.parse_args(argv)
    for flag in ("length", "batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    names = args.recipes or sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    missing = [n for n in names if not (ROOT / "recipes" / f"{n}.yaml").is_file()]
    if missing:
        parser.error(f"--recipes: no recipes/<name>.yaml for {', '.join(missing)}")
    torch.set_num_threads(1)
    print(f"`{command_line()}`\n")
    table = Table(["recipe", "estimate (MiB)", "kept for backward (MiB)", "estimate / kept"], "lrrr", stream=True)
    results = {}
    for name in names:
        recipe = zoo.load_recipe(ROOT / "recipes" / f"{name}.yaml", [f"train.seq_len={args.length}"])
        est = estimate_memory(recipe, training=True, batch_size=args.batch, seq_len=args.length).activation_bytes
        torch.manual_seed(0)
        model = zoo.build_model(recipe)
        ids = torch.randint(0, recipe.model.vocab_size, (args.batch, args.length))
        kept = kept_for_backward(lambda: model(ids, labels=ids), list(model.parameters()))
        results[name] = est / kept
        table.add([name, f"{est / 2**20:,.1f}", f"{kept / 2**20:,.1f}", f"{est / kept:.2f}"])
    print_summary({"bench": "memory_estimate", "length": args.length, "batch": args.batch, "ratios": results})


if __name__ == "__main__":
    main()
