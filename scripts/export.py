"""Export a training checkpoint to a transformers directory (zoo.hf).

    python scripts/export.py runs/x OUT            # a run dir, its checkpoints/ or one step-* dir

OUT gets model.safetensors, config.json (model_type "zoo", the resolved recipe), generation_config.json,
recipe.yaml, and the tokenizer when the recipe's is a saved transformers tokenizer, so that after
`import zoo`, `AutoModelForCausalLM.from_pretrained(OUT)` (and AutoTokenizer) load it. Ends with one
machine-readable `summary:` line.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import zoo  # noqa: E402
from zoo.data import DataError, load_tokenizer  # noqa: E402
from zoo.hf import ZooForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from zoo.train.checkpoint import CheckpointError, resolve_checkpoint  # noqa: E402


def export(ckpt, out, dtype: str = "float32") -> dict:
    path = resolve_checkpoint(ckpt)
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
    return {"checkpoint": str(path), "out": str(out), "recipe": lm.recipe.name, "dtype": dtype,
            "params": lm.num_params()["total"], "tokenizer": getattr(tokenizer, "spec", None),
            "files": sorted(p.name for p in out.iterdir())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint dir, a run dir or its checkpoints/ (the newest is taken)")
    ap.add_argument("out", help="output directory (created)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()
    try:
        summary = export(args.checkpoint, args.out, args.dtype)
    except (CheckpointError, zoo.RecipeError) as err:
        sys.exit(f"error: {err}")
    print("summary: " + json.dumps(summary))


if __name__ == "__main__":
    main()
