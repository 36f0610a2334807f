"""Tokenize a corpus once into memory-mapped train / val / test splits.

    zoo prepare-data --corpus stdlib --tokenizer byte --out data/
    zoo prepare-data --corpus stdlib+shakespeare --tokenizer byte --out data/   # code and Shakespeare's plays
    zoo prepare-data --corpus notes/ --tokenizer tok/ --out data/ --holdout 0.1
    zoo prepare-data --corpus shards/ --field content --out data/      # Parquet shards, their `content` column

Writes <out>/<corpus>-<tokenizer>/{train,val,test}.{bin,docs.npy,json} (format: zoo/data/memmap.py),
prints progress every 32 MiB of text and each split's size and throughput (MB of text a second; the whole
preparation's, reading, tokenizing and writing, in the summary), and ends with one machine-readable summary line.
An up-to-date preparation is reused unless --force.
"""
import argparse
import json
import sys
import time

from zoo.data import SPLITS, DataError, load_corpus, prepare
from zoo.data.memmap import read_header


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="stdlib", help="'stdlib', 'shakespeare' (names joined by '+' mix them), "
                                                        "a text file, a directory, a .jsonl or .parquet file, a "
                                                        "directory of Parquet shards or a saved `datasets` dataset")
    ap.add_argument("--field", default="text", help="the text column of a .jsonl, Parquet or `datasets` corpus")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a local directory AutoTokenizer loads")
    ap.add_argument("--out", default="data", help="root directory of prepared data (default: data)")
    ap.add_argument("--holdout", type=float, default=0.05,
                    help="fraction of bytes for val and for test each (not for stdlib: 1 MiB each)")
    ap.add_argument("--force", action="store_true", help="prepare again even if up to date")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = prepare(load_corpus(args.corpus, args.holdout, field=args.field), args.tokenizer, root=args.out,
                      force=args.force, log=print)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    summary = {"dir": str(out), "seconds": round(seconds, 2)}
    for split in SPLITS:
        h = read_header(out / split)
        summary[split] = {k: h[k] for k in ("num_docs", "num_bytes", "num_tokens")}
    summary["mb_per_s"] = round(sum(summary[s]["num_bytes"] for s in SPLITS) / 1e6 / max(seconds, 1e-9), 2)
    summary.update(tokenizer=h["tokenizer"], vocab_size=h["vocab_size"], dtype=h["dtype"])
    print("summary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
