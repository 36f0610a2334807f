"""The optimizer's parameter groups under FSDP2: `fully_shard` replaces every parameter, and with it the
tags blocks set on them (`_no_weight_decay`, `_lr_mult`); the groups must still be those of one process."""
import pytest
import torch

import zoo
from tests.distributed.launcher import RankPool
from tests.helpers import EVERY_BLOCK, every_block_recipe
from zoo.train.trainer import Trainer

RECIPE = every_block_recipe("every-block-optim", d_model=16, vocab_size=37, seq_len=16)
RECIPE["train"].update(batch_size=2, lr=1e-3, weight_decay=0.1, fsdp=True)


class _ValidationOnly:
    """Data for a Trainer that is built and never stepped: it checks the validation batches' shape."""
    bytes_per_token = 1.0

    def val_batches(self, n, batch_size, seq_len):
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        return [{"input_ids": ids, "labels": ids} for _ in range(n)]


def _groups(out_dir):
    """[(parameter names, weight_decay, peak lr) per group] of the Trainer's optimizer, after checking that
    it holds the model's current parameters (under FSDP2 the sharded ones, not those `fully_shard` replaced).
    The peak is `initial_lr`: the scheduler has already scaled `lr` by the first warmup factor."""
    trainer = Trainer(zoo.load_recipe(RECIPE), _ValidationOnly(), out_dir, device="cpu", progress=False,
                      log=lambda s: None)
    current = {id(p) for p in trainer.model.parameters()}
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in held} == current and len(held) == len(current)
    sharded = isinstance(trainer.model.embed.weight, torch.distributed.tensor.DTensor)
    return sharded, [(g["names"], g["weight_decay"], g["initial_lr"]) for g in trainer.optimizer.param_groups]


def _by_name(groups) -> dict:
    return {n: (wd, lr) for names, wd, lr in groups for n in names}


def test_covers_every_registered_block():
    assert {b["type"] for b in EVERY_BLOCK.values()} == set(zoo.list_blocks())


@pytest.mark.slow  # 5 s here when quiet, 13 s loaded: mostly two processes importing torch
def test_fsdp2_keeps_the_parameter_groups_of_one_process(tmp_path):
    sharded, want = _groups(tmp_path / "single")
    assert not sharded
    # the tags are in force in one process: Mamba-1's A_log (2-D) undecayed, Infini's gate at 10x
    by_name = _by_name(want)
    mamba, infini = list(EVERY_BLOCK).index("M"), list(EVERY_BLOCK).index("I")
    assert by_name[f"layers.{mamba}.mixer.A_log"] == (0.0, 1e-3)
    assert by_name[f"layers.{mamba}.mixer.in_proj.weight"] == (0.1, 1e-3)
    assert by_name[f"layers.{infini}.mixer.gate"] == (0.0, pytest.approx(1e-2))
    pool = RankPool(2)
    try:
        per_rank = pool.run(_groups, tmp_path / "fsdp", timeout=120)
    finally:
        pool.close()
    for rank, (sharded, got) in enumerate(per_rank):
        assert sharded, f"rank {rank}: the model was not sharded"
        got_by_name = _by_name(got)
        differ = {n: f"{got_by_name.get(n)} under FSDP2, {w} in one process"
                  for n, w in by_name.items() if got_by_name.get(n) != w}
        assert not differ, f"rank {rank}: (weight_decay, lr) differ: {differ}"
        assert got == want, f"rank {rank}: the same settings, other groups or order: {got} != {want}"
