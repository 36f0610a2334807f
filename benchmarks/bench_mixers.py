"""The mixers of issue 29 on CPU, float32: each zoo block against transformers' layer on the same weights (imported
by zoo.convert from a one-family model), side by side in one process (interleaved rounds: read the ratio).

    rglru       zoo's `rglru` block (chunked scan, zoo.ops.rglru) vs RecurrentGemmaRecurrentBlock (a loop over time)
    short_conv  zoo's `short_conv` block vs Lfm2ShortConv (its torch path)
    lightning   zoo's `lightning` block (the SSD scan) vs MiniMaxLightningAttention (its block-wise loop)
    mlstm       zoo's `mlstm` block (zoo.ops.mlstm) vs xLSTMLayer (transformers' native chunkwise kernel; no decode row:
                transformers' xLSTM cache fails on these shapes)
    zamba2      a Zamba2 hybrid layer: zoo's layer with a shared block use and its `mamba2` mixer vs Zamba2HybridLayer
                (the shared attention + MLP with adapters, then its Mamba-2 layer on the torch path); the decoded
                model is a Mamba-2 layer and a hybrid one

Per mixer: forward + backward of one layer at each length (batch 1, d_model 256, the sum of the output against a
fixed random tensor; the best of --rounds) and greedy decoding of a two-layer model (the mixer and an attention
layer) through each side's cache, per token (100 new tokens less 1, after a 64-token prompt). Before timing, both
sides' outputs are compared (float32, 1e-3).

    .venv/bin/python benchmarks/bench_mixers.py                          # length 4096
    .venv/bin/python benchmarks/bench_mixers.py --lengths 512 --rounds 1  # a smoke test
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

from benchmarks.harness import Table, command_line, print_summary, time_interleaved

os.environ.setdefault("HF_HUB_OFFLINE", "1")
D = 256
MIXERS = ("rglru", "short_conv", "lightning", "mlstm", "zamba2")


def models(mixer: str):
    """(transformers model, zoo model) of two layers, the mixer first, on the same weights."""
    import transformers

    from zoo.convert import from_transformers
    torch.manual_seed(0)
    if mixer == "rglru":
        cfg = transformers.RecurrentGemmaConfig(vocab_size=256, hidden_size=D, intermediate_size=2 * D,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                                attention_window_size=2048, block_types=["recurrent", "attention"])
        hf = transformers.RecurrentGemmaForCausalLM(cfg)
    elif mixer == "short_conv":
        cfg = transformers.Lfm2Config(vocab_size=256, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      layer_types=["conv", "full_attention"], max_position_embeddings=8192)
        hf = transformers.Lfm2ForCausalLM(cfg)
    elif mixer == "lightning":
        cfg = transformers.MiniMaxConfig(vocab_size=256, hidden_size=D, intermediate_size=D, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                         num_experts_per_tok=1, block_size=64,
                                         layer_types=["linear_attention", "full_attention"])
        hf = transformers.MiniMaxForCausalLM(cfg)
    elif mixer == "zamba2":
        cfg = transformers.Zamba2Config(vocab_size=256, hidden_size=D, num_hidden_layers=2,
                                        layers_block_type=["mamba", "hybrid"], num_attention_heads=8,
                                        n_mamba_heads=16, mamba_d_state=64, chunk_size=64, adapter_rank=16,
                                        use_shared_attention_adapter=True, use_mem_rope=True,
                                        max_position_embeddings=8192)
        hf = transformers.Zamba2ForCausalLM(cfg)
    else:
        cfg = transformers.xLSTMConfig(vocab_size=256, hidden_size=D, num_heads=4, num_hidden_layers=1,
                                       mode="train", chunk_size=64)
        hf = transformers.xLSTMForCausalLM(cfg)
    hf = hf.float().eval()
    return hf, from_transformers(hf).eval()


def layers(hf, zoo_model, mixer: str):
    """(transformers' mixer as fn(x) -> y, zoo's block) of the first layer."""
    if mixer == "rglru":
        block = hf.model.layers[0].temporal_block
        ids = lambda x: torch.arange(x.shape[1])[None]   # noqa: E731
        return (lambda x: block(x, ids(x), None, use_cache=False)[0]), zoo_model.layers[0].mixer
    if mixer == "short_conv":
        return (lambda x: hf.model.layers[0].conv(x)), zoo_model.layers[0].mixer
    if mixer == "lightning":
        return (lambda x: hf.model.layers[0].self_attn(x, None, None)[0]), zoo_model.layers[0].mixer
    if mixer == "zamba2":   # the whole hybrid layer, residual included, on fixed embeddings
        hybrid, emb = hf.model.layers[1], torch.randn(1, 1, D)

        def theirs(x):
            e = emb.expand_as(x)
            rope = hf.model.rotary_emb(x, torch.arange(x.shape[1])[None])
            return hybrid(x, e, 1, None, None, position_embeddings=rope)
        return theirs, (lambda x: zoo_model.layers[1](x, embeddings=emb.expand_as(x))[0])
    return (lambda x: hf.backbone.blocks[0].mlstm_layer(x)[0]), zoo_model.layers[0].mixer


def train_rows(mixer, lengths, rounds, table, records):
    hf, zoo_model = models(mixer)
    theirs, ours = layers(hf, zoo_model, mixer)
    for length in lengths:
        x = torch.randn(1, length, D, requires_grad=True)
        with torch.no_grad():
            err = (ours(x) - theirs(x)).abs().max().item()
        assert err < 1e-3, f"{mixer} at {length}: outputs differ by {err}"
        grad = torch.randn(1, length, D)

        def step(fn):
            def run():
                x.grad = None
                (fn(x) * grad).sum().backward()
            return run
        t = time_interleaved({"zoo": step(ours), "transformers": step(theirs)}, rounds, alternate=True)
        ratio = t["transformers"].best / t["zoo"].best
        table.add([mixer, "layer fwd+bwd", f"{length:,}", f"{t['zoo'].best:.3f}", f"{t['transformers'].best:.3f}",
                   f"{ratio:.2f}x"])
        records.append({"mixer": mixer, "what": "layer fwd+bwd", "length": length, "zoo": t["zoo"].to_dict(),
                        "transformers": t["transformers"].to_dict(), "max_abs_diff": err})


def decode_rows(mixer, rounds, table, records, new: int = 100):
    from zoo.hf import ZooForCausalLM
    hf, zoo_model = models(mixer)
    ours = ZooForCausalLM.from_zoo(zoo_model)
    prompt = torch.randint(1, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, pad_token_id=0)

    def gen(model, n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
    with torch.no_grad():
        assert gen(ours, 8)().tolist() == gen(hf, 8)().tolist(), f"{mixer}: greedy decoding differs"
        t = time_interleaved({"zoo": gen(ours, new), "transformers": gen(hf, new), "zoo1": gen(ours, 1),
                              "transformers1": gen(hf, 1)}, rounds, alternate=True)
    per = {side: (t[side].best - t[side + "1"].best) / (new - 1) * 1e3 for side in ("zoo", "transformers")}
    table.add([mixer, "model decode, ms/token", "1", f"{per['zoo']:.3f}", f"{per['transformers']:.3f}",
               f"{per['transformers'] / per['zoo']:.2f}x"])
    records.append({"mixer": mixer, "what": "model decode", "ms_per_token": per})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=[4096])
    ap.add_argument("--mixers", type=lambda s: s.split(","), default=list(MIXERS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    bad = [m for m in args.mixers if m not in MIXERS]
    if bad or min(args.lengths) < 2 or args.rounds < 1 or args.threads < 1:
        ap.error(f"--mixers: of {', '.join(MIXERS)} (got {bad}); --lengths: at least 2 tokens; --rounds, --threads: "
                 "positive integers")
    torch.set_num_threads(args.threads)
    table = Table(["mixer", "what", "length", "zoo s", "transformers s", "transformers / zoo"], "lllrrr", stream=True)
    records = []
    for mixer in args.mixers:
        train_rows(mixer, args.lengths, args.rounds, table, records)
        if mixer != "mlstm":
            decode_rows(mixer, args.rounds, table, records)
    print(f"\n{command_line()}  ({args.threads} thread, torch {torch.__version__}, {platform.machine()})")
    print_summary({"rows": records})


if __name__ == "__main__":
    main()
