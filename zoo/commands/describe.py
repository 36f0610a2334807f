"""Build every recipe given on the command line and print its describe() table.

    zoo describe recipes/*.yaml [--override model.d_model=128 ...]
"""
import argparse
import sys
from pathlib import Path

import zoo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--override", action="append", default=[], help="dotlist override, e.g. model.d_model=128")
    args = ap.parse_args(argv)
    built = 0
    for path in args.recipes:
        if Path(path).name.startswith("_"):
            continue  # fragments meant for `extends:`
        try:
            model = zoo.build_model(path, args.override)
        except zoo.RecipeError as err:   # its message names the file where the file is at fault
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"\n== {path}\n{model.describe()}")
        built += 1
    print(f"\nsummary: built {built} recipes; blocks available: {', '.join(zoo.list_blocks())}")


if __name__ == "__main__":
    sys.exit(main())
