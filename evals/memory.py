"""Measured peak memory of one function call, each in a fresh process.

On CPU the figure is the child's peak resident set size above its own baseline taken right before the
call (VmHWM - VmRSS from /proc/self/status): imports and the interpreter are not counted, and a fresh
process means no allocator cache from an earlier measurement hides or inflates the peak. On CUDA it is
`torch.cuda.max_memory_allocated` around the call. A per-measurement cap turns a runaway measurement
into an `OOM` record instead of taking the machine down: a watchdog thread in the child polls its RSS.

    rec = measure("evals.memory:allocate", {"n_bytes": 2**28}, cap_gb=4)
    rec -> {"status": "ok", "peak_bytes": ..., "seconds": ..., "result": ...}
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

OOM_EXIT = 77
ROOT = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


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
    cuda = spec.get("device", "cpu").startswith("cuda")
    # Warm-up before the baseline: the first parallel op starts OpenMP's thread pool (MiBs of stacks) and
    # the allocator's arenas; counting them would charge every measurement a constant ~8 MiB.
    torch.ones(1 << 20).add_(1).sum().item()
    if spec.get("cap_bytes"):
        base = _status_kb("VmRSS") * 1024
        threading.Thread(target=_watchdog, args=(base + spec["cap_bytes"],), daemon=True).start()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kb("VmRSS") * 1024
    start = time.perf_counter()
    try:
        result = fn(**spec.get("kwargs", {}))
    except torch.OutOfMemoryError:
        print(json.dumps({"status": "OOM"}))
        return
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kb("VmHWM") * 1024 - base
    print(json.dumps({"status": "ok", "peak_bytes": max(0, peak), "seconds": time.perf_counter() - start,
                      "result": result}))


def measure(target: str, kwargs: dict | None = None, cap_gb: float | None = None, device: str = "cpu",
            threads: int | None = None, timeout: float | None = None) -> dict:
    """Run `module:function(**kwargs)` in a fresh Python process and return its peak-memory record."""
    spec = {"target": target, "kwargs": kwargs or {}, "device": device, "threads": threads,
            "cap_bytes": int(cap_gb * 2**30) if cap_gb else None}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "evals.memory", json.dumps(spec)], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=timeout)
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
