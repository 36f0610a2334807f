"""`zoo lm-eval`: lm-evaluation-harness on a zoo checkpoint or model directory (the `eval` extra).

    zoo lm-eval pretrained/mamba2 --tasks niah_single_1 --metadata '{"max_seq_lengths": [1024]}' --limit 4
    zoo lm-eval pretrained/long/mamba2 --corpus-task stdlib:test --max-docs 20 --output_path runs/lm-eval

The first argument is the model (a zoo checkpoint, run or `zoo export` directory); `--corpus-task CORPUS:SPLIT`
(repeatable) adds a rolling log-likelihood task made from a zoo corpus split (evals.harness.corpus_task: the
documents `zoo eval --eos-prefix` scores, so the nats agree); every other option goes to lm_eval's `run` as it
is (`--tasks`, `--limit`, `--batch_size`, `--output_path`, `--model_args max_length=...`, ...). lm_eval runs
with `--model zoo` (evals.harness.ZooHarnessLM) on the CPU unless `--device` says otherwise. Offline: tasks that
need a download fail in lm_eval with its own message; RULER's niah_single_1, niah_multikey_2/3, vt, cwe and fwe do
not, given the tokenizer lm_eval sizes them with (`--metadata '{"tokenizer": DIR}'`; this command passes the
model directory's, written beside the model).
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="zoo lm-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a zoo checkpoint, run directory or model directory (zoo export)")
    ap.add_argument("--corpus-task", action="append", default=[], metavar="CORPUS:SPLIT",
                    help="a loglikelihood_rolling task of a zoo corpus split (e.g. stdlib:test), repeatable")
    ap.add_argument("--max-docs", type=int, default=None, help="documents per corpus task (default: the budget's)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="targets per corpus task, as zoo eval's budget")
    args, rest = ap.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: lm-eval: lm-evaluation-harness is not installed (pip install -e '.[eval]')", file=sys.stderr)
        return 2
    from evals.harness import corpus_task, hf_tokenizer
    from zoo.data import DataError
    from zoo.train.checkpoint import CheckpointError, read_recipe, resolve_checkpoint
    try:
        recipe = read_recipe(resolve_checkpoint(args.model))   # the weights load once, in ZooHarnessLM
        for spec in args.corpus_task:
            corpus, sep, split = spec.rpartition(":")
            if not sep or split not in ("train", "val", "test"):
                raise ValueError(f"--corpus-task: {spec!r}; expected CORPUS:SPLIT with SPLIT train, val or test")
    except (CheckpointError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tasks = [corpus_task(corpus, split, Path(tmp) / "tasks", recipe.train.tokenizer, args.max_tokens,
                             args.max_docs) for corpus, _, split in (s.rpartition(":") for s in args.corpus_task)]
        tok_dir = Path(tmp) / "tokenizer"
        hf_tokenizer(recipe, Path(args.model)).save_pretrained(tok_dir)   # what RULER's generators size prompts with
        run = ["run", "--model", "zoo", "--model_args", f"pretrained={args.model}", "--device", "cpu"]
        if tasks:
            run += ["--include_path", str(Path(tmp) / "tasks")]
            rest = _add_tasks(rest, tasks)
        try:
            rest = _with_tokenizer(rest, str(tok_dir))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return _lm_eval(run + rest)


def _with_tokenizer(rest: list, tok_dir: str) -> list:
    """lm_eval's --metadata with "tokenizer" (what RULER's generators size prompts with) set to the model's own
    unless the caller named one."""
    if "--metadata" not in rest:
        return rest + ["--metadata", json.dumps({"tokenizer": tok_dir})]
    i = rest.index("--metadata") + 1
    try:
        meta = json.loads(rest[i])
    except (IndexError, ValueError):
        raise ValueError(f"--metadata: expected a JSON object, got {rest[i:i + 1]}") from None
    return rest[:i] + [json.dumps({"tokenizer": tok_dir, **meta})] + rest[i + 1:]


def _add_tasks(rest: list, tasks: list) -> list:
    """lm_eval's --tasks with `tasks` added (a --tasks of the caller's kept, its values extended)."""
    for flag in ("--tasks", "-t"):
        if flag in rest:
            i = rest.index(flag) + 1
            return rest[:i] + [",".join([rest[i], *tasks])] + rest[i + 1:]
    return rest + ["--tasks", ",".join(tasks)]


def _lm_eval(argv: list) -> int:
    import evals.harness  # noqa: F401  (registers --model zoo)
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging
    setup_logging()
    parser = HarnessCLI()
    prog, sys.argv = sys.argv, ["lm-eval", *argv]   # HarnessCLI reads sys.argv itself
    try:
        parser.execute(parser.parse_args())
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except ValueError as err:   # lm_eval's refusals (an unknown task, a bad argument) in one line
        field = "--tasks: " if "Tasks not found" in str(err) else ""
        hint = " (`lm-eval ls tasks` lists lm_eval's; --corpus-task makes one of a zoo corpus)" if field else ""
        print(f"error: {field}{err}{hint}", file=sys.stderr)
        return 2
    finally:
        sys.argv = prog
    return 0


if __name__ == "__main__":
    sys.exit(main())
