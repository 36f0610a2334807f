"""The comparison engine: register each recipe's run, run every planned cell not yet in results.json (saving after
each, so an interrupted comparison resumes), then the report, its sections and the summary line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import zoo
from evals.compression import compression_bpb
from evals.context_parallel import cp_section
from evals.context_report import context_section
from evals.perplexity import documents_text
from evals.plan import context_shapes, passkey_lengths, plan
from evals.report import summary_table, write_report
from evals.results import cell_key, save_results
from evals.runs import RecipeRun, passkey_checkpoint
from zoo.data import DataError, load_tokenizer
from zoo.ops.dispatch import chosen
from zoo.train.checkpoint import CheckpointError
from zoo.train.trainer import TrainingError


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
        shapes = {(length, history, stride) for history, length, stride, _ in context_shapes(recipe, args)}
        for key in [k for k, c in results["cells"].items() if c["recipe"] == recipe.name and c["eval"] == "context_use"
                    and (c.get("length"), c.get("history_cut"), c.get("cut_stride")) not in shapes]:
            del results["cells"][key]   # measured against another history cut or stride
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

