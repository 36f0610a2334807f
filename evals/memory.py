"""Measured peak memory of one function call, each in a fresh process.

On CPU the figure is the child's peak resident set size above its own baseline taken right before the
call (VmHWM - VmRSS from /proc/self/status): imports and the interpreter are not counted, and a fresh
process means no allocator cache from an earlier measurement hides or inflates the peak. On CUDA it is
`torch.cuda.max_memory_allocated` around the call. A per-measurement cap turns a runaway measurement
into an `OOM` record instead of taking the machine down: a watchdog thread in the child polls its RSS.
`PeakMemory` is the same figure around a block of code in this process: a target that builds its inputs
first measures its own run with it and returns that (benchmarks/ do), leaving its set-up out.

    rec = measure("evals.memory:allocate", {"n_bytes": 2**28}, cap_gb=4)
    rec -> {"status": "ok", "peak_bytes": ..., "seconds": ..., "result": ...}
    with PeakMemory(device) as peak: step()        # peak.bytes
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time

OOM_EXIT = 77


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a block of code above what was in use as it began; `bytes` after the block.
    CUDA: `torch.cuda.max_memory_allocated` (its peak reset on entry) minus the memory allocated on entry.
    CPU: the peak resident set (VmHWM, reset to the current RSS through /proc/self/clear_refs) minus VmRSS on
    entry; None where /proc is missing (not Linux). With reset=False (or where clear_refs cannot be written)
    the peak is not reset on entry and also holds what came before, so a warm-up before the block must stay
    smaller than the block; a block that resets inside (a nested PeakMemory) hides the earlier peak from an
    outer one, which is why the outer measurements of this module do not reset.
    `now()` inside the block: what is held above the entry figure at that moment (RSS or allocated)."""

    def __init__(self, device="cpu", reset: bool = True):
        self.cuda = str(device).startswith("cuda")
        self.device, self.reset = device, reset
        self.bytes = self.base = None

    def _current(self):
        if self.cuda:
            import torch
            return torch.cuda.memory_allocated(self.device)
        return _status_kb("VmRSS") * 1024

    def now(self):
        return None if self.base is None else self._current() - self.base

    def __enter__(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize(self.device)
            if self.reset:
                torch.cuda.reset_peak_memory_stats(self.device)
        elif self.reset:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")   # VmHWM := VmRSS
            except OSError:
                pass
        try:
            self.base = self._current()
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.base is None:
            return
        if self.cuda:
            import torch
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kb("VmHWM") * 1024
        self.bytes = max(0, peak - self.base)


def _watchdog(cap_bytes: int):
    while True:
        if _status_kb("VmRSS") * 1024 > cap_bytes:
            os._exit(OOM_EXIT)  # no cleanup: the point is to stop before the machine swaps or kills us
        time.sleep(0.005)


def _child(spec: dict):
    import torch
    module, fn_name = spec["target"].split(":")
    fn = getattr(importlib.import_module(module), fn_name)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # Warm-up before the baseline: the first parallel op starts OpenMP's thread pool (MiBs of stacks) and
    # the allocator's arenas; counting them would charge every measurement a constant ~8 MiB.
    torch.ones(1 << 20).add_(1).sum().item()
    if spec.get("cap_bytes"):
        base = _status_kb("VmRSS") * 1024
        threading.Thread(target=_watchdog, args=(base + spec["cap_bytes"],), daemon=True).start()
    start = time.perf_counter()
    try:
        # a fresh process: nothing before to reset on CPU, and a target may reset inside (see PeakMemory)
        device = spec.get("device", "cpu")
        with PeakMemory(device, reset=device.startswith("cuda")) as peak:
            result = fn(**spec.get("kwargs", {}))
    except torch.OutOfMemoryError:
        print(json.dumps({"status": "OOM"}))
        return
    print(json.dumps({"status": "ok", "peak_bytes": peak.bytes, "seconds": time.perf_counter() - start,
                      "result": result}))


def measure(target: str, kwargs: dict | None = None, cap_gb: float | None = None, device: str = "cpu",
            threads: int | None = None, timeout: float | None = None) -> dict:
    """Run `module:function(**kwargs)` in a fresh Python process and return its peak-memory record."""
    spec = {"target": target, "kwargs": kwargs or {}, "device": device, "threads": threads,
            "cap_bytes": int(cap_gb * 2**30) if cap_gb else None}
    try:   # evals is installed, as is the target's package (zoo, evals, benchmarks)
        proc = subprocess.run([sys.executable, "-m", "evals.memory", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    if proc.returncode == OOM_EXIT or proc.returncode == -9:
        return {"status": "OOM", "cap_gb": cap_gb}
    if proc.returncode != 0:
        return {"status": "error", "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def allocate(n_bytes: int, hold_s: float = 0.0) -> int:
    """A known allocation, for testing the measurement: touch every page of n_bytes."""
    import torch
    t = torch.ones(n_bytes // 4, dtype=torch.float32)
    time.sleep(hold_s)
    return int(t.numel() * 4)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
