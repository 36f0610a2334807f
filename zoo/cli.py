"""The `zoo` command: one entry point, a subcommand per job.

    zoo train recipes/mamba2.yaml --out runs/mamba2        zoo compare transformer mamba2 --budget 300K
    zoo eval runs/mamba2 --contexts 256,1024               zoo export runs/mamba2 hf/mamba2
    zoo generate hf/mamba2 --prompt "def f("               zoo describe recipes/*.yaml
    zoo prepare-data --corpus stdlib --out data            zoo train-tokenizer --corpus stdlib --out tok

`zoo <command> --help` gives each one's options. A subcommand's module is imported only when it runs (the
evaluation ones live in evals/, which the library otherwise never imports). Exit status: the
subcommand's (2 for bad input, with one `error:` line).
"""
from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv) -> int, one line for `zoo --help`)
COMMANDS = {
    "train": ("zoo.commands.train", "train a recipe (one process, DDP / FSDP / context parallel under torchrun)"),
    "eval": ("evals.commands.eval", "perplexity of a checkpoint by context length, beside gzip / xz"),
    "compare": ("evals.commands.compare", "train or load recipes and compare them side by side (report.md)"),
    "pretrain": ("evals.commands.pretrain", "train the compared recipes once and ship them with model cards"),
    "recall": ("evals.commands.recall", "passkey fine-tunes, the MQAR sweep and RULER's tasks, offline"),
    "lm-eval": ("evals.commands.harness", "lm-evaluation-harness on a checkpoint (the eval extra)"),
    "export": ("zoo.commands.export", "a checkpoint as a transformers directory"),
    "generate": ("zoo.commands.generate", "generate text from a checkpoint or transformers directory"),
    "describe": ("zoo.commands.describe", "build recipes and print their layer tables"),
    "prepare-data": ("zoo.commands.prepare_data", "tokenize a corpus into memory-mapped splits"),
    "train-tokenizer": ("zoo.commands.train_tokenizer", "train a byte-level BPE tokenizer on a corpus"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: zoo <command> [options]   (zoo <command> --help)\n\ncommands:\n" + "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        print(f"error: command: unknown '{name}' ({hint}known: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    prog, sys.argv[0] = sys.argv[0], f"zoo {name}"   # argparse names the subcommand in usage and errors
    try:
        return module.main(rest) or 0
    finally:
        sys.argv[0] = prog


if __name__ == "__main__":
    sys.exit(main())
