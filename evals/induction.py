"""When does a recipe learn to copy? Train it from scratch on rows of random tokens holding one span copied a variable
distance later, and follow the loss on the copy: a model that only knows the token statistics pays the alphabet's
entropy there, one with an induction head (attend to the token after the previous occurrence of the current one;
Olsson et al., 2022) almost nothing. The change comes abruptly after a plateau, and this measures the plateau.

    python -m evals.induction --recipe transformer --match-params 1M --alphabet bytes --steps 3000

Rows of `length` tokens: `random_string` from the alphabet ("bytes": the 94 printable bytes, "letters": lowercase
words, "ids": the model's vocabulary; with `symbols` N, bytes and ids draw from their first N only, so that the
alphabet's size and the vocabulary's can be told apart), a span of `span` tokens at a random start copied `distance`
tokens later (a range: the model must find the source by content, not by a fixed offset, which position alone
learns: attention to exactly d tokens back needs no induction). The copy's first `skip` tokens are not scored
(nothing tells the model a copy has begun). A model with `model.head_bias` starts it at the rows' unigram
frequencies, as the trainer does; `--init-from DIR` starts from the weights shipped in DIR/<recipe> (or in DIR,
one shipped model of another recipe whose weights fit) instead (a later stage: a longer range after a short one).
AdamW at `lr`, no schedule; the loss on the copy and on the whole row, in nats per token, every `every` steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from evals.options import int_list
from evals.runs import shipped_model_dir
from zoo.data.repeats import PRINTABLE, random_string
from zoo.train.checkpoint import CheckpointError, init_weights

ALPHABETS = ("bytes", "letters", "ids")


def copy_rows(batch: int, length: int, span: int, distance, alphabet: str, vocab_size: int,
              rng: np.random.Generator, symbols: Optional[int] = None, copies: int = 1):
    """(ids [batch, length], copy_start [batch, copies]): each row random, `copies` spans of span tokens, each at
    its own src copied to src + d (every source and copy disjoint from the others); the bytes and ids alphabets
    draw from their first `symbols` tokens (default: all of them)."""
    rows, starts = [], []
    for _ in range(batch):
        if alphabet == "ids":
            row = rng.integers(0, symbols or vocab_size, size=length)
        elif alphabet == "bytes" and symbols:
            row = rng.integers(PRINTABLE[0], PRINTABLE[0] + symbols, size=length)
        else:
            row = random_string(length, vocab_size, rng, printable=alphabet == "bytes")
        taken = np.zeros(length, dtype=bool)
        row_starts = []
        for _ in range(copies):
            src, d = _free_pair(taken, span, distance, rng)
            row[src + d:src + d + span] = row[src:src + span].copy()
            taken[src:src + span] = taken[src + d:src + d + span] = True
            row_starts.append(src + d)
        rows.append(row)
        starts.append(row_starts)
    return torch.from_numpy(np.stack(rows)).long(), torch.tensor(starts)


def _free_pair(taken, span: int, distance, rng, tries: int = 1000):
    """(src, d): a source and its copy `d` tokens later, neither overlapping a `taken` token."""
    for _ in range(tries):
        d = int(rng.integers(distance[0], distance[1] + 1))
        src = int(rng.integers(0, len(taken) - d - span + 1))
        if not (taken[src:src + span].any() or taken[src + d:src + d + span].any()):
            return src, d
    raise ValueError(f"copies: no room for another span of {span} copied {distance[0]}-{distance[1]} back in rows "
                     f"of {len(taken)} after {int(taken.sum()) // (2 * span)}; use fewer copies")


def copy_loss(logits, ids, starts, span: int, skip: int) -> float:
    """Mean nats per token of the predictions of copy tokens skip..span-1 (predicted from the position before), over
    every copy: `starts` [batch] or [batch, copies]."""
    starts = starts.reshape(ids.shape[0], -1)
    offsets = torch.arange(skip, span)
    pos = (starts[:, :, None] + offsets).flatten(1)                # target positions [batch, copies * (span - skip)]
    logp = torch.log_softmax(logits.float(), -1)
    rows = torch.arange(ids.shape[0])[:, None]
    return -logp[rows, pos - 1, ids[rows, pos]].mean().item()


def shared_share(model, ids) -> list:
    """After each layer, the share of the residual stream that is one direction every position shares:
    |mean x|^2 / mean |x|^2 over the tokens of `ids` (1: every position holds the same vector, whatever its token)."""
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    shares = []
    for x in outs:
        x = x.reshape(-1, x.shape[-1]).double()
        shares.append(round((x.mean(0).square().sum() / x.square().sum(-1).mean()).item(), 4))
    return shares


def check_task(vocab: int, length: int, span: int, distance, alphabet: str, skip: int = 8,
               symbols: Optional[int] = None, copies: int = 1) -> None:
    """ValueError naming the first setting of the copy task that cannot hold for a model of `vocab` tokens."""
    if alphabet not in ALPHABETS:
        raise ValueError(f"alphabet: {alphabet!r}; allowed: {', '.join(ALPHABETS)}")
    if span + distance[1] > length or not 0 < distance[0] <= distance[1]:
        raise ValueError(f"distance: {list(distance)} must be [low, high] with 0 < low <= high and span {span} + "
                         f"high <= length {length}")
    if copies < 1 or 2 * copies * span > length:
        raise ValueError(f"copies: {copies}; allowed: 1 to {length // (2 * span)} (a source and a copy of span {span} "
                         f"each, disjoint, in rows of {length})")
    if not 0 <= skip < span:
        raise ValueError(f"skip: {skip} must be in [0, span {span})")
    if alphabet != "ids" and vocab != 256:
        raise ValueError(f"alphabet: {alphabet!r} needs a byte vocabulary (256), the model has {vocab}; use ids")
    limit = {"ids": vocab, "bytes": PRINTABLE[1] - PRINTABLE[0]}.get(alphabet, 0)
    if symbols is not None and not 2 <= symbols <= limit:
        raise ValueError(f"symbols: {symbols}; allowed: 2 to {limit} with the {alphabet} alphabet"
                         + ("" if limit else " (only bytes and ids take symbols)"))


def copy_curve(model, steps: int, length: int = 256, span: int = 64, distance=(64, 128), alphabet: str = "bytes",
               batch: int = 16, lr: float = 1e-3, every: int = 100, skip: int = 8, seed: int = 0,
               log=None, symbols: Optional[int] = None, shared: bool = False, copies: int = 1,
               warmup: int = 0) -> list:
    """[{step, copy_nats, row_nats, seconds}] every `every` steps of training `model` from its current weights (the
    learning rate rising linearly over the first `warmup` steps: a later stage's fresh optimizer then does not
    undo the copying its start can already do); with `shared`, also each layer's `shared_share` on that step's rows."""
    vocab = model.recipe.model.vocab_size
    check_task(vocab, length, span, distance, alphabet, skip, symbols, copies)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    model.train()
    curve, t0 = [], time.time()
    for step in range(steps + 1):
        ids, starts = copy_rows(batch, length, span, distance, alphabet, vocab, rng, symbols, copies)
        out = model(ids, labels=ids)
        if step % every == 0 or step == steps:
            with torch.no_grad():
                point = {"step": step, "copy_nats": copy_loss(out.logits, ids, starts, span, skip),
                         "row_nats": out.loss.item(), "seconds": round(time.time() - t0, 1)}
                if shared:
                    point["shared"] = shared_share(model, ids)
            curve.append(point)
            if log is not None:
                log(point)
        if step == steps:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    return curve


def start_head_bias(model, length: int, span: int, distance, alphabet: str, symbols: Optional[int] = None,
                    seed: int = 0, copies: int = 1) -> None:
    """As the trainer does for `model.head_bias`: the bias starts at the unigram model of 256 of the task's rows
    (drawn apart from the training rows)."""
    vocab = model.recipe.model.vocab_size
    ids, _ = copy_rows(256, length, span, distance, alphabet, vocab, np.random.default_rng([seed, 1]), symbols, copies)
    model.init_head_bias(np.bincount(ids.flatten().numpy(), minlength=vocab))


def start_from(model, source) -> Path:
    """Load the model weights of the checkpoint in `source` (a shipped DIR/<recipe>, a run, a checkpoint) into
    `model` (as `zoo pretrain --init-from` does: settings that hold no weights may differ; CheckpointError naming
    the first field that differs when the weights do not fit)."""
    return init_weights(source, model.recipe, model.load_state_dict)[0]


def ship(model, dest, steps: int, batch: int, length: int, cpu_s: float, wall_s: float, command: str,
         curve: list, init_from: Optional[str] = None) -> Path:
    """Write the trained model to `dest` as `zoo pretrain` ships one (dest/checkpoints/step-N, card.json), so that
    `zoo pretrain --init-from DIR` (DIR/<recipe name>) continues from it: the copy task as a first stage."""
    from zoo.train.checkpoint import save_checkpoint
    dest = Path(dest)
    path = save_checkpoint(dest / "checkpoints", steps, model.state_dict(), model.recipe, info={"copy_task": True})
    card = {"recipe": model.recipe.name, "command": command, "params": model.num_params()["total"],
            "tokens": steps * batch * length, "steps": steps, "batch_size": batch, "seq_len": length,
            "cpu_seconds": round(cpu_s, 1), "wall_seconds": round(wall_s, 1),
            "checkpoint": str(path.relative_to(dest)), "copy_curve": curve}
    if init_from:
        card["init_from"] = init_from
    tmp = dest / "card.json.tmp"
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    tmp.replace(dest / "card.json")
    return path


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="transformer", help="recipe name or file")
    ap.add_argument("--match-params", default=None, help="size it as zoo compare does (e.g. 1M)")
    ap.add_argument("--set", nargs="*", default=[], help="dotlist overrides")
    ap.add_argument("--alphabet", choices=ALPHABETS, default="bytes")
    ap.add_argument("--symbols", type=int, default=None, help="bytes / ids: draw from the first N of them only")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--span", type=int, default=64)
    ap.add_argument("--distance", type=int_list, default=[64, 128], help="LOW,HIGH tokens from source to copy")
    ap.add_argument("--copies", type=int, default=1, help="spans copied in each row (more signal a step in long rows)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--shared", action="store_true",
                    help="log each layer's share of the residual stream that is one direction all positions share")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="ship the trained model to DIR/<recipe name> (a start for zoo pretrain --init-from DIR)")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="start from the weights shipped in DIR/<recipe> (a copy stage, or any zoo pretrain run): "
                         "a later stage of the copy task (the head bias keeps its trained value)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    bad = [name for name in ("steps", "length", "span", "batch", "every", "threads") if getattr(args, name) < 1]
    if bad or not args.lr > 0:
        ap.error(f"--{(bad or ['lr'])[0]}: must be > 0")
    if args.warmup < 0:
        ap.error(f"--warmup: must be >= 0, got {args.warmup}")
    if len(args.distance) != 2:
        ap.error(f"--distance: expected LOW,HIGH (two integers), got {args.distance}")
    import zoo
    from evals.runs import parameter_target, resolve
    from zoo.sizing import match_params
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recipe, _ = resolve(args.recipe, args.set)
    if args.match_params:
        overrides, _ = match_params(recipe, parameter_target(args.match_params, args.set))
        recipe = zoo.load_recipe(recipe.to_dict(), overrides)
    try:   # before anything is built or trained
        check_task(recipe.model.vocab_size, args.length, args.span, args.distance, args.alphabet, symbols=args.symbols,
                   copies=args.copies)
    except ValueError as err:
        ap.error(str(err))
    if args.out:
        try:
            (Path(args.out) / recipe.name).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            ap.error(f"--out: cannot write {args.out} ({err.strerror or err})")
    model = zoo.build_model(recipe)
    if args.init_from:
        try:
            start_from(model, shipped_model_dir(args.init_from, recipe.name, "--init-from"))
        except CheckpointError as err:
            ap.error(f"--init-from: {str(err).removeprefix('checkpoint: ').removeprefix('--init-from: ')}")
    elif recipe.model.head_bias:
        start_head_bias(model, args.length, args.span, args.distance, args.alphabet, args.symbols, args.seed,
                        args.copies)
    alphabet = args.alphabet + (f" ({args.symbols} of {recipe.model.vocab_size})" if args.symbols else "")
    print(f"{recipe.name}: {model.num_params()['total']:,} parameters; {alphabet}, {args.copies} x span {args.span} "
          f"copied {args.distance[0]}-{args.distance[1]} back in rows of {args.length}", flush=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        curve = copy_curve(model, args.steps, args.length, args.span, args.distance, args.alphabet, args.batch,
                           args.lr, args.every, seed=args.seed, log=lambda p: print(json.dumps(p), flush=True),
                           symbols=args.symbols, shared=args.shared, copies=args.copies, warmup=args.warmup)
    except ValueError as err:
        ap.error(str(err))
    if args.out:
        import shlex
        path = ship(model, Path(args.out) / recipe.name, args.steps, args.batch, args.length,
                    time.process_time() - cpu0, time.perf_counter() - wall0,
                    "python -m evals.induction " + shlex.join(argv), curve, args.init_from)
        print(f"{recipe.name}: shipped {path}", flush=True)
    print("summary: " + json.dumps({"recipe": recipe.name, "alphabet": args.alphabet, "curve": curve}))


if __name__ == "__main__":
    main()
