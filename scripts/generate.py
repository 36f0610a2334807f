"""Kept for existing commands and scripts: `zoo generate` is the command (zoo/commands/generate.py)."""
import sys

from zoo.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
