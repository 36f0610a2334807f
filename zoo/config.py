"""Recipes: YAML files (OmegaConf) that compose a model layer by layer.

    model.pattern "MMMMMT" + model.blocks {M: {type: mamba2, ...}, T: {type: taipan, ...}}
    -> one LayerSpec per layer: block type, validated block config, feed-forward config.

Every error names the field path, the bad value and what is allowed. Unknown keys are errors. No field
names a Python import path, so loading a recipe can never run arbitrary code.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from zoo.blocks.ffn import FFN_TYPES, FfnConfig
from zoo.ops.dispatch import check_kernels
from zoo.registry import get_block, list_blocks, unknown_name_message


RECIPE_SUFFIXES = (".yaml", ".yml")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class RecipeError(ValueError):
    """A recipe that cannot be built; the message starts with the offending field's path."""


@dataclass
class ModelConfig:
    d_model: int = 256
    n_layers: int = 4
    vocab_size: int = 256
    pattern: str = "A"
    blocks: Dict[str, Any] = field(default_factory=dict)   # letter -> {type: <block>, ...fields, ffn?}
    ffn: FfnConfig = field(default_factory=FfnConfig)       # default after every mixer
    norm_eps: float = 1e-5
    zero_centred_norm: bool = False    # every layer and final RMSNorm scales by 1 + w, w from 0 (Qwen3-Next)
    # Untied by default: in a small, shallow model the residual stream at init is mostly the token's own
    # embedding, so a tied head gives that token a logit ~d_model*init_std above the rest (initial loss
    # ~0.35 nats above ln V for plain Mamba at d_model 256).
    tie_embeddings: bool = False
    # A bias in the LM head, started at the log unigram frequencies of the training tokens (ZooLM.init_head_bias;
    # the trainer sets it on a fresh run). Without one, a byte vocabulary's unused tokens are suppressed through a
    # direction of the residual stream the whole stack shares, which holds back the induction head's phase change
    # (docs/long-context.md: a 2-layer toy on 64 of 256 ids copies by step 1,250 with it, not by 2,000 without).
    head_bias: bool = False
    init_std: float = 0.02
    # Granite's multipliers (muP-style; issue 19): x = embed(ids) * embedding_multiplier; each mixer's and
    # FFN's output is scaled by residual_multiplier before its residual add; logits = lm_head(h) / logits_divisor
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    logit_softcap: Optional[float] = None   # logits = cap * tanh(logits / cap) (Gemma 2, RecurrentGemma: 30); null: none
    # op -> implementation, e.g. {ssd: triton}; ops left out choose by device (zoo.ops.dispatch)
    kernels: Dict[str, str] = field(default_factory=dict)
    # name -> a transformer block whose weights every layer naming it (`shared: <name>` beside a block's type)
    # uses (Zamba2's shared attention + MLP, zoo.blocks.shared): fields of zoo.blocks.shared.SharedBlockConfig
    shared_blocks: Dict[str, Any] = field(default_factory=dict)
    VALIDATED_APART = ("blocks", "shared_blocks")   # not fields: each is checked by its own config class

    def __post_init__(self):
        _positive(self, "d_model", "n_layers", "init_std", "norm_eps", "embedding_multiplier", "residual_multiplier",
                  "logits_divisor")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {self.vocab_size}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap: must be null (no cap) or > 0, got {self.logit_softcap}")
        check_kernels(self.kernels)


@dataclass
class SeqLenStage:
    """One stage of a short-to-long schedule: `seq_len` tokens per row until `until` x max_steps."""
    seq_len: int = 512
    until: float = 0.5


@dataclass
class Repeats:
    """Long-range repeats in the training rows (zoo.data.repeats): in `fraction` of the rows `count` spans of
    span[0]..span[1] tokens are each copied distance[0]..distance[1] tokens further on. 0 leaves the data as it is."""
    fraction: float = 0.0
    count: int = 1
    span: List[int] = field(default_factory=lambda: [32, 256])
    distance: List[int] = field(default_factory=lambda: [1024, 4096])
    # text: the row's own span; random: a random string of lowercase words first written there; bytes: of printable
    # bytes (zoo.data.repeats)
    source: str = "text"

    def check(self, seq_len: int):
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"repeats.fraction: must be in [0, 1], got {self.fraction}")
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ValueError(f"repeats.count: must be a positive integer, got {self.count!r}")
        for name in ("span", "distance"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"repeats.{name}: must be [low, high] with 1 <= low <= high, got {list(lo_hi)}")
        if self.source not in ("text", "random", "bytes"):
            raise ValueError(f"repeats.source: {self.source!r}; allowed: text, random, bytes")
        if self.fraction and self.span[0] + self.distance[0] > seq_len:
            raise ValueError(f"repeats: span[0] + distance[0] = {self.span[0] + self.distance[0]} tokens do not fit "
                             f"train.seq_len {seq_len}; no row could hold a repeat")


@dataclass
class TrainConfig:
    seq_len: int = 512                 # the training length (the last stage of seq_len_schedule, and evaluation's)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # 0 disables clipping
    max_steps: int = 1000
    warmup_steps: int = 100
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    corpus: str = "stdlib"
    corpus_field: str = "text"        # the text column of a .jsonl, Parquet or `datasets` corpus
    tokenizer: str = "byte"
    cross_doc: bool = True             # False: packed documents see neither each other's tokens nor state
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    cp_layout: str = "zigzag"          # context parallel: which chunks each rank holds (zoo.distributed)
    # Short to long (sequence length warm-up, as in GrowLength or Llama 3's staged context): each stage
    # trains at its shorter seq_len until `until` x max_steps, then the next; after the last, train.seq_len.
    # A stage's rows are batch_size x seq_len / stage seq_len, so every step holds the same tokens and the
    # learning-rate schedule and token budget do not depend on the stages.
    seq_len_schedule: List[SeqLenStage] = field(default_factory=list)
    repeats: Repeats = field(default_factory=Repeats)

    def __post_init__(self):
        if self.cp_layout not in ("contiguous", "zigzag"):
            raise ValueError(f"cp_layout: must be one of contiguous, zigzag, got {self.cp_layout!r}")
        _positive(self, "seq_len", "batch_size", "grad_accum", "lr", "max_steps", "eval_every",
                  "eval_batches", "save_every", "keep_last", "log_every")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps: must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay / grad_clip: must be >= 0")
        self._check_schedule()
        if isinstance(self.repeats, dict):   # a plain dict from Python rather than from a YAML file
            self.repeats = Repeats(**self.repeats)
        self.repeats.check(self.seq_len)

    def _check_schedule(self):
        prev_len, prev_until = 0, 0.0
        for i, stage in enumerate(self.seq_len_schedule):
            where = f"seq_len_schedule[{i}]"
            if isinstance(stage, dict):   # a plain dict from Python rather than from a YAML file
                stage = self.seq_len_schedule[i] = SeqLenStage(**stage)
            n, until = stage.seq_len, stage.until
            if not isinstance(n, int) or isinstance(n, bool) or not prev_len < n < self.seq_len:
                raise ValueError(f"{where}.seq_len: must be an integer above the previous stage's {prev_len} and "
                                 f"below train.seq_len {self.seq_len} (stages run short to long), got {n!r}")
            if self.seq_len % n:
                raise ValueError(f"{where}.seq_len: {n} does not divide train.seq_len {self.seq_len} (a stage's rows "
                                 f"are batch_size x seq_len / {n}, so that every step holds the same tokens)")
            if not prev_until < until < 1:
                raise ValueError(f"{where}.until: must be a fraction of max_steps in ({prev_until}, 1), "
                                 f"increasing over the stages, got {until!r}")
            prev_len, prev_until = n, until

    def shape_at(self, step: int) -> tuple:
        """(rows, seq_len) of the micro-batches of optimizer step `step` (0-based) under seq_len_schedule."""
        for stage in self.seq_len_schedule:
            if step < round(stage.until * self.max_steps):   # round: 0.3 * 1000 is 300.00000000000006
                return self.batch_size * (self.seq_len // stage.seq_len), stage.seq_len
        return self.batch_size, self.seq_len

    def shapes(self) -> list:
        """Every (rows, seq_len) the schedule trains at, short to long."""
        return [(self.batch_size * (self.seq_len // s.seq_len), s.seq_len) for s in self.seq_len_schedule] + [
            (self.batch_size, self.seq_len)]


@dataclass
class RecipeSchema:
    """The top level of a recipe file (besides `extends:`, resolved before validation)."""
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


NORM_POSITIONS = ("pre", "post", "normed")


@dataclass
class LayerSpec:
    letter: str
    type: str
    cfg: Any              # the block's config dataclass instance
    ffn: FfnConfig
    # recipe key `norm_position` (block configs have fields named `norm`): "pre": x + mixer(norm(x)),
    # x + ffn(norm(x)), the default; "post": x + norm(mixer(x)), x + norm(ffn(x)) (OLMo 2 / OLMo-Hybrid attention);
    # "normed": the residual is the normed input, scaled: a norm(x) + b mixer(norm(x)), then the same around the
    # FFN, with (a, b, a_ffn, b_ffn) the recipe key `residual_scale` (MiniMax's alpha and beta factors)
    norm_position: str = "pre"
    residual_scale: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    # recipe key `shared`: the name of a model.shared_blocks entry this layer applies before its mixer (Zamba2's
    # hybrid layer: x + mixer(norm(x + proj(shared(concat(x, embeddings)))))); None: none
    shared: Optional[str] = None


@dataclass
class SharedSpec:
    """A model.shared_blocks entry: its name, validated config (zoo.blocks.shared.SharedBlockConfig) and FFN."""
    name: str
    cfg: Any
    ffn: FfnConfig


@dataclass
class Recipe:
    name: str
    model: ModelConfig
    train: TrainConfig
    layers: List[LayerSpec]
    source: Optional[str] = None
    shared: Dict[str, SharedSpec] = field(default_factory=dict)   # model.shared_blocks, validated

    def to_dict(self) -> dict:
        """The resolved recipe (extends and overrides applied), loadable again by `load_recipe`."""
        d = {"name": self.name, "model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}
        for key in ("blocks", "shared_blocks"):
            for name, spec in d["model"][key].items():
                d["model"][key][name] = dict(spec)
        return d

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ValueError(f"{name}: must be > 0, got {value}")


def _reraise(prefix: str, err: Exception):
    """Turn an OmegaConf or __post_init__ error into a RecipeError that starts with the field path."""
    join = (lambda k: f"{prefix}.{k}" if prefix else str(k))
    if isinstance(err, ConfigKeyError):
        key = err.full_key or err.key
        allowed = ""
        if err.object_type is not None and dataclasses.is_dataclass(err.object_type):
            allowed = f" (allowed: {', '.join(f.name for f in dataclasses.fields(err.object_type))})"
        # {seq_len:1024} in a dotlist is one key "seq_len:1024" to OmegaConf's grammar, not seq_len = 1024
        hint = (f"; in an inline mapping write a space after the colon ({str(key).replace(':', ': ', 1)})"
                if ":" in str(key) else "")
        raise RecipeError(f"{join(key)}: unknown key{allowed}{hint}") from None
    if isinstance(err, OmegaConfBaseException):
        msg = (err.msg or str(err)).split("\n")[0]
        raise RecipeError(f"{join(err.full_key or err.key)}: {msg}") from None
    raise RecipeError(f"{join(str(err))}" if prefix else str(err)) from None


def _structured(cls, data, prefix: str):
    """Validate `data` against dataclass `cls` (types, unknown keys, finite floats, __post_init__)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data)
        values = OmegaConf.to_container(merged, resolve=True)
        for key in getattr(cls, "VALIDATED_APART", ()):
            values.pop(key, None)
        _check_finite(values, getattr(cls, "UNBOUNDED", ()))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        _reraise(prefix, err)


def _leaves(value, path: str = ""):
    """(path, value) of every non-container value of a plain config (dicts and lists walked), the path in the
    recipe's own spelling: `model.blocks.A.scale`, `train.seq_len_schedule[0].until`."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        yield path, value
        return
    for key, v in items:
        yield from _leaves(v, (f"{path}.{key}" if path else str(key)) if isinstance(key, str) else f"{path}[{key}]")


def _check_finite(values: dict, unbounded=()):
    """Every float of a config, nested ones included, is a finite number: inf or nan in a multiplier trains
    to the end learning nothing, or fails at step 0 far from the field that caused it. A config class lists in
    `UNBOUNDED` the fields whose +inf means "no bound" (Mamba's dt_limit); nan is never a value."""
    for path, value in _leaves(values):
        if isinstance(value, float) and not math.isfinite(value) and not (
                value == math.inf and re.split(r"[.\[]", path)[0] in unbounded):
            raise ValueError(f"{path}: must be a finite number, got {value}")   # _reraise puts the prefix before it


def _load_raw(path: Path, seen: tuple = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p.name) for p in (*seen, path))
        raise RecipeError(f"extends: cycle {chain}")
    if seen and path.suffix not in RECIPE_SUFFIXES:
        # a recipe extends recipes: never another kind of file, whose content an error would otherwise echo
        raise RecipeError(f"extends: {path} (in {seen[-1]}) is not a recipe file; allowed: a file ending in "
                          f"{' or '.join(RECIPE_SUFFIXES)}")
    if not path.is_file():
        where = f" (extended from {seen[-1]})" if seen else ""
        raise RecipeError(f"recipe file not found: {path}{where}")
    try:
        raw = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        raise RecipeError(_yaml_error(path, err)) from None
    except (UnicodeDecodeError, yaml.YAMLError):
        raise RecipeError(f"{path}: not a UTF-8 YAML text file (a recipe is YAML)") from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"{path}: a recipe is a mapping with keys name, extends, model, train")
    if not raw:
        raise RecipeError(f"{path}: empty recipe file (expected a mapping with keys name, extends, model, train)")
    _check_no_resolvers(OmegaConf.to_container(raw, resolve=False), f"{path}: ")
    # A file without its own name is named after itself, not after the file it extends, so two recipes
    # extending one base never share runs/<name>.
    own_name = "name" in raw
    if "extends" in raw:
        base = _load_raw(path.parent / str(raw.extends), (*seen, path))
        raw = OmegaConf.merge(base, {k: v for k, v in raw.items() if k != "extends"})
    if not own_name and not seen:
        raw.name = path.stem
    return raw


def _check_no_resolvers(raw: dict, where: str = ""):
    """A resolver call (${oc.env:HOME}) would read the environment into the recipe, and from there into run names
    and checkpoints: refused wherever it appears (`where`: the file, as the error's prefix)."""
    for path, value in _leaves(raw):
        if isinstance(value, str) and re.search(r"\$\{[^}]*:", value):
            raise RecipeError(f"{where}{path or 'recipe'}: {value!r} calls an OmegaConf resolver; recipes do not read "
                              "the environment or run resolvers: write the value itself")


def _yaml_error(path: Path, err) -> str:
    """One line from PyYAML's multi-line message: where the parser stopped, what it found, and where the
    construct it was reading began."""
    mark = err.problem_mark or err.context_mark
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(str(err.problem or err.context or "invalid YAML").split())
    context = ""
    if err.context and err.problem and err.context_mark is not None:
        context = f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
    return f"{where}: YAML syntax error: {problem}{context}"


def _ffn_config(default: FfnConfig, override, path: str) -> FfnConfig:
    if override is None:
        return default
    if isinstance(override, str):
        override = {"type": override}
    if not isinstance(override, (dict, DictConfig)):
        raise RecipeError(f"{path}: expected a feed-forward type ({', '.join(FFN_TYPES)}) or a mapping, got {override!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(default), override)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        _reraise(path, err)
    return _structured(FfnConfig, merged, path)


def _shared_spec(name: str, spec, model: ModelConfig, seq_len: int) -> SharedSpec:
    from zoo.blocks.shared.config import SharedBlockConfig   # the family imports zoo.blocks.ffn, as this module
    path = f"model.shared_blocks.{name}"
    if not isinstance(spec, (dict, DictConfig)):
        raise RecipeError(f"{path}: expected a mapping of attention fields, got {spec!r}")
    spec = dict(spec)
    ffn = _ffn_config(model.ffn, spec.pop("ffn", None), f"{path}.ffn")
    cfg = _structured(SharedBlockConfig, spec, path)
    try:
        cfg.check(d_model=model.d_model, seq_len=seq_len, ffn=ffn)
    except ValueError as err:
        raise RecipeError(f"{path}.{err}") from None
    return SharedSpec(name, cfg, ffn)


def _layer_spec(letter: str, spec, model: ModelConfig, seq_len: int) -> LayerSpec:
    path = f"model.blocks.{letter}"
    if not isinstance(spec, (dict, DictConfig)):
        raise RecipeError(f"{path}: expected a mapping with a 'type' key, got {spec!r}")
    spec = dict(spec)
    shared = spec.pop("shared", None)
    if shared is not None and str(shared) not in model.shared_blocks:
        defined = ", ".join(sorted(map(str, model.shared_blocks))) or "none"
        raise RecipeError(f"{path}.shared: {shared!r} is not in model.shared_blocks (defined: {defined})")
    block_type = spec.pop("type", None)
    if block_type is None:
        raise RecipeError(f"{path}.type: missing (known: {', '.join(list_blocks())})")
    try:
        entry = get_block(str(block_type))
    except KeyError:
        raise RecipeError(f"{path}.type: " + unknown_name_message("block", block_type, list_blocks())) from None
    ffn = _ffn_config(model.ffn, spec.pop("ffn", None), f"{path}.ffn")
    norm = spec.pop("norm_position", "pre")
    if norm not in NORM_POSITIONS:
        raise RecipeError(f"{path}.norm_position: {norm!r}; allowed: {', '.join(NORM_POSITIONS)} (where the "
                          f"layer's norms sit: before the mixer and the FFN, after them, or before them with the "
                          f"normed input as the residual)")
    scale = spec.pop("residual_scale", None)
    if scale is not None:
        try:
            scale = tuple(float(v) for v in scale)
        except (TypeError, ValueError):
            scale = ()
        if len(scale) != 4:
            raise RecipeError(f"{path}.residual_scale: expected four numbers [a, b, a_ffn, b_ffn], got "
                              f"{spec.get('residual_scale', scale)!r}")
        if norm != "normed":
            raise RecipeError(f"{path}.residual_scale: scales the residual of norm_position: normed, not {norm!r}")
    if norm == "normed" and model.residual_multiplier != 1:
        raise RecipeError(f"{path}.norm_position: normed scales its terms by residual_scale; model.residual_multiplier "
                          f"must stay 1, got {model.residual_multiplier}")
    cfg = _structured(entry.config, spec, path)
    if hasattr(cfg, "check"):
        try:
            cfg.check(d_model=model.d_model, seq_len=seq_len)
        except ValueError as err:
            raise RecipeError(f"{path}.{err}") from None
    if shared is not None and (norm != "pre" or entry.cls.passthrough):
        raise RecipeError(f"{path}.shared: a shared block feeds the input of a mixer with its norm before it "
                          f"(norm_position: pre), not {'no mixer' if entry.cls.passthrough else repr(norm)}")
    return LayerSpec(letter, str(block_type), cfg, ffn, norm, scale or (1.0, 1.0, 1.0, 1.0),
                     None if shared is None else str(shared))


def _expand_pattern(model: ModelConfig) -> List[str]:
    pattern = model.pattern.replace(" ", "")
    if not pattern:
        raise RecipeError("model.pattern: empty (one letter per layer, tiled over model.n_layers)")
    if model.n_layers % len(pattern):
        raise RecipeError(f"model.pattern: length {len(pattern)} of {pattern!r} does not divide "
                          f"model.n_layers {model.n_layers}")
    letters = list(pattern) * (model.n_layers // len(pattern))
    for i, letter in enumerate(letters):
        if letter not in model.blocks:
            raise RecipeError(f"model.pattern: letter {letter!r} at layer {i} has no entry in model.blocks "
                              f"(defined: {', '.join(sorted(model.blocks)) or 'none'})")
    return letters


def recipe_from_config(raw, source: Optional[str] = None) -> Recipe:
    """Validate an already merged config (a dict or DictConfig) into a Recipe."""
    raw = OmegaConf.create(raw) if not isinstance(raw, DictConfig) else raw
    allowed = [f.name for f in dataclasses.fields(RecipeSchema)]
    for key in raw:
        if key not in allowed:
            shown = str(key) if len(str(key)) <= 40 else str(key)[:40] + "..."
            raise RecipeError(f"{shown!r}: unknown key (allowed: {', '.join(allowed)})")
    _check_no_resolvers(OmegaConf.to_container(raw, resolve=False), "")
    model_raw = raw.get("model") or {}
    if "ffn" in model_raw:  # validated on its own first so its errors carry the path model.ffn.*
        _structured(FfnConfig, model_raw["ffn"], "model.ffn")
    model = _structured(ModelConfig, model_raw, "model")
    train = _structured(TrainConfig, raw.get("train") or {}, "train")
    name = raw.get("name") or ""
    if not isinstance(name, str):
        raise RecipeError(f"name: expected a string, got {name!r}")
    if name and (not RUN_NAME.fullmatch(name) or ".." in name):
        # the name becomes runs/<name> and the checkpoints' directory: a path would write anywhere
        raise RecipeError(f"name: {name!r} is not a run name; allowed: letters, digits and . _ + - (no path "
                          "separators, no '..'), starting with a letter or digit")
    # Every defined letter is validated, used by the pattern or not: a typo in a spare block (one a
    # recipe extending this one may switch on) fails here, not in someone else's run.
    for letter in model.blocks:
        if len(str(letter)) != 1 or str(letter).isspace():
            raise RecipeError(f"model.blocks.{letter}: a block letter is one non-space character, got {letter!r} "
                              f"(model.pattern names one letter per layer)")
    shared = {str(name): _shared_spec(str(name), spec, model, train.seq_len)
              for name, spec in model.shared_blocks.items()}
    layers_by_letter = {letter: _layer_spec(letter, spec, model, train.seq_len) for letter, spec in model.blocks.items()}
    letters = _expand_pattern(model)
    layers = [layers_by_letter[letter] for letter in letters]
    # Keep the used block specs as plain, fully-defaulted dicts so to_yaml() round-trips (and describes
    # the model built, as checkpoints' recipe.yaml always has).
    model.blocks = {letter: {"type": s.type, **dataclasses.asdict(s.cfg), "ffn": dataclasses.asdict(s.ffn),
                             **({"norm_position": s.norm_position} if s.norm_position != "pre" else {}),
                             **({"residual_scale": list(s.residual_scale)} if s.norm_position == "normed" else {}),
                             **({"shared": s.shared} if s.shared is not None else {})}
                    for letter, s in layers_by_letter.items() if letter in letters}
    model.shared_blocks = {name: {**dataclasses.asdict(s.cfg), "ffn": dataclasses.asdict(s.ffn)}
                           for name, s in shared.items()}
    return Recipe(name or "recipe", model, train, layers, source, shared)


def load_recipe(path: Union[str, Path, dict, DictConfig], overrides=()) -> Recipe:
    """Load a recipe file (or mapping), apply `extends:` and dotlist overrides ("model.d_model=128")."""
    if isinstance(path, (dict, DictConfig)):
        raw, source = OmegaConf.create(path), None
    else:
        raw, source = _load_raw(Path(path)), str(path)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise RecipeError(f"overrides: expected key=value (e.g. model.d_model=128), got {bad[0]!r}")
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    return recipe_from_config(raw, source)
