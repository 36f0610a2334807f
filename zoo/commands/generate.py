"""Generate text from a checkpoint or an exported directory, streaming tokens as they are produced.

    zoo generate runs/x --prompt "def fib(n):" --max-new-tokens 200
    zoo generate OUT --prompt "a" --prompt "longer prompt" --greedy    # a left-padded batch
    zoo generate OUT --prompt "x" --top-k 50 --top-p 0.9 --temperature 0.8 --repetition-penalty 1.1

CKPT_OR_DIR: a directory written by save_pretrained / zoo export (config.json), or a training
checkpoint / run directory (zoo.load_checkpoint). The tokenizer: --tokenizer, else the one saved in the
directory, else the recipe's train.tokenizer ("byte" or a saved transformers tokenizer). Sampling,
top-k/top-p, repetition penalty and stopping at the tokenizer's end-of-text are transformers' own
`generate`. One prompt streams to stdout; several are generated as one left-padded batch and printed at
the end. At the end: prefill and decode tokens/s, and the cache size in bytes measured from the cache
tensors beside the blocks' analytic `state_bytes`; the last line is a machine-readable `summary:`.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import zoo
from zoo.data import DataError, load_tokenizer
from zoo.hf import ZooForCausalLM, output_cache
from transformers.utils import logging as hf_logging
from zoo.memory import check_memory, memory_cap, parse_memory
from zoo.train.checkpoint import CheckpointError


class Streamer:
    """transformers' streamer protocol (put / end) for zoo's tokenizers: prints the text of each new token
    as it comes and timestamps the first one (the end of the prefill). A byte tokenizer can cut a UTF-8
    character in two, so text is printed only up to the last complete character."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout   # the stdout of now, not of import time
        self.ids, self.printed, self.prompt_seen = [], 0, False
        self.first_token_time = None

    def put(self, value):
        if not self.prompt_seen:   # generate hands the prompt over first
            self.prompt_seen = True
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))
        if stable > self.printed:
            self.out.write(text[self.printed:stable])
            self.out.flush()
            self.printed = stable

    def end(self):
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def load(path, dtype, device, max_memory=None):
    """The model is built on the CPU (refused there if its weights cannot fit, zoo.memory), then checked
    against the target device's free memory before it moves."""
    path = Path(path)
    with memory_cap(max_memory):
        if (path / "config.json").is_file():
            model = ZooForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            model = ZooForCausalLM.from_zoo(zoo.load_checkpoint(path).to(dtype))
        if torch.device(device).type != "cpu":
            check_memory(model.model.recipe, max_memory, device)
    return model.to(device).eval()


def check_sampling(args):
    """The first bad sampling option as a one-line message, or None. --temperature 0 means greedy."""
    if args.max_new_tokens < 1:
        return f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}"
    if not args.temperature >= 0:
        return f"--temperature: must be >= 0 (0 is greedy decoding, as --greedy), got {args.temperature}"
    if not 0 < args.top_p <= 1:
        return f"--top-p: must be in (0, 1] (1 turns top-p off), got {args.top_p}"
    if args.top_k < 0:
        return f"--top-k: must be >= 0 (0 turns top-k off), got {args.top_k}"
    if not args.repetition_penalty > 0:
        return f"--repetition-penalty: must be > 0 (1 turns it off), got {args.repetition_penalty}"
    return None


def fail(message) -> int:
    """`error: <message>` as one line on stderr; the exit status of a bad input."""
    print("error: " + "; ".join(line.strip() for line in str(message).splitlines() if line.strip()), file=sys.stderr)
    return 2


def pick_tokenizer(spec, path, model):
    if spec is None:
        spec = path if (Path(path) / "tokenizer.json").is_file() else model.model.recipe.train.tokenizer
    tok = load_tokenizer(spec)
    if tok.vocab_size > model.config.vocab_size:
        raise DataError(f"tokenizer {spec!r}: {tok.vocab_size} tokens, more than the model's vocabulary "
                        f"{model.config.vocab_size}")
    return tok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", metavar="CKPT_OR_DIR")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy, as --greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0: off")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--no-stop", action="store_true", help="do not stop at the tokenizer's end-of-text token")
    ap.add_argument("--tokenizer", default=None, help='"byte" or a saved transformers tokenizer directory')
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-memory", default=None,
                    help="refuse a model whose weights exceed this (e.g. 64GiB; inf: no check); default: the "
                         "memory available on the device")
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()
    try:
        parse_memory(args.max_memory, "--max-memory")
    except zoo.RecipeError as err:
        return fail(err)
    bad = check_sampling(args)
    if bad:
        return fail(bad)
    greedy = args.greedy or args.temperature == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    try:
        model = load(args.path, dtype, args.device, args.max_memory)
        tok = pick_tokenizer(args.tokenizer, args.path, model)
    except (CheckpointError, DataError, zoo.RecipeError, ValueError, OSError) as err:
        return fail(err)

    prompts = [tok.encode(p) for p in args.prompt]
    if any(len(p) == 0 for p in prompts):
        return fail("--prompt: an empty prompt encodes to no tokens")
    n = max(len(p) for p in prompts)
    pad = tok.eos_id if tok.eos_id is not None else 0
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for r, p in enumerate(prompts):   # left padding: generation continues every row at the same column
        ids[r, n - len(p):], mask[r, n - len(p):] = torch.tensor(p), 1
    streamer = Streamer(tok) if len(prompts) == 1 else None
    eos = None if args.no_stop or tok.eos_id is None else tok.eos_id
    kwargs = dict(do_sample=not greedy, max_new_tokens=args.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                  repetition_penalty=args.repetition_penalty, return_dict_in_generate=True, streamer=streamer)
    if not greedy:
        kwargs.update(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    if streamer is not None:
        sys.stdout.write(args.prompt[0])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids.to(args.device), attention_mask=mask.to(args.device), **kwargs)
    t1 = time.perf_counter()
    new = out.sequences[:, n:]
    if streamer is None:
        for r, p in enumerate(args.prompt):
            print(f"--- [{r}] " + p + tok.decode(new[r].tolist()))
    cache = output_cache(out)
    generated = new.shape[1]
    decode_s = t1 - (streamer.first_token_time if streamer and streamer.first_token_time else t0)
    seen = cache.get_seq_length()
    analytic = sum(layer.state_bytes(seen, batch_size=len(prompts), dtype=dtype) for layer in model.model.layers)
    summary = {"recipe": model.model.recipe.name, "batch": len(prompts), "prompt_tokens": n,
               "new_tokens": generated, "seconds": round(t1 - t0, 4),
               "tokens_per_s": round(len(prompts) * generated / (t1 - t0), 2),
               "cache_tokens": seen, "cache_bytes": cache.nbytes(), "state_bytes": analytic, "dtype": args.dtype,
               "greedy": greedy}
    if streamer is not None and streamer.first_token_time is not None and generated > 1:
        summary["prefill_s"] = round(streamer.first_token_time - t0, 4)
        summary["decode_tokens_per_s"] = round((generated - 1) / decode_s, 2)
    print(f"{generated} new tokens x {len(prompts)} rows in {t1 - t0:.2f} s "
          f"({summary['tokens_per_s']} tok/s"
          + (f", decode {summary['decode_tokens_per_s']} tok/s" if "decode_tokens_per_s" in summary else "")
          + f"); cache after {seen} positions: {cache.nbytes():,} bytes measured, {analytic:,} by state_bytes",
          file=sys.stderr)
    print("summary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
