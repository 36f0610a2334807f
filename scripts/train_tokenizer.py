"""Kept for existing commands and scripts: `zoo train-tokenizer` is the command (zoo/commands/train_tokenizer.py)."""
import sys

from zoo.commands.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
