"""What document masking (seq_idx, `train.cross_doc: false`) costs: each op and block forward + backward
with and without seq_idx, side by side in one process (attention also with its dense-mask fallback forced).

    python benchmarks/bench_documents.py [--length 1024] [--batch 4] [--docs 4] [--rounds 3]

CPU, float32, one thread. Each row of the batch holds `--docs` documents of random lengths (different
boundaries per row). Time: every method runs once to warm up, then `--rounds` interleaved rounds, each
method's best round is kept (load from other users of the machine falls on all methods alike). Prints a
markdown table and a final `summary:` line.
"""
from __future__ import annotations

import argparse
import os

from benchmarks.harness import Table, print_summary, time_interleaved


def packed_ids(batch, length, docs, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(length - 1, generator=g)[:docs - 1] + 1
        ids = torch.zeros(length, dtype=torch.int64)
        for c in cuts.tolist():
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows)


def cases(length, batch, docs):
    """name -> (function of seq_idx or None, leaves needing gradients)."""
    import torch

    import zoo
    from zoo.ops import attention as attention_ops
    from zoo.ops.attention import attention, blockwise_attention
    from zoo.ops.conv import causal_conv1d
    from zoo.ops.ssm import selective_scan

    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).requires_grad_()
    h, hd, d_model = 4, 64, 256
    q, k, v = rand(batch, length, h, hd), rand(batch, length, h, hd), rand(batch, length, h, hd)
    d_inner, n = 512, 16
    x_conv, w_conv, b_conv = rand(batch, d_inner, length), rand(d_inner, 4), rand(d_inner)
    u, delta = rand(batch, d_inner, length), rand(batch, d_inner, length)
    A = (-torch.rand(d_inner, n)).requires_grad_()
    B, C = rand(batch, n, length), rand(batch, n, length)

    def dense_mask(s):
        """attention's second choice, SDPA with a [batch, 1, L, L] document mask (forced)."""
        calls, attention_ops._PER_DOCUMENT_CALLS = attention_ops._PER_DOCUMENT_CALLS, 0
        try:
            return attention(q, k, v, seq_idx=s)
        finally:
            attention_ops._PER_DOCUMENT_CALLS = calls

    out = {
        "attention (SDPA per document)": (lambda s: attention(q, k, v, seq_idx=s), (q, k, v)),
        "attention, SDPA with dense document mask": (dense_mask, (q, k, v)),
        "blockwise 128 (doc tiles)": (lambda s: blockwise_attention(q, k, v, block_size=128, seq_idx=s), (q, k, v)),
        "swa w=256, blockwise 128": (lambda s: blockwise_attention(q, k, v, window=256, block_size=128, seq_idx=s),
                                     (q, k, v)),
        "causal_conv1d d=512 w=4": (lambda s: causal_conv1d(x_conv, w_conv, b_conv, activation="silu", seq_idx=s),
                                    (x_conv, w_conv, b_conv)),
        "selective_scan d=512 n=16": (lambda s: selective_scan(u, delta, A, B, C, delta_softplus=True, seq_idx=s),
                                      (u, delta, A, B, C)),
    }
    blocks = {
        "mamba block": {"type": "mamba", "d_state": 16},
        "mamba2 block": {"type": "mamba2", "d_state": 64, "head_dim": 64, "chunk_size": 64},
        "infini block (per document)": {"type": "infini", "n_heads": 4, "segment_len": 128},
        "selective block (per document)": {"type": "selective", "n_heads": 4, "block_size": 128},
        "taipan block (per document)": {"type": "taipan", "n_heads": 4, "window": 256, "block_size": 128},
    }
    for name, spec in blocks.items():
        entry = zoo.registry.get_block(spec.pop("type"))
        block = entry.cls(d_model, entry.config(**spec), 0)
        xb = rand(batch, length, d_model)
        out[name] = ((lambda blk, xx: lambda s: blk.run(xx, seq_idx=s)[0])(block, xb), (xb, *block.parameters()))
    return out


def fwd_bwd(fn, seq_idx, leaves):
    """One forward + backward; clearing the leaves' gradients first is timed with it (microseconds)."""
    def run():
        for t in leaves:
            t.grad = None
        fn(seq_idx).float().pow(2).mean().backward()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--docs", type=int, default=4, help="documents per row")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    torch.set_num_threads(1)
    seq_idx = packed_ids(args.batch, args.length, args.docs)
    table = cases(args.length, args.batch, args.docs)
    steps = {(name, mode): fwd_bwd(fn, s, leaves) for name, (fn, leaves) in table.items()
             for mode, s in (("plain", None), ("docs", seq_idx))}
    best = {key: t.best for key, t in time_interleaved(steps, args.rounds).items()}
    load = os.getloadavg()[0]
    print(f"CPU float32, 1 thread, batch {args.batch} x length {args.length}, {args.docs} documents per row, "
          f"forward + backward, best of {args.rounds} interleaved rounds; load average {load:.1f}\n")
    out = Table(["op / block", "without seq_idx s", "with seq_idx s", "with / without"])
    summary = {}
    for name in table:
        plain, docs = best[name, "plain"], best[name, "docs"]
        out.add([name, f"{plain:.4f}", f"{docs:.4f}", f"{docs / plain:.2f}"])
        summary[name] = {"plain_s": round(plain, 5), "docs_s": round(docs, 5), "ratio": round(docs / plain, 3)}
    print(out)
    print_summary({"length": args.length, "batch": args.batch, "docs": args.docs, "load": round(load, 1),
                   "results": summary})


if __name__ == "__main__":
    main()
