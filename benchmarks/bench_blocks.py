"""Every registered block on CPU, float32, forward + backward: time and peak memory by length, and
zoo's `infini` against the `infini-transformer-pytorch` package at the same configuration.

    .venv/bin/python benchmarks/bench_blocks.py                       # both tables
    .venv/bin/python benchmarks/bench_blocks.py --lengths 2048 8192 --blocks attn mamba2 --no-infini-package
    .venv/bin/python benchmarks/bench_blocks.py --only-infini-package --package-lengths 2048 8192

Blocks: each with its config class's defaults at d_model 256 (the table header lists what that means
for every block), batch 1, inputs x [1, L, 256] with a random cotangent on the output.

Measurement: every (block, length) cell runs in a fresh subprocess through `evals.memory.measure`
(one torch thread unless --threads says otherwise; its watchdog turns a run past --mem-cap-gb into an
OOM record). The child builds the block and its inputs, warms the code up on 256 tokens, resets the
peak RSS counter (VmHWM, through /proc/self/clear_refs), runs one forward + backward and records its
peak above the RSS right before it; then it runs `--repeats` more and keeps the least CPU time (CPU
rather than wall seconds: this machine is shared, and other processes stretch wall time far more
than a one-thread process's CPU time). A cell whose estimate from the shorter lengths (the growth
exponent between the two longest measured lengths, at least linear) exceeds --time-cap-s for one
forward + backward or --mem-cap-gb is not started, and the table says so with the estimate.

infini vs infini-transformer-pytorch (installed only for this comparison, never a dependency;
`pip install --no-deps infini-transformer-pytorch rotary-embedding-torch`): the package's layer
`CausalAttention` (its norm replaced by identity: zoo's block has no norm, the model applies it) run
over the sequence segment by segment with the memories carried, gradients flowing through them (as
its wrapper with detach_mems_every_num_segments >= the number of segments), against zoo's `infini`
block on the whole sequence; same heads (4), head_dim (64), segment length, update rule, d_model 256.
Both sides run in one subprocess per length in interleaved rounds (one warm-up round first), best
round kept, so machine load falls on both alike; memory again one fresh subprocess per side.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform

from benchmarks.harness import Table, command_line, measure, print_summary, time_call, time_interleaved

D_MODEL = 256
WARMUP_LEN = 256
HEADS, HEAD_DIM = 4, 64     # infini comparison; zoo's AttnConfig default at d_model 256


# ---------------------------------------------------------------- in the child process

def _zoo_block(name: str, length: int, **overrides):
    """The block's forward, its output alone (an auxiliary loss, taipan's, is not part of the timed work)."""
    from zoo.registry import get_block
    entry = get_block(name)
    cfg = entry.config(**overrides)
    if hasattr(cfg, "check"):
        cfg.check(D_MODEL, length)
    block = entry.cls(D_MODEL, cfg, 0).train()
    return lambda x: block.run(x)[0]


def _package_layer(segment_len: int, delta_rule: bool):
    import torch.nn as nn
    from infini_transformer_pytorch.infini_transformer import CausalAttention
    layer = CausalAttention(D_MODEL, dim_head=HEAD_DIM, heads=HEADS, use_mem_delta_rule=delta_rule)
    layer.norm = nn.Identity()
    layer.train()

    def forward(x):
        import torch
        memories, outs = None, []
        for part in x.split(segment_len, dim=1):
            out, _, memories = layer(part, past_memories=memories, return_new_memories=True)
            outs.append(out)
        return torch.cat(outs, 1)

    return forward


def _forward_fn(impl: str, length: int, segment_len: int | None = None, delta_rule: bool | None = None):
    """impl: a registered block name, 'infini-zoo' or 'infini-package' (the last two take segment/rule)."""
    if impl == "infini-package":
        return _package_layer(segment_len, delta_rule)
    if impl == "infini-zoo":
        return _zoo_block("infini", length, segment_len=segment_len, delta_rule=delta_rule)
    return _zoo_block(impl, length)


def _step_fn(impl: str, length: int, **kw):
    """A closure doing one forward + backward at `length` on fixed random inputs."""
    import torch
    forward = _forward_fn(impl, length, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, length, D_MODEL, generator=g, requires_grad=True)
    cot = torch.randn(1, length, D_MODEL, generator=g)

    def step():
        x.grad = None
        forward(x).backward(cot)

    return step, forward


def cell(impl: str, length: int, repeats: int, segment_len: int | None = None, delta_rule: bool | None = None) -> dict:
    """Run inside `evals.memory`'s fresh child: peak of one fwd+bwd above the set-up RSS, best CPU time."""
    import torch
    kw = {} if segment_len is None else {"segment_len": segment_len, "delta_rule": delta_rule}
    step, forward = _step_fn(impl, length, **kw)
    # Warm-up on a short input with the same module: kernels, thread pool and allocator arenas are
    # not memory the block needs per token.
    xw = torch.randn(1, min(WARMUP_LEN, length), D_MODEL, requires_grad=True)
    forward(xw).sum().backward()
    del xw   # parameter gradients stay allocated, so both sides' peaks exclude them alike
    first = time_call(step, 1, warmup=0, memory=True)   # the memory pass
    best = time_call(step, repeats, warmup=0) if repeats else first
    return {"peak_bytes": first.peak_bytes, "cpu_s": best.cpu_best, "wall_s": best.best, "first_cpu_s": first.cpu_best}


def interleaved(length: int, impls: list, rounds: int, segment_len: int, delta_rule: bool) -> dict:
    """Run inside a fresh child: `rounds` interleaved fwd+bwd rounds after one warm-up; best CPU s per impl."""
    steps = {impl: _step_fn(impl, length, segment_len=segment_len, delta_rule=delta_rule)[0] for impl in impls}
    timings = time_interleaved(steps, rounds)
    return {"cpu_s": {k: t.cpu_best for k, t in timings.items()}, "wall_s": {k: t.best for k, t in timings.items()}}


# ---------------------------------------------------------------- the driver

def _measure(target: str, kwargs: dict, args, timeout: float) -> dict:
    rec = measure(f"benchmarks.bench_blocks:{target}", kwargs, cap_gb=args.mem_cap_gb, threads=args.threads,
                  timeout=timeout)
    if rec["status"] == "ok":
        return {"status": "ok", **rec["result"]}
    return rec


def _estimate(done: dict, length: int, key: str):
    """Extrapolate `key` to `length` from the two longest measured lengths (exponent >= 1)."""
    pts = sorted((n, r[key]) for n, r in done.items() if r.get("status") == "ok" and n < length)
    if not pts:
        return None
    if len(pts) == 1:
        (n1, v1), p = pts[0], 1.0
    else:
        (n0, v0), (n1, v1) = pts[-2], pts[-1]
        p = max(1.0, math.log(max(v1, 1e-9) / max(v0, 1e-9)) / math.log(n1 / n0))
    return v1 * (length / n1) ** p


def _defaults_line(blocks) -> str:
    from zoo.registry import get_block
    parts = []
    for name in blocks:
        cfg = get_block(name).config()
        fields = ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                           if getattr(cfg, f.name) is not None and f.name not in ("rope_base", "qkv_bias", "out_bias",
                                                                                  "dt_min", "dt_max", "dt_init_floor",
                                                                                  "a_init_min", "a_init_max", "bias",
                                                                                  "conv_bias", "gate_lr_mult"))
        parts.append(f"`{name}` ({fields})")
    return "; ".join(parts)


def fmt_cell(r: dict, what: str, args) -> str:
    st = r["status"]
    if st == "ok":
        return f"{r['cpu_s']:.3f}" if what == "time" else f"{r['peak_bytes'] / 2**20:.0f}"
    if st == "skipped":
        return r["reason_" + what] if what == "time" else r["reason_mem"]
    if st == "OOM":
        return f"OOM (> {args.mem_cap_gb:g} GiB cap)"
    if st == "timeout":
        return f"timed out ({r['timeout_s']:.0f} s)"
    return f"error: {r.get('error')}"


def run_blocks(args) -> dict:
    from zoo.registry import list_blocks
    blocks = args.blocks or list_blocks()
    cap_bytes = args.mem_cap_gb * 2**30
    print(f"Block configs: the config classes' defaults at d_model {D_MODEL}: {_defaults_line(blocks)}.\n")
    results = {}
    for name in blocks:
        done = {}
        for n in sorted(args.lengths):
            est_t, est_m = _estimate(done, n, "cpu_s"), _estimate(done, n, "peak_bytes")
            if (est_t and est_t > args.time_cap_s) or (est_m and est_m > cap_bytes):
                why_t = f"not run: est. {est_t:.0f} s"
                why_t += f" > {args.time_cap_s:g} s cap" if est_t > args.time_cap_s else ""
                why_m = f"not run: est. {est_m / 2**20:.0f} MiB"
                why_m += f" > {args.mem_cap_gb:g} GiB cap" if est_m > cap_bytes else ""
                done[n] = {"status": "skipped", "est_cpu_s": est_t, "est_peak_bytes": est_m,
                           "reason_time": why_t, "reason_mem": why_m}
                print(f"{name} @ {n}: skipped, estimated {est_t:.0f} s per fwd+bwd and {est_m / 2**20:.0f} MiB "
                      f"(caps {args.time_cap_s:g} s, {args.mem_cap_gb:g} GiB)", flush=True)
                continue
            # The child runs 1 + repeats passes; the timeout (wall seconds, which other processes on a
            # shared machine stretch several-fold past CPU seconds) catches an estimate far too low.
            timeout = (1 + args.repeats) * args.time_cap_s * 10 + 300
            done[n] = _measure("cell", {"impl": name, "length": n, "repeats": args.repeats}, args, timeout)
            r = done[n]
            print(f"{name} @ {n}: {r['status']}" + (f", {r['cpu_s']:.3f} s, {r['peak_bytes'] / 2**20:.0f} MiB"
                                                     if r["status"] == "ok" else ""), flush=True)
        results[name] = done

    lengths = sorted(args.lengths)
    table = Table(["block"] + [f"{n} s" for n in lengths] + [f"{n} MiB" for n in lengths]
                  + [f"MiB per 1K tokens at {lengths[-1]}"], align="l" + "r" * (2 * len(lengths) + 1))
    for name, done in results.items():
        row = [fmt_cell(done[n], "time", args) for n in lengths] + [fmt_cell(done[n], "mem", args) for n in lengths]
        last = done[lengths[-1]]
        row.append(f"{last['peak_bytes'] / 2**20 / (lengths[-1] / 1024):.1f}" if last["status"] == "ok" else "-")
        table.add([name, *row])
    print(f"\n{table}")
    return {name: {str(n): {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                   for n, r in done.items()} for name, done in results.items()}


def run_infini_package(args) -> dict:
    try:
        import importlib.metadata as md

        import infini_transformer_pytorch  # noqa: F401
        version = md.version("infini-transformer-pytorch")
    except ImportError as err:
        print(f"\ninfini vs infini-transformer-pytorch: skipped, the package is not importable ({err}); "
              "install it for the benchmark only: .venv/bin/pip install --no-deps infini-transformer-pytorch "
              "rotary-embedding-torch")
        return {"skipped": str(err)}
    print(f"\ninfini vs infini-transformer-pytorch {version}: heads {HEADS}, head_dim {HEAD_DIM}, d_model {D_MODEL}, "
          f"fwd+bwd through the whole sequence; time = best CPU s of {args.rounds} interleaved rounds in one process; "
          f"memory = peak RSS above the set-up baseline, one fresh process per side. speedup = package / zoo.\n")
    table = Table(["length", "segment", "update", "zoo s", "package s", "speedup", "zoo MiB", "package MiB",
                   "memory ratio"], align="rrlrrrrrr", stream=True)
    out = {}
    for n in args.package_lengths:
        for seg in args.package_segments:
            for delta in (True, False):
                kw = {"segment_len": seg, "delta_rule": delta}
                t = _measure("interleaved", {"length": n, "impls": ["infini-zoo", "infini-package"],
                                             "rounds": args.rounds, **kw}, args, timeout=1800)
                mem = {impl: _measure("cell", {"impl": impl, "length": n, "repeats": 0, **kw}, args, timeout=900)
                       for impl in ("infini-zoo", "infini-package")}
                update = "delta" if delta else "linear"
                if t["status"] != "ok":
                    table.add([n, seg, update, t["status"], "", "", "", "", ""])
                    continue
                tz, tp = t["cpu_s"]["infini-zoo"], t["cpu_s"]["infini-package"]
                mz, mp = (mem[i]["peak_bytes"] / 2**20 if mem[i]["status"] == "ok" else None
                          for i in ("infini-zoo", "infini-package"))
                mz_s, mp_s = (f"{m:.0f}" if m is not None else mem[i]["status"]
                              for m, i in ((mz, "infini-zoo"), (mp, "infini-package")))
                ratio = f"{mp / mz:.2f}x" if mz and mp else "-"
                table.add([n, seg, update, f"{tz:.3f}", f"{tp:.3f}", f"{tp / tz:.2f}x", mz_s, mp_s, ratio])
                out[f"{n}_{seg}_{update}"] = {
                    "zoo_s": round(tz, 4), "package_s": round(tp, 4), "speedup": round(tp / tz, 3),
                    "zoo_wall_s": round(t["wall_s"]["infini-zoo"], 4),
                    "package_wall_s": round(t["wall_s"]["infini-package"], 4),
                    "zoo_mib": mz and round(mz, 1), "package_mib": mp and round(mp, 1)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--blocks", nargs="+", default=None, help="registered block names (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measurement (default 1)")
    ap.add_argument("--repeats", type=int, default=2, help="timed fwd+bwd passes after the memory pass; best kept")
    ap.add_argument("--mem-cap-gb", type=float, default=8.0)
    ap.add_argument("--time-cap-s", type=float, default=30.0,
                    help="skip a cell whose estimated CPU seconds per fwd+bwd exceed this")
    ap.add_argument("--no-infini-package", action="store_true", help="skip the infini-transformer-pytorch table")
    ap.add_argument("--only-infini-package", action="store_true", help="only the infini-transformer-pytorch table")
    ap.add_argument("--package-lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--package-segments", type=int, nargs="+", default=[128, 512],
                    help="segment lengths (zoo's default 128, the package wrapper's default 512)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (infini vs package)")
    args = ap.parse_args()

    import torch
    print(f"command: `{command_line()}`\n")
    print(f"CPU float32, batch 1, forward + backward, {args.threads} torch thread(s) per measurement on a "
          f"{os.cpu_count()}-core {platform.machine()} machine shared with other work, torch {torch.__version__}; "
          f"load average at start {os.getloadavg()[0]:.1f}. Time: CPU seconds of one fwd+bwd (best of "
          f"{args.repeats}); memory: peak RSS of a fresh subprocess above its set-up baseline (MiB).\n")
    summary = {}
    if not args.only_infini_package:
        summary["blocks"] = run_blocks(args)
    if not args.no_infini_package:
        summary["infini_vs_package"] = run_infini_package(args)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    print_summary(summary)


if __name__ == "__main__":
    main()
