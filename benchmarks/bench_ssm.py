"""Mamba-1 and Mamba-2 on CPU, float32, forward + backward: zoo's pure-PyTorch paths against the
pure-PyTorch fallbacks of transformers 5.x, op to op and mixer to mixer, on the same weights.

    transformers: mamba_selective_scan, mamba2_chunk_scan, MambaMixer, Mamba2Mixer (no mamba-ssm)
    zoo:          zoo.ops.ssm.selective_scan, zoo.ops.ssd.ssd_scan, blocks `mamba`, `mamba2`

d_model 256 (d_inner 512); Mamba-1 with d_state 16; Mamba-2 with d_state 64, head_dim 64 (8 heads),
one group; batch 1. Chunk sizes: each side at its own default, transformers' Mamba2Config 256 and
zoo's Mamba2Config 64 (both scans are faster at 64 on CPU; --zoo-chunk 256 gives the like-for-like
rows at 256, --hf-chunk 64 those at 64). Every measurement runs in a fresh subprocess (`measure`): time is the
best of `repeats` forward + backward passes, memory the peak RSS above the subprocess's own baseline
taken after building the inputs (/proc/self/status VmHWM after resetting it through clear_refs, minus
VmRSS); one torch thread unless --threads says otherwise. Before timing, the outputs and gradients
of both sides are compared on one short input.

    .venv/bin/python benchmarks/bench_ssm.py            # the full table (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_ssm.py --quick    # short lengths only, a smoke test
    .venv/bin/python benchmarks/bench_ssm.py --only mamba2:mixer    # the rows of one arch (and level)
"""
from __future__ import annotations

import argparse
import os
import platform

from benchmarks.harness import Table, command_line, measure, print_summary, time_call

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # transformers' kernel hub must not reach for the network

D_MODEL = 256
MAMBA = {"d_state": 16, "d_conv": 4, "expand": 2}
MAMBA2 = {"d_state": 64, "d_conv": 4, "expand": 2, "head_dim": 64, "n_groups": 1}
# each side's default chunk size (transformers' Mamba2Config and zoo's); --zoo-chunk / --hf-chunk override
CHUNK = {"hf": 256, "zoo": None}
TIMEOUT_S = 900

# (arch, what, length, {impl: repeats}). transformers' Mamba-1 backward grows about cubically with
# the length (every step's slice of the [b, d, l, n] tensors gets a full-size gradient buffer), so
# it runs once at 2K and not at all at 8K; its Mamba-2 path is not run at 64K.
FULL = [
    ("mamba", "op", 512, {"zoo": 3, "hf": 3}),
    ("mamba", "op", 2048, {"zoo": 3, "hf": 1}),
    ("mamba", "op", 8192, {"zoo": 3}),
    ("mamba", "mixer", 512, {"zoo": 3, "hf": 3}),
    ("mamba", "mixer", 2048, {"zoo": 3, "hf": 1}),
    ("mamba", "mixer", 8192, {"zoo": 3}),
    ("mamba2", "op", 4096, {"zoo": 3, "hf": 3}),
    ("mamba2", "op", 16384, {"zoo": 3, "hf": 3}),
    ("mamba2", "op", 65536, {"zoo": 2}),
    ("mamba2", "mixer", 4096, {"zoo": 3, "hf": 3}),
    ("mamba2", "mixer", 16384, {"zoo": 3, "hf": 3}),
    ("mamba2", "mixer", 65536, {"zoo": 2}),
]
QUICK = [
    ("mamba", "op", 256, {"zoo": 2, "hf": 2}),
    ("mamba", "mixer", 256, {"zoo": 2, "hf": 2}),
    ("mamba2", "op", 1024, {"zoo": 2, "hf": 2}),
    ("mamba2", "mixer", 1024, {"zoo": 2, "hf": 2}),
]
NOT_RUN = {("mamba", 8192): "not run: backward grows ~cubically (2K takes minutes)",
           ("mamba2", 65536): "not run: ~4x its 16K peak, past the 4 GiB benchmark budget"}


# ---------------------------------------------------------------- what is measured (in the worker)

def chunk_size(impl):
    from zoo.blocks.mamba import Mamba2Config
    return CHUNK[impl] or Mamba2Config().chunk_size


def hf_mixer(arch):
    import torch
    from transformers import Mamba2Config, MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    torch.manual_seed(0)
    if arch == "mamba":
        cfg = MambaConfig(hidden_size=D_MODEL, state_size=MAMBA["d_state"], conv_kernel=MAMBA["d_conv"],
                          expand=MAMBA["expand"], num_hidden_layers=1)
        return MambaMixer(cfg, 0)
    heads = MAMBA2["expand"] * D_MODEL // MAMBA2["head_dim"]
    cfg = Mamba2Config(hidden_size=D_MODEL, state_size=MAMBA2["d_state"], conv_kernel=MAMBA2["d_conv"],
                       expand=MAMBA2["expand"], head_dim=MAMBA2["head_dim"], num_heads=heads,
                       n_groups=MAMBA2["n_groups"], chunk_size=chunk_size("hf"), num_hidden_layers=1)
    return Mamba2Mixer(cfg, 0)


def zoo_mixer(arch, weights_from):
    """zoo's block with the transformers mixer's weights (the parameter names are the same)."""
    from zoo.blocks.mamba import Mamba2Block, Mamba2Config, MambaBlock, MambaConfig
    block = (MambaBlock(D_MODEL, MambaConfig(**MAMBA), 0) if arch == "mamba"
             else Mamba2Block(D_MODEL, Mamba2Config(**MAMBA2, chunk_size=chunk_size("zoo")), 0))
    block.load_state_dict(weights_from.state_dict())
    return block


def op_inputs(arch, length, dtype):
    """Inputs at the scale the mixers feed their scans (dt from the usual init, A = -exp(A_log))."""
    import torch
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    d_inner = 2 * D_MODEL
    if arch == "mamba":
        n = MAMBA["d_state"]
        return dict(u=rand(1, d_inner, length), delta=rand(1, d_inner, length) * 0.1,
                    A=-torch.arange(1, n + 1, dtype=dtype).repeat(d_inner, 1), B=rand(1, n, length),
                    C=rand(1, n, length), D=torch.ones(d_inner, dtype=dtype), z=rand(1, d_inner, length),
                    delta_bias=torch.full((d_inner,), -4.0, dtype=dtype))
    h, p, n = d_inner // MAMBA2["head_dim"], MAMBA2["head_dim"], MAMBA2["d_state"]
    return dict(x=rand(1, length, h, p), dt=rand(1, length, h) * 0.1, A=-torch.arange(1, h + 1, dtype=dtype),
                B=rand(1, length, 1, n), C=rand(1, length, 1, n), D=torch.ones(h, dtype=dtype),
                dt_bias=torch.full((h,), -4.0, dtype=dtype))


def op_fn(arch, impl):
    if arch == "mamba":
        if impl == "zoo":
            from zoo.ops.ssm import selective_scan as scan
        else:
            from transformers.models.mamba.modeling_mamba import mamba_selective_scan as scan
        # positional: the two libraries name u / delta differently (hidden_states / dt)
        return lambda i: scan(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"],
                              delta_softplus=True)
    if impl == "zoo":
        from zoo.ops.ssd import ssd_scan as scan
    else:
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan as scan
    return lambda i: scan(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk_size(impl), D=i["D"],
                          dt_bias=i["dt_bias"], dt_softplus=True)


def setup(arch, what, impl, length, dtype):
    """(run, leaves): run() does one forward + backward; leaves, by name, get gradients."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()   # one "falling back to PyTorch" warning per function
    if what == "op":
        inputs = {k: v.requires_grad_() for k, v in op_inputs(arch, length, dtype).items()}
        fn = op_fn(arch, impl)
        leaves = inputs
        forward = lambda: fn(inputs)
    else:
        hf = hf_mixer(arch).to(dtype)
        module = hf if impl == "hf" else zoo_mixer(arch, hf)
        del hf
        module.train()
        x = torch.randn(1, length, D_MODEL, generator=torch.Generator().manual_seed(1), dtype=dtype,
                        requires_grad=True)
        leaves = {"x": x, **dict(module.named_parameters())}
        forward = lambda: module(x)
    probe = forward()
    cotangent = torch.randn(probe.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    del probe

    def run():
        for t in leaves.values():
            t.grad = None
        out = forward()
        out.backward(cotangent)
        return out

    return run, leaves


def worker(arch, what, impl, length, repeats, chunks=None):
    """In a fresh process (`measure`): best CPU and wall s of `repeats` fwd+bwd, their peak above the set-up."""
    import torch
    CHUNK.update(chunks or {})
    run, _ = setup(arch, what, impl, length, torch.float32)
    t = time_call(run, repeats, warmup=0, memory=True)
    return {"time_s": t.cpu_best, "wall_s": t.best, "peak_mib": t.peak_bytes / 2**20}


# ---------------------------------------------------------------- the driver

def agreement(archs=("mamba", "mamba2")):
    """Max relative difference between zoo and transformers on the same weights and inputs."""
    import torch
    rows = []
    for arch in archs:
        for what in ("op", "mixer"):
            length = 300
            got = []
            for impl in ("zoo", "hf"):
                run, leaves = setup(arch, what, impl, length, torch.float32)
                out = run()
                got.append({"output": out.detach(), **{k: t.grad for k, t in leaves.items()}})
            zoo, hf = got
            assert zoo.keys() == hf.keys(), sorted(zoo.keys() ^ hf.keys())
            err = max(((zoo[k] - hf[k]).abs().max() / hf[k].abs().max().clamp_min(1e-30)).item() for k in hf)
            rows.append(f"{arch} {what}: {err:.1e}")
    return rows


def run_cell(arch, what, length, impl, repeats, threads):
    rec = measure("benchmarks.bench_ssm:worker", {"arch": arch, "what": what, "impl": impl, "length": length,
                                                  "repeats": repeats, "chunks": CHUNK},
                  threads=threads, timeout=TIMEOUT_S)
    if rec["status"] == "timeout":
        return None, f"timed out after {TIMEOUT_S} s"
    if rec["status"] != "ok":
        return None, f"failed: {(rec.get('error') or [rec['status']])[-1]}"
    return rec["result"], None


def fmt_time(r):
    return f"{r['time_s']:.3f}" if r else "-"


def fmt_mem(r):
    return f"{r['peak_mib']:.0f}" if r else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short lengths only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per measurement (default 1: on a shared machine a descheduled "
                             "thread stalls every parallel region of the other)")
    parser.add_argument("--only", default=None,
                        help="run only these rows: ARCH or ARCH:LEVEL, comma-separated (e.g. mamba2:mixer)")
    parser.add_argument("--zoo-chunk", type=int, default=None, help="zoo's Mamba-2 chunk size (default: its own, "
                                                                     "Mamba2Config().chunk_size)")
    parser.add_argument("--hf-chunk", type=int, default=CHUNK["hf"],
                        help=f"transformers' Mamba-2 chunk size (default: its own, {CHUNK['hf']})")
    args = parser.parse_args()
    CHUNK.update(zoo=args.zoo_chunk, hf=args.hf_chunk)
    rows = QUICK if args.quick else FULL
    if args.only:
        keep = [o.split(":") for o in args.only.split(",")]
        rows = [r for r in rows if any(k[0] == r[0] and (len(k) == 1 or k[1] == r[1]) for k in keep)]

    import torch
    import transformers
    print(f"command: `{command_line()}`\n")
    print(f"CPU float32, {args.threads} thread(s) per measurement on a {os.cpu_count()}-core "
          f"{platform.machine()} machine, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"load average at start {os.getloadavg()[0]:.1f}. Time: CPU seconds of one forward + backward, the "
          f"best of `runs` (CPU time rather than wall time, which other processes on a shared machine "
          f"inflate); the summary line also has the best wall times. Peak: RSS above the subprocess's "
          f"baseline. Speedup and memory ratio are transformers / zoo. Mamba-2 chunk size: zoo "
          f"{chunk_size('zoo')}, transformers {chunk_size('hf')}.\n")
    print("zoo vs transformers on the same weights, max relative difference of output and all gradients "
          "(length 300): " + "; ".join(agreement(sorted({r[0] for r in rows}))) + "\n")
    table = Table(["model", "level", "length", "runs zoo/hf", "zoo s", "transformers s", "speedup", "zoo peak MiB",
                   "transformers peak MiB", "memory ratio"], align="llrrrrrrrr", stream=True)
    summary = {}
    for arch, what, length, impls in rows:
        got = {}
        for impl in ("zoo", "hf"):
            if impl in impls:
                got[impl], err = run_cell(arch, what, length, impl, impls[impl], args.threads)
                if err:
                    got[impl] = None
                    got[impl + "_note"] = err
        zoo, hf = got.get("zoo"), got.get("hf")
        hf_time = fmt_time(hf) if "hf" in impls else NOT_RUN.get((arch, length), "not run")
        hf_time = got.get("hf_note", hf_time)
        speed = f"{hf['time_s'] / zoo['time_s']:.1f}x" if zoo and hf else "-"
        mem = f"{hf['peak_mib'] / max(zoo['peak_mib'], 1e-9):.1f}x" if zoo and hf else "-"
        runs = "/".join(str(impls.get(impl, "-")) for impl in ("zoo", "hf"))
        table.add([arch, what, length, runs, got.get("zoo_note", fmt_time(zoo)), hf_time, speed, fmt_mem(zoo),
                   fmt_mem(hf), mem])
        summary[f"{arch}_{what}_{length}"] = {"zoo_s": zoo and round(zoo["time_s"], 4),
                                              "hf_s": hf and round(hf["time_s"], 4),
                                              "zoo_wall_s": zoo and round(zoo["wall_s"], 4),
                                              "hf_wall_s": hf and round(hf["wall_s"], 4),
                                              "zoo_peak_mib": zoo and round(zoo["peak_mib"]),
                                              "hf_peak_mib": hf and round(hf["peak_mib"])}
    from zoo.ops.dispatch import chosen
    summary["mamba2_chunk"] = {impl: chunk_size(impl) for impl in CHUNK}
    summary["kernels"] = chosen("cpu")   # what zoo's ops ran: every subprocess uses the defaults
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    print_summary(summary)


if __name__ == "__main__":
    main()
