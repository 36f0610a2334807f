"""Kept for existing commands and scripts: `zoo eval` is the command (evals/commands/eval.py)."""
import sys

from evals.commands.eval import main

if __name__ == "__main__":
    sys.exit(main())
