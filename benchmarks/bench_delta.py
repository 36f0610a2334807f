"""The delta rule on CPU, float32: zoo.ops.delta against transformers' pure-PyTorch paths on the same inputs,
side by side in one process (interleaved rounds, so the ratio is the figure to read).

    scalar decay (Gated DeltaNet): zoo delta_rule vs Qwen3-Next's torch_chunk_gated_delta_rule
    per-channel decay (KDA):       zoo delta_rule vs Kimi Linear's chunk_kimi_delta_attention (torch fallback)
    decode (one token from a state): zoo delta_rule at length 1 vs torch_recurrent_gated_delta_rule
    decode of a model (a GDN and an attention layer) through each side's cache, per token
    the Gated DeltaNet layer: zoo's gated_deltanet block vs transformers' Qwen3NextGatedDeltaNet on its torch
      fallback, the same weights (imported by zoo.convert), d_model 256, 2 key heads shared by 4 value heads of
      64 x 64, forward + backward with each side's peak memory (a fresh process per side: RSS above its warmed-up
      start, evals.memory.measure), and a
      decoding step of the block (zoo) through its cache

Batch 1, 4 heads, d_k = d_v = 64, unit-length q and k (inside the op), chunk 64 on both sides; forward +
backward of the sum of the output against a fixed random tensor; the best of --rounds. Before timing, both
sides' outputs are compared (float32, 1e-3).

    .venv/bin/python benchmarks/bench_delta.py                  # lengths 1024, 4096
    .venv/bin/python benchmarks/bench_delta.py --lengths 512 --rounds 2   # a smoke test
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

from benchmarks.harness import Table, command_line, print_summary, time_interleaved

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # transformers' kernel hub must not reach for the network

HEADS, DK, DV = 4, 64, 64


def inputs(length: int, decay: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    x = {"q": r(1, length, HEADS, DK), "k": r(1, length, HEADS, DK), "v": r(1, length, HEADS, DV),
         "beta": torch.rand(1, length, HEADS, generator=g),
         "g": -torch.rand(1, length, HEADS, *((DK,) if decay == "channel" else ()), generator=g) * 0.5}
    return {k: v.requires_grad_(True) for k, v in x.items()}


def sides(decay: str):
    """{name: fn(x) -> output} for zoo and transformers on this decay."""
    from zoo.ops.delta import delta_rule
    if decay == "channel":
        from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention as theirs
    else:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as theirs
    return {"zoo": lambda x: delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], qk_l2norm=True, chunk_size=64),
            "transformers": lambda x: theirs(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=64,
                                             use_qk_l2norm_in_kernel=True)[0]}


def train_rows(lengths, rounds, table, records):
    for decay in ("head", "channel"):
        fns = sides(decay)
        for length in lengths:
            x = inputs(length, decay)
            with torch.no_grad():
                outs = {k: fn(x).float() for k, fn in fns.items()}
            err = (outs["zoo"] - outs["transformers"]).abs().max().item()
            assert err < 1e-3, f"{decay} at {length}: outputs differ by {err}"
            grad = torch.randn_like(outs["zoo"])

            def step(fn):
                def run():
                    for t in x.values():
                        t.grad = None
                    (fn(x).float() * grad).sum().backward()
                return run
            t = time_interleaved({k: step(fn) for k, fn in fns.items()}, rounds, alternate=True)
            ratio = t["transformers"].best / t["zoo"].best
            table.add([decay, "fwd+bwd", f"{length:,}", f"{t['zoo'].best:.3f}", f"{t['transformers'].best:.3f}",
                       f"{ratio:.2f}x"])
            records.append({"decay": decay, "what": "fwd+bwd", "length": length, "zoo": t["zoo"].to_dict(),
                            "transformers": t["transformers"].to_dict(), "max_abs_diff": err})


def decode_rows(rounds, table, records):
    """One token from a random state, 200 steps per timed call (a decode loop's cost per token)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    from zoo.ops.delta import delta_rule
    x = {k: v.detach() for k, v in inputs(200, "head").items()}
    state = torch.randn(1, HEADS, DK, DV)

    def zoo_loop():
        s = state
        for i in range(200):
            _, s = delta_rule(*(x[k][:, i:i + 1] for k in ("q", "k", "v", "beta", "g")), initial_state=s,
                              output_final_state=True, qk_l2norm=True)

    def hf_loop():
        s = state
        for i in range(200):
            _, s = torch_recurrent_gated_delta_rule(*(x[k][:, i:i + 1] for k in ("q", "k", "v", "g", "beta")),
                                                    initial_state=s, output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True)
    with torch.no_grad():
        t = time_interleaved({"zoo": zoo_loop, "transformers": hf_loop}, rounds, alternate=True)
    per = {k: v.best / 200 * 1e3 for k, v in t.items()}
    table.add(["head", "decode, ms/token", "1", f"{per['zoo']:.3f}", f"{per['transformers']:.3f}",
               f"{per['transformers'] / per['zoo']:.2f}x"])
    records.append({"decay": "head", "what": "decode", "ms_per_token": per})


def gdn_models():
    """(zoo's ZooLM, transformers' Qwen3NextForCausalLM): a Gated DeltaNet layer and an attention layer (transformers'
    cache cannot count the length of a model without one), the same weights."""
    import transformers

    from zoo.convert import from_transformers
    cfg = transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=64,
        linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=0)
    torch.manual_seed(0)
    hf = transformers.Qwen3NextForCausalLM(cfg).float().eval()
    return from_transformers(hf).eval(), hf


def decode_model_rows(rounds, table, records, steps: int = 100):
    """A decoding step of the whole two-layer model through each side's cache, after a 64-token prompt: zoo's
    ZooLM with its ZooCache, transformers' model with the cache its forward returns (prefill time subtracted)."""
    ours, hf = gdn_models()
    prompt = torch.randint(0, 64, (1, 64))
    token = torch.randint(0, 64, (1, 1))
    with torch.no_grad():
        def zoo_loop():
            cache = ours.init_cache(1)
            ours(prompt, cache=cache)
            for _ in range(steps):
                ours(token, cache=cache)

        def hf_loop():
            past = hf(prompt, use_cache=True).past_key_values
            for _ in range(steps):
                past = hf(token, past_key_values=past, use_cache=True).past_key_values
        prefill = time_interleaved({"zoo": lambda: ours(prompt, cache=ours.init_cache(1)),
                                    "transformers": lambda: hf(prompt, use_cache=True)}, rounds, alternate=True)
        t = time_interleaved({"zoo": zoo_loop, "transformers": hf_loop}, rounds, alternate=True)
    per = {k: (t[k].best - prefill[k].best) / steps * 1e3 for k in t}
    table.add(["head", "GDN + attention model decode, ms/token", "1", f"{per['zoo']:.3f}",
               f"{per['transformers']:.3f}", f"{per['transformers'] / per['zoo']:.2f}x"])
    records.append({"what": "model decode", "ms_per_token": per})


def gdn_layers():
    """(zoo's gated_deltanet block, transformers' Qwen3NextGatedDeltaNet) on the same weights."""
    import transformers

    from zoo.convert import from_transformers
    cfg = transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1, layer_types=["linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=64,
        linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=0)
    torch.manual_seed(0)
    hf = transformers.Qwen3NextForCausalLM(cfg).float()
    return from_transformers(hf).layers[0].mixer, hf.model.layers[0].linear_attn


def layer_cell(side: str, length: int) -> dict:
    """The peak memory of one forward + backward of one side's layer above what the process holds once the
    layers are built and warmed up (run by `measure` in a fresh process, so nothing of the other side counts)."""
    from benchmarks.harness import PeakMemory
    torch.set_num_threads(1)
    ours, theirs = gdn_layers()
    layer = ours if side == "zoo" else theirs
    layer(torch.randn(1, 64, 256, requires_grad=True)).sum().backward()
    x = torch.randn(1, length, 256, requires_grad=True)
    with PeakMemory() as peak:
        layer(x).sum().backward()
    return {"fwd_bwd_bytes": peak.bytes}


def _without_the_op(run, rounds) -> float:
    """The best time of `run` (zoo's layer) with zoo.ops.delta's op replaced by v * beta: what the layer costs
    around the op, which no faster op can remove."""
    from unittest import mock

    def pass_through(q, k, v, beta, g=None, **kw):
        return (v * beta[..., None], None) if kw.get("output_final_state") else v * beta[..., None]
    with mock.patch("zoo.blocks.delta.block.delta_rule", pass_through):
        return time_interleaved({"floor": run}, rounds)["floor"].best


def layer_rows(lengths, rounds, table, records):
    from benchmarks.harness import measure
    ours, theirs = gdn_layers()
    for length in lengths:
        x = torch.randn(1, length, 256, requires_grad=True)
        with torch.no_grad():
            err = (ours(x) - theirs(x)).abs().max().item()
        assert err < 1e-3, f"layer at {length}: outputs differ by {err}"
        grad = torch.randn(1, length, 256)

        def step(layer):
            def run():
                x.grad = None
                (layer(x) * grad).sum().backward()
            return run
        peaks = {side: measure("benchmarks.bench_delta:layer_cell", {"side": side, "length": length}, threads=1,
                               timeout=600).get("result", {}).get("fwd_bwd_bytes") for side in ("zoo", "transformers")}
        t = time_interleaved({"zoo": step(ours), "transformers": step(theirs)}, rounds, alternate=True)
        ratio = t["transformers"].best / t["zoo"].best
        floor = _without_the_op(step(ours), rounds)
        mib = {k: "?" if v is None else f"{v / 2**20:.0f}" for k, v in peaks.items()}
        table.add(["head", f"GDN layer fwd+bwd (MiB zoo / transformers: {mib['zoo']} / {mib['transformers']})",
                   f"{length:,}", f"{t['zoo'].best:.3f}", f"{t['transformers'].best:.3f}", f"{ratio:.2f}x"])
        table.add(["head", "GDN layer fwd+bwd without the op (zoo's projections, conv, norm, gates; the op a "
                   "pass-through): the best any op allows is transformers / this", f"{length:,}", f"{floor:.3f}",
                   f"{t['transformers'].best:.3f}", f"{t['transformers'].best / floor:.2f}x"])
        records.append({"what": "layer fwd+bwd", "length": length, "zoo": t["zoo"].to_dict(),
                        "transformers": t["transformers"].to_dict(), "peak_bytes": peaks, "max_abs_diff": err,
                        "zoo_without_op_s": floor})
    cache = ours.init_cache(1)
    token = torch.randn(1, 1, 256)
    with torch.no_grad():
        ours(torch.randn(1, 64, 256), cache=cache)
        t = time_interleaved({"zoo": lambda: [ours(token, cache=cache) for _ in range(100)]}, rounds)
    table.add(["head", "GDN layer decode, ms/token (zoo)", "1", f"{t['zoo'].best * 10:.3f}", "-", "-"])
    records.append({"what": "layer decode", "zoo_ms_per_token": t["zoo"].best * 10})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=[1024, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layer-lengths", type=lambda s: [int(v) for v in s.split(",")], default=[4096, 16384])
    args = ap.parse_args(argv)
    if min(args.lengths + args.layer_lengths) < 2 or args.rounds < 1 or args.threads < 1:
        ap.error("--lengths / --layer-lengths: at least 2 tokens each; --rounds, --threads: positive integers")
    torch.set_num_threads(args.threads)
    table = Table(["decay", "what", "length", "zoo s", "transformers s", "transformers / zoo"], "lllrrr",
                  stream=True)
    records = []
    train_rows(args.lengths, args.rounds, table, records)
    decode_rows(args.rounds, table, records)
    layer_rows(args.layer_lengths, args.rounds, table, records)
    decode_model_rows(args.rounds, table, records)
    print(f"\n{command_line()}  ({args.threads} thread, torch {torch.__version__}, {platform.machine()})")
    print_summary({"rows": records})


if __name__ == "__main__":
    main()
