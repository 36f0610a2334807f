"""Throughput and measured memory by context length (issue 7, items 2 and 3).

Throughput, in tokens per second, one model in this process:
- `prefill`: one forward of `batch_size` x `context` tokens through a fresh cache (what a prompt costs);
- `decode`: after a `context`-token prefill, `decode_tokens` single-token steps through the cache
  (generation's steady state at that context; the prefill is not timed);
- `train`: forward + backward of the language-model loss on `batch_size` x `context` tokens (no optimizer
  step: it does not depend on the context, and the training run itself reports whole-step tokens/s).
Every cell times (evals.timing) `repeats` calls after one untimed warm-up call at the same shape (the warm-up takes
allocator growth and one-time kernel selection out of the figure), on two clocks: wall time
(time.perf_counter) and the process's CPU time (time.process_time: all its threads, so with N busy
threads about N x wall). On a shared machine other processes add wall time while this one waits for a
core, but not CPU time, so the CPU clock is the steadier one there; on CUDA it counts only the host's
work, and wall time is the figure. The record keeps every repeat and their min and median on both
clocks (issue 16): the min because other processes only ever add time, the median to show how far one
run strays. `tokens_per_s` stays the best wall figure, as before.

Memory: the `peak_*` functions below are the targets `evals.memory.measure` runs in a fresh process
(a recipe as a plain dict in, JSON out). The peak that `measure` reports includes the weights and
everything torch sets up on its first forward (thread pools, kernels, allocator arenas: ~20 MiB on CPU,
more than the whole cache of a small model), so each function also reports its own figure on CPU,
`run_peak_bytes`: a warm-up forward of a few tokens first, then the peak RSS of the measured run above
the RSS after the warm-up (not reset: `measure`'s figure around it keeps the whole call's peak). That is the
memory the context costs: activations, the cache, gradients.

    recs = throughput(model, contexts=[256, 1024])
    rec = measure("evals.throughput:peak_decode", {"recipe": recipe.to_dict(), "context": 1024}, cap_gb=4)
"""
from __future__ import annotations

import statistics
from typing import Iterable, Sequence

import torch

from evals.memory import PeakMemory
from evals.timing import time_call

KINDS = ("prefill", "decode", "train")
MEMORY_KINDS = {"forward": "peak_forward", "decode": "peak_decode", "train": "peak_train"}


def _check_positive_int(name: str, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def _tokens(model, batch_size: int, length: int, seed: int) -> torch.Tensor:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.recipe.model.vocab_size, (batch_size, length), generator=g).to(p.device)


def _times(fn, repeats: int, device: torch.device, setup=None) -> tuple:
    """([wall seconds], [CPU seconds]) of `repeats` calls of fn after one untimed warm-up call;
    `setup()`, untimed, runs before each call and its result is fn's argument."""
    t = time_call(fn, repeats, setup=setup, device=device)
    return t.wall, t.cpu


def prefill_times(model, context: int, batch_size: int = 1, repeats: int = 2) -> tuple:
    ids = _tokens(model, batch_size, context, 0)

    @torch.no_grad()
    def run():
        model(ids, cache=model.init_cache(batch_size))
    return _times(run, repeats, ids.device)


def decode_times(model, context: int, decode_tokens: int = 32, batch_size: int = 1, repeats: int = 2) -> tuple:
    """`decode_tokens` single-token steps after a `context`-token prefill (not timed)."""
    prompt = _tokens(model, batch_size, context, 0)
    steps = _tokens(model, batch_size, decode_tokens, 1)

    @torch.no_grad()
    def prefill():
        cache = model.init_cache(batch_size)
        model(prompt, cache=cache)
        return cache

    @torch.no_grad()
    def run(cache):
        for t in range(decode_tokens):
            model(steps[:, t:t + 1], cache=cache)
    return _times(run, repeats, prompt.device, setup=prefill)


def train_times(model, context: int, batch_size: int = 1, repeats: int = 2) -> tuple:
    ids = _tokens(model, batch_size, context, 0)

    def run():
        out = model(ids, labels=ids)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        loss.backward()
        model.zero_grad(set_to_none=True)
    was_training = model.training
    model.train()
    try:
        return _times(run, repeats, ids.device)
    finally:
        model.train(was_training)


def prefill_seconds(model, context: int, batch_size: int = 1, repeats: int = 2) -> float:
    return min(prefill_times(model, context, batch_size, repeats)[0])


def decode_seconds(model, context: int, decode_tokens: int = 32, batch_size: int = 1, repeats: int = 2) -> float:
    """Best wall seconds for `decode_tokens` single-token steps after a `context`-token prefill (not timed)."""
    return min(decode_times(model, context, decode_tokens, batch_size, repeats)[0])


def train_seconds(model, context: int, batch_size: int = 1, repeats: int = 2) -> float:
    return min(train_times(model, context, batch_size, repeats)[0])


def throughput(model, contexts: Iterable[int], kinds: Sequence[str] = KINDS, batch_size: int = 1,
               decode_tokens: int = 32, repeats: int = 2) -> list:
    """One record per (kind, context): {"kind", "context", "tokens_per_s", "seconds", "tokens", ...}."""
    contexts = list(contexts)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kinds: {bad[0]!r} is not one of {', '.join(KINDS)}")
    if not contexts:
        raise ValueError("contexts: give at least one context length")
    for c in contexts:
        _check_positive_int("contexts", c)
    for name, v in (("batch_size", batch_size), ("decode_tokens", decode_tokens), ("repeats", repeats)):
        _check_positive_int(name, v)
    was_training = model.training
    model.eval()
    records = []
    try:
        for kind in kinds:
            for context in contexts:
                records.append(throughput_record(model, kind, context, batch_size, decode_tokens, repeats))
    finally:
        model.train(was_training)
    return records


def throughput_record(model, kind: str, context: int, batch_size: int = 1, decode_tokens: int = 32,
                      repeats: int = 2) -> dict:
    """The record of one (kind, context) cell; see `throughput`."""
    _check_positive_int("repeats", repeats)
    if kind == "prefill":
        (wall, cpu), tokens = prefill_times(model, context, batch_size, repeats), batch_size * context
    elif kind == "decode":
        wall, cpu = decode_times(model, context, decode_tokens, batch_size, repeats)
        tokens = batch_size * decode_tokens
    elif kind == "train":
        (wall, cpu), tokens = train_times(model, context, batch_size, repeats), batch_size * context
    else:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    wall_med, cpu_med = statistics.median(wall), statistics.median(cpu)
    # a CPU clock's tick can exceed a tiny call: a zero reads as no figure, not infinitely fast
    per_cpu = (lambda s: tokens / s if s > 0 else None)
    return {"kind": kind, "context": context, "batch_size": batch_size, "tokens": tokens, "seconds": min(wall),
            "tokens_per_s": tokens / min(wall), "repeats": repeats,
            "timing": "best of repeats after a warm-up; wall and process CPU clocks, min and median",
            "decode_tokens": decode_tokens if kind == "decode" else None,
            "wall_seconds": wall, "cpu_seconds": cpu, "wall_median": wall_med, "cpu_min": min(cpu),
            "cpu_median": cpu_med, "tokens_per_s_median": tokens / wall_med,
            "tokens_per_cpu_s": per_cpu(min(cpu)), "tokens_per_cpu_s_median": per_cpu(cpu_med),
            "units": {"tokens_per_s": "tokens/s", "seconds": "s", "wall_seconds": "s", "cpu_seconds": "CPU s",
                      "tokens_per_cpu_s": "tokens per CPU second (all threads)"}}


# -- memory targets for evals.memory.measure (each runs in a fresh process) ------------------------------------

WARMUP_TOKENS = 4


def _model(recipe: dict):
    from zoo.model import build_model
    torch.manual_seed(0)
    model = build_model(recipe)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, weights


def analytic_state_bytes(model, context: int, batch_size: int = 1, dtype=torch.float32) -> int:
    """Sum over layers of the blocks' `state_bytes`: the cache inference holds after `context` tokens."""
    return int(sum(layer.state_bytes(context, batch_size, dtype=dtype) for layer in model.layers))


@torch.no_grad()
def _forward(model, context: int, batch_size: int):
    model.eval()(_tokens(model, batch_size, context, 0))


@torch.no_grad()
def _decode(model, context: int, batch_size: int, decode_tokens: int):
    model.eval()
    cache = model.init_cache(batch_size)
    model(_tokens(model, batch_size, context, 0), cache=cache)
    for t in _tokens(model, batch_size, decode_tokens, 1).unbind(1):
        model(t[:, None], cache=cache)


def _train(model, context: int, batch_size: int):
    ids = _tokens(model, batch_size, context, 0)
    out = model.train()(ids, labels=ids)
    (out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)).backward()


def peak_forward(recipe: dict, context: int, batch_size: int = 1) -> dict:
    """Inference forward of `batch_size` x `context` tokens without a cache (logits of every position)."""
    model, weights = _model(recipe)
    _forward(model, WARMUP_TOKENS, batch_size)
    with PeakMemory(reset=False) as run:
        _forward(model, context, batch_size)
    return {"weights_bytes": weights, "run_peak_bytes": run.bytes}


def peak_decode(recipe: dict, context: int, batch_size: int = 1, decode_tokens: int = 8) -> dict:
    """Prefill of `context` tokens through a cache, then `decode_tokens` single-token steps."""
    model, weights = _model(recipe)
    _decode(model, WARMUP_TOKENS, batch_size, 1)
    with PeakMemory(reset=False) as run:
        _decode(model, context, batch_size, decode_tokens)
    return {"weights_bytes": weights, "run_peak_bytes": run.bytes,
            "state_bytes": analytic_state_bytes(model, context + decode_tokens, batch_size)}


def peak_train(recipe: dict, context: int, batch_size: int = 1) -> dict:
    """Forward + backward of the loss on `batch_size` x `context` tokens. The warm-up's gradients are
    kept, so the measured run's figure holds activations, not the gradient buffers (weights-sized)."""
    model, weights = _model(recipe)
    _train(model, WARMUP_TOKENS, batch_size)
    with PeakMemory(reset=False) as run:
        _train(model, context, batch_size)
    return {"weights_bytes": weights, "run_peak_bytes": run.bytes}
