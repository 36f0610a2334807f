"""Compare recipes under one token budget: train each, evaluate all, write results.json, report.md and plots.

    zoo compare transformer swa mamba2 taipan samba --budget 300K --contexts 256,512,1024,2048 \
        --out runs/compare [--match-params 2M | --match-params transformer] [--set train.seq_len=256 ...]

RECIPES are recipe names (recipes/<name>.yaml), recipe files, or run / checkpoint directories (evaluated
as they are, not trained). Every recipe trains for the same number of tokens (`--budget`, rounded down to
whole optimizer steps of its batch_size x seq_len). `--match-params` scales each recipe's d_model, in
steps that keep every block's heads dividing it with an even head dimension, to the size closest to the
target (a count like 2M, or the name of one of the recipes) and prints the resulting sizes.

Evaluations, each a cell of results.json keyed (recipe, eval, scheme, context): perplexity under the
`--schemes` by context (with gzip / xz reference lines on the same text), measured peak memory in a
fresh process per cell (inference forward, prefill + decode, training forward + backward; a cap gives
`OOM` and the sweep goes on), throughput (prefill, decode, training tokens/s), passkey retrieval.
Uncertainty (issue 16): every bits/byte carries a 95% bootstrap interval over the scored documents
(`--resamples`); `--max-doc-tokens` caps each document's share of `--max-tokens`, so the budget spans many
documents. Throughput cells keep every one of `--repeats` on the wall and the process CPU clock. Length
extrapolation (`--extrapolation-factor F`, 0 for none): the `--extrapolation-docs` longest held-out documents,
cut to F x the recipe's train.seq_len, streamed through the cache; bits/byte by position and whether the loss
keeps falling, stays flat or breaks past the training length (evals.perplexity.extrapolation).
A second run skips every cell already in results.json (and reuses the trained checkpoints), so an
interrupted comparison resumes where it stopped. Ends with the summary table, where the report and plots
are, and one machine-readable `summary:` line.

Context parallel (`--world-sizes 1,2,4`): for every world size W and every `--cp-contexts` length, the
trained model runs one sequence of validation text spread over W gloo processes (evals.context_parallel):
per-rank peak memory of a training step and the perplexity of that sequence (the same for every W: the
sharded run is exact). With `--cp-cap-gb` a rank outgrowing the cap gives an OOM cell, and the report
names the longest context each recipe fits per rank at each W, beside a memory-vs-context plot.

Memory as the architectures claim it (evals.context_memory), both on each recipe built at seed 0 (memory does
not depend on the weights, so neither needs the trained checkpoint):
`--decode-memory-contexts 1024,4096,16384,65536`: per context, a fresh process prefills the cache in chunks of
`--prefill-chunk` tokens and decodes `--decode-memory-tokens` steps; the cell holds the cache's tensor bytes,
the analytic state, and the peak RSS of the decode steps above the warmed-up model. Contexts are run
shortest first; one whose time, extrapolated from the shorter ones, exceeds `--decode-memory-time-cap`
seconds (attention's quadratic prefill) is recorded `skipped` with the prediction, and so is every longer
one (a later run with a larger cap measures them). `--cap-gb` caps each cell's memory.
`--longest-train-worlds 1,2,4`: the longest context each recipe trains at (forward + backward + AdamW step)
with every rank's RSS capped at `--longest-train-cap-gb`, the sequence over W gloo processes: doubling from
256, then bisection on multiples of `--longest-train-step`, one fresh set of processes per probe.
"""
import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the checkout: recipes/ by name, the git commit

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import zoo  # noqa: E402
from evals.compression import compression_bpb  # noqa: E402
from evals.context_memory import longest_trainable, predicted_seconds  # noqa: E402
from evals.context_report import context_section  # noqa: E402
from evals.context_use import COPY_SKIP, context_use, synthetic_copy  # noqa: E402
from evals.context_parallel import cp_cell, cp_section  # noqa: E402
from evals.memory import measure  # noqa: E402
from evals.perplexity import SCHEMES, documents_text, evaluate_perplexity, extrapolation  # noqa: E402
from evals.recall import passkey_grid  # noqa: E402
from evals.report import cell_key, summary_table, write_report  # noqa: E402
from evals.throughput import KINDS, MEMORY_KINDS, throughput_record  # noqa: E402
from zoo.data import DataError, PreparedData, load_tokenizer, prepare, prepared_data  # noqa: E402
from zoo.data.corpus import NAMED as NAMED_CORPORA  # noqa: E402
from zoo.ops.dispatch import chosen  # noqa: E402
from zoo.train.checkpoint import CheckpointError, resolve_checkpoint  # noqa: E402
from zoo.train.run_dir import RunDirError, RunLock, move_aside  # noqa: E402
from zoo.train.trainer import Trainer, TrainingError  # noqa: E402


# -- arguments ---------------------------------------------------------------------------------------------------

def count(text: str) -> int:
    """'300K', '1.5M', '20000' -> int."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count such as 20000, 300K or 1.5M, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return int(value)


def int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values, default=0) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def float_list(text: str) -> list:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def name_list(allowed):
    def parse(text: str) -> list:
        names = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in names if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; allowed: {', '.join(allowed)}")
        return names
    return parse


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="recipe names, recipe files, or run/checkpoint directories")
    ap.add_argument("--out", default="runs/compare", help="results.json, report.md, PNGs and runs/ go here")
    ap.add_argument("--budget", type=count, default=count("300K"), help="training tokens per recipe")
    ap.add_argument("--contexts", type=int_list, default=[256, 512, 1024, 2048])
    ap.add_argument("--match-params", default=None, help="target parameter count (2M) or a recipe's name")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="dotlist overrides applied to every recipe, e.g. model.n_layers=4 train.seq_len=256")
    ap.add_argument("--schemes", type=name_list(SCHEMES), default=list(SCHEMES))
    ap.add_argument("--max-tokens", type=int, default=8192, help="targets scored per scheme and context")
    ap.add_argument("--max-doc-tokens", type=int, default=None,
                    help="each document's first tokens at most, so --max-tokens spans more documents (default: whole)")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the bits/byte intervals")
    ap.add_argument("--extrapolation-factor", type=int, default=16,
                    help="stream the longest documents to this many times train.seq_len, loss by position (0: off)")
    ap.add_argument("--extrapolation-docs", type=int, default=16, help="how many of the longest documents")
    ap.add_argument("--eval-corpora", type=lambda t: [c for c in t.split(",") if c], default=[],
                    help="context use on held-out documents of each named corpus (e.g. stdlib,shakespeare), "
                         "prepared with the recipe's tokenizer: segments of --context-length tokens "
                         "streamed whole, the history-cut control, the copy probe by distance and gzip / xz on "
                         "the same segments (evals/context_use.py)")
    ap.add_argument("--context-length", type=int, default=None,
                    help="tokens per context-use segment (default 4 x train.seq_len)")
    ap.add_argument("--history-cut", type=int, default=None,
                    help="the control's history in tokens (default train.seq_len): does history past it help?")
    ap.add_argument("--context-segments", type=int, default=8, help="segments per corpus (the interval's documents)")
    ap.add_argument("--context-split", choices=("val", "test"), default="test",
                    help="the held-out split the context-use segments come from")
    ap.add_argument("--copy-span", type=int, default=16, help="tokens a repeat must match to count as a copy")
    ap.add_argument("--copy-lengths", type=int_list, default=[],
                    help="synthetic copy: random strings of these lengths repeated once (evals.context_use)")
    ap.add_argument("--copy-trials", type=int, default=8, help="strings per synthetic copy length")
    ap.add_argument("--memory", type=name_list(tuple(MEMORY_KINDS)), default=list(MEMORY_KINDS),
                    help="memory kinds to measure (comma-separated; '' for none)")
    ap.add_argument("--memory-contexts", type=int_list, default=None, help="default: --contexts")
    ap.add_argument("--cap-gb", type=float, default=4.0, help="per-measurement memory cap (gives OOM)")
    ap.add_argument("--throughput", type=name_list(KINDS), default=list(KINDS),
                    help="throughput kinds (comma-separated; '' for none)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed repeats per throughput cell (every one kept, on the wall and the CPU clock)")
    ap.add_argument("--passkey-lengths", type=int_list, default=[256, 1024])
    ap.add_argument("--passkey-depths", type=float_list, default=[0.0, 0.5, 1.0])
    ap.add_argument("--passkey-trials", type=int, default=4)
    ap.add_argument("--no-passkey", action="store_true")
    ap.add_argument("--passkey-from", default=None,
                    help="evaluate passkey on DIR/<name>, the passkey fine-tunes of `zoo recall passkey` (recipes "
                         "without one are left out of the passkey cells); default: the compared models themselves")
    ap.add_argument("--passkey-factors", type=int_list, default=None,
                    help="with --passkey-from: prompt lengths as these multiples of each fine-tune's own length "
                         "(instead of --passkey-lengths)")
    ap.add_argument("--mqar-results", default=None,
                    help="results.json of `zoo recall mqar`: its runs go into results.json and the report's figure")
    ap.add_argument("--data", default=None, help="prepared data directory (default: prepare each recipe's corpus)")
    ap.add_argument("--data-root", default="data", help="where corpora are prepared and cached")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads here and in the memory subprocesses (default: torch's). On a CPU shared "
                         "with other work, 1 avoids threads spinning while they wait for a core")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--overwrite", action="store_true",
                    help="--out holds a comparison of other recipes or settings: move it into --out/replaced-<time>/ "
                         "and start over (a rerun of the same comparison resumes without it)")
    ap.add_argument("--world-sizes", type=int_list, default=[],
                    help="context parallel: measure memory and perplexity with the sequence over W gloo processes")
    ap.add_argument("--cp-contexts", type=int_list, default=None, help="default: --memory-contexts or --contexts")
    ap.add_argument("--cp-cap-gb", type=float, default=None, help="per-rank memory cap of the cp cells (gives OOM)")
    ap.add_argument("--decode-memory-contexts", type=int_list, default=[],
                    help="decode memory after a chunked prefill at these contexts (default: none)")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill chunk of the decode-memory cells")
    ap.add_argument("--decode-memory-tokens", type=int, default=8, help="decode steps measured per decode-memory cell")
    ap.add_argument("--decode-memory-time-cap", type=float, default=120.0,
                    help="seconds: a decode-memory context predicted to take longer is skipped, and longer ones too")
    ap.add_argument("--longest-train-worlds", type=int_list, default=[],
                    help="longest trainable context under --longest-train-cap-gb per world size (default: none)")
    ap.add_argument("--longest-train-cap-gb", type=float, default=0.25, help="per-rank memory cap of that search")
    ap.add_argument("--longest-train-step", type=int, default=256, help="the search's resolution in tokens")
    ap.add_argument("--longest-train-max", type=int, default=65536, help="the search stops growing there")
    ap.add_argument("--longest-train-timeout", type=float, default=120.0,
                    help="seconds per probe; a probe past it ends the growth as an OOM does")
    args = ap.parse_args(argv)
    if args.prefill_chunk < 1 or args.decode_memory_tokens < 1:
        ap.error("--prefill-chunk and --decode-memory-tokens: expected positive integers")
    if args.extrapolation_factor == 1 or args.extrapolation_factor < 0 or args.extrapolation_docs < 1:
        ap.error("--extrapolation-factor: 0 (off) or at least 2; --extrapolation-docs: a positive integer")
    if args.max_tokens < 2:
        ap.error(f"--max-tokens: at least 2 targets per scheme and context, got {args.max_tokens}")
    if args.context_segments < 1 or args.copy_span < 2 or args.copy_trials < 1:
        ap.error("--context-segments, --copy-trials: positive integers; --copy-span: at least 2")
    if args.history_cut is not None and args.history_cut < 4:
        ap.error(f"--history-cut: at least 4 tokens, got {args.history_cut}")
    if args.context_length is not None and args.history_cut is not None and (
            args.context_length % args.history_cut or args.context_length < 2 * args.history_cut):
        ap.error(f"--context-length: a multiple of --history-cut, at least twice it (got {args.context_length} and "
                 f"{args.history_cut})")
    if args.copy_lengths and min(args.copy_lengths) <= COPY_SKIP:
        ap.error(f"--copy-lengths: each must exceed the {COPY_SKIP} tokens a copy is given to start, "
                 f"got {args.copy_lengths}")
    for corpus in args.eval_corpora:
        if corpus not in NAMED_CORPORA:
            ap.error(f"--eval-corpora: unknown corpus {corpus!r}; allowed: {', '.join(NAMED_CORPORA)}")
    if (args.max_doc_tokens is not None and args.max_doc_tokens < 2) or args.resamples < 1:
        ap.error("--max-doc-tokens: at least 2 (a document's first target needs a token before it); "
                 "--resamples: a positive integer")
    return args


# -- recipes and sizes -------------------------------------------------------------------------------------------

def resolve(spec: str, overrides: list):
    """(recipe, checkpoint or None) for a recipe name, recipe file, run/checkpoint directory, or a model directory
    written by ZooForCausalLM.save_pretrained (an import; zoo.train.checkpoint.is_model_dir)."""
    path = Path(spec)
    if path.is_dir():
        ckpt = resolve_checkpoint(path)
        return zoo.load_recipe(ckpt / "recipe.yaml"), ckpt
    if path.is_file():
        return zoo.load_recipe(path, overrides), None
    named = ROOT / "recipes" / f"{spec}.yaml"
    if named.is_file():
        return zoo.load_recipe(named, overrides), None
    known = sorted(p.stem for p in (ROOT / "recipes").glob("[!_]*.yaml"))
    raise ValueError(f"recipes: {spec!r} is not a recipe file, a run directory or a recipe name "
                     f"(known: {', '.join(known)})")


def d_model_step(recipe) -> int:
    """The d_model multiple every block accepts: heads divide it with an even head dimension, and an
    expanded inner width splits into whole heads of a fixed head_dim."""
    step = 1
    for spec in recipe.layers:
        cfg = spec.cfg
        heads = getattr(cfg, "n_heads", None)
        if heads:
            step = math.lcm(step, 2 * heads)
        head_dim, expand = getattr(cfg, "head_dim", None), getattr(cfg, "expand", None)
        if head_dim and expand:
            step = math.lcm(step, head_dim // math.gcd(int(expand), head_dim))
    return step


def ffn_overrides(recipe, mult: float) -> list:
    """Set the feed-forward width `mult` of the default FFN and of every block that inherits it (a loaded
    recipe spells each block's FFN out, so the default alone would change nothing)."""
    default = recipe.model.ffn
    if default.type == "none" or default.hidden is not None:
        return []
    out = [f"model.blocks.{letter}.ffn.mult={mult}" for letter, block in recipe.to_dict()["model"]["blocks"].items()
           if isinstance(block.get("ffn"), dict) and block["ffn"].get("type") != "none"
           and block["ffn"].get("hidden") is None and block["ffn"].get("mult") == default.mult]
    return [f"model.ffn.mult={mult}"] + out if out else []


def params_at(recipe, d_model: int, ffn_mult=None) -> int:
    """Parameters of `recipe` at this width; 0 where the recipe is invalid at it (a width too narrow for a
    fixed field, e.g. rope_dim above the head dimension), so the search grows past it."""
    overrides = [f"model.d_model={d_model}"] + (ffn_overrides(recipe, ffn_mult) if ffn_mult is not None else [])
    try:
        return zoo.build_model(zoo.load_recipe(recipe.to_dict(), overrides)).num_params()["total"]
    except zoo.RecipeError:
        return 0


def match_params(recipe, target: int, tolerance: float = 0.02) -> tuple:
    """(overrides, params) that bring `recipe` closest to `target` parameters.

    First d_model, over multiples of `d_model_step`: parameters grow with d_model, so a binary search finds
    the first multiple at or above the target and its predecessor is the other candidate. At small widths
    those steps are coarse (d_model 112 -> 120 with 4 heads is +15% parameters), so when the closest one
    still misses by more than `tolerance` and the recipe has feed-forward layers, their width (model.ffn.mult,
    a float) is then searched the same way at that d_model. A recipe without either stays off target, and
    the printed sizes say by how much."""
    step = d_model_step(recipe)
    lo, hi = 1, 1
    while params_at(recipe, hi * step) < target:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if params_at(recipe, mid * step) < target:
            lo = mid + 1
        else:
            hi = mid
    d, n = min(((k * step, params_at(recipe, k * step)) for k in {max(1, hi - 1), hi}),
               key=lambda c: (c[1] == 0, abs(c[1] - target)))   # never a width the recipe refuses
    overrides = [f"model.d_model={d}"]
    if abs(n - target) <= tolerance * target or not ffn_overrides(recipe, 1.0):
        return overrides, n
    lo_m, hi_m = 0.25, 4 * recipe.model.ffn.mult
    for _ in range(30):
        mid_m = (lo_m + hi_m) / 2
        if params_at(recipe, d, mid_m) < target:
            lo_m = mid_m
        else:
            hi_m = mid_m
    mult, n_m = min(((m, params_at(recipe, d, m)) for m in (round(lo_m, 4), round(hi_m, 4))),
                    key=lambda c: abs(c[1] - target))
    if abs(n_m - target) < abs(n - target):
        return overrides + ffn_overrides(recipe, mult), n_m
    return overrides, n


# -- results file ------------------------------------------------------------------------------------------------

def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"meta": {}, "recipes": {}, "cells": {}}


def save_results(path: Path, results: dict):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)  # a kill mid-write leaves the previous file, never half of one


def meta(args, argv) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
            or platform.machine(), "world_size": 1, "threads": torch.get_num_threads(), "dtype": "float32",
            "commit": commit, "command": "zoo compare " + shlex.join(argv),
            "budget_tokens": args.budget, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- the comparison ----------------------------------------------------------------------------------------------

def budget_steps(train, budget: int) -> int:
    """Optimizer steps of a `budget`-token run: whole steps of batch_size x seq_len x grad_accum tokens, at least one
    (a sequence-length schedule keeps that many tokens in every step)."""
    return max(1, budget // (train.batch_size * train.seq_len * train.grad_accum))


def context_shape(recipe, args) -> tuple:
    """(history cut, segment length) of the context-use cells of `recipe`: --history-cut (default train.seq_len) and
    --context-length (default 4 x train.seq_len), checked together before any cell runs."""
    history = args.history_cut or recipe.train.seq_len
    segment = args.context_length or 4 * recipe.train.seq_len
    if args.eval_corpora and (segment % history or segment < 2 * history):
        raise ValueError(f"--context-length: {segment} must be a multiple of --history-cut {history}, at least twice "
                         f"it (recipe {recipe.name}; the defaults are 4 x and 1 x train.seq_len {recipe.train.seq_len})")
    return history, segment


class RecipeRun:
    """One recipe's model, trained (or loaded) only when a cell that needs it has not been done yet."""

    def __init__(self, recipe, checkpoint, args, out: Path, say):
        self.recipe, self.checkpoint, self.args, self.say = recipe, checkpoint, args, say
        self.run_dir = out / "runs" / recipe.name
        self._model = self._data = None

    def data(self):
        if self._data is None:
            self._data = prepared_data(self.recipe, self.args.data, root=self.args.data_root, log=self.say)
        return self._data

    def held_out(self, corpus: str):
        """The --context-split of `corpus` prepared with this recipe's tokenizer."""
        directory = prepare(corpus, self.recipe.train.tokenizer, root=self.args.data_root, log=self.say)
        return PreparedData(directory).splits[self.args.context_split]

    def train_steps(self) -> int:
        return budget_steps(self.recipe.train, self.args.budget)

    def train(self) -> dict:
        steps = self.train_steps()
        warmup = min(self.recipe.train.warmup_steps, steps // 10)
        recipe = zoo.load_recipe(self.recipe.to_dict(), [
            f"train.max_steps={steps}", f"train.warmup_steps={warmup}", f"train.eval_every={steps}",
            f"train.save_every={steps}", "train.keep_last=1", f"train.log_every={max(1, steps // 50)}"])
        # the train cell is not done: what the run directory holds is an interrupted or voided attempt
        trainer = Trainer(recipe, self.data(), self.run_dir, device=self.args.device, log=self.say,
                          progress=not self.args.no_progress, overwrite=True)
        result = trainer.train()
        self._model = trainer.model.eval()
        self.checkpoint = Path(result.checkpoint)
        return {"steps": result.step, "tokens": result.tokens, "seconds": result.seconds,
                "tokens_per_s": result.tokens / result.seconds, "train_loss": result.train_loss,
                "val_loss": result.val_loss, "val_bpb": result.val_bpb, "checkpoint": str(result.checkpoint),
                "batch_size": recipe.train.batch_size, "seq_len": recipe.train.seq_len,
                "units": {"tokens": "tokens", "seconds": "s", "tokens_per_s": "tokens/s",
                          "train_loss": "nats/token", "val_loss": "nats/token", "val_bpb": "bits/byte"}}

    def model(self):
        if self._model is None:
            if self.checkpoint is None:
                raise RuntimeError(f"{self.recipe.name}: no checkpoint to evaluate")
            self._model = zoo.load_checkpoint(self.checkpoint, device=self.args.device).eval()
        return self._model


def decode_memory_cell(recipe: dict, context: int, args, earlier: list) -> dict:
    """One decode-memory cell; `earlier`: this recipe's decode-memory cells at shorter contexts."""
    units = {"peak_bytes": "bytes", "seconds": "s", "cache_bytes": "bytes", "state_bytes": "bytes",
             "decode_bytes": "bytes", "decode_step_bytes": "bytes", "held_bytes": "bytes",
             "prefill_peak_bytes": "bytes", "weights_bytes": "bytes", "prefill_seconds": "s", "decode_seconds": "s"}
    stopped = [c for c in earlier if c["status"] != "ok"]
    if stopped:
        return {"status": "skipped", "reason": f"context {stopped[0]['context']} was {stopped[0]['status']}",
                "units": units}
    predicted = predicted_seconds([(c["context"], c["seconds"]) for c in earlier], context)
    if predicted is not None and predicted > args.decode_memory_time_cap:
        return {"status": "skipped", "predicted_seconds": predicted, "units": units,
                "reason": f"predicted {predicted:.0f} s > --decode-memory-time-cap {args.decode_memory_time_cap:g} s"}
    rec = measure("evals.context_memory:decode_memory",
                  {"recipe": recipe, "context": context, "prefill_chunk": args.prefill_chunk,
                   "decode_tokens": args.decode_memory_tokens, "device": args.device}, cap_gb=args.cap_gb,
                  device=args.device, timeout=args.decode_memory_time_cap + 60, threads=args.threads)
    rec["units"] = units
    rec["method"] = (("peak RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated") +
                     " of a fresh process during decode steps above the model warmed up on one chunk; "
                     "cache_bytes: the cache's tensors; state_bytes: the blocks' analytic float32 state")
    return rec


def plan(run: RecipeRun, args, given: bool, results: dict | None = None) -> list:
    """[(eval, scheme, context, function returning the cell's record)] for one recipe, in running order."""
    name, cells = run.recipe.name, []
    if not given:
        cells.append(("train", "budget", run.recipe.train.seq_len, run.train))
    for scheme in args.schemes:
        for context in ([None] if scheme == "streaming" else args.contexts):
            def ppl(scheme=scheme, context=context):
                [rec] = evaluate_perplexity(run.model(), run.data().val, [context or 1], scheme=scheme,
                                            max_tokens=args.max_tokens, device=torch.device(args.device),
                                            max_doc_tokens=args.max_doc_tokens, resamples=args.resamples)
                rec["units"] = {"loss_nats": "nats/token", "ppl": "per token", "bits_per_byte": "bits/byte",
                                "seconds": "s"}
                return rec
            cells.append(("ppl", scheme, context, ppl))
    if args.extrapolation_factor:
        T = run.recipe.train.seq_len

        def extra():
            rec = extrapolation(run.model(), run.data().val, T, args.extrapolation_factor, args.extrapolation_docs,
                                device=torch.device(args.device), resamples=args.resamples)
            rec["units"] = {"loss_nats": "nats/token", "ppl": "per token", "bits_per_byte": "bits/byte",
                            "seconds": "s", "train_len": "tokens", "length": "tokens"}
            return rec
        cells.append(("extrapolation", "streaming", args.extrapolation_factor * T, extra))
    history, segment = context_shape(run.recipe, args)
    for corpus in args.eval_corpora:
        def use(corpus=corpus):
            rec = context_use(run.model(), run.held_out(corpus), corpus, history, segment, args.context_segments,
                              args.copy_span, device=torch.device(args.device), resamples=args.resamples)
            rec["units"] = {"bits_per_byte": "bits/byte", "train_len": "tokens", "length": "tokens",
                            "seconds": "s"}
            return rec
        cells.append(("context_use", corpus, segment, use))
    for length in args.copy_lengths:
        def copy(length=length):
            rec = synthetic_copy(run.model(), length, args.copy_trials, device=torch.device(args.device))
            rec["units"] = {"token_accuracy": "fraction", "exact_rate": "fraction", "length": "tokens"}
            return rec
        cells.append(("copy", "synthetic", length, copy))
    for kind in args.memory:
        for context in args.memory_contexts or args.contexts:
            def mem(kind=kind, context=context):
                rec = measure(f"evals.throughput:{MEMORY_KINDS[kind]}", {"recipe": run.recipe.to_dict(),
                              "context": context}, cap_gb=args.cap_gb, device=args.device, timeout=600,
                              threads=args.threads)
                rec["units"] = {"peak_bytes": "bytes", "seconds": "s", "weights_bytes": "bytes",
                                "state_bytes": "bytes"}
                rec["method"] = ("peak RSS of a fresh process above its baseline, weights included"
                                 if args.device == "cpu" else "torch.cuda.max_memory_allocated")
                return rec
            cells.append(("memory", kind, context, mem))
    for context in sorted(args.decode_memory_contexts):
        def decode_mem(context=context):
            earlier = [c for c in (results or {}).get("cells", {}).values() if c["recipe"] == name
                       and c["eval"] == "decode_memory" and c["context"] < context]
            return decode_memory_cell(run.recipe.to_dict(), context, args, earlier)
        cells.append(("decode_memory", "chunked", context, decode_mem))
    for world in args.longest_train_worlds:
        def longest(world=world):
            rec = longest_trainable(run.recipe.to_dict(), world, cap_gb=args.longest_train_cap_gb,
                                    step=args.longest_train_step, start=max(256, args.longest_train_step),
                                    limit=args.longest_train_max, timeout=args.longest_train_timeout,
                                    layout=run.recipe.train.cp_layout)
            rec["units"] = {"longest": "tokens", "first_failing": "tokens", "peak_bytes": "bytes per rank",
                            "cap_gb": "GiB per rank", "search_seconds": "s"}
            rec["method"] = ("per-rank peak RSS of forward + backward + AdamW step above the rank's warmed-up "
                             "baseline (weights excluded), W gloo processes, one fresh set per probe")
            return rec
        cells.append(("longest_train", f"W{world}", None, longest))
    for kind in args.throughput:
        for context in args.contexts:
            cells.append(("throughput", kind, context,
                          lambda kind=kind, context=context: throughput_record(
                              run.model(), kind, context, decode_tokens=args.decode_tokens, repeats=args.repeats)))
    for world in args.world_sizes:
        for context in args.cp_contexts or args.memory_contexts or args.contexts:
            def cp(world=world, context=context):
                run.model()  # trained or loaded: the checkpoint exists
                tokens = run.data().val.eval_batches(1, 1, context)[0]["input_ids"][0].tolist()
                rec = cp_cell(run.recipe.to_dict(), context, world, checkpoint=str(run.checkpoint), tokens=tokens,
                              cap_gb=args.cp_cap_gb, layout=run.recipe.train.cp_layout)
                rec["units"] = {"peak_bytes": "bytes per rank", "seconds": "s", "loss_nats": "nats/token",
                                "ppl": "per token"}
                return rec
            cells.append(("cp", f"W{world}", context, cp))
    tuned = passkey_checkpoint(args.passkey_from, name) if args.passkey_from else None
    if not args.no_passkey and (tuned or not args.passkey_from):
        loaded = {}

        def passkey_model():
            if tuned is None:
                return run.model()
            if "model" not in loaded:
                loaded["model"] = zoo.load_checkpoint(tuned["checkpoint"], device=args.device).eval()
            return loaded["model"]

        for length in passkey_lengths(args, tuned):
            def passkey(length=length):
                tok_spec = run.recipe.train.tokenizer
                tok = None if tok_spec == "byte" else load_tokenizer(tok_spec)
                grid = passkey_grid(passkey_model(), [length], args.passkey_depths, args.passkey_trials,
                                    tokenizer=tok, device=args.device)
                rec = {"depths": grid["depths"], "accuracy": grid["accuracy"][0], "n_trials": grid["n_trials"],
                       "scoring": grid["scoring"], "seed": grid["seed"], "units": {"accuracy": "fraction"}}
                if tuned:
                    rec.update(model="passkey fine-tune", **{k: tuned[k] for k in ("checkpoint", "finetune_len",
                                                                                   "finetune_steps")})
                return rec
            cells.append(("passkey", "greedy", length, passkey))
    return [(name, *c) for c in cells]


def passkey_checkpoint(root, name: str) -> dict | None:
    """The passkey fine-tune of `name` under `root` (`zoo recall passkey`'s OUT): {checkpoint, finetune_len,
    finetune_steps}, or None when it has none."""
    card = Path(root) / name / "card.json"
    if not card.is_file():
        return None
    info = json.loads(card.read_text())
    return {"checkpoint": str(resolve_checkpoint(card.parent)), "finetune_len": info["seq_len"],
            "finetune_steps": info["steps"]}


def passkey_lengths(args, tuned: dict | None) -> list:
    """The passkey prompt lengths of one recipe: --passkey-factors x its fine-tune's length, or --passkey-lengths."""
    if tuned and args.passkey_factors:
        return [f * tuned["finetune_len"] for f in args.passkey_factors]
    return list(args.passkey_lengths)


def attach_mqar(results: dict, path) -> None:
    """Carry the runs of `zoo recall mqar`'s results.json into results["mqar"] (offline measurements: the
    report says where they come from)."""
    try:
        sweep = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--mqar-results: {path} is not a readable results.json of `zoo recall mqar` ({err})") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list):
        raise ValueError(f"--mqar-results: {path} holds no list of runs (expected `zoo recall mqar`'s results.json)")
    results["mqar"] = {"source": str(path), "meta": sweep.get("meta", {}), "runs": sweep["runs"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = load_results(results_path)
    kept = {k: v for k, v in results.get("meta", {}).items() if k in ("started", "setup")}
    results["meta"] = {**meta(args, argv), **kept}
    say = tqdm.write if not args.no_progress else print

    try:
        if args.mqar_results:
            attach_mqar(results, args.mqar_results)
        if args.passkey_from and not Path(args.passkey_from).is_dir():
            raise ValueError(f"--passkey-from: {args.passkey_from} is not a directory (expected `zoo recall "
                             "passkey`'s --out, holding <name>/card.json per recipe)")
        resolved = [resolve(spec, args.overrides) for spec in args.recipes]
        names = [r.name for r, _ in resolved]
        if len(set(names)) < len(names):
            raise ValueError(f"recipes: two recipes share a name ({names}); give them distinct `name:` fields")
        if args.match_params:
            by_name = {r.name: r for r, _ in resolved}
            target = (zoo.build_model(by_name[args.match_params]).num_params()["total"]
                      if args.match_params in by_name else count(args.match_params))
            say(f"matching parameter counts to {target:,}:")
            matched = []
            for recipe, ckpt in resolved:
                if ckpt is not None:
                    raise ValueError(f"--match-params: {recipe.name} is a given checkpoint; its size is fixed")
                overrides, n = match_params(recipe, target)
                miss = abs(n - target) > 0.02 * target
                say(f"  {recipe.name:<16} {' '.join(overrides)} (was d_model {recipe.model.d_model}, ffn mult "
                    f"{recipe.model.ffn.mult:g}): {n:,} params ({100 * (n - target) / target:+.1f}%"
                    + (", outside 2%: no finer knob in this recipe)" if miss else ")"))
                matched.append((zoo.load_recipe(recipe.to_dict(), overrides), None))
            resolved = matched
    except (zoo.RecipeError, CheckpointError, ValueError, argparse.ArgumentTypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    try:
        for recipe, _ in resolved:
            context_shape(recipe, args)   # a cut the segments do not fit is refused before anything trains
        lock = RunLock(out, say, name="compare.lock")   # a second comparison into --out is refused, not interleaved
        results = own_results(out, results, resolved, args, say)
    except (RunDirError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return run_comparison(out, results, results_path, resolved, names, args, argv, say)
    finally:
        lock.release()


def setup_of(resolved, args) -> dict:
    """What the cells of a comparison depend on: each recipe as sized (or the checkpoint it was given as), and the
    training budget of the recipes trained here."""
    setup = {r.name: {"recipe": r.to_dict(), "checkpoint": str(c) if c else None} for r, c in resolved}
    if any(c is None for _, c in resolved):
        setup["--budget"] = args.budget
    return json.loads(json.dumps(setup))   # as results.json holds it (tuples as lists)


def own_results(out: Path, results: dict, resolved, args, say) -> dict:
    """The results to continue: those in --out when they are this comparison's (the same recipes and settings), a
    fresh start with --overwrite (the old ones moved aside), an error otherwise: a comparison never reports cells
    of other models beside its own."""
    setup = setup_of(resolved, args)
    held = results.get("meta", {}).get("setup")
    if not results.get("cells") or held == setup:
        results.setdefault("meta", {})["setup"] = setup
        return results
    if held is None:
        difference = "results.json from before comparisons recorded their setup"
    else:
        key = next(k for k in sorted(set(held) | set(setup)) if held.get(k) != setup.get(k))
        difference = (f"{key}: not in this comparison" if key not in setup else f"{key}: not in the one in --out"
                      if key not in held else f"{key}: {_first_difference(held[key], setup[key])}")
    if not args.overwrite:
        raise ValueError(f"--out: {out} holds a comparison of other recipes or settings ({difference}); rerun the "
                         "same comparison to resume it, give another --out, or --overwrite to move it aside")
    moved = move_aside(out, [p.name for p in out.iterdir() if not p.name.startswith("replaced-")
                             and p.name != "compare.lock"])
    say(f"overwrite: moved the previous comparison in {out} ({difference}) to {moved}")
    fresh = {"meta": {**results["meta"], "setup": setup}, "recipes": {}, "cells": {}}
    return fresh


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path or 'value'} was {a!r}, now {b!r}"


def run_comparison(out, results, results_path, resolved, names, args, argv, say) -> int:
    runs, todo = [], []
    for recipe, ckpt in resolved:
        run = RecipeRun(recipe, ckpt, args, out, say)
        done_train = results["cells"].get(cell_key(recipe.name, "train", "budget", recipe.train.seq_len))
        if done_train and Path(done_train["checkpoint"]).is_dir():
            run.checkpoint = Path(done_train["checkpoint"])
        elif done_train:  # the checkpoint is gone: train again, and what was measured on it is void
            for key in [k for k in results["cells"] if k.startswith(recipe.name + "|")]:
                del results["cells"][key]
        # passkey cells answered by other weights than this run's: the LM when fine-tunes are asked for (a recipe
        # without one then has no passkey cells), a fine-tune when they are not, or another fine-tune
        tuned = passkey_checkpoint(args.passkey_from, recipe.name) if args.passkey_from else None
        answered_by = tuned["checkpoint"] if tuned else ("none" if args.passkey_from else None)
        lengths = passkey_lengths(args, tuned)
        for key in [k for k, c in results["cells"].items() if c["recipe"] == recipe.name and c["eval"] == "passkey"
                    and (c.get("checkpoint") != answered_by or c["context"] not in lengths)]:
            del results["cells"][key]
        history, _ = context_shape(recipe, args)
        for key in [k for k, c in results["cells"].items() if c["recipe"] == recipe.name
                    and c["eval"] == "context_use" and c.get("history_cut") != history]:
            del results["cells"][key]   # measured against another history cut
        n = zoo.build_model(recipe).num_params()
        results["recipes"][recipe.name] = {"params": n, "d_model": recipe.model.d_model,
                                           "n_layers": recipe.model.n_layers, "seq_len": recipe.train.seq_len,
                                           "checkpoint": str(run.checkpoint) if run.checkpoint else None,
                                           "recipe": recipe.to_dict(),
                                           "kernels": chosen(args.device, recipe.model.kernels)}
        runs.append(run)
        todo += [(run, *c) for c in plan(run, args, given=ckpt is not None, results=results)]
    if not any(c["eval"] == "compression" for c in results["cells"].values()) and args.schemes:
        todo.append((runs[0], "-", "compression", None, None, None))

    ran = skipped = 0
    bar = tqdm(todo, desc="cells", disable=args.no_progress, dynamic_ncols=True)
    try:
        for run, name, eval_name, scheme, context, fn in bar:
            if eval_name == "compression":
                data = run.data()
                tok = None if data.tokenizer == "byte" else load_tokenizer(data.tokenizer)
                ref = compression_bpb(documents_text(data.val, args.max_tokens, tokenizer=tok,
                                                     max_doc_tokens=args.max_doc_tokens))
                for comp, bpb in ref.items():
                    results["cells"][cell_key("-", "compression", comp, None)] = {
                        "recipe": "-", "eval": "compression", "scheme": comp, "context": None, "bits_per_byte": bpb,
                        "max_tokens": args.max_tokens, "units": {"bits_per_byte": "bits/byte"}}
                save_results(results_path, results)
                ran += 1
                continue
            key = cell_key(name, eval_name, scheme, context)
            if key in results["cells"] and results["cells"][key].get("status") != "skipped":
                skipped += 1
                continue
            bar.set_description(key)
            start = time.perf_counter()
            record = fn()
            params = results["recipes"][name]["params"]["total"]
            results["cells"][key] = {"recipe": name, "eval": eval_name, "scheme": scheme, "context": context,
                                     **record, "params": params, "device": args.device,
                                     "world_size": record.get("world_size", 1) if eval_name in ("cp", "longest_train")
                                     else 1,
                                     "kernels": results["recipes"][name]["kernels"],
                                     "torch": torch.__version__, "cell_seconds": time.perf_counter() - start}
            if eval_name == "train":
                results["recipes"][name]["checkpoint"] = record["checkpoint"]
            save_results(results_path, results)
            ran += 1
    except (zoo.RecipeError, CheckpointError, TrainingError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        bar.close()

    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save_results(results_path, results)
    report, pngs = write_report(results, out)
    for section, more in (cp_section(results, out), context_section(results, out)):
        if section:
            with open(report, "a") as f:
                f.write("\n" + section)
            pngs = list(pngs) + more
    print(summary_table(results))
    print(f"report: {report}")
    print("plots: " + ", ".join(str(p) for p in pngs))
    print("summary: " + json.dumps({"results": str(results_path), "report": str(report),
                                    "plots": [str(p) for p in pngs], "recipes": names if not args.match_params
                                    else [r.name for r, _ in resolved], "cells_run": ran, "cells_skipped": skipped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
