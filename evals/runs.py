"""The models a comparison measures: recipes found by name, file or run directory, trained on a token budget
or loaded, each only when a cell needs it (`RecipeRun`); passkey fine-tunes beside them; run provenance.

Recipe names are looked up in `./recipes/` of the working directory (the checkout's recipes, where the
README's commands run) or in the directory `ZOO_RECIPES` names; files and directories are taken as given.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from omegaconf import OmegaConf

import zoo
from evals.options import count
from zoo.data import PreparedData, prepare, prepared_data
from zoo.train.checkpoint import (CheckpointError, list_checkpoints, model_differences, read_recipe, resolve_checkpoint,
                                  save_checkpoint)
from zoo.train.trainer import Trainer

# precisions a shipped checkpoint's weights may be rounded to (zoo pretrain --dtype, zoo recall)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shipped_model_dir(root, name: str, flag: str) -> Path:
    """The shipped model of recipe `name` under `root`: root/<name>, or root itself when it is one shipped model
    (another recipe's weights, e.g. local layers started from a global model's); CheckpointError naming `flag`."""
    for path in (Path(root) / name, Path(root)):
        if (path / "card.json").is_file():
            return path
    raise CheckpointError(f"{flag}: no shipped checkpoint {Path(root) / name} (card.json) for recipe {name}, and "
                          f"{root} is not one itself")


def recipe_dirs() -> list:
    """Where recipe names are looked up, first match wins."""
    dirs = [Path(os.environ["ZOO_RECIPES"])] if os.environ.get("ZOO_RECIPES") else []
    return dirs + [Path.cwd() / "recipes"]


def parameter_target(spec: str, overrides: list, given: dict | None = None) -> int:
    """--match-params: a count (2M, 1.5e6, 300K) or the name of a recipe, whose parameter count it means (one of
    `given` {name: recipe}, else looked up as `resolve` does)."""
    if spec[:1].isdigit():
        return count(spec)
    recipe = (given or {}).get(spec) or resolve(spec, overrides)[0]
    return zoo.build_model(recipe).num_params()["total"]


def source_commit() -> str | None:
    """The git commit of the zoo source this process imported (None outside a git checkout): what made a run."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(zoo.__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def add_time(run_dir: Path, cpu_s: float, wall_s: float, write: bool = True) -> tuple:
    """The run's CPU and wall seconds over all its sessions (a resumed run adds to what its earlier ones
    recorded in run_dir/time.json); the totals."""
    path = run_dir / "time.json"
    seen = json.loads(path.read_text()) if path.is_file() else {"cpu_seconds": 0.0, "wall_seconds": 0.0}
    total = {"cpu_seconds": seen["cpu_seconds"] + cpu_s, "wall_seconds": seen["wall_seconds"] + wall_s}
    if write:
        path.write_text(json.dumps(total) + "\n")
    return total["cpu_seconds"], total["wall_seconds"]


def resolve(spec: str, overrides: list):
    """(recipe, checkpoint or None) for a recipe name, recipe file, run/checkpoint directory, or a model directory
    written by ZooForCausalLM.save_pretrained (an import; zoo.train.checkpoint.is_model_dir)."""
    path = Path(spec)
    if path.is_dir():   # only NAME:-prefixed overrides reach a trained model: settings without weights, by name
        ckpt = resolve_checkpoint(path)
        recipe = zoo.load_recipe(ckpt / "recipe.yaml")
        own = [item.partition(":")[2] for item in overrides if _prefix(item) == recipe.name]
        return (zoo.load_recipe(ckpt / "recipe.yaml", own) if own else recipe), ckpt
    if path.is_file():
        return _load(path, overrides), None
    for directory in recipe_dirs():
        named = directory / f"{spec}.yaml"
        if named.is_file():
            return _load(named, overrides), None
    known = sorted({p.stem for d in recipe_dirs() for p in d.glob("[!_]*.yaml")})
    where = " or ".join(str(d) for d in recipe_dirs())
    raise ValueError(f"recipes: {spec!r} is not a recipe file, a run directory or a recipe name in {where} "
                     f"(known: {', '.join(known) or 'none'}; ZOO_RECIPES names another directory of recipes)")


def _prefix(item: str):
    """NAME of a `NAME:KEY=VALUE` override; None for a plain KEY=VALUE (a value may hold a colon)."""
    head, _, rest = item.partition(":")
    return head if rest and "=" not in head else None


def split_overrides(overrides: list, name: str) -> list:
    """The overrides that apply to recipe `name`: unprefixed ones and `name:`-prefixed ones (prefix removed)."""
    return [item if _prefix(item) is None else item.partition(":")[2]
            for item in overrides if _prefix(item) in (None, name)]


def override_names(overrides: list) -> set:
    """The recipe names that `NAME:KEY=VALUE` overrides address."""
    return {_prefix(item) for item in overrides} - {None}


def check_override_names(overrides: list, names) -> None:
    """ValueError naming an override addressed to a recipe that is not among `names` (a typo would do nothing)."""
    stray = sorted(override_names(overrides) - set(names))
    if stray:
        raise ValueError(f"--set: {stray[0]}: names no recipe of this command (recipes: {', '.join(names)}); "
                         "NAME:KEY=VALUE applies KEY=VALUE to recipe NAME only")


def _load(path: Path, overrides: list):
    """The recipe file at `path` with the overrides for it: unprefixed and its own `NAME:`-prefixed ones."""
    if override_names(overrides):
        name = OmegaConf.load(path).get("name") or path.stem
        overrides = split_overrides(overrides, str(name))
    return zoo.load_recipe(path, overrides)


def budget_steps(train, budget: int) -> int:
    """Optimizer steps of a `budget`-token run: whole steps of batch_size x seq_len x grad_accum tokens, at least one
    (a sequence-length schedule keeps that many tokens in every step)."""
    return max(1, budget // (train.batch_size * train.seq_len * train.grad_accum))


class RecipeRun:
    """One recipe's model, trained (or loaded) only when a cell that needs it has not been done yet."""

    def __init__(self, recipe, checkpoint, args, out: Path, say):
        self.recipe, self.checkpoint, self.args, self.say = recipe, checkpoint, args, say
        self.run_dir = out / "runs" / recipe.name
        self._model = self._data = None

    def data(self):
        if self._data is None:
            self._data = prepared_data(self.recipe, self.args.data, root=self.args.data_root, log=self.say)
        return self._data

    def held_out(self, corpus: str):
        """The --context-split of `corpus` prepared with this recipe's tokenizer."""
        directory = prepare(corpus, self.recipe.train.tokenizer, root=self.args.data_root, log=self.say)
        return PreparedData(directory).splits[self.args.context_split]

    def train_steps(self) -> int:
        return budget_steps(self.recipe.train, self.args.budget)

    def train(self) -> dict:
        steps = self.train_steps()
        warmup = min(self.recipe.train.warmup_steps, steps // 10)
        recipe = zoo.load_recipe(self.recipe.to_dict(), [
            f"train.max_steps={steps}", f"train.warmup_steps={warmup}", f"train.eval_every={steps}",
            f"train.save_every={steps}", "train.keep_last=1", f"train.log_every={max(1, steps // 50)}"])
        # the train cell is not done: what the run directory holds is an interrupted or voided attempt
        trainer = Trainer(recipe, self.data(), self.run_dir, device=self.args.device, log=self.say,
                          progress=not self.args.no_progress, overwrite=True)
        result = trainer.train()
        self._model = trainer.model.eval()
        self.checkpoint = Path(result.checkpoint)
        return {"steps": result.step, "tokens": result.tokens, "seconds": result.seconds,
                "tokens_per_s": result.tokens / result.seconds, "train_loss": result.train_loss,
                "val_loss": result.val_loss, "val_bpb": result.val_bpb, "checkpoint": str(result.checkpoint),
                "batch_size": recipe.train.batch_size, "seq_len": recipe.train.seq_len,
                "units": {"tokens": "tokens", "seconds": "s", "tokens_per_s": "tokens/s",
                          "train_loss": "nats/token", "val_loss": "nats/token", "val_bpb": "bits/byte"}}

    def model(self):
        if self._model is None:
            if self.checkpoint is None:
                raise RuntimeError(f"{self.recipe.name}: no checkpoint to evaluate")
            changed = model_differences(read_recipe(self.checkpoint), self.recipe)
            if changed:
                self.say(f"{self.recipe.name}: {self.checkpoint} evaluated with " + ", ".join(changed))
            self._model = zoo.load_checkpoint(self.checkpoint, device=self.args.device,
                                              recipe=self.recipe if changed else None).eval()
        return self._model


def passkey_checkpoint(root, name: str) -> dict | None:
    """The passkey fine-tune of `name` under `root` (`zoo recall passkey`'s OUT): {checkpoint, finetune_len,
    finetune_steps}, or None when it has none."""
    card = Path(root) / name / "card.json"
    if not card.is_file():
        return None
    info = json.loads(card.read_text())
    return {"checkpoint": str(resolve_checkpoint(card.parent)), "finetune_len": info["seq_len"],
            "finetune_steps": info["steps"]}


def ship(trainer, recipe, dest: Path, dtype, step=None) -> tuple:
    """Write the model's weights rounded to `dtype` as dest's checkpoint (named `step`, default the trainer's),
    replacing what dest shipped before (its weights stay in the run directories that made them); returns (path,
    val loss, val bpb) of the rounded weights, evaluated on the trainer's validation batches."""
    model = trainer.model
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k].to(v.dtype))   # evaluate what is shipped, not the float32 original
    loss, bpb = trainer.evaluate()   # every rank: under cp the evaluation is a collective
    if trainer.rank != 0:
        return None, loss, bpb
    path = save_checkpoint(dest / "checkpoints", trainer.step if step is None else step, state, trainer.recipe,
                           info={"dtype": str(dtype).removeprefix("torch."), "tokens": trainer.tokens}, keep_last=1)
    # keep_last prunes by step number: an older shipment numbered higher (another stage count) would outlive this one
    for old in list_checkpoints(dest / "checkpoints"):
        if old.resolve() != Path(path).resolve():
            shutil.rmtree(old)
    return path, loss, bpb
