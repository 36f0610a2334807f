"""Kept for existing commands and scripts: `zoo prepare-data` is the command (zoo/commands/prepare_data.py)."""
import sys

from zoo.commands.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
