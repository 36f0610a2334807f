"""A block family written and registered in this file only, implementing `zoo.blocks.base.Block`, gets
everything the contract promises without an edit anywhere in zoo: training steps, streaming through its
typed cache, `describe()`, cached generation with left padding through `ZooForCausalLM.generate` (each
row as it generates alone) and context parallel on 2 gloo ranks (equal to one process); a block that
keeps the defaults (no merge hook, no cp path) decodes left-padded rows in groups of one and is refused
under cp with an error naming it."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import zoo
import zoo.registry
from tests.distributed.launcher import RankPool
from tests.helpers import assert_close, check_cache_contract, make_block, rel_err, train_losses
from zoo.blocks.base import Block, BlockCache
from zoo.distributed import all_reduce_grads, shard
from zoo.distributed.halo import preceding
from zoo.registry import register_block

V = 29


@dataclass
class DepthwiseConvConfig:
    width: int = 4          # inputs each output reads, its own included

    def __post_init__(self):
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width: must be an integer >= 1, got {self.width!r}")

    def width_step(self) -> int:
        return 1   # one filter per channel: any d_model


@dataclass
class DepthwiseConvCache(BlockCache):
    tail: torch.Tensor      # [batch, width - 1, d_model]: the last inputs of the convolution


class DepthwiseConv(Block):
    """out_proj(silu(causal depthwise conv over time of in_proj(x))): the simplest block with state."""

    supports_cp = True

    def __init__(self, d_model: int, cfg: DepthwiseConvConfig, layer_idx: int, kernels=None):
        super().__init__(d_model, cfg, layer_idx, kernels)
        self.in_proj = nn.Linear(d_model, d_model)
        self.weight = nn.Parameter(torch.randn(d_model, cfg.width) / cfg.width)
        self.weight._no_reinit = True
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, *, cache=None, cp=None, seq_idx=None):
        h, keep = self.in_proj(x), self.cfg.width - 1
        if cp is not None:
            if cache is not None:
                raise ValueError("cache: dwconv runs whole sequences under context parallel")
            # the halo: each chunk's keep inputs before it, from whichever ranks hold them
            halos, h = preceding(h, cp, lambda start, end: keep)
            y = torch.cat([self._conv(torch.cat([F.pad(halo, (0, 0, keep - halo.shape[1], 0)), h[:, c.local]], 1))
                           for c, halo in zip(cp.chunks(), halos)], 1)
        else:
            past = h.new_zeros(h.shape[0], keep, h.shape[2]) if cache is None else cache.tail.to(h.dtype)
            padded = torch.cat([past, h], 1)
            if cache is not None:
                cache.tail = padded[:, padded.shape[1] - keep:].to(cache.tail.dtype)
            y = self._conv(padded)
        return self.out_proj(F.silu(y))

    def _conv(self, padded):
        """[b, width - 1 + t, d] -> [b, t, d]."""
        return F.conv1d(padded.transpose(1, 2), self.weight[:, None, :].to(padded.dtype),
                        groups=self.weight.shape[0]).transpose(1, 2)

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> DepthwiseConvCache:
        return DepthwiseConvCache(torch.zeros(batch_size, self.cfg.width - 1, self.d_model, device=device, dtype=dtype))

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        return batch_size * (self.cfg.width - 1) * self.d_model * torch.empty((), dtype=dtype).element_size()

    def merge_left_padded(self, caches, row_start, length):
        return DepthwiseConvCache.stack(caches)   # the state has no position: rows stack


class PlainDepthwiseConv(DepthwiseConv):
    """The same block on the contract's defaults: left-padded rows decode as groups of one, no cp path."""

    supports_cp = False
    merge_left_padded = Block.merge_left_padded


def register():
    """Register both blocks (idempotent); each gloo rank calls it too."""
    register_block("dwconv", config=DepthwiseConvConfig)(DepthwiseConv)
    register_block("dwconv_plain", config=DepthwiseConvConfig)(PlainDepthwiseConv)


def unregister():
    for name in ("dwconv", "dwconv_plain"):
        zoo.registry._BLOCKS.pop(name, None)   # the registry has no removal: other tests list every block


@pytest.fixture(autouse=True)
def registered():
    register()
    yield
    unregister()


def recipe(pattern="CA", block="dwconv"):
    return {"name": f"new-{block}",
            "model": {"d_model": 16, "n_layers": len(pattern), "vocab_size": V, "pattern": pattern,
                      "blocks": {"C": {"type": block, "width": 3}, "A": {"type": "attn", "n_heads": 2}},
                      "ffn": {"type": "swiglu", "mult": 2}, "init_std": 0.3},
            "train": {"seq_len": 32}}


def test_trains_and_describes():
    model = zoo.build_model(recipe())
    assert isinstance(model.layers[0].mixer, DepthwiseConv)
    losses, out = train_losses(model, torch.randint(0, V, (4, 24)), 8)
    assert out.aux_loss is None and losses[-1] < losses[0], losses
    table = model.describe(context=1024)
    row = next(line for line in table.splitlines() if line.split()[:2] == ["0", "dwconv"])
    assert row.count("64 B") == 2   # state @1K and @32K: width - 1 = 2 inputs of 16 bf16 values


def test_cache_contract_and_state_bytes():
    block = make_block("dwconv", 16, width=4)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    check_cache_contract(block, x, splits=((1,), (3, 5), (23,)))
    cache = block.init_cache(2, dtype=torch.float64)
    block(x, cache=cache)
    assert cache.nbytes() == block.state_bytes(23, batch_size=2, dtype=torch.float64)


@pytest.mark.parametrize("block", ["dwconv", "dwconv_plain"])
def test_left_padded_generation_equals_each_row_alone(block):
    from zoo.hf import ZooForCausalLM, output_cache

    model = ZooForCausalLM.from_zoo(zoo.build_model(recipe("CAC", block)).double().eval())
    prompts = [[5, 3], [9, 9, 1, 4, 4, 2, 8], [6, 6, 6, 6]]
    n = max(map(len, prompts))
    ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for r, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), **kw)
        assert batch[r, n:].tolist() == alone[0, len(p):].tolist(), f"row {r}"
    with torch.no_grad():
        cache = output_cache(model(ids, attention_mask=mask))
    # the merge hook: the block's own (stacked rows) or the default (a group per row)
    assert cache.row_cached == [block == "dwconv_plain", False, block == "dwconv_plain"]
    assert cache.nbytes() == sum(layer.mixer.state_bytes(n, batch_size=3, dtype=torch.float64)
                                 for layer in model.model.layers)


def test_default_refuses_context_parallel_naming_the_block():
    model = zoo.build_model(recipe(block="dwconv_plain"))
    with pytest.raises(ValueError, match="context parallel is not supported by block.s. dwconv_plain"):
        model(torch.randint(0, V, (1, 8)), cp_group=object())


def _cp_step(world_size_check: int):
    """On each rank: one training step's loss, logits and summed gradients vs the single process."""
    register()
    torch.manual_seed(0)
    model = zoo.build_model(recipe("CAC")).double()
    ids = torch.randint(0, V, (2, 13))
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    group = dist.group.WORLD
    assert dist.get_world_size(group) == world_size_check
    out = model(shard(ids, group), labels=shard(ids, group), cp_group=group)
    out.loss.backward()
    all_reduce_grads(model, group)
    errs = {"logits": rel_err(out.logits, shard(ref.logits, group)), "loss": rel_err(out.loss, ref.loss)}
    errs.update({f"grad {n}": rel_err(p.grad, ref_grads[n], floor=1e-3) for n, p in model.named_parameters()})
    unregister()
    return errs


def test_context_parallel_step_equals_one_process():
    pool = RankPool(2)
    try:
        results = pool.run(_cp_step, 2)
    finally:
        pool.close()
    for rank, errs in enumerate(results):
        bad = {k: v for k, v in errs.items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"
