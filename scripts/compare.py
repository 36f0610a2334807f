"""Kept for existing commands and scripts: `zoo compare` is the command (evals/commands/compare.py)."""
import sys

from evals.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
