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


def cache_bytes(cache) -> int:
    """Bytes held by every tensor in a (nested) cache of dicts, lists and tuples."""
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
}


def every_block_recipe(name: str, d_model: int, vocab_size: int, seq_len: int, **model) -> dict:
    """A recipe mapping with one layer of each block in EVERY_BLOCK (MLP FFNs, mult 2)."""
    return {"name": name,
            "model": {"d_model": d_model, "n_layers": len(EVERY_BLOCK), "vocab_size": vocab_size,
                      "pattern": "".join(EVERY_BLOCK), "blocks": EVERY_BLOCK, "ffn": {"type": "mlp", "mult": 2},
                      **model},
            "train": {"seq_len": seq_len}}


def load_script(name: str):
    """scripts/<name>.py as a module, to call its main(argv) in-process."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
