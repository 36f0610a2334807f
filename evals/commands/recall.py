"""Recall in miniature, offline: the passkey fine-tunes and the MQAR sweep whose results `zoo compare` reports.

    zoo recall passkey transformer swa mamba2 taipan samba --from pretrained --out pretrained/passkey
    zoo recall mqar transformer mamba2 samba taipan --widths 32,64,128 --kv-pairs 4,8,16 --seeds 0,1,2 \
        --out pretrained/mqar                                                              # = make recall
    zoo recall ruler transformer mamba2 --from pretrained/long --factors 1,4 --out runs/ruler

passkey: each recipe's shipped LM (FROM/<name>) is fine-tuned on passkey prompts of `--seq-len` tokens
(zoo.data.synthetic.PasskeyData: needle at a uniform depth, 5-digit key), as Infini-attention and Samba
fine-tune theirs before retrieving far past the fine-tuning length. The fine-tuned weights are shipped to
OUT/<name>/ (half precision, like `zoo pretrain`) with card.json and MODEL_CARD.md: the command, the
steps, CPU time, and the greedy exact-match accuracy at `--factors` x the fine-tuning length (the shipped
weights, `--trials` prompts per depth). `zoo compare --passkey-from OUT` evaluates these checkpoints.

mqar: Zoology's experiment (arXiv 2312.04927) in miniature: each recipe as a `--layers`-layer model (a
pattern that does not fit keeps its first and last block type, e.g. Taipan's "MMMMMMT" -> "MT") at each
`--widths` d_model, trained from scratch for `--steps` on MQAR with each `--kv-pairs` count and each
`--seeds` seed, scored on held-out batches. One row per run in OUT/results.json, written as each run ends,
so an interrupted sweep resumes; `zoo compare --mqar-results OUT/results.json` puts the figure in the report.

ruler: RULER's synthetic tasks (zoo.data.ruler: needle in a haystack with one / several keys, values, queries;
variable tracking; common- and frequent-words extraction; generated from seeds, no downloads) on each shipped
checkpoint FROM/<name>, at `--factors` x its training length (or `--lengths`), `--trials` prompts per cell, greedy
decoding, scored as RULER scores; OUT/results.json for `zoo compare --ruler-results`.

Overrides: `--set KEY=VALUE` for every recipe, `--set NAME:KEY=VALUE` for one (e.g. swa:model.blocks.A.window=16).
Ends with one machine-readable `summary:` line.
"""
import argparse
import json
import shlex
import os
import sys
import time
from pathlib import Path

import torch

import zoo
from evals.options import float_list, int_list
from evals.runs import DTYPES, add_time, resolve, ship, source_commit, split_overrides
from evals.recall import mqar_eval, passkey_grid
from evals.ruler import ruler_grid
from evals.throughput import analytic_state_bytes
from zoo.data import DataError, load_tokenizer
from zoo.data.ruler import TASKS as RULER_TASKS, ruler_sample
from zoo.data.synthetic import PasskeyData
from zoo.train.checkpoint import CheckpointError, read_recipe, resolve_checkpoint
from zoo.train.run_dir import RunDirError
from zoo.train.trainer import Trainer, TrainingError


def seed_list(text: str) -> list:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = [-1]
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return seeds


def loss_list(text: str) -> list:
    losses = [v.strip() for v in text.split(",")]
    bad = [v for v in losses if v not in PasskeyData.LOSSES]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(PasskeyData.LOSSES)}")
    return losses


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="zoo recall", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("recipes", nargs="+", help="recipe names (or files, for mqar)")
    common.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="[NAME:]KEY=VALUE",
                        help="dotlist overrides, for every recipe or (NAME:) for one")
    common.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    common.add_argument("--no-progress", action="store_true")

    pk = sub.add_parser("passkey", parents=[common], help="fine-tune shipped LMs on passkey retrieval and ship them")
    pk.add_argument("--from", dest="source", default="pretrained", help="FROM/<name>: the LM checkpoint to start from")
    pk.add_argument("--out", default="pretrained/passkey")
    pk.add_argument("--steps", type=int_list, default=[800],
                    help="steps per stage (comma-separated: a curriculum, one stage per --seq-len)")
    pk.add_argument("--seq-len", type=int_list, default=[320],
                    help="prompt length per stage (tokens, answer included); the last is the fine-tuning length")
    pk.add_argument("--batch-size", type=int_list, default=[16], help="per stage, or one for all")
    pk.add_argument("--lr", type=float_list, default=[3e-3], help="per stage, or one for all")
    pk.add_argument("--loss", type=loss_list, default=["lm"],
                    help="per stage, or one for all. lm: every token (the needle's own key repeat teaches copying "
                         "at short range); answer: the answer tokens only (all the gradient on the long copy)")
    pk.add_argument("--min-seq-len", type=int_list, default=None,
                    help="per stage, or one for all: each training row's length drawn in [MIN, --seq-len] (the rest "
                         "of the row unscored filler), so the answer's position is not a constant to learn "
                         "(default: every row at --seq-len)")
    pk.add_argument("--factors", type=int_list, default=[1, 4, 16],
                    help="evaluate at these multiples of --seq-len")
    pk.add_argument("--depths", type=float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    pk.add_argument("--trials", type=int, default=10, help="prompts per (length, depth)")
    pk.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    pk.add_argument("--retrain", action="store_true", help="fine-tune again even where OUT/<name> is shipped")

    mq = sub.add_parser("mqar", parents=[common], help="Zoology's MQAR sweep over width, key-value pairs and seeds")
    mq.add_argument("--out", default="pretrained/mqar")
    mq.add_argument("--widths", type=int_list, default=[32, 64, 128])
    mq.add_argument("--kv-pairs", type=int_list, default=[4, 8, 16])
    mq.add_argument("--seeds", type=seed_list, default=[0, 1, 2])
    mq.add_argument("--layers", type=int, default=2)
    mq.add_argument("--vocab", type=int, default=256, help="keys from the lower half, values from the upper")
    mq.add_argument("--seq-len", type=int, default=128)
    mq.add_argument("--steps", type=int, default=400)
    mq.add_argument("--batch-size", type=int, default=32)
    mq.add_argument("--lr", type=float_list, default=[3e-3],
                    help="learning rates (comma-separated): each run is repeated at each, and the report keeps the "
                         "best per recipe and width, as Zoology does")
    ru = sub.add_parser("ruler", parents=[common], help="RULER's synthetic tasks on shipped checkpoints")
    ru.add_argument("--from", dest="source", default="pretrained/long",
                    help="FROM/<name>: the checkpoint of each name (a path to a checkpoint directory works too)")
    ru.add_argument("--out", default="runs/ruler", help="OUT/results.json (for `zoo compare --ruler-results`)")
    ru.add_argument("--tasks", type=lambda t: t.split(","), default=list(RULER_TASKS),
                    help=f"comma-separated, of: {', '.join(RULER_TASKS)}")
    ru.add_argument("--factors", type=int_list, default=[1, 4, 16],
                    help="prompt lengths as multiples of each model's training length (train.seq_len)")
    ru.add_argument("--lengths", type=int_list, default=None, help="prompt lengths in tokens (instead of --factors)")
    ru.add_argument("--trials", type=int, default=8, help="prompts per (task, length)")
    ru.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.task == "ruler":
        bad = [t for t in args.tasks if t not in RULER_TASKS]
        if bad or not args.tasks:
            ap.error(f"--tasks: {bad or 'none'} (known: {', '.join(RULER_TASKS)})")
        if args.trials < 1 or min(args.lengths or args.factors) < 1:
            ap.error("--trials, --lengths, --factors: positive integers")
    if args.task == "passkey":
        if args.trials < 1:
            ap.error("--trials: a positive integer")
        if not args.depths or any(not 0 <= d <= 1 for d in args.depths):
            ap.error(f"--depths: fractions of the prompt in [0, 1], got {args.depths}")
        if args.min_seq_len is None:
            args.min_seq_len = [None]
        for field in ("batch_size", "lr", "loss", "min_seq_len"):   # one value stands for every stage
            if len(getattr(args, field)) == 1:
                setattr(args, field, getattr(args, field) * len(args.seq_len))
        counts = [len(getattr(args, f)) for f in ("steps", "seq_len", "batch_size", "lr", "loss", "min_seq_len")]
        if len(set(counts)) != 1:
            ap.error("--steps, --seq-len, --batch-size, --lr, --loss, --min-seq-len: one value per stage (or one for "
                     f"all of the last four), got {', '.join(map(str, counts))}")
        bad = [(m, n) for m, n in zip(args.min_seq_len, args.seq_len) if m is not None and not 0 < m <= n]
        if bad:
            ap.error(f"--min-seq-len: {bad[0][0]} must be in [1, --seq-len of its stage = {bad[0][1]}]")
    if args.task == "mqar" and (args.steps < 1 or args.layers < 1 or args.batch_size < 1):
        ap.error("--steps, --layers, --batch-size: positive integers")
    return args


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)   # a kill mid-write leaves the previous file


# -- passkey -----------------------------------------------------------------------------------------------------

def passkey_card_text(card: dict) -> str:
    lengths = card["eval"]["lengths"]
    lines = [f"# {card['recipe']} passkey fine-tune (zoo recall)", "",
             f"- command: `{card['command']}` (commit {card['commit']})",
             f"- from: {card['from']} (the shipped LM, {card['params']:,} parameters); weights shipped as {card['dtype']}",
             "- fine-tuned: " + ", then ".join(map(_stage_text, stages(card))) +
             f"; seed {card['seed']}",
             f"- time: {card['cpu_seconds']:.0f} CPU seconds, {card['wall_seconds']:.0f} wall seconds "
             f"({card['threads']} thread{'s' if card['threads'] != 1 else ''})",
             f"- answer loss on held-out prompts: {card['val_loss']:.4f} nats/token (chance for a digit: ln 10 = 2.3026)",
             "", "Greedy exact-match accuracy of the shipped weights, " f"{card['eval']['n_trials']} prompts per cell:", "",
             "| depth | " + " | ".join(f"{n} ({n // card['seq_len']}x)" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for j, d in enumerate(card["eval"]["depths"]):
        lines.append(f"| {d:g} | " + " | ".join(f"{100 * card['eval']['accuracy'][i][j]:.0f}%"
                                                for i in range(len(lengths))) + " |")
    lines.append("| mean | " + " | ".join(f"{100 * m:.0f}%" for m in card["eval"]["mean"]) + " |")
    return "\n".join(lines) + "\n"


def stages(card: dict) -> list:
    """[{seq_len, steps, batch_size, lr, loss, min_seq_len}] of a card. Older cards keep some at the top: a card of
    one stage (before curricula) all of them, a card before per-stage losses its one lr and loss; a card before
    --min-seq-len trained every row at full length (None)."""
    keys = ("seq_len", "steps", "batch_size", "lr", "loss", "min_seq_len")
    return [{k: st.get(k, card.get(k)) for k in keys} for st in card.get("stages") or [card]]


def asked_stages(args) -> list:
    return [{"seq_len": n, "steps": k, "batch_size": b, "lr": lr, "loss": loss, "min_seq_len": m}
            for n, k, b, lr, loss, m in zip(args.seq_len, args.steps, args.batch_size, args.lr, args.loss,
                                            args.min_seq_len)]


def _stage_text(st: dict) -> str:
    rows = f"{st['min_seq_len']}-{st['seq_len']}" if st.get("min_seq_len") else f"{st['seq_len']}"
    return f"{st['steps']} steps of {st['batch_size']} x {rows} tokens (loss {st['loss']}, lr {st['lr']})"


def stage_run_dir(out: Path, name: str, i: int) -> Path:
    return out / "runs" / (name if i == 0 else f"{name}-stage{i + 1}")


def train_stage(name: str, i: int, start, recipe, args, say):
    """Fine-tune stage i from the checkpoint `start` (continuing an interrupted stage); (trainer, result,
    the stage's CPU and wall seconds over every session that ran it)."""
    st = asked_stages(args)[i]
    steps = st["steps"]
    recipe = zoo.load_recipe(recipe.to_dict(), [
        *split_overrides(args.overrides, name), f"train.max_steps={steps}", f"train.seq_len={st['seq_len']}",
        f"train.batch_size={st['batch_size']}", f"train.lr={st['lr']}", f"train.warmup_steps={max(1, steps // 10)}",
        f"train.eval_every={max(1, steps // 4)}", f"train.save_every={max(1, steps // 4)}", "train.keep_last=1",
        "train.eval_batches=2", "train.grad_accum=1", f"train.log_every={max(1, steps // 20)}"])
    tok = recipe.train.tokenizer
    data = PasskeyData(None if tok == "byte" else load_tokenizer(tok), seed=recipe.train.seed, loss=st["loss"],
                       min_len=st["min_seq_len"])
    run_dir = stage_run_dir(Path(args.out), name, i)
    resume = None if args.retrain or not (run_dir / "checkpoints").is_dir() else "auto"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trainer = Trainer(recipe, data, run_dir, log=say, progress=not args.no_progress, resume=resume,
                      overwrite=resume is None, init_from=str(start))
    result = trainer.train()
    return trainer, result, *add_time(run_dir, time.process_time() - cpu0, time.perf_counter() - wall0)


def finetune_passkey(name: str, args, argv, say) -> dict:
    ckpt = resolve_checkpoint(Path(args.source) / name)
    recipe, start, cpu_s, wall_s = read_recipe(ckpt), ckpt, 0.0, 0.0
    for i, st in enumerate(asked_stages(args)):
        say(f"{name}: stage {i + 1}, {st['steps']} steps of {st['batch_size']} x {st['seq_len']} tokens")
        trainer, result, cpu_i, wall_i = train_stage(name, i, start, recipe, args, say)
        cpu_s, wall_s = cpu_s + cpu_i, wall_s + wall_i
        if result.stopped:
            return {"recipe": name, "stopped": result.step}
        start = stage_run_dir(Path(args.out), name, i)
    seq_len = args.seq_len[-1]
    tok = None if trainer.recipe.train.tokenizer == "byte" else load_tokenizer(trainer.recipe.train.tokenizer)
    dest = Path(args.out) / name
    path, val_loss, _ = ship(trainer, trainer.recipe, dest, DTYPES[args.dtype], step=sum(args.steps))
    lengths = [f * seq_len for f in args.factors]
    say(f"{name}: passkey accuracy at {lengths} ...")
    grid = passkey_grid(trainer.model, lengths, args.depths, args.trials, tokenizer=tok)
    grid["mean"] = [sum(row) / len(row) for row in grid["accuracy"]]
    card = {"recipe": name, "command": "zoo recall " + shlex.join(argv), "commit": source_commit() or "unknown",
            "from": str(ckpt),
            "params": trainer.model.num_params()["total"], "dtype": args.dtype, "steps": sum(args.steps),
            "batch_size": args.batch_size[-1], "seq_len": seq_len,
            "stages": [{k: v for k, v in st.items() if v is not None} for st in asked_stages(args)],
            "lr": args.lr[-1], "loss": args.loss[-1], "seed": trainer.recipe.train.seed,
            "threads": torch.get_num_threads(), "cpu_seconds": round(cpu_s, 1),
            "wall_seconds": round(wall_s, 1), "val_loss": round(val_loss, 4),
            "checkpoint": str(path.relative_to(dest)), "eval": grid}
    write_json(dest / "card.json", card)
    (dest / "MODEL_CARD.md").write_text(passkey_card_text(card))
    say(f"{name}: " + ", ".join(f"{n}: {100 * m:.0f}%" for n, m in zip(lengths, grid["mean"])) + f" -> {path}")
    return card


def run_passkey(args, argv, say) -> dict:
    out = {}
    for name in args.recipes:
        dest = Path(args.out) / name
        card = json.loads((dest / "card.json").read_text()) if (dest / "card.json").is_file() else None
        if card and stages(card) == asked_stages(args) and not args.retrain:
            say(f"{name}: fine-tuned already ({dest}); --retrain to fine-tune it again")
        else:   # new, asked again, or asked with other stages: stages already trained are resumed, not redone
            card = finetune_passkey(name, args, argv, say)
            if "stopped" in card:
                say(f"{name}: stopped at step {card['stopped']}, not shipped; rerun to continue")
                break
        out[name] = {"lengths": card["eval"]["lengths"], "mean_accuracy": card["eval"]["mean"]}
    return out


# -- MQAR --------------------------------------------------------------------------------------------------------

def miniature_pattern(pattern: str, layers: int) -> str:
    """The recipe's pattern if it divides `layers`; else its first and last letters (one if they agree), tiled."""
    pattern = pattern.replace(" ", "")
    if layers % len(pattern) == 0:
        return pattern
    short = pattern[0] + pattern[-1] if pattern[0] != pattern[-1] else pattern[0]
    if layers % len(short):
        raise ValueError(f"--layers: {layers} is not a multiple of the miniature pattern {short!r} of {pattern!r}")
    return short


def mqar_recipe(spec: str, width: int, args):
    recipe, _ = resolve(spec, [])
    pattern = miniature_pattern(recipe.model.pattern, args.layers)
    return zoo.load_recipe(recipe.to_dict(), [
        f"model.n_layers={args.layers}", f"model.pattern={pattern}", f"model.d_model={width}",
        f"model.vocab_size={args.vocab}", *split_overrides(args.overrides, recipe.name)])


def _run_key(run: dict) -> tuple:
    return (run["recipe"], run["d_model"], run["seed"], run["seq_len"], run["steps"], tuple(run["by_kv_pairs"]),
            run.get("lr"))


def _read_results(path: Path) -> dict:
    """OUT/results.json; rows from before the learning-rate grid take the one lr their meta recorded."""
    results = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "runs": []}
    lr = results["meta"].get("lr")
    for run in results["runs"]:
        if "lr" not in run and isinstance(lr, float):
            run["lr"] = lr
    return results


def _record(path: Path, run: dict, meta: dict) -> None:
    """Add one run to OUT/results.json as it is on disk now, so that sweeps of other recipes writing the same
    file at once (one per core) keep each other's rows."""
    results = _read_results(path)
    if _run_key(run) not in {_run_key(r) for r in results["runs"]}:
        results["runs"].append(run)
    results["meta"] = meta
    write_json(path, results)


def run_mqar(args, argv, say) -> list:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    meta = {"command": "zoo recall " + shlex.join(argv), "commit": source_commit() or "unknown", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "vocab_size": args.vocab, "seq_len": args.seq_len,
            "layers": args.layers, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    done = {_run_key(r) for r in _read_results(path)["runs"]}
    plan = [(spec, w, seed, lr) for w in args.widths for spec in args.recipes for lr in args.lr for seed in args.seeds]
    for i, (spec, width, seed, lr) in enumerate(plan):
        recipe = mqar_recipe(spec, width, args)
        kvs = tuple(map(str, args.kv_pairs))
        if (recipe.name, width, seed, args.seq_len, args.steps, kvs, lr) in done:
            continue
        cpu0 = time.process_time()
        # one model per (recipe, width, seed, lr) trains on the mix of counts and is scored at each (Zoology's setup)
        res = mqar_eval(recipe, args.steps, args.seq_len, args.kv_pairs, batch_size=args.batch_size, lr=lr,
                        seed=seed, overrides=[f"train.seed={seed}"])
        model = zoo.build_model(recipe)
        res["by_kv_pairs"] = {str(k): v for k, v in res["by_kv_pairs"].items()}   # as JSON keeps them
        res.update(d_model=width, seed=seed, lr=lr, params=model.num_params()["total"],
                   state_bytes=analytic_state_bytes(model, args.seq_len),
                   cpu_seconds=round(time.process_time() - cpu0, 2))
        _record(path, res, meta)
        say(f"[{i + 1}/{len(plan)}] {recipe.name} d_model {width} lr {lr:g} seed {seed}: " + ", ".join(
            f"{k} pairs {100 * v['accuracy']:.1f}%" for k, v in res["by_kv_pairs"].items())
            + f" ({res['cpu_seconds']:.0f} CPU s)")
    if not path.is_file():
        return []
    results = _read_results(path)
    results["meta"] = meta   # the command of the last sweep over the file: rerun the whole one to cover every row
    write_json(path, results)
    return results["runs"]


# -- ruler -------------------------------------------------------------------------------------------------------

def run_ruler(args, argv, say) -> list:
    """Every model's cells, each written to OUT/results.json as the model finishes; a model already there with the
    same tasks, lengths, trials and seed is skipped."""
    models = []
    for name in args.recipes:   # every checkpoint and length checked before any decoding
        path = Path(args.source) / name if (Path(args.source) / name).is_dir() else Path(name)
        model = zoo.load_checkpoint(str(resolve_checkpoint(path))).eval()
        tok_name = model.recipe.train.tokenizer
        tok = None if tok_name == "byte" else load_tokenizer(tok_name)
        lengths = args.lengths or [f * model.recipe.train.seq_len for f in args.factors]
        for task in args.tasks:
            try:
                ruler_sample(task, min(lengths), 0, tok)
            except DataError as err:
                raise DataError(f"--lengths / --factors: {err}") from None
        models.append((path.name, model, tok, lengths))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    results["meta"] = {"command": "zoo recall " + shlex.join(argv), "commit": source_commit() or "unknown",
                       "trials": args.trials, "seed": args.seed, "torch": torch.__version__}
    for name, model, tok, lengths in models:
        key = {"model": name, "tasks": args.tasks, "lengths": lengths, "trials": args.trials, "seed": args.seed}
        if any(all(r.get(k) == v for k, v in key.items()) for r in results["runs"]):
            say(f"{name}: done already ({path})")
            continue
        cpu0 = time.process_time()
        cells = ruler_grid(model, args.tasks, lengths, args.trials, args.seed, tok)
        results["runs"] = [r for r in results["runs"] if r.get("model") != name] + [
            {**key, "train_seq_len": model.recipe.train.seq_len, "cells": cells,
             "cpu_seconds": round(time.process_time() - cpu0, 1)}]
        write_json(path, results)
        say(f"{name}: " + ", ".join(f"{c['task']}@{c['length']} {100 * c['score']:.0f}%" for c in cells))
    return results["runs"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = print
    try:
        if args.task == "passkey":
            summary = run_passkey(args, argv, say)
        elif args.task == "ruler":
            summary = {"runs": len(run_ruler(args, argv, say))}
        else:
            runs = run_mqar(args, argv, say)
            summary = {"runs": len(runs)}
    except (zoo.RecipeError, CheckpointError, TrainingError, DataError, RunDirError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("summary: " + json.dumps(summary))
    return 0
