"""Per-rank memory of the context-parallel paths of swa, taipan, mamba, mamba2, infini, selective and
blockwise (ring attention): does what a rank holds fall as 1/W?

Each block alone, CPU float32, batch 1, the zigzag layout over W gloo processes (fresh ones for every
measurement), one torch thread each. After a warm-up step, per rank:
  held: RSS after the forward (the graph alive, before the backward) minus RSS just before it, i.e. the
        activations kept for the backward plus the output;
  peak: the peak RSS over forward + backward (VmHWM, reset through /proc/self/clear_refs) minus that
        same baseline.
The largest rank is reported. "single" is the block without `cp` in one process: the ratios divide by
it. glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS.

    .venv/bin/python benchmarks/bench_cp_memory.py                      # L 8192, d_model 128, W 1 2 4
    .venv/bin/python benchmarks/bench_cp_memory.py --length 2048 --blocks swa,mamba2
"""
from __future__ import annotations

import argparse
import os

os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"   # inherited by the spawned ranks

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.harness import PeakMemory, Table, print_summary  # noqa: E402
from evals.context_parallel import run_ranks  # noqa: E402

BLOCKS = {
    "swa": dict(n_heads=4, window=256),
    "taipan": dict(n_heads=4, window=256),
    "mamba": dict(d_state=16),
    "mamba2": dict(d_state=64, head_dim=32, chunk_size=64),
    "infini": dict(n_heads=4, segment_len=256),
    "infini-linear": dict(n_heads=4, segment_len=256, delta_rule=False),
    "selective": dict(n_heads=4, block_size=128),
    "blockwise": dict(n_heads=4, block_size=512),
}


def _rank(rank, world_size, init_file, name, length, d_model, use_cp) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    from zoo.distributed import ContextParallel, shard
    from zoo.registry import get_block
    entry = get_block(name.split("-")[0])
    torch.manual_seed(0)
    block = entry.cls(d_model, entry.config(**BLOCKS[name]), layer_idx=0)
    x = torch.randn(1, length, d_model)
    cp = ContextParallel.for_length(None, length, "zigzag") if use_cp else None
    xs = (shard(x, None, "zigzag") if use_cp else x).clone().requires_grad_(True)
    del x
    block.run(xs, cp=cp)[0].sum().backward()      # warm-up: allocator, thread pool, first-call caches
    xs.grad = None
    block.zero_grad(set_to_none=True)
    dist.barrier()
    with PeakMemory() as peak:
        out = block.run(xs, cp=cp)[0]
        held = peak.now()
        out.sum().backward()
    dist.barrier()
    dist.destroy_process_group()
    return {"held": held, "peak": peak.bytes}


def held_and_peak(name, world_size, length, d_model, use_cp=True, timeout=3600):
    got, errors, _ = run_ranks(_rank, world_size, lambda rank, init_file: (rank, world_size, init_file, name, length,
                                                                          d_model, use_cp), timeout)
    if errors or len(got) < world_size:
        raise RuntimeError(f"{name} W={world_size} failed: " + "\n".join(f"rank {r}: {e}" for r, e in errors.items()))
    return {k: max(r[k] for r in got.values()) for k in ("held", "peak")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--world-sizes", default="1,2,4")
    ap.add_argument("--blocks", default=",".join(BLOCKS))
    args = ap.parse_args()
    sizes = [int(w) for w in args.world_sizes.split(",")]
    mib = lambda b: f"{b / 2**20:.1f}"
    print(f"L={args.length} d_model={args.d_model} float32 batch 1 zigzag; MiB per rank (largest rank), "
          f"ratio to the single process in parentheses")
    header = ["block", "single held", "single peak"] + [f"W={w} held" for w in sizes] + [f"W={w} peak" for w in sizes]
    table = Table(header, stream=True)
    summary = {}
    for name in args.blocks.split(","):
        single = held_and_peak(name, 1, args.length, args.d_model, use_cp=False)
        per_w = {w: held_and_peak(name, w, args.length, args.d_model) for w in sizes}
        cells = [name, mib(single["held"]), mib(single["peak"])]
        for key in ("held", "peak"):
            cells += [f"{mib(per_w[w][key])} ({per_w[w][key] / single[key]:.2f})" for w in sizes]
        table.add(cells)
        summary[name] = {"single": single, **{f"W{w}": per_w[w] for w in sizes}}
    print_summary({"bench": "cp_memory", "length": args.length, "d_model": args.d_model, "results": summary})


if __name__ == "__main__":
    main()
