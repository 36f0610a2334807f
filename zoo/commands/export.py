"""Export a training checkpoint to a transformers directory (zoo.hf).

    zoo export runs/x OUT            # a run dir, its checkpoints/ or one step-* dir
    zoo export runs/x OUT --force    # OUT exists and is not empty: write into it

OUT gets model.safetensors, config.json (model_type "zoo", the resolved recipe), generation_config.json,
recipe.yaml, and the tokenizer: a saved transformers tokenizer as it is, the byte tokenizer as a tokenizer.json
of the same ids (zoo.data.tokenizer.ByteTokenizer.save_pretrained), so that after `import zoo`,
`AutoModelForCausalLM.from_pretrained(OUT)`, AutoTokenizer and pipeline("text-generation") load it. Ends with
one machine-readable `summary:` line.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import zoo
from zoo.data import DataError, load_tokenizer
from zoo.hf import ZooForCausalLM
from transformers.utils import logging as hf_logging
from zoo.memory import memory_cap, parse_memory
from zoo.train.checkpoint import CheckpointError, resolve_checkpoint


class ExportError(ValueError):
    """An output directory export will not write into."""


def check_out(out: Path, force: bool = False) -> None:
    """OUT must be new or empty unless `force`: an export into a directory that holds something else would
    mix its files with another model's (a stale tokenizer.json would be picked up by AutoTokenizer)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"out: {out} is a file; allowed: a new or empty directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise ExportError(f"out: {out} is not empty ({shown}); allowed: a new or empty directory, or --force "
                          f"to write into it (files of the same name are replaced)")


def export(ckpt, out, dtype: str = "float32", force: bool = False, max_memory=None) -> dict:
    path = resolve_checkpoint(ckpt)
    if Path(out).resolve() in (path.resolve(), Path(ckpt).resolve()):
        # --force would replace the checkpoint's own weights, at --dtype's precision
        raise ExportError(f"out: {out} is the checkpoint being exported; allowed: another directory")
    check_out(Path(out), force)
    with memory_cap(max_memory):
        lm = zoo.load_checkpoint(path).to(getattr(torch, dtype)).eval()
    model = ZooForCausalLM.from_zoo(lm)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(lm.recipe.train.tokenizer)
    except DataError as err:
        print(f"note: tokenizer not exported ({err})", file=sys.stderr)
    if tokenizer is not None and tokenizer.eos_id is not None:
        model.config.eos_token_id = tokenizer.eos_id
        model.generation_config.eos_token_id = tokenizer.eos_id
        model.generation_config.pad_token_id = tokenizer.eos_id
    out = Path(out)
    model.save_pretrained(out)
    if tokenizer is not None and hasattr(tokenizer, "hf"):
        tokenizer.hf.save_pretrained(out)
    elif tokenizer is not None:   # the byte tokenizer, as a tokenizer.json AutoTokenizer and pipelines load
        tokenizer.save_pretrained(out)
    return {"checkpoint": str(path), "out": str(out), "recipe": lm.recipe.name, "dtype": dtype,
            "params": lm.num_params()["total"], "tokenizer": getattr(tokenizer, "spec", None),
            "files": sorted(p.name for p in out.iterdir())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint dir, a run dir or its checkpoints/ (the newest is taken)")
    ap.add_argument("out", help="output directory (created; must be empty unless --force)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--force", action="store_true", help="write into a non-empty OUT (same-named files are replaced)")
    ap.add_argument("--max-memory", default=None,
                    help="refuse a model whose weights exceed this (e.g. 64GiB; inf: no check); default: the "
                         "memory available")
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()
    try:
        max_memory = parse_memory(args.max_memory, "--max-memory")
        summary = export(args.checkpoint, args.out, args.dtype, args.force, max_memory)
    except (CheckpointError, ExportError, zoo.RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("summary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
