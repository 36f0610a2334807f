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

This module is the command (its options and their checks); the engine it drives is a library: evals/runs.py
(the recipe runs), evals/plan.py (the cells), evals/results.py (the store), evals/engine.py (running them).
"""
import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import zoo
from evals.options import count, float_list, int_list, name_list
from evals.context_use import COPY_SKIP
from evals.engine import run_comparison
from evals.perplexity import SCHEMES
from evals.plan import context_readings, context_shapes
from evals.results import attach_mqar, attach_ruler, load_results, own_results
from evals.runs import check_override_names, parameter_target, resolve, source_commit
from evals.throughput import KINDS, MEMORY_KINDS
from zoo.data.corpus import NAMED as NAMED_CORPORA
from zoo.sizing import match_params
from zoo.train.checkpoint import CheckpointError
from zoo.train.run_dir import RunDirError, RunLock


# -- arguments ---------------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="recipe names, recipe files, or run/checkpoint directories")
    ap.add_argument("--out", default="runs/compare", help="results.json, report.md, PNGs and runs/ go here")
    ap.add_argument("--budget", type=count, default=count("300K"), help="training tokens per recipe")
    ap.add_argument("--contexts", type=int_list, default=[256, 512, 1024, 2048])
    ap.add_argument("--match-params", default=None, help="target parameter count (2M) or a recipe's name")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="[NAME:]KEY=VALUE",
                    help="dotlist overrides applied to every recipe, e.g. model.n_layers=4 train.seq_len=256, or "
                         "(NAME:) to one, e.g. swa:model.blocks.A.window=64; only NAME: ones reach a given "
                         "checkpoint, evaluated under settings that hold no weights (its weights must fit)")
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
    ap.add_argument("--context-length", type=int_list, default=None,
                    help="tokens per context-use segment (default 4 x train.seq_len); a comma list makes one "
                         "reading per length, each with the cut, stride and segment count at the same place in "
                         "their lists (one value serves every reading)")
    ap.add_argument("--history-cut", type=int_list, default=None,
                    help="the control's history in tokens (default train.seq_len): does history past it help?")
    ap.add_argument("--history-cut-stride", type=int_list, default=None,
                    help="the control's windows advance this many tokens (default half the cut): every target keeps "
                         "at least cut - stride tokens of history; a smaller stride is a stricter control, at "
                         "cut / stride windows a segment")
    ap.add_argument("--context-segments", type=int_list, default=[8],
                    help="segments per corpus (the interval's documents)")
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
    ap.add_argument("--ruler-results", default=None,
                    help="results.json of `zoo recall ruler`: its cells go into results.json and the report's heat map")
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
    if args.copy_span < 2 or args.copy_trials < 1:
        ap.error("--copy-trials: a positive integer; --copy-span: at least 2")
    try:
        args.context_readings = context_readings(args)
    except ValueError as err:
        ap.error(str(err))
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


def meta(args, argv) -> dict:
    commit = source_commit()
    return {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
            or platform.machine(), "world_size": 1, "threads": torch.get_num_threads(), "dtype": "float32",
            "commit": commit, "command": "zoo compare " + shlex.join(argv),
            "budget_tokens": args.budget, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- the comparison ----------------------------------------------------------------------------------------------


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
        if args.ruler_results:
            attach_ruler(results, args.ruler_results)
        if args.passkey_from and not Path(args.passkey_from).is_dir():
            raise ValueError(f"--passkey-from: {args.passkey_from} is not a directory (expected `zoo recall "
                             "passkey`'s --out, holding <name>/card.json per recipe)")
        resolved = [resolve(spec, args.overrides) for spec in args.recipes]
        names = [r.name for r, _ in resolved]
        check_override_names(args.overrides, names)
        if len(set(names)) < len(names):
            raise ValueError(f"recipes: two recipes share a name ({names}); give them distinct `name:` fields")
        if args.match_params:
            target = parameter_target(args.match_params, args.overrides, {r.name: r for r, _ in resolved})
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
            context_shapes(recipe, args)   # a cut the segments do not fit is refused before anything trains
        lock = RunLock(out, say, name="compare.lock")   # a second comparison into --out is refused, not interleaved
        results = own_results(out, results, resolved, args, say)
    except (RunDirError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return run_comparison(out, results, results_path, resolved, names, args, argv, say)
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
