"""Per-rank memory of the context-parallel paths of swa, taipan, mamba, mamba2, infini and selective:
does what a rank holds fall as 1/W?

Each block alone, CPU float32, batch 1, the zigzag layout over W gloo processes (fresh ones for every
measurement), one torch thread each. After a warm-up step, per rank:
  held: RSS after the forward (the graph alive, before the backward) minus RSS just before it, i.e. the
        activations kept for the backward plus the output;
  peak: the peak RSS over forward + backward (VmHWM, reset through /proc/self/clear_refs) minus that
        same baseline.
The largest rank is reported. "single" is the block without `cp` in one process: the ratios divide by
it. glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS.

    .venv/bin/python scripts/bench_cp_memory.py                      # L 8192, d_model 128, W 1 2 4
    .venv/bin/python scripts/bench_cp_memory.py --length 2048 --blocks swa,mamba2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"   # inherited by the spawned ranks
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

BLOCKS = {
    "swa": dict(n_heads=4, window=256),
    "taipan": dict(n_heads=4, window=256),
    "mamba": dict(d_state=16),
    "mamba2": dict(d_state=64, head_dim=32, chunk_size=64),
    "infini": dict(n_heads=4, segment_len=256),
    "infini-linear": dict(n_heads=4, segment_len=256, delta_rule=False),
    "selective": dict(n_heads=4, block_size=128),
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rank(rank, world_size, init_file, out_dir, name, length, d_model, use_cp):
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
    block(xs, cp=cp).sum().backward()      # warm-up: allocator, thread pool, first-call caches
    xs.grad = None
    block.zero_grad(set_to_none=True)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                       # resets VmHWM to the current RSS
    base = _status("VmRSS")
    out = block(xs, cp=cp)
    held = _status("VmRSS") - base
    out.sum().backward()
    peak = _status("VmHWM") - base
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps({"held": held, "peak": peak}))
    dist.barrier()
    dist.destroy_process_group()


def measure(name, world_size, length, d_model, use_cp=True):
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "store")
        mp.spawn(_rank, args=(world_size, init_file, out_dir, name, length, d_model, use_cp), nprocs=world_size)
        ranks = [json.loads((Path(out_dir) / f"{r}.json").read_text()) for r in range(world_size)]
    return {k: max(r[k] for r in ranks) for k in ("held", "peak")}


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
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    summary = {}
    for name in args.blocks.split(","):
        single = measure(name, 1, args.length, args.d_model, use_cp=False)
        per_w = {w: measure(name, w, args.length, args.d_model) for w in sizes}
        cells = [name, mib(single["held"]), mib(single["peak"])]
        for key in ("held", "peak"):
            cells += [f"{mib(per_w[w][key])} ({per_w[w][key] / single[key]:.2f})" for w in sizes]
        print("| " + " | ".join(cells) + " |", flush=True)
        summary[name] = {"single": single, **{f"W{w}": per_w[w] for w in sizes}}
    print(json.dumps({"bench": "cp_memory", "length": args.length, "d_model": args.d_model, "results": summary}))


if __name__ == "__main__":
    main()
