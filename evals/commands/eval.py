"""Perplexity of a checkpoint by context length, with gzip / xz bits per byte as reference lines.

    zoo eval runs/x --split val --contexts 256,512,1024,2048 --schemes blocks,sliding,streaming \
        --max-tokens 16384 --out results.json [--plot ppl.png]

Schemes, units and what is scored: see evals/perplexity.py. The compressors run on the text of the same
documents the model scores (evals/compression.py). Prints a table per scheme, the streaming loss by
position bucket, and ends with one machine-readable `summary:` line.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

import zoo
from evals.compression import compression_bpb
from evals.perplexity import SCHEMES, documents_text, evaluate_perplexity, select_documents
from zoo.data import DataError, PreparedData, load_tokenizer, prepared_data
from zoo.memory import check_memory, memory_cap, parse_memory
from zoo.ops.dispatch import chosen
from zoo.train.checkpoint import CheckpointError, resolve_checkpoint


def _int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _schemes(text: str) -> list:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SCHEMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown scheme {bad[0] if bad else text!r}; allowed: {', '.join(SCHEMES)}")
    return names


def table(records: list, reference: dict) -> str:
    rows = [("scheme", "context", "stride", "tokens", "loss (nats)", "ppl", "bits/byte")]
    for r in records:
        rows.append((r["scheme"], "document" if r["context"] is None else str(r["context"]),
                     str(r["stride"] or "-"), f"{r['tokens_scored']:,}", f"{r['loss_nats']:.4f}",
                     f"{r['ppl']:.3f}", f"{r['bits_per_byte']:.4f}"))
    for name, bpb in reference.items():
        rows.append((name, "-", "-", "-", "-", "-", f"{bpb:.4f}"))
    return _format(rows)


def bucket_table(record: dict) -> str:
    rows = [("position", "tokens", "loss (nats)", "ppl", "bits/byte")]
    for b in record["buckets"]:
        rows.append((b["label"], f"{b['tokens_scored']:,}", f"{b['loss_nats']:.4f}", f"{b['ppl']:.3f}",
                     f"{b['bits_per_byte']:.4f}"))
    return _format(rows)


def _format(rows: list) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(records: list, reference: dict, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for scheme in ("blocks", "sliding"):
        rs = [r for r in records if r["scheme"] == scheme]
        if rs:
            left.plot([r["context"] for r in rs], [r["bits_per_byte"] for r in rs], "o-", label=scheme)
    for r in records:
        if r["scheme"] == "streaming":
            left.axhline(r["bits_per_byte"], color="C2", label="streaming (whole document)")
            mids = [math.sqrt(max(b["positions"][0], 1) * b["positions"][1]) for b in r["buckets"]]
            right.plot(mids, [b["bits_per_byte"] for b in r["buckets"]], "o-", color="C2", label="streaming")
    for ax in (left, right):
        for k, (name, bpb) in enumerate(reference.items()):
            ax.axhline(bpb, color="grey", linestyle=("--", ":")[k % 2], label=name)
        ax.set_xscale("log", base=2)
        ax.set_ylabel("bits per byte")
        ax.legend(fontsize=8)
    left.set_xlabel("context (tokens)")
    right.set_xlabel("position in document (tokens, bucket midpoint)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory, a run directory (its newest checkpoint), or a model "
                                       "directory written by ZooForCausalLM.save_pretrained (an import)")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--data", default=None, help="prepared data directory (default: prepare the recipe's corpus)")
    ap.add_argument("--contexts", type=_int_list, default=[256, 512, 1024, 2048])
    ap.add_argument("--schemes", type=_schemes, default=list(SCHEMES))
    ap.add_argument("--stride", type=int, default=None, help="sliding stride (default context // 2)")
    ap.add_argument("--chunk-size", type=int, default=1024, help="tokens per forward call under streaming")
    ap.add_argument("--max-tokens", type=int, default=16384, help="targets scored per scheme and context")
    ap.add_argument("--min-doc-tokens", type=int, default=2, help="skip shorter documents (pick long ones)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eos-prefix", action="store_true",
                    help="score every token, a document's first given the end-of-document id (lm-evaluation-"
                         "harness's rolling log-likelihood; `zoo lm-eval --corpus-task` then gives the same nats)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-memory", default=None,
                    help="refuse a model whose weights exceed this (e.g. 64GiB; inf: no check); default: the "
                         "memory available on the device")
    ap.add_argument("--out", default=None, help="write the records as JSON here")
    ap.add_argument("--plot", default=None, help="write a PNG: bits per byte by context and by position")
    args = ap.parse_args(argv)
    for flag, value in (("--out", args.out), ("--plot", args.plot)):
        if value and not Path(value).resolve().parent.is_dir():   # checked now, not after the whole evaluation
            ap.error(f"{flag}: the directory of {value} does not exist")

    try:
        max_memory = parse_memory(args.max_memory, "--max-memory")
        path = resolve_checkpoint(args.checkpoint)
        with memory_cap(max_memory):   # built on the CPU, checked again against the device before it moves
            model = zoo.load_checkpoint(path)
            if torch.device(args.device).type != "cpu":
                check_memory(model.recipe, max_memory, args.device)
        model = model.to(args.device)
        data = PreparedData(args.data) if args.data else prepared_data(model.recipe)
        split = data.splits[args.split]
        tokenizer = None if data.tokenizer == "byte" else load_tokenizer(data.tokenizer)
        text = documents_text(split, args.max_tokens, args.min_doc_tokens, tokenizer=tokenizer)
        reference = compression_bpb(text)
        scored = select_documents(split.file, args.max_tokens, args.min_doc_tokens)
        longest = max((n for _, n in scored), default=0)
        too_long = [c for c in args.contexts if c > longest] if set(args.schemes) - {"streaming"} else []
        if too_long:   # a window past every document is the whole document: it would be labelled as if it ran
            raise ValueError(f"--contexts: {too_long[0]} is longer than every scored document (the longest is "
                             f"{longest:,} tokens under --max-tokens {args.max_tokens:,}); allowed: up to {longest:,}")
        records = []
        for scheme in args.schemes:
            records += evaluate_perplexity(model, split, args.contexts, scheme=scheme,
                                           stride=args.stride if scheme == "sliding" else None,
                                           max_tokens=args.max_tokens, batch_size=args.batch_size,
                                           device=torch.device(args.device), chunk_size=args.chunk_size,
                                           min_doc_tokens=args.min_doc_tokens, eos_prefix=args.eos_prefix)
    except (CheckpointError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    train_len = model.recipe.train.seq_len
    print(f"checkpoint {path} (recipe {model.recipe.name}, trained at {train_len} tokens); "
          f"{args.split} split of {data.directory}: {records[0]['documents']} documents, "
          f"{records[0]['tokens_scored']:,} tokens, {len(text):,} bytes of text")
    print(f"bytes counted: {records[0]['bytes_method']}")
    print(table(records, reference))
    for r in records:
        if r["scheme"] == "streaming":
            print(f"streaming by position in document (chunks of {r['chunk']} tokens):")
            print(bucket_table(r))
    kernels = chosen(args.device, model.recipe.model.kernels)
    result = {"checkpoint": str(path), "recipe": model.recipe.name, "train_seq_len": train_len, "kernels": kernels,
              "split": args.split, "data": str(data.directory),
              "reference_bits_per_byte": {**reference, "text_bytes": len(text)}, "records": records}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(records, reference, Path(args.plot), f"{model.recipe.name} on {args.split}")
    summary = {"checkpoint": str(path), "split": args.split, "tokens_scored": records[0]["tokens_scored"],
               "bits_per_byte": {f"{r['scheme']}@{r['context'] or 'doc'}": round(r["bits_per_byte"], 5)
                                 for r in records},
               **{k: round(v, 5) for k, v in reference.items()}, "out": args.out, "kernels": kernels}
    print("summary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
