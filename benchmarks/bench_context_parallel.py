"""Context parallel on CPU: per-rank peak memory and step time for W = 1, 2, 4 ranks, and ring attention
against the `ring-attention-pytorch` package.

Every measurement runs in W fresh processes (gloo, one torch thread each, float32, batch 1) holding one
sequence of --length tokens in the zigzag layout. Each rank warms up on a short sequence, then runs one
forward + backward at full length between two barriers:
  step: the slowest rank's wall time of that forward + backward;
  peak: the largest rank's peak RSS during it (VmHWM, reset through /proc/self/clear_refs) above its RSS
        just before it, with glibc's mmap threshold pinned so freed tensors leave the RSS.
The W = 1 run is the block without context parallel. Cases: every block alone (d_model --d-model), the
taipan and jamba recipes (their own widths, --length tokens), and ring attention for zoo (zigzag) and
ring-attention-pytorch (its load-balanced striped layout and `ring_reduce_col`, bucket 512 like zoo's block
512; install it for the benchmark only:
`pip install --no-deps ring-attention-pytorch==0.5.20 beartype jaxtyping wadler-lindig`) at two levels:
  ring-op:     the attention op alone (4 heads of 64), zoo's `ring_attention` vs the package's `ring_flash_attn`;
  ring-module: the layer as users call it, projections included (d_model 256 = 4 heads of 64): zoo's `ring`
               block (qkv and output projections, RoPE) vs the package's `RingAttention(ring_attn=True,
               striped_ring_attn=True)` with its defaults otherwise (a pre-RMSNorm, no rotary), each rank
               handed its own shard of the input. The W ranks
share this machine's cores, so times at W > 1 measure the cost of the extra work and communication, not a
speed-up. Gradient error: out, dq, dk, dv of both ring implementations at --check-length against float64
dense attention, relative to the reference's largest entry.

    .venv/bin/python benchmarks/bench_context_parallel.py --length 8192
    .venv/bin/python benchmarks/bench_context_parallel.py --length 2048 --cases ring-op,mamba2 --world-sizes 1,2
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta

os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"   # inherited by the spawned ranks

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.harness import ROOT, Table, print_summary, time_call, write_json  # noqa: E402
from evals.context_parallel import run_ranks  # noqa: E402

BLOCKS = {
    "attn": dict(n_heads=4),
    "swa": dict(n_heads=4, window=256),
    "blockwise": dict(n_heads=4, block_size=512),
    "ring": dict(n_heads=4, block_size=512),
    "infini": dict(n_heads=4, segment_len=256),
    "selective": dict(n_heads=4, block_size=128),
    "taipan": dict(n_heads=4, window=256),
    "mamba": dict(d_state=16),
    "mamba2": dict(d_state=64, head_dim=32, chunk_size=64),
}
RECIPES = ("taipan", "jamba")
RING_HEADS, RING_HEAD_DIM, RING_BLOCK = 4, 64, 512


# ---------------------------------------------------------------------------------------------------------
# What one rank runs: build, warm up, measure one forward + backward.

def _build(case: str, d_model: int, length: int):
    """(module, make_input(n) -> args, loss(out)) for a case."""
    import zoo
    from zoo.registry import get_block
    kind, name = case.split(":")
    if kind == "block":
        entry = get_block(name)
        torch.manual_seed(0)
        module = entry.cls(d_model, entry.config(**BLOCKS[name]), layer_idx=0).train()
        return module, (lambda g, n: torch.randn(1, n, d_model, generator=g)), (lambda out: out.float().pow(2).mean())
    recipe = zoo.load_recipe(ROOT / "recipes" / f"{name}.yaml", [f"train.seq_len={max(length, 512)}"])
    torch.manual_seed(0)
    model = zoo.build_model(recipe).train()
    vocab = recipe.model.vocab_size
    return model, (lambda g, n: torch.randint(0, vocab, (1, n), generator=g)), None


def _step(module, case, x, cp, group):
    """One forward + backward."""
    from zoo.distributed import shard
    kind = case.split(":")[0]
    if kind == "block":
        xs = x if cp is None else shard(x, group, cp.layout)
        xs = xs.clone().requires_grad_(True)
        out, aux = module.run(xs, cp=cp)
        loss = out.float().pow(2).mean() + (aux if aux is not None else 0)
    else:
        ids = x if cp is None else shard(x, group, cp.layout)
        kw = {} if cp is None else {"cp_group": group}
        out = module(ids, labels=ids, **kw)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()


def _ring_qkv(g, n):
    return [torch.randn(1, n, RING_HEADS, RING_HEAD_DIM, generator=g) for _ in range(3)]


def _striped(length: int) -> torch.Tensor:
    """ring-attention-pytorch's striped order: 'b (i j) d -> b (j i) d' with i = bucket, then contiguous shards."""
    return torch.arange(length).view(RING_BLOCK, length // RING_BLOCK).t().reshape(-1)


def _ring_step(impl, q, k, v, w, r, cp):
    """One forward + backward of a ring implementation on this rank's shard of the whole q, k, v."""
    from zoo.distributed.layout import take_chunks
    n = q.shape[1]
    if impl == "zoo":
        qs, ks, vs = (take_chunks(t, cp).clone().requires_grad_(True) for t in (q, k, v))
        from zoo.distributed.ring import ring_attention
        out = ring_attention(qs, ks, vs, cp, causal=True, block_size=RING_BLOCK)
        idx = torch.cat([torch.arange(c.start, c.end) for c in cp.chunks()])
    else:
        from ring_attention_pytorch.ring_flash_attention import ring_flash_attn
        idx = _striped(n)[r * (n // w):(r + 1) * (n // w)]
        qs, ks, vs = (t[:, idx].clone().requires_grad_(True) for t in (q, k, v))
        out = ring_flash_attn(qs, ks, vs, causal=True, bucket_size=RING_BLOCK, ring_reduce_col=w > 1,
                              striped_ring_attn=w > 1)
    return out, (qs, ks, vs), idx


def _rank_main(case, d_model, length, check_length, rank, world, init_file) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    from zoo.distributed import ContextParallel
    group = dist.group.WORLD
    kind, name = case.split(":")
    g = torch.Generator().manual_seed(1)
    res = {}
    if kind == "ringmod":
        module = _ring_module(name)
        for n in (2 * world * RING_BLOCK, length):   # warm-up, then the measured length
            x = torch.randn(1, n, RING_HEADS * RING_HEAD_DIM, generator=g)
            cp = ContextParallel.for_length(group, n, "zigzag") if world > 1 else None
            step = lambda: _ring_module_step(module, name, x, world, rank, cp)  # noqa: E731
            if n != length:
                step()
                module.zero_grad(set_to_none=True)
    elif kind == "ring":
        cp = ContextParallel.for_length(group, length, "zigzag")
        warm = _ring_qkv(g, 2 * world * RING_BLOCK)
        warm_cp = ContextParallel.for_length(group, warm[0].shape[1], "zigzag")
        out, ins, _ = _ring_step(name, *warm, world, rank, warm_cp)
        out.sum().backward()
        q, k, v = _ring_qkv(g, length)
        gout = torch.randn(1, length, RING_HEADS, RING_HEAD_DIM, generator=g)
        step = lambda: _ring_backward(*_ring_step(name, q, k, v, world, rank, cp), gout)  # noqa: E731
    else:
        module, make, _ = _build(case, d_model, length)
        n_warm = 2 * world * 64
        warm_cp = None if world == 1 else ContextParallel.for_length(group, n_warm, "zigzag")
        _step(module, case, make(g, n_warm), warm_cp, group)
        module.zero_grad(set_to_none=True)
        x = make(g, length)
        cp = None if world == 1 else ContextParallel.for_length(group, length, "zigzag")
        step = lambda: _step(module, case, x, cp, group)  # noqa: E731
    import gc
    gc.collect()
    dist.barrier()
    t = time_call(step, 1, warmup=0, memory=True)
    dist.barrier()
    res.update(seconds=t.best, peak_bytes=t.peak_bytes)
    if kind == "ring" and world > 1 and check_length:
        res["errors"] = _ring_errors(name, check_length, world, rank, group)
    return res


def _ring_module(impl):
    torch.manual_seed(0)
    if impl == "zoo":
        from zoo.registry import get_block
        entry = get_block("ring")
        return entry.cls(RING_HEADS * RING_HEAD_DIM, entry.config(n_heads=RING_HEADS, block_size=RING_BLOCK),
                         layer_idx=0).train()
    from ring_attention_pytorch import RingAttention
    return RingAttention(RING_HEADS * RING_HEAD_DIM, dim_head=RING_HEAD_DIM, heads=RING_HEADS, causal=True,
                         bucket_size=RING_BLOCK, ring_attn=True, striped_ring_attn=True, use_cuda_kernel=False).train()


def _ring_module_step(module, impl, x, world, rank, cp):
    """One forward + backward of a ring attention layer on this rank's shard of x (parameter gradients too)."""
    n = x.shape[1]
    if impl == "zoo":
        from zoo.distributed.layout import take_chunks
        xs = (x if cp is None else take_chunks(x, cp)).clone().requires_grad_(True)
        out, _ = module.run(xs, cp=cp)
    else:
        xs = x[:, _striped(n)[rank * (n // world):(rank + 1) * (n // world)]].clone().requires_grad_(True)
        out = module(xs)
    out.float().pow(2).mean().backward()


def _ring_backward(out, ins, idx, gout):
    (out * gout[:, idx]).sum().backward()


def _ring_errors(impl, length, world, rank, group):
    """Largest relative errors of out, dq, dk, dv over this rank's tokens (float32 vs float64 dense)."""
    from zoo.distributed import ContextParallel
    from zoo.ops.attention import blockwise_attention_ref
    g = torch.Generator().manual_seed(2)
    q, k, v = _ring_qkv(g, length)
    gout = torch.randn(1, length, RING_HEADS, RING_HEAD_DIM, generator=g)
    ref_in = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = blockwise_attention_ref(*ref_in, causal=True)
    (ref * gout.double()).sum().backward()
    cp = ContextParallel.for_length(group, length, "zigzag")
    out, ins, idx = _ring_step(impl, q, k, v, world, rank, cp)
    _ring_backward(out, ins, idx, gout)
    err = {}
    for name, got, want in (("out", out, ref), ("dq", ins[0].grad, ref_in[0].grad),
                            ("dk", ins[1].grad, ref_in[1].grad), ("dv", ins[2].grad, ref_in[2].grad)):
        want = want[:, idx]
        err[name] = ((got.double() - want).abs().max() / want.abs().max()).item()
    return err


# ---------------------------------------------------------------------------------------------------------
# The parent: one fresh set of W processes per measurement.

def measure(case, d_model, length, world, check_length=0, timeout=3600):
    got, errors, _ = run_ranks(_rank_main, world, lambda rank, init_file: (case, d_model, length, check_length, rank,
                                                                          world, init_file), timeout)
    if errors or len(got) < world:
        raise RuntimeError(f"{case} W={world} failed: " + "\n".join(f"rank {r}: {e}" for r, e in errors.items()))
    rec = {"case": case, "world_size": world, "length": length,
           "seconds": max(r["seconds"] for r in got.values()),
           "peak_bytes": max(r["peak_bytes"] for r in got.values())}
    if "errors" in got[0]:
        rec["errors"] = {k: max(r["errors"][k] for r in got.values()) for k in got[0]["errors"]}
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--world-sizes", default="1,2,4")
    ap.add_argument("--cases", default="all",
                    help="comma list of block names, recipe:<name>, ring-op and ring-module (both implementations "
                         "each); default all")
    ap.add_argument("--check-length", type=int, default=2048, help="length of the ring gradient-error check")
    ap.add_argument("--json", default=None, help="write the records here")
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    if args.cases == "all":
        cases = (["ring:zoo", "ring:pkg", "ringmod:zoo", "ringmod:pkg"] + [f"block:{b}" for b in BLOCKS]
                 + [f"recipe:{r}" for r in RECIPES])
    else:
        cases = []
        for c in args.cases.split(","):
            pairs = {"ring-op": ["ring:zoo", "ring:pkg"], "ring-module": ["ringmod:zoo", "ringmod:pkg"]}
            cases += pairs.get(c, [c if ":" in c else f"block:{c}"])
    records = []
    for case in cases:
        for w in worlds:
            try:
                rec = measure(case, args.d_model, args.length, w, args.check_length)
            except RuntimeError as e:
                rec = {"case": case, "world_size": w, "length": args.length, "error": str(e).splitlines()[-1]}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    if args.json:
        write_json(args.json, records)
    print()
    print(table(records))
    print_summary({"length": args.length, "d_model": args.d_model, "records": len(records),
                   "failed": sum("error" in r for r in records)})


def table(records) -> Table:
    base = {r["case"]: r for r in records if r["world_size"] == 1 and "error" not in r}
    out = Table(["case", "W", "step (s)", "step / W=1", "peak per rank (MiB)", "W=1 peak / peak", "out err", "dq err",
                 "dk err", "dv err"])
    for r in records:
        if "error" in r:
            out.add([r["case"], r["world_size"], f"failed: {r['error'][:80]}"] + [""] * 7)
            continue
        b = base.get(r["case"])
        e = r.get("errors", {})
        errs = [f"{e[k]:.1e}" if k in e else "" for k in ("out", "dq", "dk", "dv")]
        ratios = ([f"{r['seconds'] / b['seconds']:.2f}", f"{b['peak_bytes'] / max(r['peak_bytes'], 1):.2f}"] if b
                  else ["", ""])
        out.add([r["case"], r["world_size"], f"{r['seconds']:.2f}", ratios[0], f"{r['peak_bytes'] / 2**20:.1f}",
                 ratios[1], *errs])
    return out


if __name__ == "__main__":
    main()
