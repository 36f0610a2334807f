"""The plan of a comparison: for one recipe, every cell (eval, scheme, context) the arguments ask for, in running
order, each with the function that measures it. The cells themselves are in evals/ (perplexity, memory,
throughput, context use, recall, context parallel); this module only says which run and with what."""
from __future__ import annotations

import torch

import zoo
from evals.context_memory import longest_trainable, predicted_seconds
from evals.context_parallel import cp_cell
from evals.context_use import context_use, synthetic_copy
from evals.memory import measure
from evals.perplexity import evaluate_perplexity, extrapolation
from evals.recall import passkey_grid
from evals.runs import RecipeRun, passkey_checkpoint
from evals.throughput import MEMORY_KINDS, throughput_record
from zoo.data import load_tokenizer


READING_FLAGS = {"length": "--context-length", "cut": "--history-cut", "stride": "--history-cut-stride",
                 "segments": "--context-segments"}


def context_readings(args) -> list:
    """The context-use readings the flags ask for: [{length, cut, stride, segments}] (None: the recipe's default),
    one per entry of the longest of the four lists; a one-value list serves every reading. Checks what does not
    depend on the recipe (context_shapes checks the rest)."""
    lists = {k: getattr(args, flag[2:].replace("-", "_")) for k, flag in READING_FLAGS.items()}
    n = max(len(v) for v in lists.values() if v)
    for k, v in lists.items():
        if v and len(v) not in (1, n):
            raise ValueError(f"{READING_FLAGS[k]}: {len(v)} values for {n} readings: give one value, or one a reading")
    readings = [{k: (v[i] if len(v) > 1 else v[0]) if v else None for k, v in lists.items()} for i in range(n)]
    for r in readings:
        if r["cut"] is not None and r["cut"] < 4:
            raise ValueError(f"--history-cut: at least 4 tokens, got {r['cut']}")
        if r["stride"] is not None and r["cut"] is not None and r["stride"] > r["cut"]:
            raise ValueError(f"--history-cut-stride: {r['stride']} must be in [1, --history-cut]")
        if r["length"] is not None and r["cut"] is not None and (r["length"] % r["cut"] or r["length"] < 2 * r["cut"]):
            raise ValueError(f"--context-length: a multiple of --history-cut, at least twice it (got {r['length']} "
                             f"and {r['cut']})")
    return readings


def context_shapes(recipe, args) -> list:
    """[(history cut, segment length, cut stride, segments)] of the context-use readings of `recipe`: the history
    cut defaults to train.seq_len, the length to 4 x train.seq_len, the stride to half the cut; checked together
    before any cell runs. Each reading's cells are keyed by its length, so the lengths must differ."""
    shapes = []
    for r in getattr(args, "context_readings", None) or context_readings(args):
        history = r["cut"] or recipe.train.seq_len
        segment = r["length"] or 4 * recipe.train.seq_len
        stride = r["stride"] or max(1, history // 2)
        if args.eval_corpora and (segment % history or segment < 2 * history):
            raise ValueError(f"--context-length: {segment} must be a multiple of --history-cut {history}, at least "
                             f"twice it (recipe {recipe.name}; the defaults are 4 x and 1 x train.seq_len "
                             f"{recipe.train.seq_len})")
        if stride > history:
            raise ValueError(f"--history-cut-stride: {stride} must be in [1, --history-cut {history}] "
                             f"(recipe {recipe.name})")
        if segment in [s[1] for s in shapes]:
            raise ValueError(f"--context-length: each reading needs a length of its own (its cells are keyed by "
                             f"it); {segment} twice for recipe {recipe.name}")
        shapes.append((history, segment, stride, r["segments"]))
    return shapes


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
    for history, segment, stride, n_segments in context_shapes(run.recipe, args):
        for corpus in args.eval_corpora:
            def use(corpus=corpus, history=history, segment=segment, stride=stride, n_segments=n_segments):
                rec = context_use(run.model(), run.held_out(corpus), corpus, history, segment, n_segments,
                                  args.copy_span, device=torch.device(args.device), resamples=args.resamples,
                                  cut_stride=stride)
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


def passkey_lengths(args, tuned: dict | None) -> list:
    """The passkey prompt lengths of one recipe: --passkey-factors x its fine-tune's length, or --passkey-lengths."""
    if tuned and args.passkey_factors:
        return [f * tuned["finetune_len"] for f in args.passkey_factors]
    return list(args.passkey_lengths)

