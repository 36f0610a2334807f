"""Attention forward+backward on CPU: dense reference, SDPA, blockwise and sliding window side by side.

    python benchmarks/bench_attention.py [--lengths 1024 4096 16384] [--mem-cap-gb 8] [--window 1024]

float32, batch 1, 4 heads x head_dim 64 (d_model 256), causal.
Memory: every (method, length) runs one forward+backward in a fresh subprocess (`measure`); its figure
is the peak RSS during it above the RSS just before (inputs allocated, code warmed up on a 64-token
run). A measurement whose estimated peak exceeds --mem-cap-gb is not started and reads "OOM (cap X
GiB)"; the child also runs under a watchdog at its RSS + the cap, so an estimate that is too low ends
in a recorded OOM rather than a swapping machine.
Time: one subprocess per length runs the methods in interleaved rounds (one warm-up round first)
and keeps each method's best round, so that load from other users of the machine falls on all
methods alike; the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import sys

from benchmarks.harness import PeakMemory, Table, command_line, measure, print_summary, time_interleaved

METHODS = ("dense", "sdpa", "blockwise", "swa")
HEADS, HEAD_DIM, BATCH = 4, 64, 1
# Score-sized float32 tensors alive at the dense reference's peak (scores, probabilities and their
# gradients in the backward); compare with the measured 1K and 4K figures the script prints.
DENSE_SCORE_TENSORS = 5


def estimate_bytes(method: str, length: int) -> int:
    """Rough peak for the pre-check: only the dense reference is quadratic."""
    linear = 16 * BATCH * length * HEADS * HEAD_DIM * 4
    if method == "dense":
        return linear + DENSE_SCORE_TENSORS * BATCH * HEADS * length * length * 4
    return linear


def _setup(length: int, block_size: int, window: int):
    import torch

    from zoo.ops.attention import attention, attention_ref, blockwise_attention

    fns = {
        "dense": lambda q, k, v: attention_ref(q, k, v, causal=True),
        "sdpa": lambda q, k, v: attention(q, k, v, causal=True),
        "blockwise": lambda q, k, v: blockwise_attention(q, k, v, causal=True, block_size=block_size),
        "swa": lambda q, k, v: attention(q, k, v, causal=True, window=window),
    }
    torch.manual_seed(0)
    q, k, v = (torch.randn(BATCH, length, HEADS, HEAD_DIM, requires_grad=True) for _ in range(3))
    grad = torch.randn(BATCH, length, HEADS, HEAD_DIM)

    def step(method):
        q.grad = k.grad = v.grad = None
        fns[method](q, k, v).backward(grad)

    return step


def memory_cell(method: str, length: int, block_size: int, window: int) -> dict:
    """In a fresh process (`measure`): the peak of one forward + backward above its inputs."""
    # A tiny warm-up first: loading BLAS kernels and starting the thread pool raise RSS once, and
    # that is not memory the method needs per token.
    _setup(min(length, 64), min(block_size, 16), min(window, 16))(method)
    step = _setup(length, block_size, window)
    with PeakMemory() as peak:
        step(method)
    return {"status": "ok", "peak_bytes": peak.bytes}


def time_cell(methods: list, length: int, block_size: int, window: int, rounds: int) -> dict:
    """In a fresh process: the methods in interleaved rounds after a warm-up round; best wall s each."""
    step = _setup(length, block_size, window)
    timings = time_interleaved({m: (lambda m=m: step(m)) for m in methods}, rounds)
    return {m: t.best for m, t in timings.items()}


def _run_child(args, target: str, **kwargs) -> dict:
    kwargs.update(block_size=args.block_size, window=args.window)
    rec = measure(f"benchmarks.bench_attention:{target}", kwargs, cap_gb=args.mem_cap_gb if target == "memory_cell"
                  else None, threads=args.threads)
    if rec["status"] == "OOM":
        return {"status": "oom"}
    if rec["status"] != "ok":
        sys.exit(f"{target} {kwargs} failed: {rec}")
    return rec["result"]


def fmt_mem(r: dict, cap_gb: float) -> str:
    if r["status"] == "skipped":
        return f"OOM (cap {cap_gb:g} GiB; est. {r['est_bytes'] / 2**30:.1f} GiB, not run)"
    if r["status"] == "oom":
        return f"OOM (cap {cap_gb:g} GiB, allocation failed)"
    return f"{r['peak_bytes'] / 2**20:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--mem-cap-gb", type=float, default=8.0)
    ap.add_argument("--block-size", type=int, default=512, help="blockwise_attention block_size")
    ap.add_argument("--window", type=int, default=1024, help="sliding window (keys per query)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round; best is kept")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every measurement (default: torch's)")
    args = ap.parse_args()
    cap = int(args.mem_cap_gb * 2**30)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"command: `{command_line()}`\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; float32, "
          f"batch {BATCH}, {HEADS} heads x head_dim {HEAD_DIM}, causal, fwd+bwd; blockwise block_size "
          f"{args.block_size}, swa window {args.window}; time: best of {args.rounds} interleaved rounds (s); "
          f"memory: peak RSS above a fresh subprocess's baseline (MiB)")
    load_before = os.getloadavg()[0]
    mem, secs = {}, {}
    for n in args.lengths:
        for m in METHODS:
            est = estimate_bytes(m, n)
            mem[m, n] = ({"status": "skipped", "est_bytes": est} if est > cap
                         else _run_child(args, "memory_cell", method=m, length=n))
        runnable = [m for m in METHODS if mem[m, n]["status"] == "ok"]
        for m, t in _run_child(args, "time_cell", methods=runnable, length=n, rounds=args.rounds).items():
            secs[m, n] = t
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}\n")

    head = ["length"] + [f"{m} {x}" for m in METHODS for x in ("s", "MiB")]
    table = Table(head + ["blockwise/dense mem", "blockwise/sdpa time"], stream=True)
    summary = {}
    for n in args.lengths:
        row = [str(n)]
        for m in METHODS:
            row += [f"{secs[m, n]:.3f}" if (m, n) in secs else "-", fmt_mem(mem[m, n], args.mem_cap_gb)]
        dense, block = mem["dense", n], mem["blockwise", n]
        mem_ratio = None
        if block["status"] == "ok" and dense["status"] == "ok":
            mem_ratio = block["peak_bytes"] / dense["peak_bytes"]
            row.append(f"{mem_ratio:.3f}")
        elif block["status"] == "ok" and dense["status"] == "skipped":
            mem_ratio = block["peak_bytes"] / dense["est_bytes"]
            row.append(f"{mem_ratio:.3f} (vs est.)")
        else:
            row.append("-")
        time_ratio = secs["blockwise", n] / secs["sdpa", n]
        row.append(f"{time_ratio:.2f}")
        table.add(row)
        summary[n] = {"blockwise_over_dense_mem": mem_ratio and round(mem_ratio, 4),
                      "blockwise_over_sdpa_time": round(time_ratio, 3),
                      "swa_kib_per_token": round(mem["swa", n]["peak_bytes"] / n / 1024, 2)}
    # Activations and gradients are per token, so "flat" means flat per token: no L x L term.
    per_token = lambda m: ", ".join(f"{n}: {mem[m, n]['peak_bytes'] / n / 1024:.1f}" for n in args.lengths
                                    if mem[m, n]["status"] == "ok")
    print(f"\npeak memory per token (KiB) - swa: {per_token('swa')}; sdpa: {per_token('sdpa')}; "
          f"blockwise: {per_token('blockwise')}; dense: {per_token('dense')}")
    if any(n <= args.window for n in args.lengths):
        print(f"swa at lengths <= window {args.window} is plain causal attention: `attention` runs SDPA for it")
    if any(mem["dense", n]["status"] == "skipped" for n in args.lengths):
        print(f"dense est. = {DENSE_SCORE_TENSORS} float32 [batch, heads, L, L] tensors + inputs; "
              "'(vs est.)' ratios divide by that estimate, not by a measurement")
    print_summary(summary)


if __name__ == "__main__":
    main()
