"""What every bench script shares: one timing helper, one fresh-process memory helper, one writer of its
JSON, its markdown table and its `summary:` line. A bench script is its cases, its command line and its
table; how it times, measures memory and prints comes from here.

Timing (evals.timing): `time_call(fn, repeats, warmup=1, setup=None, device=None, memory=False)` and
`time_interleaved({name: fn}, rounds, warmup=1, alternate=False)` return `Timing`s (every repeat on the wall
and process CPU clocks; `best`, `median`, `cpu_best`, `cpu_median`; CUDA events on a CUDA device);
`Stopwatch(device)` times a block of code on both clocks.
Memory (evals.memory): `measure("benchmarks.bench_x:cell", kwargs, cap_gb, threads=, timeout=)` runs one
function in a fresh process (a cap turns a runaway into an OOM record); `PeakMemory(device)` is the peak of a
block above what was in use as it began (CUDA allocator, or RSS with the high-water mark reset).
Both live in evals, not here: evals' throughput and memory measurements use them and evals must not import
benchmarks (imports run benchmarks -> evals -> zoo), so this module re-exports them.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from evals.memory import PeakMemory, measure
from evals.timing import Stopwatch, Timing, time_call, time_interleaved

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "PeakMemory", "Stopwatch", "Table", "Timing", "command_line", "measure", "print_summary",
           "time_call", "time_interleaved", "write_json"]


def command_line(argv=None) -> str:
    """`python benchmarks/<script>.py <args>` as run, the path relative to the repository: the command
    that goes beside the figure in docs/benchmarks.md."""
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), ROOT)
    return shlex.join(["python", script, *argv[1:]])


class Table:
    """A markdown table. `align`: one letter per column, `l` (default) or `r`. With stream=True the header
    prints at once and every row as it is added (flushed), so a long run shows its progress; `str(table)`
    is the whole table either way."""

    def __init__(self, header, align: str = "", stream: bool = False):
        self.header, self.rows, self.stream = [str(h) for h in header], [], stream
        self.align = align.ljust(len(self.header), "l")
        if stream:
            print(self._head(), flush=True)

    def _head(self) -> str:
        return (self._line(self.header) + "\n|"
                + "".join("---:|" if a == "r" else "---|" for a in self.align))

    @staticmethod
    def _line(cells) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    def add(self, cells) -> None:
        self.rows.append([str(c) for c in cells])
        if self.stream:
            print(self._line(self.rows[-1]), flush=True)

    def __str__(self) -> str:
        return "\n".join([self._head(), *(self._line(r) for r in self.rows)])


def write_json(path, obj) -> Path:
    """The records of a run, indented, for a later report or plot."""
    path = Path(path)
    path.write_text(json.dumps(obj, indent=1))
    return path


def print_summary(obj) -> None:
    """The last line of every bench script: `summary: {json}`, for machines."""
    print("summary: " + json.dumps(obj), flush=True)
