"""Memory by context as the architectures claim it (issue 16, item 5).

Inference (`decode_memory`, a target for `evals.memory.measure`, so one fresh process per context): the
prompt goes through the cache in chunks of `prefill_chunk` tokens (`chunked_prefill`), so the prefill's
activations stay those of one chunk whatever the context, then `decode_tokens` single-token steps. The
record holds the cache's own tensor bytes (`ZooCache.nbytes`), the blocks' analytic `state_bytes`, and
measured RSS figures above a model warmed up on one short chunk:
  decode_bytes        peak RSS during the decode steps (after a first, settling one): what decoding at this
                      context holds (the cache) plus what one step needs on top of it; a constant-state
                      recipe is flat in context, a KV cache grows linearly;
  decode_step_bytes   the same peak above the RSS before those steps: the step's own transient;
  held_bytes          the RSS after the steps: what stays between steps;
  prefill_peak_bytes  the chunked prefill's peak: the cache plus one chunk's activations.
glibc's malloc would keep freed blocks of a dynamically raised size in its heap (the KV cache is
reallocated at every chunk), so the RSS after the prefill would hold garbage; `_plain_malloc` fixes its
mmap threshold, so every block larger than it is returned to the system when freed.

Training (`longest_trainable`): the longest context each recipe trains at, forward + backward + AdamW step,
with every rank's RSS capped (`evals.context_parallel.cp_cell`, W fresh gloo processes, W = 1 included):
`longest_context` doubles the context until a probe fails, then bisects between the last fitting and the
first failing length over multiples of `step`.

    rec = measure("evals.context_memory:decode_memory", {"recipe": recipe.to_dict(), "context": 16384})
    rec = longest_trainable(recipe.to_dict(), world_size=2, cap_gb=0.25)
"""
from __future__ import annotations

import ctypes
import gc
import math
import time
from typing import Callable, Optional

import torch

from evals.memory import PeakMemory

# Bytes above which malloc serves (and frees) blocks by mmap in `decode_memory`'s process. glibc's default
# is dynamic: 128 KiB at start, raised to the size of any mmapped block freed, up to 32 MiB.
MMAP_THRESHOLD = 1 << 16


def chunked_prefill(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Run `ids` [batch, length] through `cache` in pieces of `chunk` tokens; the last piece's logits.
    The block contract makes this equal to one forward of the whole prompt through the cache."""
    if chunk < 1:
        raise ValueError(f"prefill_chunk: must be a positive integer, got {chunk!r}")
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start:start + chunk], cache=cache).logits
    return logits


def _plain_malloc():
    """A fixed mmap threshold for this process (glibc only; elsewhere a no-op). Returns whether it took."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@torch.no_grad()
def decode_memory(recipe: dict, context: int, prefill_chunk: int = 512, decode_tokens: int = 8,
                  batch_size: int = 1, device: str = "cpu") -> dict:
    """Chunked prefill of `context` random tokens, then `decode_tokens` steps: the module docstring's record
    (on CUDA the figures are the allocator's, `evals.memory.PeakMemory`)."""
    from zoo.model import build_model
    plain = _plain_malloc() if device == "cpu" else False
    torch.manual_seed(0)
    model = build_model(recipe).to(device).eval()
    vocab = model.recipe.model.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch_size, context), generator=g).to(device)
    steps = torch.randint(0, vocab, (batch_size, decode_tokens + 1), generator=g).to(device)
    # warm-up on a context of one chunk: thread pools, allocator, one-time kernel selection
    warm = model.init_cache(batch_size)
    chunked_prefill(model, prompt[:, :min(prefill_chunk, context)], warm, prefill_chunk)
    model(steps[:, :1], cache=warm)
    del warm
    gc.collect()
    start = time.perf_counter()
    with PeakMemory(device) as prefill:
        cache = model.init_cache(batch_size)
        chunked_prefill(model, prompt, cache, prefill_chunk)
    prefill_seconds = time.perf_counter() - start
    # The first step releases what the last chunk left behind (a chunk-sized matmul workspace: ~6 MiB here
    # after a 512-token chunk, whatever the context); the steady state starts after it.
    model(steps[:, :1], cache=cache)
    start = time.perf_counter()
    with PeakMemory(device) as decode:
        for t in range(1, decode_tokens + 1):
            model(steps[:, t:t + 1], cache=cache)
        held = decode.now()
    decode_seconds = time.perf_counter() - start
    settled = decode.base - prefill.base  # what the prefill left, above the warmed-up model
    seen = context + decode_tokens + 1
    state = sum(layer.state_bytes(seen, batch_size, dtype=torch.float32) for layer in model.layers)
    return {"context": context, "prefill_chunk": prefill_chunk, "decode_tokens": decode_tokens,
            "batch_size": batch_size, "cache_bytes": cache.nbytes(), "state_bytes": int(state), "tokens_seen": seen,
            "decode_bytes": max(0, settled + decode.bytes), "decode_step_bytes": decode.bytes,
            "held_bytes": settled + held, "prefill_peak_bytes": prefill.bytes,
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "prefill_seconds": prefill_seconds, "decode_seconds": decode_seconds, "fixed_mmap_threshold": plain}


def predicted_seconds(done: list, context: int) -> Optional[float]:
    """Seconds a cell at `context` should take, from [(context, seconds)] of shorter ones: a power law through
    the last two (exponent clamped to [1, 2]: linear for states, quadratic at most for attention), linear from
    one; None without any."""
    done = sorted((c, s) for c, s in done if c < context)
    if not done:
        return None
    c2, s2 = done[-1]
    p = 1.0
    if len(done) > 1:
        c1, s1 = done[-2]
        if s1 > 0 and s2 > 0:
            p = min(2.0, max(1.0, math.log(s2 / s1) / math.log(c2 / c1)))
    return s2 * (context / c2) ** p


# -- the longest trainable context ---------------------------------------------------------------------------

def longest_context(fits: Callable[[int], bool], start: int = 256, step: int = 256, limit: int = 65536) -> dict:
    """The longest multiple of `step` for which `fits` holds, assuming it holds for every shorter one.

    Doubles from `start` until a probe fails or `limit` is reached (the last doubling is clipped to it),
    then bisects between the last fitting and the first failing length on multiples of `step`: about
    log2(longest / start) + log2(longest / step) probes. Returns {"longest": int or None (not even `start`
    fits: the search does not go below it), "first_failing": int or None (None: `limit` fits),
    "probes": [[context, fits], ...] in the order run}."""
    if start < step or start % step or limit < start or limit % step:
        raise ValueError(f"longest_context: need step <= start <= limit with start and limit multiples of step, "
                         f"got start {start}, step {step}, limit {limit}")
    probes = []

    def probe(c):
        ok = bool(fits(c))
        probes.append([c, ok])
        return ok

    lo, hi, c = None, None, start
    while True:
        if not probe(c):
            hi = c
            break
        lo = c
        if c >= limit:
            break
        c = min(2 * c, limit)
    if lo is not None and hi is not None:
        while hi - lo > step:
            mid = lo + (hi - lo) // step // 2 * step
            if probe(mid):
                lo = mid
            else:
                hi = mid
    return {"longest": lo, "first_failing": hi, "probes": probes}


def longest_trainable(recipe: dict, world_size: int = 1, cap_gb: float = 0.25, start: int = 256,
                      step: int = 256, limit: int = 65536, timeout: float = 120.0,
                      layout: str = "zigzag") -> dict:
    """`longest_context` over `cp_cell` training steps (forward + backward + AdamW step) of `recipe` on
    `world_size` gloo processes, each rank's RSS capped at `cap_gb` above its warmed-up baseline (weights
    and the warm-up excluded; gradients, optimizer moments and activations counted). A probe fits when its
    cell is ok; an OOM, a timeout (`timeout` seconds per probe) or an error stops the growth, and the first
    failing probe's status says which."""
    from evals.context_parallel import cp_cell
    if step % (2 * world_size):
        raise ValueError(f"step: {step} must be a multiple of 2 x world_size ({2 * world_size}) for the zigzag "
                         f"layout's 2W chunks")
    cells = {}

    def fits(context):
        cells[context] = cp_cell(recipe, context, world_size, cap_gb=cap_gb, layout=layout, timeout=timeout,
                                 optimizer_step=True, evaluate=False)
        return cells[context]["status"] == "ok"

    wall = time.perf_counter()
    found = longest_context(fits, start, step, limit)
    failing = cells.get(found["first_failing"])
    errors = [c.get("error") for c in cells.values() if c["status"] == "error"]
    return {"status": "ok", "world_size": world_size, "cap_gb": cap_gb, "start": start, "step": step, "limit": limit,
            "timeout_s": timeout, "longest": found["longest"], "first_failing": found["first_failing"],
            "failing_status": failing["status"] if failing else None, "error": errors[0] if errors else None,
            "peak_bytes": cells[found["longest"]]["peak_bytes"] if found["longest"] else None,
            "probes": [{"context": c, "status": cells[c]["status"], "peak_bytes": cells[c].get("peak_bytes"),
                        "seconds": cells[c].get("seconds")} for c, _ in found["probes"]],
            "search_seconds": time.perf_counter() - wall, "optimizer": "AdamW (two fp32 moments)"}
