"""Memory and perplexity with one sequence spread over W gloo processes (context parallel, zoo.distributed).

`cp_cell` runs one (recipe, context, W) measurement in W fresh processes, one torch thread each: every rank
loads the model (a checkpoint, or the recipe built at seed 0), warms up on a short sequence, then on its
shard of `context` tokens (validation text when given) runs
  a training forward + backward, whose peak RSS above the rank's RSS just before it (VmHWM, reset through
  /proc/self/clear_refs) is the rank's peak; the cell reports the largest rank's;
  with `optimizer_step`, then the gradients summed over the ranks and an AdamW step (its two moments
  are allocated inside the measured run, as in a training run's first step);
  an evaluation forward (no grad; `evaluate=False` skips it): the global loss over the sequence, identical
  for every W up to float rounding, so the perplexity column doubles as a check that the sharded run is the
  same model.
A per-rank cap turns a rank that outgrows it into an `OOM` cell (a watchdog thread in every rank), so a
sweep over contexts finds the longest one that fits (`longest_fitting`).
"""
from __future__ import annotations

import math
import os
import queue
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Optional

from evals.memory import OOM_EXIT, PeakMemory, _watchdog
from evals.timing import Stopwatch


def _rank(rank, world, init_file, spec) -> dict:
    """One rank of `cp_cell`: warm up, measure one training step on this rank's shard, then evaluate."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec["timeout"]))
    import zoo
    from zoo.distributed import shard
    group = dist.group.WORLD
    if spec["checkpoint"]:
        model = zoo.load_checkpoint(spec["checkpoint"], device="cpu")
    else:
        torch.manual_seed(0)
        model = zoo.build_model(zoo.load_recipe(spec["recipe"]))
    model.checkpoint_layers = model.recipe.train.activation_checkpointing   # a training step as the trainer runs it
    context, layout = spec["context"], spec["layout"]
    g = torch.Generator().manual_seed(0)
    vocab = model.recipe.model.vocab_size
    ids = (torch.tensor(spec["tokens"], dtype=torch.long)[None] if spec["tokens"] is not None
           else torch.randint(0, vocab, (1, context), generator=g))

    def forward(x):
        x = x if world == 1 else shard(x, group, layout)
        return model(x, labels=x, **({} if world == 1 else {"cp_group": group, "cp_layout": layout}))

    model.train()
    warm = forward(torch.randint(0, vocab, (1, 32 * world), generator=g))
    (warm.loss + (warm.aux_loss if warm.aux_loss is not None else 0)).backward()
    model.zero_grad(set_to_none=True)
    del warm
    if spec.get("optimizer_step"):
        # the first optimizer step imports torch._dynamo (~140 MiB RSS): on a stand-in parameter, so that
        # the measured step counts the model's moments and not the import
        stand_in = torch.zeros(1, requires_grad=True)
        stand_in.grad = torch.zeros(1)
        torch.optim.AdamW([stand_in]).step()
    import gc
    gc.collect()
    dist.barrier()
    with PeakMemory() as peak, Stopwatch() as clock:
        if spec["cap_bytes"]:
            threading.Thread(target=_watchdog, args=(peak.base + spec["cap_bytes"],), daemon=True).start()
        out = forward(ids)
        (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        del out
        if spec.get("optimizer_step"):
            if world > 1:
                from zoo.distributed import all_reduce_grads
                all_reduce_grads(model, group)
            torch.optim.AdamW(model.parameters(), lr=1e-4).step()
    model.zero_grad(set_to_none=True)
    loss = None
    if spec.get("evaluate", True):
        model.eval()
        with torch.no_grad():
            loss = forward(ids).loss.item()
    return {"peak_bytes": peak.bytes, "seconds": clock.wall, "loss_nats": loss}


def _run_rank(target, rank, args, results):
    """One spawned rank: what target(*args) returns, or its traceback, goes on `results`; then the process
    leaves at once (os._exit), without waiting on torch's exit handlers or a process group."""
    try:
        results.put((rank, "ok", target(*args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


def run_ranks(target, world_size: int, args_of, timeout: float):
    """Run `target(*args_of(rank, init_file))` in `world_size` spawned processes that meet at a fresh gloo
    rendezvous file, and collect what each returns (or the traceback it raised) until every rank reported,
    a rank left with OOM_EXIT, all exited, or `timeout` passed. Stragglers are killed.
    Returns ({rank: payload} of ranks that returned, {rank: traceback} of the others, exit codes)."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    fd, init_file = tempfile.mkstemp(prefix="zoo_ranks_")
    os.close(fd)
    os.unlink(init_file)  # gloo's file store wants to create it
    results = ctx.Queue()
    procs = [ctx.Process(target=_run_rank, args=(target, r, args_of(r, init_file), results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    got, errors = {}, {}
    deadline = time.monotonic() + timeout
    while len(got) + len(errors) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=2)
        except queue.Empty:
            if any(p.exitcode == OOM_EXIT for p in procs) or all(not p.is_alive() for p in procs):
                break
            continue
        (got if status == "ok" else errors)[rank] = payload
    for p in procs:
        p.join(timeout=30 if len(got) == world_size else 1)
        if p.is_alive():
            p.kill()
            p.join()
    if os.path.exists(init_file):
        os.unlink(init_file)
    return got, errors, [p.exitcode for p in procs]


def cp_cell(recipe: dict, context: int, world_size: int, checkpoint: Optional[str] = None,
            tokens: Optional[list] = None, cap_gb: Optional[float] = None, layout: str = "zigzag",
            timeout: float = 1800.0, optimizer_step: bool = False, evaluate: bool = True) -> dict:
    """One measurement on `world_size` fresh gloo processes; a record with status ok / OOM / error / timeout.
    `optimizer_step`: the measured run is a whole training step (forward, backward, AdamW step);
    `evaluate=False`: no evaluation forward (loss_nats and ppl are None)."""
    spec = {"recipe": recipe, "checkpoint": checkpoint, "context": int(context), "layout": layout,
            "tokens": None if tokens is None else [int(t) for t in tokens[:context]],
            "cap_bytes": int(cap_gb * 2**30) if cap_gb else None, "timeout": timeout,
            "optimizer_step": optimizer_step, "evaluate": evaluate}
    started = time.monotonic()
    got, errors, exitcodes = run_ranks(_rank, world_size, lambda rank, init_file: (rank, world_size, init_file, spec),
                                       timeout)
    base = {"world_size": world_size, "context": int(context), "layout": layout}
    if OOM_EXIT in exitcodes:
        return {**base, "status": "OOM", "cap_gb": cap_gb}
    if len(got) < world_size and not errors and time.monotonic() - started < timeout:
        # every rank gone before the deadline without a word: it died before its try (spawn, import)
        return {**base, "status": "error", "error": f"ranks exited without a report (exit codes {exitcodes})"}
    if len(got) < world_size and not errors:
        return {**base, "status": "timeout", "timeout_s": timeout}
    if errors:
        return {**base, "status": "error", "error": next(iter(errors.values())).strip().splitlines()[-1]}
    loss = got[0]["loss_nats"]
    return {**base, "status": "ok", "peak_bytes": max(r["peak_bytes"] for r in got.values()),
            "per_rank_peak_bytes": [got[r]["peak_bytes"] for r in range(world_size)],
            "seconds": max(r["seconds"] for r in got.values()), "loss_nats": loss,
            "ppl": None if loss is None else math.exp(loss), "cap_gb": cap_gb,
            "tokens": "validation text" if tokens is not None else "random ids", "optimizer_step": optimizer_step}


def longest_fitting(cells: list) -> Optional[int]:
    """The longest context among ok cells below the shortest OOM one (None when none fits)."""
    oom = min((c["context"] for c in cells if c.get("status") == "OOM"), default=math.inf)
    ok = [c["context"] for c in cells if c.get("status") == "ok" and c["context"] < oom]
    return max(ok, default=None)


# ---------------------------------------------------------------------------------------------------------
# Report: a table per recipe and a memory-vs-context plot with one line per world size.

def cp_section(results: dict, out_dir) -> tuple:
    """(markdown section, [png paths]) for the `cp` cells of a results.json (scripts/compare.py)."""
    cs = [c for c in results.get("cells", {}).values() if c.get("eval") == "cp"]
    if not cs:
        return "", []
    recipes = sorted({c["recipe"] for c in cs})
    worlds = sorted({c["world_size"] for c in cs})
    contexts = sorted({c["context"] for c in cs})
    caps = sorted({c.get("cap_gb") for c in cs if c.get("cap_gb")})
    lines = ["## Context parallel: one sequence over W ranks", "",
             "Per-rank peak memory of a training forward + backward (the largest rank's RSS above its own "
             "baseline, weights excluded) and the evaluation perplexity of the same sequence, zigzag layout, "
             "one gloo process per rank" + (f", per-rank cap {caps[0]:g} GiB" if caps else "") + ".", ""]
    header = "| recipe | W | " + " | ".join(str(c) for c in contexts) + " | longest fitting |"
    lines += [header, "|" + "---|" * (len(contexts) + 3)]
    for r in recipes:
        for w in worlds:
            row = {c["context"]: c for c in cs if c["recipe"] == r and c["world_size"] == w}
            cells_txt = []
            for ctx in contexts:
                c = row.get(ctx)
                if c is None:
                    cells_txt.append("")
                elif c["status"] == "ok":
                    cells_txt.append(f"{c['peak_bytes'] / 2**20:.1f} MiB, ppl {c['ppl']:.3f}")
                else:
                    cells_txt.append(c["status"])
            fit = longest_fitting(list(row.values()))
            fit_txt = "none" if fit is None else (f"{fit}" if any(c["status"] == "OOM" for c in row.values())
                                                  else f">= {fit} (no OOM up to it)")
            lines.append(f"| {r} | {w} | " + " | ".join(cells_txt) + f" | {fit_txt} |")
    pngs = []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in recipes:
            for w in worlds:
                pts = sorted((c["context"], c["peak_bytes"] / 2**20) for c in cs
                             if c["recipe"] == r and c["world_size"] == w and c["status"] == "ok")
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{r} W={w}", linestyle="-" if w == 1 else "--")
        for cap in caps:
            ax.axhline(cap * 1024, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("peak MiB per rank (train step)")
        ax.legend(fontsize=7)
        ax.set_title("memory per rank vs context, by world size")
        path = Path(out_dir) / "cp_memory.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        pngs.append(path)
        lines += ["", f"![memory per rank vs context]({path.name})"]
    return "\n".join(lines) + "\n", pngs
