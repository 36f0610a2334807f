"""Write the running environment's package versions as the project's pip constraints (the lock).

    .venv-upgrade/bin/python scripts/lock.py --freeze constraints.txt            # what `make lock` runs
    .venv-upgrade/bin/python scripts/lock.py --freeze new.txt --diff constraints.txt   # `make upgrade`

The lock pins every installed distribution (pip and setuptools too, so that the build backend is pinned
through --build-constraint), except zoo itself. torch loses its local build tag (2.13.0+cpu -> 2.13.0):
the CPU build and a CUDA build then satisfy the same line. Ends with one `summary:` line.
"""
import argparse
import json
import re
import sys
from importlib import metadata
from pathlib import Path

HEADER = """\
# The versions the test suite last passed with (Python {py}, {platform}), used by `make install`,
# the README's commands and CI as pip constraints: `pip install -c constraints.txt ...`.
# torch is pinned without its local build tag, so the CPU build (+cpu) and a CUDA build both satisfy it.
# pip and setuptools (the build backend, via --build-constraint) are pinned as well.
# Regenerate with `make lock` after `make upgrade` has passed (it freezes .venv-upgrade); never by hand.
"""
SKIP = {"zoo"}


def installed() -> dict:
    """Normalised name -> version of every distribution this interpreter sees, local tags dropped."""
    pins = {}
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name not in SKIP:
            pins[name] = dist.version.split("+")[0]
    return pins


def read_lock(path: Path) -> dict:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def write_lock(path: Path, pins: dict) -> None:
    header = HEADER.format(py=".".join(map(str, sys.version_info[:2])), platform=sys.platform)
    path.write_text(header + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))


def diff(old: dict, new: dict) -> list:
    """Lines 'name: old -> new' for every package whose version changed, appeared or went."""
    return [f"{n}: {old.get(n, '(absent)')} -> {new.get(n, '(absent)')}"
            for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--freeze", required=True, help="write this environment's versions here")
    ap.add_argument("--diff", default=None, help="a lock to compare them with (printed, one line a package)")
    args = ap.parse_args(argv)
    pins = installed()
    write_lock(Path(args.freeze), pins)
    changed = []
    if args.diff:
        changed = diff(read_lock(Path(args.diff)), pins)
        print(f"{len(changed)} package(s) differ from {args.diff}:" if changed else f"same versions as {args.diff}")
        for line in changed:
            print("  " + line)
    print("summary: " + json.dumps({"lock": args.freeze, "packages": len(pins), "changed": len(changed)}))


if __name__ == "__main__":
    main()
