"""Training on the built-in corpus under a time budget: validation bits per byte against CPU time, wall
time and tokens, beside gzip -9 on the same bytes; and training throughput of zoo's transformer beside
transformers' `LlamaForCausalLM` of the same size and shape, trained by the same loop.

    .venv/bin/python benchmarks/bench_train.py transformer mamba2 taipan --budget 30m --out runs/bench_train
    .venv/bin/python benchmarks/bench_train.py transformer --budget 3m --set train.lr=3e-3   # a tuning run
    .venv/bin/python benchmarks/bench_train.py --llama transformer --no-curves              # throughput only
    .venv/bin/python benchmarks/bench_train.py --plot-only --out runs/bench_train           # redraw the PNG

Curves. Each recipe trains with zoo's `Trainer` (its AdamW groups, clipping, data order) until its
training time reaches the budget, on the budget's clock: `cpu` (default) is this process's CPU time,
which is what a shared machine does not inflate (with one thread it equals wall time on a quiet
machine), `wall` is elapsed time. Evaluation is not charged to the budget; both clocks are recorded for
training alone. The learning rate warms up linearly over `train.warmup_steps`, then follows a cosine to
`lr * min_lr_ratio` over the rest of the budget (the fraction of the budget spent, not of max_steps),
so a run ends annealed whatever the machine's speed; the recipe's max_steps is not used. On a shared
machine `--wall-limit` also ends a run that long after its start (evaluations included); the schedule then
follows whichever limit is nearer, and the JSON says which one stopped the run.

Validation: a fixed slice of the val split, `--eval-segments` contiguous segments of `--eval-segment`
tokens at evenly spaced offsets (the default 8 x 32,768 = 262,144 tokens, about 256 KiB), each cut into
windows of the recipe's seq_len that start from an empty context; every token of a segment after its
first is predicted once. bits per byte = summed -log2 p over those tokens / their UTF-8 bytes (the
end-of-document byte 0 carries none). gzip -9's figure is computed here on the same bytes, the
segments concatenated, and on the whole val split. Segments are long because gzip's 32 KiB window
finds most of its matches far back in the same file: on 2 KiB segments gzip -9 gives ~2.03 bpb
against 1.79 on the whole split, a bar the model's short windows would clear unfairly.

Throughput (`--llama RECIPE`): the recipe's model (attention + SwiGLU + RMSNorm, untied) and a
LlamaForCausalLM with the same d_model, layers, heads, MLP width, vocab, norm eps and RoPE base (sdpa
attention), same parameter count, each trained by `loop_step` below with the same AdamW groups, batches,
float32 and threads. Timed windows alternate between the two (and which goes first) to cancel drift;
the figure per model is the median over windows of training tokens per wall second, with CPU seconds
beside it.

Writes <out>/<recipe>.json (the curve), <out>/throughput.json, <out>/curves.png, and a `summary:` line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import zoo  # noqa: E402
from benchmarks.harness import ROOT, Stopwatch, print_summary, time_interleaved, write_json  # noqa: E402
from evals.compression import compression_bpb  # noqa: E402
from zoo.train.optim import build_optimizer, lr_factor  # noqa: E402
from zoo.data import prepared_data  # noqa: E402
from zoo.train.trainer import Trainer  # noqa: E402


def duration(text: str) -> float:
    """'30m', '90s', '1.5h', '600' -> seconds."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if text[-1:].lower() in "smh" else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 600, 90s, 30m or 1.5h, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return value


def recipe_path(name: str) -> str:
    p = Path(name)
    return str(p if p.suffix in (".yaml", ".yml") else ROOT / "recipes" / f"{name}.yaml")


# -- validation slice ------------------------------------------------------------------------------------------

def _nats(logits, targets) -> float:
    """Summed -ln p of the targets; the log-softmax in at least float32 (bf16 loses ~2 digits)."""
    logits = logits.float() if logits.element_size() < 4 else logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()


class ValSlice:
    """`n` contiguous segments of `length` + 1 tokens at evenly spaced offsets of the val split; the last
    `length` tokens of each are predicted, in windows of the model's seq_len."""

    def __init__(self, data, n: int, length: int):
        if data.tokenizer != "byte":
            raise SystemExit("bench_train measures bits per byte with the byte tokenizer (train.tokenizer: byte)")
        tokens = data.val.file.tokens
        if n * (length + 1) > len(tokens):
            raise SystemExit(f"--eval-segments x --eval-segment: {n} x {length} exceeds the val split "
                             f"({len(tokens):,} tokens)")
        starts = np.linspace(0, len(tokens) - length - 1, n).round().astype(np.int64)
        self.tokens = torch.from_numpy(np.stack([np.asarray(tokens[s:s + length + 1], dtype=np.int64)
                                                 for s in starts]))
        targets = self.tokens[:, 1:]
        eos = data.val.file.header.get("eos_id")
        # byte tokenizer: a target token is one byte, except the end-of-document id, which is none
        kept = targets[targets != eos] if eos is not None else targets.flatten()
        self.text = bytes(kept.to(torch.uint8).numpy())
        self.num_bytes = len(self.text)
        self.num_targets = targets.numel()

    @torch.no_grad()
    def bits_per_byte(self, model, seq_len: int, batch: int = 16) -> float:
        length = self.tokens.shape[1] - 1
        if length % seq_len:
            raise SystemExit(f"--eval-segment: {length} is not a multiple of train.seq_len {seq_len}")
        inputs = self.tokens[:, :-1].reshape(-1, seq_len)
        targets = self.tokens[:, 1:].reshape(-1, seq_len)
        was_training = model.training
        model.eval()
        nats = 0.0
        for x, y in zip(inputs.split(batch), targets.split(batch)):
            nats += _nats(model(x).logits, y)
        model.train(was_training)
        return nats / math.log(2) / self.num_bytes


# -- curves ----------------------------------------------------------------------------------------------------

def full_val_bpb(model, data, seq_len: int, batch: int = 16) -> tuple[float, float, int]:
    """(model bpb, gzip -9 bpb, bytes) over the whole val split in windows of seq_len, on the same bytes."""
    tokens = torch.from_numpy(np.asarray(data.val.file.tokens, dtype=np.int64))
    n = (len(tokens) - 1) // seq_len
    inputs, targets = tokens[:n * seq_len].view(n, seq_len), tokens[1:n * seq_len + 1].view(n, seq_len)
    eos = data.val.file.header.get("eos_id")
    text = bytes(targets[targets != eos].to(torch.uint8).numpy())
    model.eval()
    nats = 0.0
    with torch.no_grad():
        for x, y in zip(inputs.split(batch), targets.split(batch)):
            nats += _nats(model(x).logits, y)
    return nats / math.log(2) / len(text), compression_bpb(text)["gzip-9"], len(text)


def train_curve(name: str, overrides: list, budget: float, clock_kind: str, eval_every: float,
                val: ValSlice, gzip_bpb: float, out: Path, wall_limit: float = math.inf,
                full_val: bool = False, log=print) -> dict:
    recipe = zoo.load_recipe(recipe_path(name), overrides)
    cfg = recipe.train
    data = prepared_data(recipe, log=log)
    trainer = Trainer(recipe, data, out / f"run-{recipe.name}", progress=False, log=log, overwrite=True)  # a new curve
    spent = [0.0]   # fraction of the budget spent, read by the schedule at every step
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return lr_factor(step, warm, warm + 1, cfg.min_lr_ratio)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, spent[0])))

    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, factor)
    params = trainer.model.num_params()
    log(f"{recipe.name}: {params['total']:,} params, seq_len {cfg.seq_len}, batch {cfg.batch_size} x "
        f"{cfg.grad_accum}, lr {cfg.lr}, warmup {warm}, budget {budget:.0f} s ({clock_kind} clock), "
        f"wall limit {wall_limit:.0f} s")
    result = {"recipe": recipe.name, "source": recipe_path(name), "overrides": list(overrides),
              "params": params, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
              "grad_accum": cfg.grad_accum, "lr": cfg.lr, "warmup_steps": warm, "min_lr_ratio": cfg.min_lr_ratio,
              "weight_decay": cfg.weight_decay, "budget_s": budget, "clock": clock_kind,
              "wall_limit_s": wall_limit if math.isfinite(wall_limit) else None,
              "threads": torch.get_num_threads(), "val_tokens": val.num_targets, "val_bytes": val.num_bytes,
              "gzip9_bpb": gzip_bpb, "complete": False}
    clock = Stopwatch()   # training time on both clocks, paused while evaluating
    points, losses = [], []
    next_eval, start = eval_every, time.perf_counter()   # no point at step 0: untrained is 8 bpb

    def evaluate():
        t0 = time.perf_counter()
        bpb = val.bits_per_byte(trainer.model, cfg.seq_len)
        point = {"step": trainer.step, "tokens": trainer.tokens, "cpu_s": round(clock.cpu, 2),
                 "wall_s": round(clock.wall, 2), "elapsed_s": round(time.perf_counter() - start, 2),
                 "train_loss": round(statistics.fmean(losses[-20:]), 4) if losses else None,
                 "lr": trainer.scheduler.get_last_lr()[0], "val_bpb": round(bpb, 4)}
        points.append(point)
        result.update(points=points, final_bpb=point["val_bpb"],
                      tokens_per_cpu_s=round(trainer.tokens / max(clock.cpu, 1e-9), 1),
                      first_below_gzip=next(({k: p[k] for k in ("cpu_s", "wall_s", "tokens", "step")}
                                             for p in points if p["val_bpb"] < gzip_bpb), None))
        write_json(out / f"{recipe.name}.json", result)   # partial results survive a kill
        log(f"  {recipe.name} step {point['step']:>5}  tokens {point['tokens']:>10,}  cpu {clock.cpu:7.1f} s  "
            f"wall {clock.wall:7.1f} s  val {bpb:.4f} bpb (gzip {gzip_bpb:.4f})  eval {time.perf_counter() - t0:.0f} s")

    while True:
        used = clock.cpu if clock_kind == "cpu" else clock.wall
        # a shared machine may not grant the budget in time: the wall limit then ends the run, and the
        # schedule follows whichever limit is nearer so that the run still ends annealed
        spent[0] = max(used / budget, (time.perf_counter() - start) / wall_limit)
        if used >= next_eval or spent[0] >= 1:
            evaluate()
            next_eval += eval_every
        if spent[0] >= 1:
            break
        with clock:
            losses.append(trainer.train_step())
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"{recipe.name}: non-finite loss at step {trainer.step}")
    result["checkpoint"] = str(trainer.save())
    result["stopped_by"] = "budget" if used >= budget else "wall limit"
    if full_val:
        t0 = time.process_time()
        bpb, gz, nbytes = full_val_bpb(trainer.model, data, cfg.seq_len)
        result["full_val"] = {"bpb": round(bpb, 4), "gzip9_bpb": round(gz, 4), "bytes": nbytes}
        log(f"  {recipe.name} whole val split ({nbytes:,} bytes): {bpb:.4f} bpb, gzip -9 {gz:.4f} "
            f"(eval {time.process_time() - t0:.0f} CPU s)")
    result["complete"] = True
    write_json(out / f"{recipe.name}.json", result)
    return result


# -- throughput beside transformers' Llama ---------------------------------------------------------------------

def llama_like(recipe):
    """transformers' LlamaForCausalLM with the shape of a plain attention + SwiGLU recipe."""
    from transformers import LlamaConfig, LlamaForCausalLM
    m = recipe.model
    kinds = {(spec.type, spec.ffn.type) for spec in recipe.layers}
    if kinds != {("attn", "swiglu")}:
        raise SystemExit(f"--llama: needs a recipe whose every layer is attn + swiglu, got {sorted(kinds)}")
    attn, ffn = recipe.layers[0].cfg, recipe.layers[0].ffn
    if attn.qkv_bias or attn.out_bias or ffn.bias or m.tie_embeddings:
        raise SystemExit("--llama: the recipe must have no biases and untied embeddings, as Llama")
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=ffn.hidden_size(m.d_model),
                         num_hidden_layers=m.n_layers, num_attention_heads=attn.n_heads,
                         num_key_value_heads=attn.n_kv_heads or attn.n_heads,
                         head_dim=attn.head_dim or m.d_model // attn.n_heads, max_position_embeddings=recipe.train.seq_len,
                         rms_norm_eps=m.norm_eps, rope_theta=attn.rope_base, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, initializer_range=m.init_std, use_cache=False)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def loop_step(model, optimizer, batch, grad_clip: float) -> float:
    """The one training step both models take: forward with labels, backward, clip, AdamW, zero grads."""
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def profile_pair(models: dict, optims: dict, batches: list, grad_clip: float) -> dict:
    """torch.profiler over the same training steps of each model: {model: {op: [self CPU ms per step, calls
    per step]}}, every op with its self time (children excluded), so the columns add up to the step."""
    from torch.profiler import ProfilerActivity, profile
    out = {}
    for k, m in models.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches:
                loop_step(m, optims[k], b, grad_clip)
        n = len(batches)
        out[k] = {e.key: [e.self_cpu_time_total / 1e3 / n, e.count / n] for e in prof.key_averages()
                  if e.self_cpu_time_total > 0}
    return out


def profile_table(prof: dict, top: int = 20) -> str:
    """The ops that cost most on either side, then the rest and the step's total, in ms per step."""
    a, b = prof.values()
    keys = sorted(set(a) | set(b), key=lambda op: -max(a.get(op, [0])[0], b.get(op, [0])[0]))
    names = list(prof)
    lines = [f"| op (self CPU) | {names[0]} ms | calls | {names[1]} ms | calls |", "|---|---:|---:|---:|---:|"]
    for op in keys[:top]:
        (ta, ca), (tb, cb) = a.get(op, [0, 0]), b.get(op, [0, 0])
        lines.append(f"| {op} | {ta:.1f} | {ca:g} | {tb:.1f} | {cb:g} |")
    rest = [sum(side.get(op, [0])[0] for op in keys[top:]) for side in (a, b)]
    lines.append(f"| the other {len(keys) - top} ops | {rest[0]:.1f} | | {rest[1]:.1f} | |")
    lines.append(f"| **step** | **{sum(v[0] for v in a.values()):.1f}** | | **{sum(v[0] for v in b.values()):.1f}** | |")
    return "\n".join(lines)


def throughput(name: str, overrides: list, windows: int, steps: int, log=print, profile_steps: int = 0) -> dict:
    recipe = zoo.load_recipe(recipe_path(name), overrides)
    cfg = recipe.train
    data = prepared_data(recipe, log=log)
    torch.manual_seed(cfg.seed)
    models = {"zoo": zoo.build_model(recipe), "transformers Llama": llama_like(recipe)}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"--llama: parameter counts differ: {counts}")
    optims = {k: build_optimizer(m, cfg) for k, m in models.items()}
    tokens = cfg.batch_size * cfg.seq_len
    batches = [data.train_batch(i, 0, cfg.batch_size, cfg.seq_len) for i in range(steps)]
    for k, m in models.items():   # warm-up: allocator, thread pool, optimizer state
        m.train()
        for b in batches[:2]:
            loop_step(m, optims[k], b, cfg.grad_clip)
    def window(k):
        def run():
            for b in batches:
                loop_step(models[k], optims[k], b, cfg.grad_clip)
        return run

    def each(k, w, clock):
        log(f"  window {w}: {k:<20} {steps * tokens / clock.last_wall:8,.0f} tokens/s "
            f"(cpu {clock.last_cpu:.2f} s, wall {clock.last_wall:.2f} s)")

    order = list(models)
    times = time_interleaved({k: window(k) for k in order}, windows, warmup=0, alternate=True, each=each)
    result = {"recipe": recipe.name, "overrides": list(overrides), "params": counts["zoo"], "seq_len": cfg.seq_len,
              "batch_size": cfg.batch_size, "threads": torch.get_num_threads(), "windows": windows,
              "steps_per_window": steps, "models": {}}
    for k, t in times.items():
        result["models"][k] = {"tokens_per_s": round(steps * tokens / t.median, 1),
                               "tokens_per_cpu_s": round(steps * tokens / t.cpu_median, 1),
                               "wall_s": [round(x, 3) for x in t.wall], "cpu_s": [round(x, 3) for x in t.cpu]}
    if profile_steps:
        result["profile"] = profile_pair(models, optims, batches[:profile_steps], cfg.grad_clip)
    z, h = (result["models"][k]["tokens_per_s"] for k in order)
    result["zoo_over_llama"] = round(z / h, 3)
    # per-window ratios of adjacent measurements: drift cancels within a window
    result["zoo_over_llama_per_window"] = [round(b / a, 3) for a, b in zip(times["zoo"].wall,
                                                                          times["transformers Llama"].wall)]
    return result


# -- plot ------------------------------------------------------------------------------------------------------

def plot(out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "throughput.json"]
    curves = [c for c in curves if "points" in c]
    if not curves:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, key, label in zip(axes, ("cpu_s", "wall_s", "tokens"),
                              ("training CPU seconds (process)", "training wall seconds", "training tokens")):
        for c in curves:
            pts = [p for p in c["points"] if p["step"] > 0]
            ax.plot([p[key] for p in pts], [p["val_bpb"] for p in pts], marker=".",
                    label=f"{c['recipe']} ({c['params']['total'] / 1e6:.1f}M, {c['seq_len']} x {c['batch_size']}, "
                          f"{c['threads']} thread{'s' if c['threads'] > 1 else ''}, {c['budget_s'] / 60:.0f} {c['clock']} min)")
        ax.axhline(curves[0]["gzip9_bpb"], color="k", ls="--", lw=1, label=f"gzip -9 ({curves[0]['gzip9_bpb']:.3f})")
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits per byte")
        ax.set_ylim(1.0, 4.0)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"stdlib corpus, byte tokenizer; validation {curves[0]['val_bytes']:,} bytes")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", help="recipe names (recipes/<name>.yaml) or files")
    ap.add_argument("--budget", type=duration, default=duration("30m"), help="training time per recipe")
    ap.add_argument("--budgets", default="", help="per recipe, e.g. mamba2=15m,taipan=12m (overrides --budget)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--wall-limit", type=duration, default=math.inf,
                    help="also stop each recipe this long after its start, evaluations included (a shared machine)")
    ap.add_argument("--full-val", action="store_true", help="at the end, bits per byte on the whole val split")
    ap.add_argument("--eval-every", type=duration, default=duration("2m"), help="on the budget's clock")
    ap.add_argument("--eval-segments", type=int, default=8)
    ap.add_argument("--eval-segment", type=int, default=32768)
    ap.add_argument("--set", nargs="*", default=[], help="dotlist overrides for every recipe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama", default=None, metavar="RECIPE", help="also time RECIPE beside LlamaForCausalLM")
    ap.add_argument("--llama-windows", type=int, default=6)
    ap.add_argument("--llama-steps", type=int, default=5)
    ap.add_argument("--llama-profile", type=int, default=0, metavar="STEPS",
                    help="after timing, profile STEPS training steps of each (torch.profiler) and print the ops")
    ap.add_argument("--no-curves", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--score", default=None, metavar="CHECKPOINT",
                    help="only score a trained checkpoint on the slice in windows of each --score-windows length")
    ap.add_argument("--score-windows", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_train"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    if args.plot_only:
        print(f"plot: {plot(args.out)}")
        return 0
    if args.score:
        # What a shorter training window costs at evaluation: the same model, less context per window.
        model = zoo.load_checkpoint(args.score).eval()
        val = ValSlice(prepared_data(model.recipe), args.eval_segments, args.eval_segment)
        scores = {w: round(val.bits_per_byte(model, w), 4) for w in args.score_windows}
        for w, bpb in scores.items():
            print(f"windows of {w}: {bpb:.4f} bpb")
        print_summary({"checkpoint": args.score, "bpb_by_window": scores})
        return 0
    budgets = {}
    for item in filter(None, args.budgets.split(",")):
        k, _, v = item.partition("=")
        budgets[k.strip()] = duration(v.strip())
    if args.llama:
        res = throughput(args.llama, args.set, args.llama_windows, args.llama_steps,
                         profile_steps=args.llama_profile)
        write_json(args.out / "throughput.json", res)
        if "profile" in res:
            print(profile_table(res["profile"]))
        for k, m in res["models"].items():
            print(f"{k:<20} {m['tokens_per_s']:10,.0f} tokens/s  ({m['tokens_per_cpu_s']:,.0f} per CPU s)")
        print(f"zoo / Llama: {res['zoo_over_llama']}x (per window {res['zoo_over_llama_per_window']})")
        summary["zoo_over_llama"] = res["zoo_over_llama"]
    if args.recipes and not args.no_curves:
        first = zoo.load_recipe(recipe_path(args.recipes[0]), args.set)
        data = prepared_data(first)
        val = ValSlice(data, args.eval_segments, args.eval_segment)
        gzip_slice = compression_bpb(val.text)["gzip-9"]
        val_text = bytes(np.asarray(data.val.file.tokens)[np.asarray(data.val.file.tokens) != data.val.file.header["eos_id"]]
                         .astype(np.uint8))
        gzip_full = compression_bpb(val_text)["gzip-9"]
        print(f"validation slice: {args.eval_segments} segments x {args.eval_segment} tokens, {val.num_targets:,} "
              f"targets, {val.num_bytes:,} bytes; gzip -9: {gzip_slice:.4f} bpb on the slice, {gzip_full:.4f} on "
              f"the whole val split ({len(val_text):,} bytes)")
        summary["gzip9_bpb_slice"], summary["gzip9_bpb_val"] = round(gzip_slice, 4), round(gzip_full, 4)
        for name in args.recipes:
            budget = budgets.get(Path(name).stem, args.budget)
            res = train_curve(name, args.set, budget, args.clock, args.eval_every, val, gzip_slice, args.out,
                              wall_limit=args.wall_limit, full_val=args.full_val)
            summary[res["recipe"]] = {"final_bpb": res["final_bpb"], "budget_s": budget,
                                      "first_below_gzip": res["first_below_gzip"], "tokens": res["points"][-1]["tokens"]}
        summary["plot"] = str(plot(args.out))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
