"""Kept for existing commands and scripts: `zoo describe` is the command (zoo/commands/describe.py)."""
import sys

from zoo.commands.describe import main

if __name__ == "__main__":
    sys.exit(main())
