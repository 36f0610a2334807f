"""Checkpoints that never lose work.

    <root>/step-00000200/  model.safetensors  state.pt  trainer.json  recipe.yaml

A checkpoint is written into a hidden temporary directory, every file and the directory fsynced, then
renamed into place: a rename is atomic, so a kill at any moment leaves either the old set of
checkpoints or the old set plus the new one, never a half-written `step-*`. Old checkpoints are
first renamed out of the `step-*` namespace, then deleted. Loading never unpickles arbitrary
objects: weights come from safetensors, the rest from JSON and `torch.load(weights_only=True)`.
A save that fails (disk full, no permission) removes its temporary directory and raises one
CheckpointError naming the checkpoint and the OS error; a file that fails to load is a CheckpointError
naming the file, never a library's traceback.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zoo.config import Recipe, load_recipe

FILES = ("model.safetensors", "state.pt", "trainer.json", "recipe.yaml")
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    pass


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dedup_tied(state: dict) -> tuple[dict, dict]:
    """safetensors refuses shared storage: keep one name per tensor and record the aliases."""
    seen, unique, aliases = {}, {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def save_checkpoint(root, step: int, model_state: dict, recipe: Recipe, train_state: Optional[dict] = None,
                    info: Optional[dict] = None, keep_last: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep_last`.

    model_state: the full (unsharded) state dict; train_state: tensors and plain containers
    (optimizer, scheduler, RNG) loadable with weights_only=True; info: JSON-serialisable trainer state.
    """
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    old = root / f".old-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors, aliases = _dedup_tied(model_state)
        save_file(tensors, tmp / "model.safetensors", metadata={"aliases": json.dumps(aliases)})
        torch.save(train_state or {}, tmp / "state.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **(info or {})}, indent=1))
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        for name in FILES:
            _fsync(tmp / name)
        _fsync(tmp)
        if final.exists():  # re-saving the same step: move the old one out of the namespace first
            final.rename(old)
        os.rename(tmp, final)
        _fsync(root)
    except BaseException as err:  # a KeyboardInterrupt too: never leave a .tmp-* behind
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        if not isinstance(err, (OSError, RuntimeError, SafetensorError)):
            raise
        previous = latest_checkpoint(root)
        raise CheckpointError(f"checkpoint: could not write {final} ({reason(err)}); "
                              + (f"the previous checkpoint {previous} is kept" if previous else
                                 "no earlier checkpoint exists")) from None
    _prune(root, keep_last)
    return final


def reason(err: BaseException) -> str:
    """An OS error as 'No space left on device (ENOSPC)'; a library's error as its first sentence,
    without the paragraph of advice that torch appends."""
    if isinstance(err, OSError) and err.errno in errno.errorcode:
        return f"{err.strerror or os.strerror(err.errno)} ({errno.errorcode[err.errno]})"
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(err).__name__


def _prune(root: Path, keep_last: int):
    complete = list_checkpoints(root)
    for path in complete[:-keep_last] if keep_last > 0 else []:
        trash = root / f".trash-{path.name}-{os.getpid()}"
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    for stale in root.glob(".old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and all((path / f).is_file() for f in FILES):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def step_dirs(root) -> list[Path]:
    """Every `step-*` directory under `root`, complete or not, oldest first (what `resume auto` walks)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path) -> Optional[int]:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def _check_files(path: Path):
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint: {path / missing[0]} is missing"
                              + (f" (and {', '.join(missing[1:])})" if missing[1:] else ""))


MODEL_DIR_FILES = ("config.json", "model.safetensors", "recipe.yaml")


def is_model_dir(path) -> bool:
    """An imported (or exported) model directory, as `zoo.hf.ZooForCausalLM.save_pretrained` writes it:
    config.json with model_type "zoo", model.safetensors (names under `model.`), recipe.yaml. It evaluates
    like a checkpoint; it has no optimizer state, so it does not resume training."""
    path = Path(path)
    if not all((path / f).is_file() for f in MODEL_DIR_FILES):
        return False
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "zoo"
    except (ValueError, OSError, AttributeError):
        return False


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, a directory of checkpoints, a run directory (…/checkpoints), or a model
    directory written by `ZooForCausalLM.save_pretrained` (`is_model_dir`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint: {path} does not exist")
    if all((path / f).is_file() for f in FILES) or is_model_dir(path):
        return path
    if checkpoint_step(path) is not None:  # a step-* directory that lacks a file
        _check_files(path)
    for root in (path, path / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"checkpoint: no complete checkpoint in {path} (a checkpoint directory holds "
                          f"{', '.join(FILES)}; a run directory holds checkpoints/step-*)")


def read_model_state(path) -> dict:
    path = resolve_checkpoint(path)
    try:
        tensors = load_file(path / "model.safetensors")
        with open(path / "model.safetensors", "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header_len)).get("__metadata__", {})
        aliases = json.loads(meta.get("aliases", "{}"))
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint: {path / 'model.safetensors'} is unreadable or corrupt "
                              f"({reason(err)})") from None
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    if is_model_dir(path):   # transformers' names: ZooForCausalLM holds the ZooLM as `model`; a tied head is left out
        tensors = {name[len("model."):] if name.startswith("model.") else name: t for name, t in tensors.items()}
        if "lm_head.weight" not in tensors and "embed.weight" in tensors and read_recipe(path).model.tie_embeddings:
            tensors["lm_head.weight"] = tensors["embed.weight"]
    return tensors


def read_train_state(path) -> tuple[dict, dict]:
    """(train_state tensors/containers, trainer info) of a checkpoint, without unpickling objects."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        raise CheckpointError(f"checkpoint: {path / 'state.pt'} is unreadable or corrupt ({reason(err)})") from None
    try:
        info = json.loads((path / "trainer.json").read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint: {path / 'trainer.json'} is unreadable or corrupt ({reason(err)})") from None
    return state, info


def read_recipe(path) -> Recipe:
    path = Path(path) / "recipe.yaml"
    try:
        return load_recipe(path)
    except Exception as err:  # RecipeError, a YAML parse error, an unreadable file
        raise CheckpointError(f"checkpoint: {path} is unreadable or not a valid recipe ({reason(err)})") from None


def read_checkpoint(path) -> tuple[Recipe, dict, dict, dict]:
    """(recipe, model state, train state, trainer info) of one checkpoint directory, every file read and
    its keys checked before the caller applies any of it."""
    path = Path(path)
    _check_files(path)
    recipe = read_recipe(path)
    model_state = read_model_state(path)
    state, info = read_train_state(path)
    for name, have, keys in (("state.pt", state, ("optimizer", "scheduler", "rng")),
                             ("trainer.json", info, ("step", "tokens", "python_rng"))):
        lacking = [k for k in keys if not isinstance(have, dict) or k not in have]
        if lacking:
            raise CheckpointError(f"checkpoint: {path / name} lacks {', '.join(map(repr, lacking))}")
    return recipe, model_state, state, info


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _model_fields(saved: Recipe, current: Recipe) -> tuple:
    """(saved's model fields, current's, the keys that differ, shallowest first), flattened to dotted keys."""
    a, b = _flatten(saved.to_dict()["model"]), _flatten(current.to_dict()["model"])
    return a, b, sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k)), key=lambda k: (k.count("."), k))


def model_differences(saved: Recipe, current: Recipe) -> list:
    """['model.<field>: saved -> current', ...] for each model setting that differs, shallowest first; a block
    only one side has (a new pattern letter) is one entry: "model.blocks.S: added (type 'swa')" or "removed"."""
    a, b, diff = _model_fields(saved, current)
    old, new = (r.to_dict()["model"]["blocks"] for r in (saved, current))
    out, whole = [], set()
    for k in diff:
        parts = k.split(".")
        name = parts[1] if parts[0] == "blocks" else None
        if name is None or (name in old) == (name in new):
            out.append(f"model.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif name not in whole:
            whole.add(name)
            out.append(f"model.blocks.{name}: " + (f"added (type {new[name]['type']!r})" if name in new else "removed"))
    return out


def init_weights(source, recipe: Recipe, load) -> tuple:
    """A fine-tune's start: `load(state)` the model weights of checkpoint `source` into a model of `recipe`.
    (path, differences): the recipes may differ in settings that hold no weights (a RoPE base, a window, a query
    scale: context extension), returned as `model_differences`; a model whose weights do not fit is refused,
    naming the first setting that differs."""
    path = resolve_checkpoint(source)
    saved = read_recipe(path)
    diff = model_differences(saved, recipe)
    try:
        load(read_model_state(path))
    except (RuntimeError, ValueError, KeyError) as err:
        check_same_model(saved, recipe, path)
        raise CheckpointError(f"checkpoint: {path} does not fit this model ({reason(err)})") from None
    return path, diff


def check_same_model(saved: Recipe, current: Recipe, path) -> None:
    a, b, diff = _model_fields(saved, current)
    if diff:
        k = diff[0]  # the shallowest difference is usually the cause of the others
        raise CheckpointError(f"checkpoint: {path} was trained with another model (recipe {saved.name!r}); "
                              f"model.{k} differs: checkpoint {a.get(k)!r} vs recipe {b.get(k)!r}"
                              + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""))


def load_checkpoint(path, device=None, recipe: Recipe | None = None):
    """Load a checkpoint (or a run's newest one) into a fresh ZooLM ready for evaluation. `recipe`: build the model
    from it instead of the checkpoint's own (settings that hold no weights may differ: a window, a RoPE base, layers
    re-typed as sliding-window attention); weights that do not fit are refused naming the first differing field."""
    from zoo.model import ZooLM  # train -> model, never the other way

    if recipe is not None:
        model = ZooLM(recipe)
        init_weights(path, recipe, model.load_state_dict)
        return model.to(device) if device is not None else model
    path = resolve_checkpoint(path)
    recipe = read_recipe(path)
    model = ZooLM(recipe)
    state = read_model_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint: {path} does not fit its recipe (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model.to(device) if device is not None else model
