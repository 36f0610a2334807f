"""Helpers shared by the tests: relative errors, gradient comparison, the cache contract."""
from __future__ import annotations

import dataclasses

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-6) -> float:
    """max |a - b| / max(max |b|, floor): small only when a matches b everywhere. The floor keeps a
    gradient that is exactly zero in theory (e.g. dq at length 1) from dividing rounding noise by 0."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item() if b.numel() else 0.0


def assert_close(a, b, tol: float, what: str = "output", floor: float = 1e-6):
    err = rel_err(a, b, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_block_matches(block, x, reference, tol: float):
    """block(x) against reference(block, x): the output, the gradient of x and of every parameter, under one
    fixed cotangent (a ramp, so no gradient cancels by symmetry). x must require grad."""
    results = []
    for fn in (lambda: block(x), lambda: reference(block, x)):
        block.zero_grad()
        x.grad = None
        out = fn()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out, x.grad.clone(), {n: p.grad.clone() for n, p in block.named_parameters()}))
    (got, got_dx, got_grads), (want, want_dx, want_grads) = results
    assert_close(got, want, tol)
    assert_close(got_dx, want_dx, tol, "grad x")
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], tol, f"grad {name}")


def cp_errors(worst: dict, key: str, out, ref, ref_grads: dict, model, group, layout) -> None:
    """Record into `worst` the relative errors of a context-parallel ZooLM step against the one-process one:
    this rank's logits against its shard of the reference, loss, aux loss, and every (all-reduced) gradient."""
    from zoo.distributed import shard
    worst[f"{key} logits"] = rel_err(out.logits, shard(ref.logits, group, layout))
    worst[f"{key} loss"] = rel_err(out.loss, ref.loss)
    if ref.aux_loss is not None or out.aux_loss is not None:
        worst[f"{key} aux_loss"] = rel_err(out.aux_loss, ref.aux_loss)
    for n, p in model.named_parameters():
        worst[f"{key} grad {n}"] = rel_err(p.grad, ref_grads[n], floor=1e-3)


def assert_each_close(names, got, want, tol: float):
    """Compare named results pairwise (outputs, states, gradients); a reference that is exactly zero
    (dq when each query sees only its own key) is compared absolutely. `None` references are skipped."""
    for name, a, b in zip(names, got, want):
        if b is None:
            continue
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        if b.numel() and b.abs().max() == 0:
            assert a.abs().max() <= tol, f"{name}: {a.abs().max():.3e} where the reference is 0"
        else:
            assert_close(a, b, tol, name)


def grads(module: torch.nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, tol: float):
    assert got.keys() == want.keys(), f"gradients for different parameters: {sorted(got) ^ sorted(want)}"
    for name in want:
        assert_close(got[name], want[name], tol, f"grad {name}")


def check_block_vs_reference(block, reference, x: torch.Tensor, tol: float = 1e-10):
    """The block's forward vs `reference(block, x)` (the same math through an op's `_ref` twin):
    outputs, the input gradient and every parameter gradient."""
    x = x.detach().requires_grad_(True)
    got = block(x)
    got.pow(2).sum().backward()
    got_grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    assert set(got_grads) == {n for n, _ in block.named_parameters()}, "a parameter got no gradient"
    got_dx = x.grad.clone()
    block.zero_grad()
    x.grad = None
    want = reference(block, x)
    want.pow(2).sum().backward()
    assert_close(got, want, tol)
    assert_close(got_dx, x.grad, tol, "grad x")
    for n, p in block.named_parameters():
        # floor 1: some gradients are zero in theory (dq at length 1); compare them on the O(1) scale
        assert_close(got_grads[n], p.grad, tol, f"grad {n}", floor=1.0)
    return got_grads


def run_chunks(block, x: torch.Tensor, sizes) -> torch.Tensor:
    """Feed x through `block` in chunks of the given sizes (cycled) via a fresh cache."""
    cache = block.init_cache(x.shape[0], x.device, x.dtype)
    outs, start, i = [], 0, 0
    while start < x.shape[1]:
        n = sizes[i % len(sizes)]
        outs.append(block(x[:, start:start + n], cache=cache))
        start, i = start + n, i + 1
    return torch.cat(outs, dim=1), cache


def check_cache_contract(block, x: torch.Tensor, tol: float = 1e-10, splits=((1,), (3, 5), (7,))):
    """Whole sequence == any chunking through the cache == token by token (the block contract)."""
    block.eval()
    with torch.no_grad():
        whole = block(x)
        for sizes in splits:
            got, _ = run_chunks(block, x, list(sizes))
            assert_close(got, whole, tol, f"chunks {sizes} vs whole")
    return whole


def check_cache_bytes_and_documents(block, d_model: int = 12, length: int = 17, split: int = 5):
    """The cache contract on two random rows (float64), the cache's bytes after them equal to `state_bytes`, and a
    row packed from two documents (seq_idx) equal to each document alone. Returns the cache."""
    x = torch.randn(2, length, d_model, dtype=torch.float64)
    check_cache_contract(block, x, splits=((1,), (2, 5), (length,)))
    cache = block.init_cache(2, dtype=torch.float64)
    with torch.no_grad():
        block(x, cache=cache)
        packed = block(x[:1], seq_idx=torch.tensor([[0] * split + [1] * (length - split)]))
        alone = torch.cat([block(x[:1, :split]), block(x[:1, split:])], 1)
    assert cache.nbytes() == block.state_bytes(length, batch_size=2, dtype=torch.float64)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-12)
    return cache


def cache_bytes(cache) -> int:
    """Bytes held by every tensor in a (nested) cache of dicts, lists and tuples. A preallocated cache
    (`zoo.blocks.attention.cache.SlotCache`: K/V buffers with spare capacity) counts the keys its state
    keeps, read back in time order from its buffers; its spare slots are allocation, not state."""
    from zoo.blocks.attention.cache import SlotCache
    if isinstance(cache, SlotCache):
        return sum(cache_bytes(cache.in_order(name)) for name, t in vars(cache).items()
                   if name in cache.BUFFERS and name not in cache.BOOKKEEPING and t is not None)
    if torch.is_tensor(cache):
        return cache.numel() * cache.element_size()
    if dataclasses.is_dataclass(cache):
        return cache_bytes(vars(cache))
    if isinstance(cache, dict):
        return sum(cache_bytes(v) for v in cache.values())
    if isinstance(cache, (list, tuple)):
        return sum(cache_bytes(v) for v in cache)
    return 0


def make_block(name: str, d_model: int, dtype=torch.float64, std: float = 0.3, **cfg):
    """A registered block with every parameter drawn N(0, std): non-zero biases, gates and scales, so a
    comparison sees every path (std 0.3 gives attention logits of order 5, so masks and selection matter)."""
    from zoo.registry import get_block
    entry = get_block(name)
    block = entry.cls(d_model, entry.config(**cfg), layer_idx=0).to(dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=std)
    return block


def projected_qkv(block, x: torch.Tensor):
    """q, k, v [b, t, heads, head_dim] of an attention-style block, and q, k rotated at positions 0..t-1."""
    from zoo.ops.rope import apply_rope, rope_cos_sin
    b, t, _ = x.shape
    hd = block.head_dim
    q, k, v = (proj(x).view(b, t, -1, hd) for proj in (block.q_proj, block.k_proj, block.v_proj))
    cos, sin = rope_cos_sin(torch.arange(t), hd, block.cfg.rope_base)
    return q, k, v, apply_rope(q, cos, sin), apply_rope(k, cos, sin)


# Small configurations of every registered block, one pattern letter each: the hybrid that the model,
# decoding and context-parallel tests build (`every_block_recipe`).
EVERY_BLOCK = {
    "A": {"type": "attn", "n_heads": 2, "n_kv_heads": 1},
    "S": {"type": "swa", "n_heads": 2, "window": 5, "block_size": 4},
    "B": {"type": "blockwise", "n_heads": 2, "block_size": 4, "ffn": {"chunk": 5}},
    "R": {"type": "ring", "n_heads": 2, "block_size": 3},
    "I": {"type": "infini", "n_heads": 2, "segment_len": 4},
    "L": {"type": "selective", "n_heads": 2, "block_size": 4},
    "T": {"type": "taipan", "n_heads": 2, "window": 6, "capacity": 0.5},
    "M": {"type": "mamba", "d_state": 4, "ffn": "none"},
    "N": {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 4, "ffn": "none"},
    "F": {"type": "none", "ffn": {"type": "relu2", "mult": 2}},
    "P": {"type": "parallel", "branches": [{"type": "attn", "n_heads": 2, "out_scale": 0.5},
                                           {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 4,
                                            "out_scale": 1.5}]},
    "D": {"type": "deltanet", "n_heads": 2, "head_k_dim": 8, "chunk_size": 4},
    "G": {"type": "gated_deltanet", "n_heads": 2, "n_k_heads": 1, "head_k_dim": 8, "chunk_size": 4},
    "C": {"type": "short_conv", "d_conv": 3},
    "Q": {"type": "mla", "n_heads": 2, "kv_lora_rank": 6, "qk_nope_head_dim": 4, "qk_rope_head_dim": 2,
          "v_head_dim": 5},
    "K": {"type": "kda", "n_heads": 2, "head_k_dim": 8, "decay_rank": 4, "chunk_size": 4, "allow_neg_eigval": True},
    "W": {"type": "rglru", "n_heads": 2, "chunk_size": 4},
    "Z": {"type": "lightning", "n_heads": 2, "chunk_size": 4, "decay_layers": 8},
    "X": {"type": "mlstm", "n_heads": 2, "chunk_size": 4},
}


def every_block_recipe(name: str, d_model: int, vocab_size: int, seq_len: int, **model) -> dict:
    """A recipe mapping with one layer of each block in EVERY_BLOCK (MLP FFNs, mult 2)."""
    return {"name": name,
            "model": {"d_model": d_model, "n_layers": len(EVERY_BLOCK), "vocab_size": vocab_size,
                      "pattern": "".join(EVERY_BLOCK), "blocks": EVERY_BLOCK, "ffn": {"type": "mlp", "mult": 2},
                      **model},
            "train": {"seq_len": seq_len}}


# -- training: a two-layer recipe and data it learns in a few steps (tests/train) ---------------------------
TOY_RECIPE = {
    "name": "tiny-train",
    "model": {"d_model": 32, "n_layers": 2, "vocab_size": 64, "pattern": "AS",
              "blocks": {"A": {"type": "attn", "n_heads": 2}, "S": {"type": "swa", "n_heads": 2, "window": 8}},
              "ffn": {"type": "swiglu", "mult": 2}},
    "train": {"seq_len": 16, "batch_size": 4, "lr": 3e-3, "max_steps": 6, "warmup_steps": 2, "eval_every": 3,
              "eval_batches": 2, "save_every": 3, "keep_last": 2, "log_every": 1},
}


class ToyData:
    """Batches that are a pure function of (step, micro): a learnable pattern plus noise."""
    bytes_per_token = 1.0

    def _batch(self, seed, batch_size, seq_len):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 64, (batch_size, 1), generator=g)
        ids = (start + torch.arange(seq_len + 0)[None] * 3) % 64
        return {"input_ids": ids, "labels": ids.clone()}

    def train_batch(self, step, micro, batch_size, seq_len):
        return self._batch(1000 * step + micro, batch_size, seq_len)

    def val_batches(self, n, batch_size, seq_len):
        return [self._batch(10**9 + i, batch_size, seq_len) for i in range(n)]


def toy_recipe(**train):
    import zoo
    return zoo.load_recipe(TOY_RECIPE, [f"train.{k}={v}" for k, v in train.items()])


def train_toy(out, resume=None, data=None, overwrite=False, **train):
    """(trainer, result) of a quiet CPU run of `toy_recipe(**train)` in `out`."""
    from zoo.train.trainer import Trainer
    trainer = Trainer(toy_recipe(**train), data or ToyData(), out, device="cpu", resume=resume, overwrite=overwrite,
                      progress=False, log=lambda s: None)
    return trainer, trainer.train()


def launch(worker, world, *args, timeout=180):
    """Run worker(rank, world, port, *args) in `world` spawned processes; all must exit cleanly."""
    import multiprocessing as mp
    import os
    ctx = mp.get_context("spawn")
    port = 29500 + (os.getpid() + hash(worker.__name__)) % 1000
    procs = [ctx.Process(target=worker, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, f"{worker.__name__}: exit codes {[p.exitcode for p in procs]}"


def load_script(name: str):
    """scripts/<name>.py as a module, to call its main(argv) in-process."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# scripts/train.py's tests: one attention layer on bytes, a few hundred steps in seconds on one CPU thread
CLI_RECIPE = {
    "name": "tiny-cli",
    "model": {"d_model": 16, "n_layers": 1, "vocab_size": 256, "pattern": "A",
              "blocks": {"A": {"type": "attn", "n_heads": 2}}, "ffn": {"type": "swiglu", "mult": 2}},
    "train": {"seq_len": 16, "batch_size": 2, "lr": 3e-3, "max_steps": 8, "warmup_steps": 2, "eval_every": 4,
              "eval_batches": 2, "save_every": 4, "keep_last": 2, "log_every": 1},
}


def write_prepared(root, train=6000, val=1000, test=500):
    """A prepared directory (zoo.data.memmap format) of code-like byte text, one document per split."""
    import numpy as np

    from zoo.data.memmap import TokenWriter
    rng = np.random.default_rng(0)
    words = [b"def", b"return", b"self", b"import", b"class", b"for", b"in", b"if", b"else", b"print", b"(x)", b":\n"]
    for split, n in (("train", train), ("val", val), ("test", test)):
        text = b" ".join(words[i] for i in rng.integers(0, len(words), size=n))[:n]
        with TokenWriter(root / split, vocab_size=256, tokenizer="byte", tokenizer_fingerprint="byte",
                         corpus="toy", corpus_fingerprint="toy") as w:
            w.add_document(np.frombuffer(text, dtype=np.uint8), num_bytes=len(text))
    return root


def check_left_padded_generation(recipe, prompts=((5, 3), (9, 9, 1, 4, 4, 2, 8)), new_tokens: int = 5, seed: int = 0):
    """Greedy generation of a left-padded batch through zoo.hf equals each row generated alone (float64)."""
    import zoo
    from zoo.hf import ZooForCausalLM
    torch.manual_seed(seed)
    model = ZooForCausalLM.from_zoo(zoo.build_model(recipe).double().eval())
    n = max(map(len, prompts))
    ids = torch.tensor([[0] * (n - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for r, p in enumerate(prompts):
        alone = model.generate(torch.tensor([list(p)]), **kw)
        assert batch[r, n:].tolist() == alone[0, len(p):].tolist(), f"row {r}"


def train_losses(model, ids, steps: int, lr: float = 1e-2):
    """(the loss of each of `steps` AdamW steps on `ids` as its own labels, the last step's output)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses, out
