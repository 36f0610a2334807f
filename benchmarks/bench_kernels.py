"""The GPU kernels side by side: every dispatched op's implementations on one CUDA device, plus the
training MFU of the transformer and taipan recipes.

    ssd             zoo torch path | zoo Triton | mamba-ssm's mamba_chunk_scan_combined (if installed)
    selective_scan  zoo torch path | zoo Triton | mamba-ssm's selective_scan_fn (if installed)
    selective_attn  zoo torch path | zoo Triton | SDPA plain causal attention (the speed to reach)
    infini          zoo torch path | zoo Triton (memory retrieval + update fused; local attention SDPA)
    delta_rule      zoo torch path | zoo Triton (the chunk-to-chunk pass; the chunks' WY part in torch)
    mfu             training steps of recipes/transformer.yaml and recipes/taipan.yaml, scaled up

Each cell is forward + backward of one call (batch 1 unless --batch), bf16 inputs unless --dtype,
time the median of --repeats after two warm-up calls (CUDA events), memory the peak allocated above
the inputs. Before timing, every implementation's output is compared with the torch path's at 2K.
Shapes: Mamba-2 d_model 768 (24 heads of 64, d_state 128, one group, chunk 256); Mamba-1 d_inner
1536, d_state 16; attention 12 heads of 64; Gated DeltaNet 16 heads, d_k = d_v = 128, chunk 64 (Qwen3-Next's
linear-attention shape with its 32 value heads halved).

MFU = model FLOPs per second / the device's dense bf16 peak (989 TFLOP/s for H100 and H200 SXM,
or --peak-tflops), model FLOPs per token 6 N (N: parameters without the embedding, the LM head
included) plus, for attention layers, 6 L d (causal attention's QK^T and PV, forward and backward;
PaLM, arXiv 2204.02311, appendix B, halved for the causal mask).

On a machine without CUDA it says so, runs a correctness smoke of the Triton kernels under Triton's
interpreter (tiny shapes, against the torch paths) and exits 0.

    .venv/bin/python benchmarks/bench_kernels.py                     # lengths 2K, 8K, 32K, 64K
    .venv/bin/python benchmarks/bench_kernels.py --lengths 2048 --repeats 3 --skip-mfu
Ends with one machine-readable `summary:` line (device, kernels chosen by auto, every cell).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    # before anything imports triton: its kernels then run in the interpreter, on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import zoo  # noqa: E402
from benchmarks.harness import ROOT, Stopwatch, Table, print_summary, time_call  # noqa: E402
from zoo.ops.delta import delta_rule  # noqa: E402
from zoo.ops.dispatch import chosen, unavailable  # noqa: E402
from zoo.ops.infini import infini_attention  # noqa: E402
from zoo.ops.selective import selective_attention  # noqa: E402
from zoo.ops.ssd import ssd_scan  # noqa: E402
from zoo.ops.ssm import selective_scan  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
MFU_OVERRIDES = {  # sizes at which a GPU is busy; the recipes' own are CPU-sized
    "transformer": ["model.d_model=2048", "model.n_layers=16", "model.blocks.A.n_heads=16",
                    "model.vocab_size=32000", "train.seq_len=2048", "train.batch_size=8"],
    "taipan": ["model.d_model=1536", "model.n_layers=14", "model.blocks.M.head_dim=64", "model.blocks.M.d_state=128",
               "model.blocks.M.chunk_size=256", "model.blocks.T.n_heads=12", "model.blocks.T.window=2048",
               "model.blocks.T.block_size=256", "model.vocab_size=32000", "train.seq_len=4096",
               "train.batch_size=4"],
}


# ---- the cases: (name, make inputs, {impl: fn(inputs) -> output}) -----------------------------------

GPU_SHAPES = {"ssd": dict(h=24, p=64, n=128, g=1, chunk=256), "selective_scan": dict(d=1536, n=16),
              "attention": dict(heads=12, head_dim=64, segment_len=2048), "delta": dict(h=16, d=128, chunk=64)}
SMOKE_SHAPES = {"ssd": dict(h=4, p=8, n=8, g=2, chunk=16), "selective_scan": dict(d=8, n=4),
                "attention": dict(heads=2, head_dim=16, segment_len=16), "delta": dict(h=2, d=16, chunk=16)}
SHAPES = GPU_SHAPES


def ssd_case(length, batch, dtype, device):
    h, p, n, g, chunk = (SHAPES["ssd"][k] for k in ("h", "p", "n", "g", "chunk"))
    gen = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)
    inputs = dict(x=r(batch, length, h, p).to(dtype), dt=r(batch, length, h).to(dtype),
                  A=-torch.rand(h, generator=gen, device=device).add(0.5), B=r(batch, length, g, n).to(dtype),
                  C=r(batch, length, g, n).to(dtype), D=r(h), dt_bias=r(h) - 2)
    run = lambda impl: lambda a: ssd_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk, D=a["D"],
                                          dt_bias=a["dt_bias"], dt_softplus=True, impl=impl)
    return inputs, {impl: run(impl) for impl in ("torch", "triton", "cuda")}


def scan_case(length, batch, dtype, device):
    d, n = SHAPES["selective_scan"]["d"], SHAPES["selective_scan"]["n"]
    gen = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)
    inputs = dict(u=r(batch, d, length).to(dtype), delta=r(batch, d, length).to(dtype),
                  A=-torch.rand(d, n, device=device), B=r(batch, n, length).to(dtype), C=r(batch, n, length).to(dtype),
                  D=r(d), z=r(batch, d, length).to(dtype), bias=r(d) - 2)
    run = lambda impl: lambda a: selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["bias"],
                                                delta_softplus=True, impl=impl)
    return inputs, {impl: run(impl) for impl in ("torch", "triton", "cuda")}


def attention_inputs(length, batch, dtype, device):
    heads, head_dim = SHAPES["attention"]["heads"], SHAPES["attention"]["head_dim"]
    gen = torch.Generator(device).manual_seed(0)
    r = lambda: torch.randn(batch, length, heads, head_dim, generator=gen, device=device).to(dtype)
    return dict(q=r(), k=r(), v=r())


def selective_case(length, batch, dtype, device):
    run = lambda impl: lambda a: selective_attention(a["q"], a["k"], a["v"], impl=impl)
    sdpa = lambda a: F.scaled_dot_product_attention(*(a[t].transpose(1, 2) for t in "qkv"), is_causal=True)
    impls = {"torch": run("torch"), "triton": run("triton"), "sdpa": sdpa}
    return attention_inputs(length, batch, dtype, device), impls


def infini_case(length, batch, dtype, device):
    inputs = attention_inputs(length, batch, dtype, device)
    inputs["gate"] = torch.zeros(SHAPES["attention"]["heads"], device=device)
    segment = SHAPES["attention"]["segment_len"]
    run = lambda impl: lambda a: infini_attention(a["q"], a["k"], a["v"], a["gate"], segment_len=segment, impl=impl)
    return inputs, {"torch": run("torch"), "triton": run("triton")}


def delta_case(length, batch, dtype, device):
    h, d, chunk = (SHAPES["delta"][k] for k in ("h", "d", "chunk"))
    gen = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)
    inputs = dict(q=r(batch, length, h, d).to(dtype), k=r(batch, length, h, d).to(dtype),
                  v=r(batch, length, h, d).to(dtype), beta=torch.rand(batch, length, h, generator=gen, device=device),
                  g=-torch.rand(batch, length, h, generator=gen, device=device))
    run = lambda impl: lambda a: delta_rule(a["q"], a["k"], a["v"], a["beta"], a["g"], qk_l2norm=True,
                                            chunk_size=chunk, impl=impl)
    return inputs, {"torch": run("torch"), "triton": run("triton")}


CASES = {"ssd": ssd_case, "selective_scan": scan_case, "selective_attention": selective_case, "infini": infini_case,
         "delta_rule": delta_case}
OP_OF = {"ssd": "ssd", "selective_scan": "selective_scan", "selective_attention": "selective_attention",
         "infini": "infini", "delta_rule": "delta_rule"}


def runnable(case, impl, device):
    if impl == "sdpa":
        return None
    return unavailable(OP_OF[case], impl, device)


def fwd_bwd(fn, inputs):
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    out = fn(leaves)
    out.float().square().mean().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}


def cuda_measure(fn, inputs, repeats):
    t = time_call(lambda: fwd_bwd(fn, inputs), repeats, warmup=2, device=inputs[next(iter(inputs))].device,
                  memory=True)
    return {"s": t.median, "peak_mib": t.peak_bytes / 2**20}


def agreement(case, dtype, device, batch, length=2048):
    """Max |impl - torch| / max |torch| of the output and every gradient."""
    inputs, impls = CASES[case](length, batch, dtype, device)
    want_out, want_grads = fwd_bwd(impls["torch"], inputs)
    got = {}
    for impl, fn in impls.items():
        if impl in ("torch", "sdpa") or runnable(case, impl, device):
            continue
        out, grads = fwd_bwd(fn, inputs)
        rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
        got[impl] = max([rel(out, want_out)] + [rel(grads[k], want_grads[k]) for k in want_grads])
    return got


def gpu_tables(args, device, dtype):
    cells = {}
    for case in args.cases:
        agree = agreement(case, dtype, device, args.batch, args.agreement_length)
        print(f"\n{case}: max relative difference to the torch path at {args.agreement_length} tokens "
              "(output and gradients): "
              + (", ".join(f"{k} {v:.2e}" for k, v in agree.items()) or "nothing else runs"))
        _, impls = CASES[case](16, 1, dtype, device)
        names = list(impls)
        other = "cuda" if "cuda" in names else "sdpa" if "sdpa" in names else None
        header = (["length"] + [f"{n} {x}" for n in names for x in ("ms", "MiB")] + ["torch / triton"]
                  + ([f"triton / {other}"] if other else []))
        table = Table(header, align="r" * len(header), stream=True)
        for length in args.lengths:
            inputs, impls = CASES[case](length, args.batch, dtype, device)
            row = {}
            for impl, fn in impls.items():
                why = runnable(case, impl, device)
                if why:
                    row[impl] = {"not_run": why}
                    continue
                if impl == "torch" and length > args.max_torch_length.get(case, 1 << 30):
                    row[impl] = {"not_run": f"torch path above {args.max_torch_length[case]} tokens not run"}
                    continue
                try:
                    row[impl] = cuda_measure(fn, inputs, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    row[impl] = {"not_run": "out of memory"}
                    torch.cuda.empty_cache()
            ratio = lambda a, b: (f"{row[a]['s'] / row[b]['s']:.2f}x" if "s" in row.get(a, {}) and "s" in row.get(b, {})
                                  else "-")
            cols = [x for n in names for x in ((f"{row[n]['s'] * 1e3:.2f}", f"{row[n]['peak_mib']:.0f}")
                                               if "s" in row[n] else ("-", "-"))]
            table.add([length, *cols, ratio("torch", "triton")] + ([ratio("triton", other)] if other else []))
            cells[f"{case}@{length}"] = row
            del inputs
            torch.cuda.empty_cache()
        cells[f"{case}_agreement"] = agree
    return cells


def mfu(args, device, dtype):
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    out = {}
    for recipe_name, overrides in MFU_OVERRIDES.items():
        recipe = zoo.load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", overrides)
        model = zoo.build_model(recipe).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        b, L = recipe.train.batch_size, recipe.train.seq_len
        ids = torch.randint(0, recipe.model.vocab_size, (b, L), device=device)

        def step():
            with torch.autocast("cuda", dtype=dtype):
                res = model(ids, labels=ids)
                loss = res.loss + (res.aux_loss if res.aux_loss is not None else 0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        with Stopwatch(device) as clock:
            for _ in range(args.mfu_steps):
                step()
        tokens_s = args.mfu_steps * b * L / clock.wall
        n = model.num_params()
        attn_layers = [layer for layer in model.layers if layer.block_type in ("attn", "blockwise", "ring")]
        attn_dim = sum(layer.mixer.n_heads * layer.mixer.head_dim for layer in attn_layers) if attn_layers else 0
        flops_token = 6 * (n["non_embedding"] + recipe.model.vocab_size * recipe.model.d_model) + 6 * L * attn_dim
        row = {"tokens_per_s": round(tokens_s), "params": n["total"], "flops_per_token": flops_token,
               "mfu": peak and round(flops_token * tokens_s / (peak * 1e12), 4), "overrides": overrides,
               "kernels": model.kernels()}
        print(f"{recipe_name}: {tokens_s:,.0f} tokens/s, {n['total']:,} params, "
              f"MFU {row['mfu'] if peak else 'unknown (pass --peak-tflops)'}; kernels: {row['kernels']}")
        out[recipe_name] = row
        del model, opt
        torch.cuda.empty_cache()
    return out


def interpreter_smoke():
    """Every Triton kernel against its torch path at tiny shapes, float32, under the interpreter."""
    global SHAPES
    SHAPES = SMOKE_SHAPES
    result = {}
    for case, make in CASES.items():
        inputs, impls = make(37, 2, torch.float32, torch.device("cpu"))
        start = time.perf_counter()
        want_out, want_grads = fwd_bwd(impls["torch"], inputs)
        got_out, got_grads = fwd_bwd(impls["triton"], inputs)
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        err = max([rel(got_out, want_out)] + [rel(got_grads[k], want_grads[k]) for k in want_grads])
        result[case] = err
        print(f"  {case}: triton vs torch, output and {len(want_grads)} gradients, max relative difference "
              f"{err:.1e} ({time.perf_counter() - start:.1f} s)", flush=True)
    SHAPES = GPU_SHAPES
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--agreement-length", type=int, default=2048)
    ap.add_argument("--skip-mfu", action="store_true")
    ap.add_argument("--mfu-steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for --dtype")
    args = ap.parse_args(argv)
    # the blocked torch attention paths are O(L^2) in time with Python loops over blocks
    args.max_torch_length = {"selective_attention": 32768}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    if not torch.cuda.is_available():
        print("no CUDA device: no GPU timing or MFU is measured on this machine. Correctness smoke of the "
              "Triton kernels under TRITON_INTERPRET=1 (float32, tiny shapes):")
        smoke = interpreter_smoke()
        print_summary({"device": "cpu", "gpu": None, "kernels": chosen("cpu"), "interpreter_smoke_max_rel": smoke})
        return 0

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    print(f"{name}, torch {torch.__version__}, {args.dtype}, batch {args.batch}; auto would choose: {chosen(device)}")
    summary = {"device": name, "dtype": args.dtype, "batch": args.batch, "kernels": chosen(device)}
    summary["cells"] = gpu_tables(args, device, dtype)
    if not args.skip_mfu:
        summary["mfu"] = mfu(args, device, dtype)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
