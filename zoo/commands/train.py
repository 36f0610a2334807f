"""Train a recipe.

    zoo train recipes/transformer.yaml [model.d_model=128 train.max_steps=200 ...] --out runs/x
    torchrun --nproc-per-node 2 -m zoo.commands.train recipes/mamba2.yaml --out runs/y      # DDP (gloo on CPU)
    torchrun --nproc-per-node 4 -m zoo.commands.train recipes/jamba.yaml --cp 2             # 2 dp x 2 cp mesh

Prints the parameter count and the layer table, shows a progress bar (loss, tokens/s, lr, ETA), writes
metrics.jsonl and checkpoints under --out, and ends with one machine-readable summary line.

--out holds one run: a directory with another run's checkpoints or metrics is refused unless --resume auto
continues it or --overwrite moves it aside. SIGTERM or Ctrl-C saves a checkpoint after the current step
and exits 0 (a second Ctrl-C exits at once); --resume auto then continues where it stopped.
"""
import argparse
import json
import sys
from pathlib import Path

import zoo
from zoo.train.checkpoint import CheckpointError
from zoo.train.run_dir import RunDirError
from zoo.data import DataError, prepared_data
from zoo.memory import parse_memory
from zoo.train import launch
from zoo.train.trainer import Trainer, TrainingError, dp_info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.max_steps=100")
    ap.add_argument("--out", default=None, help="run directory (default runs/<recipe name>)")
    ap.add_argument("--resume", default=None, help="'auto' (newest checkpoint in --out that loads) or a path")
    ap.add_argument("--overwrite", action="store_true",
                    help="--out holds another run: move it into --out/replaced-<time>/ and start over")
    ap.add_argument("--data", default=None, help="prepared data directory (default: prepare train.corpus)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tensorboard", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--cp", type=int, default=1,
                    help="context parallel: ranks that share one sequence (must divide the world size; the "
                         "remaining factor is data parallel); layout from train.cp_layout")
    ap.add_argument("--max-memory", default=None,
                    help="refuse a model whose estimated training memory exceeds this (e.g. 64GiB; default: the "
                         "memory available on the device; inf skips the check)")
    args = ap.parse_args(argv)

    launch.init_from_env()
    say = print if dp_info()[0] == 0 else (lambda *a, **k: None)
    try:
        max_memory = parse_memory(args.max_memory, "--max-memory")
        recipe = zoo.load_recipe(args.recipe, args.overrides)
        out = Path(args.out or Path("runs") / recipe.name)
        data = prepared_data(recipe, args.data, log=say)
        trainer = Trainer(recipe, data, out, device=args.device, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.no_progress, tensorboard=args.tensorboard, log=say, cp=args.cp,
                          max_memory=max_memory)
        say(trainer.model.describe())
        n = trainer.model.num_params()
        say(f"parameters: {n['total']:,} ({n['non_embedding']:,} non-embedding); data: {data.describe()}")
        result = trainer.train()
    except (zoo.RecipeError, CheckpointError, TrainingError, DataError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one before it started
        print("interrupted: stopped at once, without a checkpoint", file=sys.stderr)
        return 130
    finally:
        launch.close()
    summary = {"recipe": recipe.name, "step": result.step, "train_loss": round(result.train_loss, 4),
               "val_loss": result.val_loss and round(result.val_loss, 4),
               "val_bpb": result.val_bpb and round(result.val_bpb, 4), "tokens": result.tokens,
               "seconds": round(result.seconds, 1), "checkpoint": result.checkpoint}
    if result.stopped:
        summary["stopped"] = result.stopped
    say("summary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
