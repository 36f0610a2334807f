"""FSDP2 with a shared block (Zamba2's): fully_shard per layer and at the root leaves the shared weights in the root's
group, used by two layers; two gloo processes make the same updates as one process with the same global batch."""
import pytest
import torch
import torch.distributed as dist

import zoo
from tests.helpers import TOY_RECIPE, ToyData, launch
from zoo.train.trainer import Trainer

RECIPE = {**TOY_RECIPE, "name": "tiny-shared",
          "model": {**TOY_RECIPE["model"], "n_layers": 3, "pattern": "HAH",
                    "shared_blocks": {"S": {"n_heads": 2, "adapter_rank": 2, "ffn_adapter_rank": 2}},
                    "blocks": {"A": {"type": "attn", "n_heads": 2},
                               "H": {"type": "mamba2", "d_state": 4, "head_dim": 8, "chunk_size": 4, "ffn": "none",
                                     "shared": "S"}}}}


def _trainer(out, fsdp: bool):
    recipe = zoo.load_recipe(RECIPE, ["train.max_steps=3", f"train.fsdp={str(fsdp).lower()}", "train.save_every=3"])
    return Trainer(recipe, ToyData(), out, device="cpu", progress=False, log=lambda s: None)


def _fsdp_worker(rank, world, port, out):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        trainer = _trainer(out, fsdp=True)
        result = trainer.train()
        state = trainer._full_model_state()
        if rank == 0:
            torch.save({"state": state, "loss": result.train_loss}, out / "rank0.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_with_a_shared_block_matches_one_process(tmp_path):
    single = _trainer(tmp_path / "s", fsdp=False)
    result = single.train()
    (tmp_path / "f").mkdir()
    launch(_fsdp_worker, 2, tmp_path / "f")
    sharded = torch.load(tmp_path / "f" / "rank0.pt", weights_only=True)
    assert [k for k in sharded["state"] if k.endswith("q_proj.weight")] == ["shared.S.attention.q_proj.weight",
                                                                          "layers.1.mixer.q_proj.weight"]
    for name, want in single.model.state_dict().items():
        assert torch.allclose(sharded["state"][name], want, rtol=1e-4, atol=1e-6), name
    assert abs(sharded["loss"] - result.train_loss) <= 1e-4 * abs(result.train_loss)
