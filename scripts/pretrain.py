"""Kept for existing commands and scripts: `zoo pretrain` is the command (evals/commands/pretrain.py)."""
import sys

from evals.commands.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
