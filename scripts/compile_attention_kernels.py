"""Compile the selective-attention and Infini-memory Triton kernels for a CUDA target without a GPU.

Triton lowers a kernel to PTX and assembles it with its bundled ptxas on any machine, so a session
without a GPU can still learn whether a kernel compiles (the interpreter runs the same source through
numpy and accepts programs the compiler refuses) and how much shared memory a launch needs, which
must fit the device (H100: 227 KiB per block, A100: 163 KiB). Nothing runs and nothing is timed.

    .venv/bin/python scripts/compile_attention_kernels.py                    # sm_90, head_dim 64
    .venv/bin/python scripts/compile_attention_kernels.py --head-dim 128 --dtypes bf16

Ends with one `summary:` line: per kernel and dtype, ok or the error, and the shared memory bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import zoo.ops.triton.infini as infini  # noqa: E402
import zoo.ops.triton.selective as selective  # noqa: E402

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def compile_one(fn, pointers, scalars, constexprs, target, num_warps):
    signature = {**pointers, **scalars, **{k: "constexpr" for k in constexprs}}
    names = list(signature)
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options={"num_warps": num_warps})


def jobs(dtypes, head_dim, heads, kv_heads):
    for dt in dtypes:
        acc = "fp64" if dt == "fp64" else "fp32"
        tile = selective._default_tile(TORCH_DTYPES[dt], head_dim)  # selective_attention_triton's default
        meta = dict(H=heads, HK=kv_heads, D=head_dim, DV=head_dim, BLOCK_M=tile, BLOCK_N=tile,
                    BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=max(16, triton.next_power_of_2(head_dim)),
                    IEEE=dt in ("fp32", "fp64"))
        lengths = {"LQ": "i32", "LK": "i32"}
        p = lambda names, t: {n: "*" + t for n in names}
        yield (f"selective colsum {dt}", selective._colsum_kernel, {**p("QK", dt), **p(["C", "FBLK", "FINAL"], acc)},
               {"scale": "fp32", "off": "i32", "n_carried": "i32", **lengths}, meta)
        yield (f"selective forward {dt}", selective._fwd_kernel,
               {**p("QKV", dt), "FBLK": "*" + acc, "OUT": "*" + dt, "LSE": "*" + acc},
               {"scale": "fp32", "off": "i32", **lengths}, meta)
        yield (f"selective backward {dt}", selective._bwd_kernel,
               {**p(["Q", "K", "V", "DO"], dt), **p(["LSE", "DELTA", "FBLK", "DFINAL", "DQ", "DK", "DK0", "DVH", "DCARRY"], acc)},
               {"scale": "fp32", "off": "i32", **lengths}, meta)
        if dt == "bf16":
            continue  # infini_attention hands the memory kernel float32 (or float64) tensors
        for delta in (False, True):
            m = dict(H=heads, HK=kv_heads, DK=head_dim, DV=head_dim, SEG=2048, DELTA=delta, BLOCK_T=32,
                     BLOCK_DK=max(16, triton.next_power_of_2(head_dim)),
                     BLOCK_DV=min(64, max(16, triton.next_power_of_2(head_dim))))
            rule = "delta" if delta else "linear"
            yield (f"infini forward {rule} {dt}", infini._fwd_kernel,
                   p(["Q", "K", "V", "M0", "Z0", "MEM", "MB", "ZB", "MF", "ZF"], acc), {"n_seg": "i32", "L": "i32"}, m)
            yield (f"infini backward {rule} {dt}", infini._bwd_kernel,
                   p(["Q", "K", "V", "MB", "ZB", "DMEM", "DMF", "DZF", "DQ", "DKK", "DVV", "DM0", "DZ0"], acc),
                   {"n_seg": "i32", "L": "i32"}, m)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32", "fp64"], choices=["bf16", "fp16", "fp32", "fp64"])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--num-warps", type=int, default=4)
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_LIMIT.get(args.arch)
    results = {}
    for name, fn, pointers, scalars, meta in jobs(args.dtypes, args.head_dim, args.heads, args.kv_heads):
        start = time.perf_counter()
        try:
            shared = compile_one(fn, pointers, scalars, meta, target, args.num_warps).metadata.shared
            fits = limit is None or shared <= limit
            results[name] = {"ok": True, "shared_bytes": shared, "fits": fits}
            note = "" if fits else f"  EXCEEDS the {limit // 1024} KiB per block of sm_{args.arch}"
            print(f"{name}: compiles, {shared / 1024:.0f} KiB shared memory (tiles {meta.get('BLOCK_M', meta.get('BLOCK_T'))}){note} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        except Exception as err:  # noqa: BLE001 - report every kernel, not only the first failure
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
            print(f"{name}: FAILS: {results[name]['error']}", flush=True)
    print("summary: " + json.dumps({"arch": args.arch, "head_dim": args.head_dim, "num_warps": args.num_warps,
                                    "triton": triton.__version__, "kernels": results}))
    return 0 if all(r["ok"] and r.get("fits", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
