"""Compile zoo's Triton kernels for a GPU without one: every launch the ops make on a small call is
turned into `triton.compile(...)` for the target (default sm_90, an H100), which runs Triton's whole
pipeline and ptxas, and reports each kernel's shared memory against the target's limit. Nothing
runs, so the ops' outputs are garbage; the point is the errors that the interpreter (which the tests
use) cannot show: types the compiler rejects, and kernels that would not fit the device.

    .venv/bin/python benchmarks/compile_kernels.py                     # bf16, every op, default shapes
    .venv/bin/python benchmarks/compile_kernels.py --dtype fp32 --ops ssd
    .venv/bin/python benchmarks/compile_kernels.py --ops selective_attention infini --head-dim 128 --dtype fp32

Shapes: Mamba-2's head_dim 64 / d_state 128 (ssd), Mamba-1's d_state 16 (selective_scan), --head-dim
for selective attention (8 heads over 4 kv heads) and Infini's memory kernels (both update rules; the
op hands them float32, or float64 for float64 inputs).

ptxas on large float32 tiles is slow (minutes per kernel on a small CPU). Ends with a `summary:` line;
exits 1 if a kernel failed to compile or needs more shared memory than the target has.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)   # real compilation, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from benchmarks.harness import print_summary  # noqa: E402

OPS = ("ssd", "selective_scan", "selective_attention", "infini")
SHARED_LIMIT = {90: 232448, 80: 166912}   # bytes of shared memory one block may use (opt-in maximum)
DTYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}


def signature(kernel, args, kwargs):
    values = dict(zip(kernel.arg_names, args), **kwargs)
    sig, const = {}, {}
    for i, p in enumerate(kernel.params):
        v = values.get(p.name)
        if p.is_constexpr or v is None:
            sig[p.name], const[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i64" if abs(v) >= 2**31 else "i32"
        else:
            sig[p.name] = "fp32"
    return sig, const


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"], default="bf16")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--head-dim", type=int, default=64, help="selective_attention and infini head size")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    target, limit = GPUTarget("cuda", args.arch, 32), SHARED_LIMIT[args.arch]
    results = {}

    def compile_launch(kernel, launch_args, launch_kwargs):
        sig, const = signature(kernel, launch_args, launch_kwargs)
        name = f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}" + "".join(
            f" {k}={v}" for k, v in launch_kwargs.items() if k in ("DELTA",))
        if name in results:
            return
        try:
            compiled = triton.compile(ASTSource(kernel, sig, const), target=target)
            shared = compiled.metadata.shared
            results[name] = {"shared_bytes": shared, "fits": shared <= limit}
            print(f"{name}: shared memory {shared / 1024:.0f} KiB of {limit / 1024:.0f}"
                  + ("" if shared <= limit else "  DOES NOT FIT"), flush=True)
        except Exception as err:  # noqa: BLE001 - report every compiler error, go on with the rest
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
            print(f"{name}: FAILED {results[name]['error']}", flush=True)

    JITFunction.__getitem__ = lambda kernel, grid: (lambda *a, **k: compile_launch(kernel, a, k))
    r = lambda *shape: torch.randn(*shape).to(dtype).requires_grad_()
    if "ssd" in args.ops:
        from zoo.ops.triton.ssd import ssd_scan_triton
        b, length, h, p, g, n = 1, 130, 4, 64, 1, 128            # Mamba-2's head_dim and d_state
        x, z, B, C = r(b, length, h, p), r(b, length, h, p), r(b, length, g, n), r(b, length, g, n)
        dt, A, D = r(b, length, h), -torch.rand(h).requires_grad_(), r(h)
        h0 = torch.randn(b, h, p, n, requires_grad=True)
        y, final = ssd_scan_triton(x, dt, A, B, C, 256, D=D, z=z, initial_states=h0, dt_softplus=True,
                                   return_final_states=True)
        (y.float().sum() + final.sum()).backward()
    if "selective_scan" in args.ops:
        from zoo.ops.triton.ssm import selective_scan_triton
        b, d, n, length = 1, 64, 16, 70                          # Mamba-1's d_state
        out, last = selective_scan_triton(r(b, d, length), r(b, d, length), -torch.rand(d, n).requires_grad_(),
                                          r(b, n, length), r(b, n, length), r(d), r(b, d, length), r(d), True,
                                          True, None)
        (out.float().sum() + last.float().sum()).backward()
    hd = args.head_dim
    if "selective_attention" in args.ops:
        from zoo.ops.triton.selective import selective_attention_triton
        out, final = selective_attention_triton(r(1, 100, 8, hd), r(1, 130, 4, hd), r(1, 130, 4, hd),
                                                scores=torch.rand(1, 30), return_scores=True)
        (out.float().sum() + final.sum()).backward()
    if "infini" in args.ops:
        from zoo.ops.triton.infini import infini_memory_triton
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        ra = lambda *shape: torch.randn(*shape, dtype=acc).requires_grad_()
        for delta in (False, True):
            mem, M, z = infini_memory_triton(ra(1, 130, 8, hd), ra(1, 130, 4, hd), ra(1, 130, 4, hd),
                                             ra(1, 4, hd, hd), ra(1, 4, hd), 64, delta)
            (mem.sum() + M.sum() + z.sum()).backward()
    bad = [k for k, v in results.items() if not v.get("fits", False)]
    print_summary({"target": f"sm_{args.arch}", "dtype": args.dtype, "kernels": results, "failed_or_too_big": bad})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
