"""Train the compared recipes once, offline, and ship them: the checkpoints `make compare` evaluates.

    zoo pretrain transformer swa mamba2 taipan samba --budget 4M --match-params 1M \
        --set train.seq_len=256 train.batch_size=16 --threads 2 --out pretrained          # = make pretrain

Each recipe is sized as `zoo compare` sizes it (`--match-params`), trained for `--budget` tokens with
the recipe's seed (data order and initialisation are functions of it), and written to OUT/<name>/ as a
checkpoint directory that `zoo compare`, `zoo eval` and zoo.load_checkpoint read: weights in half precision
(`--dtype`, float16 by default; about 2 bytes per parameter), no optimizer state. Beside it OUT/<name>/card.json
and MODEL_CARD.md: the command, commit, parameters, tokens, steps, CPU and wall seconds, threads, and the
validation bits per byte of the shipped (rounded) weights beside gzip -9 on the same bytes.

Long context: a recipe's `train.seq_len_schedule` trains short to long at the same tokens per step; on a
ring of W processes the sequence is split over them (context parallel, exact: the same update as one
process up to summation order), so a length that does not fit one process trains on W:

    torchrun --nproc-per-node 2 -m evals.commands.pretrain transformer --cp 2 --set train.seq_len=4096 ...

Rank 0 writes the run, the checkpoint and the card (which records the world size and cp); the CPU seconds
are summed over the ranks.

Rerunning continues an interrupted recipe from its last checkpoint (OUT/runs/<name>) and skips finished
ones; `--retrain` starts them over. Ends with one machine-readable `summary:` line.
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import zoo
from evals.options import count
from evals.runs import (DTYPES, add_time, budget_steps, check_override_names, parameter_target, resolve, ship,
                        shipped_model_dir, source_commit)
from zoo.sizing import match_params
from evals.compression import compression_bpb
from zoo.data import DataError, prepared_data
from zoo.train.checkpoint import CheckpointError
from zoo.train import launch
from zoo.train.run_dir import RunDirError
from zoo.train.trainer import Trainer, TrainingError, dp_info



def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="recipe names or files")
    ap.add_argument("--out", default="pretrained", help="OUT/<name>/ per recipe, OUT/runs/ for the training runs")
    ap.add_argument("--budget", type=count, default=count("4M"), help="training tokens per recipe")
    ap.add_argument("--match-params", default=None, help="target parameter count (1M) or a recipe's name")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="[NAME:]KEY=VALUE",
                    help="dotlist overrides applied to every recipe before sizing, or (NAME:) to one")
    ap.add_argument("--evals", type=int, default=8, help="validation evaluations along the run (the curve in card.json)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="precision of the shipped weights")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data", default=None, help="prepared data directory (default: prepare the recipe's corpus)")
    ap.add_argument("--retrain", action="store_true", help="start every recipe over, even a finished one")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="start each recipe from the weights shipped in DIR/<name>, or in DIR when it is one shipped "
                         "model (context extension of a short-context checkpoint: optimizer and schedule start "
                         "fresh); the card adds its tokens")
    ap.add_argument("--cp", type=int, default=1,
                    help="context parallel under torchrun: ranks that share one sequence (must divide the world "
                         "size; the rest is data parallel)")
    args = ap.parse_args(argv)
    if args.evals < 1:
        ap.error(f"--evals: expected a positive integer, got {args.evals}")
    return args


def sized_recipes(args, say) -> list:
    """The recipes as compare.py sizes them: (recipe, overrides that sized it)."""
    out = []
    for spec in args.recipes:
        recipe, _ = resolve(spec, args.overrides)
        extra = []
        if args.match_params:
            extra, n = match_params(recipe, parameter_target(args.match_params, args.overrides))
            recipe = zoo.load_recipe(recipe.to_dict(), extra)
            say(f"{recipe.name}: {n:,} parameters ({' '.join(extra)})")
        out.append((recipe, extra))
    check_override_names(args.overrides, [r.name for r, _ in out])
    return out


def train_one(recipe, data, run_dir: Path, args, say):
    """Train to the budget (continuing an interrupted run); (trainer, result, CPU seconds, wall seconds)."""
    t = recipe.train
    steps = budget_steps(t, args.budget)
    every = max(1, steps // args.evals)
    recipe = zoo.load_recipe(recipe.to_dict(), [
        f"train.max_steps={steps}", f"train.warmup_steps={min(t.warmup_steps, steps // 10)}",
        f"train.eval_every={every}", f"train.save_every={every}", "train.keep_last=1",
        f"train.log_every={max(1, steps // 100)}"])
    resume = None if args.retrain or not (run_dir / "checkpoints").is_dir() else "auto"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    init = init_dir(args, recipe.name)
    trainer = Trainer(recipe, data, run_dir, log=say, progress=not args.no_progress, resume=resume,
                      overwrite=resume is None, cp=args.cp, init_from=str(init) if init else None)
    result = trainer.train()
    cpu_s = time.process_time() - cpu0
    if trainer.world > 1:   # every rank's CPU time: the cost of the run, not of one process
        t = torch.tensor([cpu_s], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        cpu_s = t.item()
    return trainer, result, *add_time(run_dir, cpu_s, time.perf_counter() - wall0, trainer.rank == 0)


def init_dir(args, name: str):
    """--init-from's checkpoint directory for recipe `name` (`shipped_model_dir`); None without --init-from."""
    return shipped_model_dir(args.init_from, name, "--init-from") if args.init_from else None


# the fields `train_one` sets from the budget and --evals: not the recipe's own
SCHEDULED = ("max_steps", "warmup_steps", "eval_every", "save_every", "keep_last", "log_every")


def shipped_difference(dest: Path, card: dict, recipe, args) -> str | None:
    """The first setting in which the checkpoint shipped in `dest` differs from what this run would train
    (model and train fields, token budget, starting weights), as "field: shipped X, asked Y"; None when none does."""
    from zoo.train.checkpoint import read_recipe, resolve_checkpoint
    try:
        old = read_recipe(resolve_checkpoint(dest / card["checkpoint"])).to_dict()
    except (CheckpointError, KeyError, OSError):
        return "its checkpoint does not load"
    new = recipe.to_dict()
    for section in ("model", "train"):
        for key in sorted(set(old[section]) | set(new[section])):
            if section == "train" and key in SCHEDULED:
                continue
            if old[section].get(key) != new[section].get(key):
                return f"{section}.{key}: shipped {old[section].get(key)!r}, asked {new[section].get(key)!r}"
    t = recipe.train
    tokens = budget_steps(t, args.budget) * t.batch_size * t.seq_len * t.grad_accum
    if card.get("tokens") != tokens:
        return f"--budget: shipped {card.get('tokens'):,} tokens, asked {tokens:,}"
    base = (card.get("init_from") or {}).get("dir")
    asked = str(init_dir(args, recipe.name)) if args.init_from else None
    if base != asked:
        return f"--init-from: shipped from {base}, asked {asked}"
    return None


def curve(run_dir: Path) -> list:
    """[(step, tokens, val_bpb)] from the run's metrics.jsonl."""
    rows = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        if row.get("val_bpb") is not None:
            rows.append([row["step"], row.get("tokens"), round(row["val_bpb"], 4)])
    return rows


def gzip_on_validation(trainer) -> float:
    """gzip -9 bits per byte on the bytes of the validation batches the model is scored on."""
    ids = torch.cat([b["input_ids"].flatten() for b in trainer.data.val_batches(
        trainer.cfg.eval_batches, trainer.cfg.batch_size, trainer.cfg.seq_len)])
    if trainer.recipe.model.vocab_size != 256:
        return None   # byte tokens only: other tokenizers would need their decoder here
    return round(compression_bpb(bytes(ids.to(torch.uint8).tolist()))["gzip-9"], 4)


def card_text(card: dict) -> str:
    lines = [f"# {card['recipe']} (zoo pretrained checkpoint)", "",
             f"- command: `{card['command']}` (commit {card['commit']})",
             f"- parameters: {card['params']:,}; weights shipped as {card['dtype']}",
             f"- trained: {card['tokens']:,} tokens, {card['steps']} steps of {card['batch_size']} x {card['seq_len']}, "
             f"seed {card['seed']}, {card['threads']} threads" + _schedule_text(card) + _repeats_text(card)
             + _ring_text(card),
             *_init_text(card),
             f"- time: {card['cpu_seconds']:.0f} CPU seconds, {card['wall_seconds']:.0f} wall seconds "
             f"(on {card['machine']})",
             f"- validation: {card['val_bpb']:.4f} bits/byte (shipped weights; float32 {card['val_bpb_float32']:.4f}); "
             f"gzip -9 on the same bytes {card['gzip_bpb']:.4f}" if card.get("gzip_bpb") else
             f"- validation: {card['val_bpb']:.4f} bits/byte", "",
             "Validation curve (step, tokens, bits/byte): " + ", ".join(f"({s}, {t}, {b})" for s, t, b in card["curve"])]
    return "\n".join(lines) + "\n"


def _schedule_text(card: dict) -> str:
    stages = card.get("seq_len_schedule")
    if not stages:
        return ""
    parts = [f"{n} tokens to {until:.0%}" for n, until in stages]
    return f"; short to long: {', '.join(parts)} of the steps, then {card['seq_len']} (same tokens per step)"


def _repeats_text(card: dict) -> str:
    r = card.get("repeats")
    if not r:
        return ""
    what = "a random string written there and" if r.get("source") == "random" else "a span of"
    return (f"; long-range repeats in {r['fraction']:.0%} of the rows ({r['count']} per row, each {what} "
            f"{r['span'][0]}-{r['span'][1]} tokens copied {r['distance'][0]}-{r['distance'][1]} tokens later: "
            "train.repeats)")


def _init_text(card: dict) -> list:
    base = card.get("init_from")
    if not base:
        return []
    return [f"- started from: {base['dir']} ({base['tokens']:,} tokens at {base['seq_len']}, {base['cpu_seconds']:.0f} "
            f"CPU seconds); in all {base['tokens'] + card['tokens']:,} tokens"]


def _ring_text(card: dict) -> str:
    if card.get("world_size", 1) == 1:
        return ""
    return (f"; on {card['world_size']} processes, each sequence split over a ring of {card['cp']} "
            f"(context parallel, layout {card['cp_layout']})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    own_group = launch.init_from_env()
    rank0 = dp_info()[0] == 0
    say = print if rank0 else (lambda *a, **k: None)
    out, shipped = Path(args.out), []
    try:
        recipes = sized_recipes(args, say)
        for recipe, _ in recipes:   # every recipe's starting weights exist before the first one trains
            init_dir(args, recipe.name)
        for recipe, sizing in recipes:
            dest = out / recipe.name
            if (dest / "card.json").is_file() and not args.retrain:
                card = json.loads((dest / "card.json").read_text())
                differs = shipped_difference(dest, card, recipe, args)
                if differs:   # never report another model as this command's result
                    raise ValueError(f"{recipe.name}: {dest} was shipped with other settings ({differs}); "
                                     "--retrain to replace it, or another --out")
                say(f"{recipe.name}: shipped already ({dest}); --retrain to train it again")
                shipped.append(card)
                continue
            data = launch.rank0_first(lambda: prepared_data(recipe, args.data, log=say))
            trainer, result, cpu_s, wall_s = train_one(recipe, data, out / "runs" / recipe.name, args, say)
            if result.stopped:   # a stop before the budget: nothing is shipped; a rerun continues the run
                say(f"{recipe.name}: stopped at step {result.step}, not shipped; rerun to continue")
                return 0
            val32 = result.val_bpb
            path, _, bpb = ship(trainer, recipe, dest, DTYPES[args.dtype])
            if not rank0:
                continue
            card = make_card(trainer, result, recipe, argv, sizing, args, path, dest, bpb, val32, cpu_s, wall_s)
            (dest / "card.json").write_text(json.dumps(card, indent=1) + "\n")
            (dest / "MODEL_CARD.md").write_text(card_text(card))
            say(f"{recipe.name}: {bpb:.4f} bits/byte (gzip -9 {card['gzip_bpb']}) -> {path}")
            shipped.append(card)
    except (zoo.RecipeError, CheckpointError, TrainingError, DataError, RunDirError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if own_group:
            launch.close()
    say("summary: " + json.dumps({c["recipe"]: {"val_bpb": c["val_bpb"], "gzip_bpb": c["gzip_bpb"],
                                                "params": c["params"], "tokens": c["tokens"]} for c in shipped}))
    return 0


def make_card(trainer, result, recipe, argv, sizing, args, path, dest, bpb, val32, cpu_s, wall_s) -> dict:
    t = trainer.recipe.train
    launcher = (f"torchrun --nproc-per-node {trainer.world} -m evals.commands.pretrain" if trainer.world > 1
                else "zoo pretrain")
    card = {"recipe": recipe.name, "command": f"{launcher} " + shlex.join(argv),
            "commit": source_commit() or "unknown", "sizing": sizing, "params": trainer.model.num_params()["total"],
            "dtype": args.dtype, "tokens": trainer.tokens, "steps": result.step, "batch_size": t.batch_size,
            "seq_len": t.seq_len, "seed": t.seed, "threads": torch.get_num_threads(),
            "cpu_seconds": round(cpu_s, 1), "wall_seconds": round(wall_s, 1),
            "machine": f"{torch.get_num_threads()} threads, {sys.platform}, torch {torch.__version__}",
            "val_bpb": round(bpb, 4), "val_bpb_float32": round(val32, 4),
            "gzip_bpb": gzip_on_validation(trainer), "checkpoint": str(path.relative_to(dest)),
            "curve": curve(Path(args.out) / "runs" / recipe.name)}
    if args.init_from:
        init = init_dir(args, recipe.name)
        base = json.loads((init / "card.json").read_text())
        card["init_from"] = {"dir": str(init), "tokens": base["tokens"],
                             "seq_len": base["seq_len"], "cpu_seconds": base["cpu_seconds"]}
    if t.seq_len_schedule:
        card["seq_len_schedule"] = [[s.seq_len, s.until] for s in t.seq_len_schedule]
    if t.repeats.fraction:
        card["repeats"] = {"fraction": t.repeats.fraction, "count": t.repeats.count, "span": list(t.repeats.span),
                           "distance": list(t.repeats.distance), "source": t.repeats.source}
    if trainer.world > 1:
        card.update(world_size=trainer.world, cp=trainer.cp, cp_layout=t.cp_layout)
    return card


if __name__ == "__main__":
    sys.exit(main())
