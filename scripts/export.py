"""Kept for existing commands and scripts: `zoo export` is the command (zoo/commands/export.py)."""
import sys

from zoo.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
