"""What a recipe's model will take in memory, estimated before anything is allocated, and the refusal of a
model that cannot fit (`model.d_model=1000000` would otherwise try to allocate terabytes).

    check_memory(recipe)                      # RecipeError naming the field and the estimate, or None
    estimate_memory(recipe, training=True)    # MemoryEstimate: weights, gradients + AdamW, activations
    with memory_cap("64GiB"): ...             # the cap for every ZooLM built inside (load_checkpoint, ...)

The cap is the memory available on the device (CPU: MemAvailable; CUDA: free memory) unless `max_memory`
says otherwise; `max_memory="inf"` turns the check off.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

import torch

from zoo.blocks.shared import SharedBlock
from zoo.config import Recipe, RecipeError
from zoo.layer import ZooLayer

# What backward keeps is measured per layer, not assumed: one layer of each pattern letter runs PROBE_TOKENS
# tokens forward on the CPU under torch.autograd.graph.saved_tensors_hooks, and its saved bytes (each storage
# once) scale with the tokens. Linear in the length for every shipped layer (256, 1,024 and 2,048 tokens agree
# to 5%); per d_model channel they range from 5 (nemotron-h's attention) to 118 float32 values a token (kimi-
# linear's KDA layer): a delta-rule layer, RG-LRU or a shared block's use keeps 2-7x a transformer layer (16).
PROBE_TOKENS = 512
# Read at 4x the probe's length a layer keeps up to 2% more a token (taipan's, mamba's): the probe's figure is
# raised by this much.
PROBE_MARGIN = 1.05
# A layer whose weights alone pass this is not built to be probed; ACTIVATION_VALUES_PER_CHANNEL bounds it.
PROBE_WEIGHT_LIMIT = 256 * 2**20
# The bound where no probe runs (and in the rough pre-check): above every shipped layer's 118, rounded up.
ACTIVATION_VALUES_PER_CHANNEL = 128
# Per token the model also keeps its embedding output and final norm's input (2 d_model values) and, for the
# loss, the logits, their float32 log-softmax and its gradient.
MODEL_VALUES_PER_CHANNEL = 2
LOGIT_COPIES = 3
# A generous bound on one layer's parameters in units of d_model^2 (attention ~4, a SwiGLU FFN of mult 4
# ~12, a Mamba mixer of expand 2 ~6): models whose bound is far below the cap skip the exact count, which
# builds each kind of layer on the meta device. Meta-device arithmetic imports torch's Python meta kernels
# on first use (~2.5 s here), too slow for every small model a test builds.
_ROUGH_PARAMS_PER_LAYER = 64
_ROUGH_MARGIN = 8

_CAP: contextvars.ContextVar = contextvars.ContextVar("zoo_max_memory", default=None)


@dataclass
class MemoryEstimate:
    params: int                  # parameters (the tied LM head counted once)
    weight_bytes: int            # parameters and buffers
    dtype: torch.dtype
    optimizer_bytes: int = 0     # training: gradients and AdamW's two moments
    activation_bytes: int = 0    # training: what backward keeps (each layer probed: PROBE_TOKENS)
    batch_size: int = 0
    seq_len: int = 0

    @property
    def total(self) -> int:
        return self.weight_bytes + self.optimizer_bytes + self.activation_bytes

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [f"{gib(self.weight_bytes)} of weights: {self.params:,} parameters in {dtype}"]
        if self.optimizer_bytes:
            parts.append(f"{gib(self.optimizer_bytes)} of gradients and AdamW state")
        if self.activation_bytes:
            parts.append(f"{gib(self.activation_bytes)} of activations at train.batch_size {self.batch_size} "
                         f"x train.seq_len {self.seq_len}")
        return f"{gib(self.total)} ({'; '.join(parts)})"


def gib(n: float) -> str:
    """GiB to one decimal; parts below 0.1 GiB in MiB (or KiB) so that they do not read as zero."""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB")):
        if n >= scale / 10:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def parse_memory(value: Union[None, int, float, str], name: str = "max_memory") -> Optional[float]:
    """Bytes from an int / float, or a string such as "64GiB", "512MB", "1.5e9" or "inf"; None stays None.
    `name` is the field the error names (a script's `--max-memory`)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        m = re.fullmatch(r"\s*([0-9.eE+-]+|inf)\s*([KMGT]i?B?|B)?\s*", str(value), flags=re.IGNORECASE)
        units = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
                 "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
        try:
            number = float(m.group(1)) * units[(m.group(2) or "").lower().removesuffix("b")] if m else None
        except ValueError:
            number = None
        if number is None:
            raise RecipeError(f"{name}: expected bytes or a size such as 64GiB, 512MB or inf, got {value!r}")
    if number is not None and not number > 0:
        raise RecipeError(f"{name}: must be > 0 (inf turns the check off), got {value!r}")
    return number


@contextlib.contextmanager
def memory_cap(max_memory):
    """Every ZooLM built inside is checked against `max_memory` (see parse_memory) rather than the memory
    available: the way through for code that builds the model for you (zoo.load_checkpoint, Trainer,
    from_pretrained). None leaves the cap as it is."""
    token = _CAP.set(parse_memory(max_memory) if max_memory is not None else _CAP.get())
    try:
        yield
    finally:
        _CAP.reset(token)


def available_memory(device=None) -> Optional[tuple[int, str]]:
    """(bytes, where they were read) free for new tensors on `device`, or None where unknown."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    if device.type != "cpu":
        return None
    try:
        import psutil
        return psutil.virtual_memory().available, "available on cpu"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available on cpu (MemAvailable)"
    except OSError:
        pass
    return None


def estimate_memory(recipe: Recipe, training: bool = False, batch_size: Optional[int] = None,
                    seq_len: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> MemoryEstimate:
    """Weights counted exactly (one layer of each pattern letter built on the meta device); with `training`,
    gradients and AdamW's two moments (three more copies) and activations for a batch of `batch_size` x
    `seq_len` tokens (default: the recipe's train.batch_size and train.seq_len)."""
    dtype = dtype or torch.get_default_dtype()
    params, weight_bytes, layer_params = _count_weights(recipe, dtype)
    est = MemoryEstimate(params, weight_bytes, dtype)
    if training:
        est.batch_size = batch_size or recipe.train.batch_size
        est.seq_len = seq_len or recipe.train.seq_len
        est.optimizer_bytes = 3 * params * dtype.itemsize
        est.activation_bytes = _activation_bytes(recipe, est.batch_size, est.seq_len, layer_params)
    return est


def check_memory(recipe: Recipe, max_memory=None, device=None, training: bool = False,
                 batch_size: Optional[int] = None, seq_len: Optional[int] = None) -> Optional[MemoryEstimate]:
    """Raise RecipeError if the estimate exceeds `max_memory` (see parse_memory; default: the cap set by
    memory_cap, else the memory available on `device`). Returns the estimate when one was made."""
    cap = parse_memory(max_memory) if max_memory is not None else _CAP.get()
    where = "max_memory cap"
    if cap is None:
        available = available_memory(device)
        if available is None:
            return None
        cap, where = available
    if math.isinf(cap):
        return None
    if _rough_bytes(recipe, training, batch_size, seq_len) * _ROUGH_MARGIN < cap:
        return None
    est = estimate_memory(recipe, training, batch_size, seq_len)
    if est.total > cap:
        raise RecipeError(_too_large(recipe, est, cap, where))
    return est


def _too_large(recipe: Recipe, est: MemoryEstimate, cap: float, where: str) -> str:
    m = recipe.model
    embedding = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) * est.dtype.itemsize
    if est.activation_bytes > est.weight_bytes + est.optimizer_bytes:
        field, value = "train.batch_size", f"{est.batch_size} x train.seq_len {est.seq_len}"
    elif 2 * embedding > est.weight_bytes:
        field, value = "model.vocab_size", f"{m.vocab_size} (with model.d_model {m.d_model})"
    else:
        field, value = "model.d_model", f"{m.d_model} (with model.n_layers {m.n_layers}, model.vocab_size {m.vocab_size})"
    return (f"{field}: {value} needs an estimated {est.describe()}, more than the {gib(cap)} {where}; "
            f"allowed: at most that, or a higher max_memory (scripts: --max-memory 64GiB; inf skips the check)")


def _count_weights(recipe: Recipe, dtype: torch.dtype) -> tuple[int, int, dict]:
    """(parameters, bytes of parameters and buffers, {letter: one such layer's parameters, its shared block's
    included})."""
    m = recipe.model
    size = dtype.itemsize
    params = (m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model   # embedding, head, final norm
              + m.vocab_size * m.head_bias)
    nbytes = params * size
    counts = Counter(spec.letter for spec in recipe.layers)
    first = _first_layers(recipe)
    letter_params = {}
    with torch.device("meta"):
        shared = {name: SharedBlock(m.d_model, spec, m.norm_eps) for name, spec in recipe.shared.items()}
        shared_params = {name: sum(p.numel() for p in block.parameters()) for name, block in shared.items()}
        params += sum(shared_params.values())   # once each, however many layers use it
        nbytes += sum(shared_params.values()) * size
        for letter, n in counts.items():
            spec = recipe.layers[first[letter]]
            layer = ZooLayer(m.d_model, spec, first[letter], m.norm_eps, shared_blocks=shared)
            layer_params = sum(p.numel() for p in layer.parameters())
            params += n * layer_params
            nbytes += n * (layer_params * size + sum(b.numel() * b.element_size() for b in layer.buffers()))
            letter_params[letter] = layer_params + shared_params.get(spec.shared, 0)
    return params, nbytes, letter_params


def _first_layers(recipe: Recipe) -> dict:
    """{pattern letter: the index of its first layer}."""
    first = {}
    for i, spec in enumerate(recipe.layers):
        first.setdefault(spec.letter, i)
    return first


def _activation_bytes(recipe: Recipe, batch_size: int, seq_len: int, layer_params: dict) -> int:
    m = recipe.model
    per_layer = _layer_activation_bytes(recipe, layer_params)       # bytes a token, by layer
    if recipe.train.activation_checkpointing:
        # checkpointed layers keep only their inputs; one layer at a time is recomputed in backward
        layers = len(per_layer) * m.d_model * 4 + max(per_layer)
    else:
        layers = sum(per_layer)
    return math.ceil(batch_size * seq_len * (layers + 4 * _model_values(m)))


def _model_values(m) -> int:
    """Float32 values a token the model keeps outside its layers (MODEL_VALUES_PER_CHANNEL, LOGIT_COPIES)."""
    return MODEL_VALUES_PER_CHANNEL * m.d_model + LOGIT_COPIES * m.vocab_size


def _layer_activation_bytes(recipe: Recipe, layer_params: dict) -> list[float]:
    """Bytes backward keeps a token for each layer, probed once per pattern letter (see PROBE_TOKENS); a letter
    whose layer's weights pass PROBE_WEIGHT_LIMIT is not built: ACTIVATION_VALUES_PER_CHANNEL stands for it."""
    m = recipe.model
    key = (repr(recipe.to_dict()), torch.get_default_dtype())
    if key not in _PROBED:
        bound = ACTIVATION_VALUES_PER_CHANNEL * m.d_model * 4
        itemsize = torch.get_default_dtype().itemsize
        # the caller's RNG and device untouched; under no_grad or inference_mode a layer would keep nothing
        with torch.random.fork_rng(devices=[]), torch.device("cpu"), torch.inference_mode(False), torch.enable_grad():
            probed = {letter: bound if layer_params[letter] * itemsize > PROBE_WEIGHT_LIMIT
                      else _probe_layer(recipe, index) for letter, index in _first_layers(recipe).items()}
        if len(_PROBED) >= 64:   # a bounded memo: the trainer asks once per schedule stage, a sweep per recipe
            _PROBED.clear()
        _PROBED[key] = [probed[spec.letter] for spec in recipe.layers]
    return _PROBED[key]


_PROBED: dict = {}


def _probe_layer(recipe: Recipe, index: int) -> float:
    m = recipe.model
    spec = recipe.layers[index]
    tokens = min(PROBE_TOKENS, recipe.train.seq_len)
    shared = {name: SharedBlock(m.d_model, s, m.norm_eps, m.zero_centred_norm)
              for name, s in recipe.shared.items() if name == spec.shared}
    layer = ZooLayer(m.d_model, spec, index, m.norm_eps, residual_multiplier=m.residual_multiplier,
                     zero_centred_norm=m.zero_centred_norm, shared_blocks=shared)
    x = torch.randn(1, tokens, m.d_model, requires_grad=True)
    embeddings = torch.randn(1, tokens, m.d_model) if spec.shared is not None else None
    kept = kept_for_backward(lambda: layer(x, embeddings=embeddings),
                             [p for b in (layer, *shared.values()) for p in b.parameters()])
    return PROBE_MARGIN * kept / tokens


def kept_for_backward(forward, weights=()) -> int:
    """Bytes that `forward()` leaves saved for backward: every saved tensor's storage once (views of one
    storage count it once), the storages of `weights` left out."""
    skip = {t.untyped_storage().data_ptr() for t in weights}
    saved: dict = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        forward()
    return sum(saved.values())


def _rough_bytes(recipe: Recipe, training: bool, batch_size: Optional[int], seq_len: Optional[int]) -> int:
    m = recipe.model
    weights = torch.get_default_dtype().itemsize * (2 * m.vocab_size * m.d_model + m.n_layers * _ROUGH_PARAMS_PER_LAYER * m.d_model ** 2)
    if not training:
        return weights
    tokens = (batch_size or recipe.train.batch_size) * (seq_len or recipe.train.seq_len)
    return 4 * weights + 4 * tokens * (m.n_layers * ACTIVATION_VALUES_PER_CHANNEL * m.d_model + _model_values(m))
