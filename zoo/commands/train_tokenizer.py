"""Train a byte-level BPE tokenizer on a corpus's train split; AutoTokenizer loads the result.

    zoo train-tokenizer --corpus stdlib --vocab-size 4096 --out tok/
    python -c "from transformers import AutoTokenizer; print(AutoTokenizer.from_pretrained('tok/'))"

The vocabulary: 256 byte symbols, <|endoftext|> (the end-of-document token) and the learned merges.
Ends with one machine-readable summary line (including bytes per token on the val split).
Measured on CPython 3.11.7's stdlib with the first command above: 15.7 s on 2 shared CPU cores, 3.657 val
bytes per token (the byte tokenizer: 1.0); prepared, train holds 2,866,111 tokens for 9,923,712 bytes.
"""
import argparse
import json
import sys
import time

from zoo.data import DataError, count_bytes, load_corpus, train_bpe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="stdlib", help="'stdlib', a text file, a directory or a .jsonl file")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", required=True, help="directory to save the tokenizer to")
    ap.add_argument("--holdout", type=float, default=0.05, help="as in zoo prepare-data")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        corpus = load_corpus(args.corpus, args.holdout)
        tok = train_bpe(corpus.documents("train"), args.vocab_size, args.out)
        val_bytes = val_tokens = 0
        for text in corpus.documents("val"):
            val_bytes += count_bytes(text)
            val_tokens += len(tok.encode(text))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {"out": args.out, "corpus": corpus.name, "vocab_size": tok.vocab_size,
               "val_bytes_per_token": round(val_bytes / max(val_tokens, 1), 3),
               "seconds": round(time.perf_counter() - t0, 1)}
    print("summary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
