"""Kept for existing commands and scripts: `zoo train` is the command (zoo/commands/train.py)."""
import sys

from zoo.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
