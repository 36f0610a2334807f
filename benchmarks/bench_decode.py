"""Decode speed and cache size by context length: zoo recipes beside transformers' own Llama and Mamba-2.

    .venv/bin/python benchmarks/bench_decode.py                       # contexts 1K, 8K, 32K; every model
    .venv/bin/python benchmarks/bench_decode.py --contexts 1024 --models zoo:mamba2,hf:mamba2 --steps 8

Each cell (model, context C) runs in a fresh subprocess (`measure`): build the model (float32, eval, one torch thread
unless --threads), prefill C random tokens in one forward through the model's cache, then decode --steps
tokens one at a time (greedy, after 2 untimed warm-up steps), each step timed on its own; tokens/s is 1 /
the median step. The cache is measured after the last step: for transformers, bytes of every tensor the
cache object holds; for zoo, the state its tensors hold (`ZooCache.nbytes`: the filled slots of its
preallocated K/V buffers), set beside the blocks' analytic `state_bytes(C + steps)`, and what it allocates
(`allocated_bytes`: the buffers' spare capacity too, up to as much again as the K/V state, since they grow
by doubling; the table shows it in brackets where it differs).

Models: every zoo recipe named in MODELS at its own size (d_model 256), and two same-weights pairs: a
random `LlamaForCausalLM` shaped like recipes/transformer.yaml and a random `Mamba2ForCausalLM` shaped like
recipes/mamba2.yaml, each run by transformers (its DynamicCache / Mamba-2 cache, its forward) and by zoo
after `zoo.convert.from_transformers` (ZooLM and its ZooCache). `pair:*` runs both sides in one process with
their decode steps alternating (the ratio zoo / transformers is then taken under the same load; the table
shows it beside zoo's tokens/s); `hf:*` and `zoo:llama` / `zoo:mamba2-hf` run one side per cell. The first
greedy token after the prefill must agree between the two sides. A cell that runs past --timeout is recorded
as skipped with that reason, and the model's longer contexts are then skipped without running. Writes
--out (JSON) and prints a markdown table; the last line is a machine-readable `summary:`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from benchmarks.harness import ROOT, Stopwatch, Table, measure, print_summary, time_call, time_interleaved, write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ZOO_RECIPES = ["transformer", "swa", "infini", "selective", "mamba", "mamba2", "samba", "jamba", "taipan"]
MODELS = [f"zoo:{r}" for r in ZOO_RECIPES] + ["pair:llama", "pair:mamba2", "hf:llama", "zoo:llama", "hf:mamba2",
                                                "zoo:mamba2-hf"]


def _hf_model(kind: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "llama":   # recipes/transformer.yaml: d_model 256, 6 layers, 4 heads, SwiGLU mult 4 (hidden 688)
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                                       max_position_embeddings=65536, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)
    # recipes/mamba2.yaml: d_model 256, 8 layers, d_state 64, head_dim 32 (16 heads), chunk 64
    cfg = transformers.Mamba2Config(hidden_size=256, state_size=64, num_hidden_layers=8, vocab_size=256, expand=2,
                                    head_dim=32, num_heads=16, n_groups=1, chunk_size=64, conv_kernel=4)
    return transformers.Mamba2ForCausalLM(cfg)


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from a cache object (attributes, lists, dicts)."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel())
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def _cache_bytes(side: str, cache) -> dict:
    """transformers: every tensor its cache holds; zoo: the state, and the allocation where it differs."""
    if side == "hf":
        return {"cache_bytes": _tensor_bytes(cache)}
    return {"cache_bytes": cache.nbytes(), "allocated_bytes": cache.allocated_nbytes()}


def run_pair(kind: str, context: int, steps: int) -> list:
    """transformers' model and zoo's conversion of it (same weights) in one process: both prefill, then
    their decode steps alternate, so the two medians see the same machine load."""
    import torch

    import zoo.convert

    torch.manual_seed(0)
    hf = _hf_model(kind).float().eval()
    ours = zoo.convert.from_transformers(hf).float().eval()
    cache_key = "cache_params" if kind == "mamba2" else "past_key_values"
    ids = torch.randint(0, 256, (1, context))
    rows, state = [], {}

    def decode_step(side):
        def step():
            logits, cache = state[side]
            nxt = logits.argmax(-1, keepdim=True)
            if side == "hf":
                out = hf(nxt, use_cache=True, **{cache_key: cache})
                state[side] = [out.logits[:, -1], getattr(out, cache_key)]
            else:
                state[side] = [ours(nxt, cache=cache).logits[:, -1], cache]
        return step

    with torch.no_grad():
        for side in ("hf", "zoo"):
            with Stopwatch() as prefill:
                if side == "hf":
                    out = hf(ids, use_cache=True)
                    state[side] = [out.logits[:, -1], getattr(out, cache_key)]
                else:
                    cache = ours.init_cache(1)
                    state[side] = [ours(ids, cache=cache).logits[:, -1], cache]
            rows.append({"model": f"{side}:{kind}" + (" (same weights)" if side == "zoo" else ""),
                         "context": context, "steps": steps, "prefill_s": round(prefill.wall, 3)})
        if not torch.equal(state["hf"][0].argmax(-1), state["zoo"][0].argmax(-1)):
            raise RuntimeError("transformers and zoo disagree on the next token after the prefill")
        times = time_interleaved({side: decode_step(side) for side in ("hf", "zoo")}, steps, warmup=2)
    seen = context + steps + 2
    for row, side in zip(rows, ("hf", "zoo")):
        med = times[side].median
        row.update(step_ms_median=round(1000 * med, 3), tokens_per_s=round(1 / med, 2),
                   **_cache_bytes(side, state[side][1]))
    rows[1]["state_bytes"] = sum(layer.state_bytes(seen, dtype=torch.float32) for layer in ours.layers)
    rows[1]["ratio_vs_hf"] = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    return rows


def run_cell(model_name: str, context: int, steps: int) -> dict:
    import torch

    import zoo
    import zoo.convert

    side, name = model_name.split(":")
    if side == "pair":
        return run_pair(name, context, steps)
    torch.manual_seed(0)
    if side == "hf":
        model = _hf_model(name).float().eval()
    elif name in ("llama", "mamba2-hf"):
        model = zoo.convert.from_transformers(_hf_model("llama" if name == "llama" else "mamba2")).float().eval()
    else:
        model = zoo.build_model(ROOT / "recipes" / f"{name}.yaml").float().eval()
    ids = torch.randint(0, 256, (1, context + steps + 2))

    if side == "hf":
        cache_key = "cache_params" if name == "mamba2" else "past_key_values"

        def prefill(x):
            out = model(x, use_cache=True)
            return out.logits[:, -1], getattr(out, cache_key)

        def step(x, cache):
            out = model(x, use_cache=True, **{cache_key: cache})
            return out.logits[:, -1], getattr(out, cache_key)
    else:
        def prefill(x):
            cache = model.init_cache(1)
            return model(x, cache=cache).logits[:, -1], cache

        def step(x, cache):
            return model(x, cache=cache).logits[:, -1], cache

    state = []

    def decode():
        logits, cache = state
        state[:] = step(logits.argmax(-1, keepdim=True), cache)

    with torch.no_grad():
        with Stopwatch() as prefill_clock:
            state[:] = prefill(ids[:, :context])
        times = time_call(decode, steps, warmup=2)
    cache = state[1]
    seen = context + steps + 2
    row = {"model": model_name, "context": context, "steps": steps, "prefill_s": round(prefill_clock.wall, 3),
           "step_ms_median": round(1000 * times.median, 3), "tokens_per_s": round(1 / times.median, 2),
           **_cache_bytes(side, cache)}
    if side == "zoo":
        row["state_bytes"] = sum(layer.state_bytes(seen, dtype=torch.float32) for layer in model.layers)
    return row


def table(rows, contexts) -> Table:
    label = lambda c: f"{c // 1024}K" if c % 1024 == 0 else str(c)
    out = Table(["model"] + [f"{label(c)} {x}" for c in contexts for x in ("tok/s", "cache MiB")])
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for c in contexts:
            r = next((r for r in rows if r["model"] == model and r["context"] == c), None)
            if r is None or "skipped" in r:
                cells += ["skipped", "-"]
            else:
                mib = r["cache_bytes"] / 2 ** 20
                check = "" if "state_bytes" not in r else ("" if r["state_bytes"] == r["cache_bytes"] else " (!= state_bytes)")
                alloc = r.get("allocated_bytes", r["cache_bytes"])
                alloc = "" if alloc == r["cache_bytes"] else f" (alloc {alloc / 2 ** 20:.2f})"
                ratio = f" ({r['ratio_vs_hf']:.2f}x)" if "ratio_vs_hf" in r else ""
                cells += [f"{r['tokens_per_s']:.1f}{ratio}", f"{mib:.2f}{check}{alloc}"]
        out.add([model, *cells])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per cell (prefill + decode)")
    ap.add_argument("--out", default="bench_decode.json")
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad[0]!r} (known: {', '.join(MODELS)})")
    rows = []
    for model in models:
        skip_reason = None
        for c in contexts:
            if skip_reason is not None:
                rows.append({"model": model, "context": c, "skipped": skip_reason})
                continue
            t = time.perf_counter()
            rec = measure("benchmarks.bench_decode:run_cell", {"model_name": model, "context": c, "steps": args.steps},
                          threads=args.threads, timeout=args.timeout)
            if rec["status"] != "ok":
                skip_reason = (f"context {c} ran past {args.timeout:.0f} s" if rec["status"] == "timeout"
                               else f"context {c} failed: {(rec.get('error') or ['?'])[-1][:200]}")
                rows.append({"model": model, "context": c, "skipped": skip_reason})
                print(f"{model} @{c}: {skip_reason}", file=sys.stderr, flush=True)
                continue
            result = rec["result"]
            for row in result if isinstance(result, list) else [result]:
                row["cell_s"] = round(time.perf_counter() - t, 1)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            write_json(args.out, {"rows": rows})
    import torch
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
            "steps": args.steps, "cpu": platform.processor() or platform.machine(), "contexts": contexts}
    write_json(args.out, {"meta": meta, "rows": rows})
    print(table(rows, contexts))
    print_summary({"cells": len(rows), "skipped": sum("skipped" in r for r in rows), "out": args.out})


if __name__ == "__main__":
    main()
