"""Timing a call, the one way every measurement here does it: untimed warm-up calls, then timed ones on
two clocks, every repeat kept so that the best and the median can both be read.

- wall: `time.perf_counter`; on CUDA, CUDA events recorded around the call and synchronised, so the figure
  is the device's time from the first kernel queued to the last one done.
- cpu: `time.process_time`, this process's CPU time on all its threads (with N busy threads about
  N x wall). Other processes on a shared machine add wall time while this one waits for a core, not CPU
  time, so on CPU it is the steadier clock; on CUDA it counts only the host's work.
- best (min): other processes only ever add time; median: how far one run strays.
- the warm-up takes allocator growth, thread-pool start-up and one-time kernel selection out of the figure.

    t = time_call(step, repeats=3)                         # one warm-up call, then 3 timed ones
    t.best, t.median, t.cpu_best, t.cpu_median             # seconds
    t = time_call(step, repeats=3, memory=True)            # t.peak_bytes: peak over the timed calls
    ts = time_interleaved({"zoo": f, "hf": g}, rounds=3)   # f g f g ...: load falls on both alike

This lives in evals, not benchmarks/, because evals' own throughput measurement uses it and evals must not
import benchmarks; benchmarks/harness.py re-exports it.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Optional


def _is_cuda(device) -> bool:
    return device is not None and str(device).startswith("cuda")


@dataclass
class Timing:
    """Seconds of every timed call on both clocks; `peak_bytes` when timed with memory=True."""
    wall: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    peak_bytes: Optional[int] = None

    best = property(lambda self: min(self.wall), doc="least wall seconds")
    median = property(lambda self: statistics.median(self.wall), doc="median wall seconds")
    cpu_best = property(lambda self: min(self.cpu), doc="least CPU seconds")
    cpu_median = property(lambda self: statistics.median(self.cpu), doc="median CPU seconds")

    def to_dict(self, digits: int = 4) -> dict:
        r = lambda x: round(x, digits)  # noqa: E731
        return {"wall_best": r(self.best), "wall_median": r(self.median), "cpu_best": r(self.cpu_best),
                "cpu_median": r(self.cpu_median), "wall_s": [r(x) for x in self.wall],
                "cpu_s": [r(x) for x in self.cpu], "peak_bytes": self.peak_bytes}


class Stopwatch:
    """Both clocks around a block of code (CUDA events for the wall clock on a CUDA device). `last_wall` /
    `last_cpu`: the latest block; `wall` / `cpu`: the sum over every block, a clock that pauses between them."""

    def __init__(self, device=None):
        self.device = device
        self.wall = self.cpu = self.last_wall = self.last_cpu = 0.0

    def __enter__(self):
        if _is_cuda(self.device):
            import torch
            torch.cuda.synchronize(self.device)
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if _is_cuda(self.device):
            import torch
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize(self.device)
            self.last_wall = self._event.elapsed_time(end) / 1e3
        else:
            self.last_wall = time.perf_counter() - self._wall
        self.last_cpu = time.process_time() - self._cpu
        self.wall += self.last_wall
        self.cpu += self.last_cpu


def time_call(fn: Callable, repeats: int = 1, *, warmup: int = 1, setup: Optional[Callable] = None, device=None,
              memory: bool = False) -> Timing:
    """`warmup` untimed calls of fn, then `repeats` timed ones. `setup()`, untimed, runs before every call and
    its result is fn's argument. memory=True: `peak_bytes` is the peak over the timed calls (setups included)
    above what was in use as they began (`evals.memory.PeakMemory` on `device`)."""
    call = (lambda: fn(setup())) if setup is not None else fn
    for _ in range(warmup):
        call()
    timing, clock = Timing(), Stopwatch(device)
    if memory:
        from evals.memory import PeakMemory
        peak = PeakMemory(device or "cpu")
    else:
        peak = nullcontext()
    with peak:
        for _ in range(repeats):
            arg = setup() if setup is not None else None
            with clock:
                fn(arg) if setup is not None else fn()
            timing.wall.append(clock.last_wall)
            timing.cpu.append(clock.last_cpu)
    if memory:
        timing.peak_bytes = peak.bytes
    return timing


def time_interleaved(fns: Mapping[Hashable, Callable], rounds: int, *, warmup: int = 1, device=None,
                     alternate: bool = False, each: Optional[Callable] = None) -> dict:
    """Every fn once per round, in order (reversed on odd rounds with `alternate`, so that neither always
    goes first), the first `warmup` rounds untimed: what other processes add falls on all of them alike, so
    their ratio is the figure to read. `each(key, round, stopwatch)` after every timed call (progress lines).
    Returns {key: Timing}."""
    timings, clock = {k: Timing() for k in fns}, Stopwatch(device)
    order = list(fns)
    for r in range(warmup + rounds):
        for key in (order[::-1] if alternate and r % 2 else order):
            with clock:
                fns[key]()
            if r >= warmup:
                timings[key].wall.append(clock.last_wall)
                timings[key].cpu.append(clock.last_cpu)
                if each is not None:
                    each(key, r - warmup, clock)
    return timings
