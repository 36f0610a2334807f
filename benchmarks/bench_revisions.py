"""One training step, or decoding, of recipes at two git revisions of zoo, side by side: did a change cost speed?

    .venv/bin/python benchmarks/bench_revisions.py --base 04d0247 --recipes transformer taipan mamba2
    .venv/bin/python benchmarks/bench_revisions.py --base HEAD~3 --head HEAD --length 2048 --rounds 5
    .venv/bin/python benchmarks/bench_revisions.py --base fb2fd7d --kind decode --length 4096

Each revision is checked out in a temporary git worktree; every measurement is a fresh process of this
interpreter importing zoo from that worktree (PYTHONPATH, run from a neutral directory), alternating between the
revisions round by round so that machine load falls on both alike. A measurement builds the recipe at ~1M
parameters (this checkout's zoo.sizing, the same sizes for both), float32, one thread, batch 1, and
times forward + backward + AdamW step on `--length` tokens after one warm-up step: the least CPU seconds of
`--steps` steps. `--kind decode`: 32 single-token steps through the model's cache after a `--length`-token
prefill (not timed), the least CPU seconds of `--steps` such runs, each from a fresh prefill. Ratios head / base
above 1 mean the head is slower.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import ROOT, Table, command_line, print_summary

# Each child: the recipe at the given sizes from the worktree's recipes/, seeded, then its kind's timing loop.
SETUP = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import zoo
name, overrides, length, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
recipe = zoo.load_recipe(f"{sys.argv[5]}/recipes/{name}.yaml", overrides + [f"train.seq_len={max(length, 512)}"])
torch.manual_seed(0)
model = zoo.build_model(recipe)
ids = torch.randint(0, recipe.model.vocab_size, (1, length))
best = float("inf")
"""
TRAIN = r"""
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
for i in range(steps + 1):
    t = time.process_time()
    out = model(ids, labels=ids)
    (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i:
        best = min(best, time.process_time() - t)
"""
# 32 decoding steps after a prefill of `ids`, through the model's own cache (ZooLM.init_cache: every revision
# since issue 10)
DECODE = r"""
model.eval()
tokens = torch.randint(0, recipe.model.vocab_size, (1, 32))
with torch.no_grad():
    for i in range(steps + 1):
        cache = model.init_cache(1)
        model(ids, cache=cache)
        t = time.process_time()
        for j in range(32):
            model(tokens[:, j:j + 1], cache=cache)
        if i:
            best = min(best, time.process_time() - t)
"""
REPORT = r"""
print(json.dumps({"cpu_s": best, "module": zoo.__file__}))
"""
CHILDREN = {"train": SETUP + TRAIN + REPORT, "decode": SETUP + DECODE + REPORT}


def measure(tree: Path, name: str, overrides: list, length: int, steps: int, kind: str = "train") -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILDREN[kind], name, json.dumps(overrides), str(length), str(steps),
                          str(tree)], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["module"].startswith(str(tree)), f"imported {rec['module']}, not the worktree {tree}"
    return rec["cpu_s"]


def sizes(tree: Path, names: list) -> dict:
    """{recipe: overrides} at ~1M parameters (this checkout's zoo.sizing on the head tree's recipes), so that
    both revisions build the same model."""
    import zoo
    from zoo.sizing import match_params
    return {n: match_params(zoo.load_recipe(tree / "recipes" / f"{n}.yaml"), 1_000_000)[0] for n in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the revision before the change (a commit, tag or HEAD~n)")
    ap.add_argument("--head", default="HEAD")
    ap.add_argument("--recipes", nargs="+", default=["transformer", "taipan", "mamba2"])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kind", choices=sorted(CHILDREN), default="train",
                    help="train: forward + backward + AdamW on --length tokens; decode: 32 steps after a prefill")
    args = ap.parse_args(argv)
    for side in ("base", "head"):   # checked before any worktree or measurement
        rev = getattr(args, side)
        if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True).returncode:
            ap.error(f"--{side}: {rev!r} is not a commit of {ROOT}")
    missing = [n for n in args.recipes if not (ROOT / "recipes" / f"{n}.yaml").is_file()]
    if missing:
        ap.error(f"--recipes: no recipes/<name>.yaml for {', '.join(missing)}")
    trees = {}
    try:
        for side in ("base", "head"):
            rev = getattr(args, side)
            tree = Path(tempfile.mkdtemp(prefix=f"zoo-{side}-"))
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
            trees[side] = tree
        sized = sizes(trees["head"], args.recipes)
        table = Table(["recipe", args.kind, "length", "base CPU s", "head CPU s", "head / base"], "llrrrr",
                      stream=True)
        rows = []
        for name in args.recipes:
            best = {"base": float("inf"), "head": float("inf")}
            for r in range(args.rounds):
                for side in (("base", "head") if r % 2 == 0 else ("head", "base")):
                    best[side] = min(best[side], measure(trees[side], name, sized[name], args.length, args.steps,
                                                         args.kind))
            table.add([name, args.kind, f"{args.length:,}", f"{best['base']:.3f}", f"{best['head']:.3f}",
                       f"{best['head'] / best['base']:.3f}"])
            rows.append({"recipe": name, "kind": args.kind, "length": args.length, **best})
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"\n{command_line()}  (base {args.base}, head {args.head})")
    print_summary({"rows": rows})


if __name__ == "__main__":
    main()
