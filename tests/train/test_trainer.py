"""Trainer: exact resume, kill-safe checkpoints, DDP == single process, clear errors."""
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import time

import pytest
import torch
import torch.distributed as dist

import zoo
from zoo.train import checkpoint as ckpt
from zoo.train.trainer import Trainer, TrainingError

from tests.helpers import TOY_RECIPE, ToyData, launch, toy_recipe, train_toy

def test_resume_is_bitwise_exact(tmp_path):
    straight, res = train_toy(tmp_path / "a", max_steps=6)
    train_toy(tmp_path / "b", max_steps=6, save_every=3)  # writes step 3 and 6
    # resume from step 3 in a fresh directory holding only that checkpoint
    half = tmp_path / "c"
    (half / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "b" / "checkpoints" / "step-00000003", half / "checkpoints" / "step-00000003")
    resumed, res2 = train_toy(half, resume="auto", max_steps=6)
    assert resumed.step == 6 and res2.train_loss == res.train_loss
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert res.val_loss < math.log(64)  # it learned something


def test_keep_last_and_load_checkpoint(tmp_path):
    trainer, _ = train_toy(tmp_path, max_steps=6, save_every=2, keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-00000004", "step-00000006"]
    model = zoo.load_checkpoint(tmp_path)
    ids = torch.randint(0, 64, (1, 10))
    assert torch.equal(model(ids).logits, trainer.model.eval()(ids).logits)


def _train_then_die_while_saving(out, ready):
    import zoo.train.checkpoint as c
    original = c.save_file

    def slow_save(*args, **kwargs):
        if os.environ.get("_ZOO_SLOW_SAVE") == "1":
            original(*args, **kwargs)
            ready.set()
            time.sleep(60)  # killed here, mid-checkpoint
        return original(*args, **kwargs)

    c.save_file = slow_save
    trainer = Trainer(toy_recipe(max_steps=6, save_every=3), ToyData(), out, device="cpu", progress=False,
                      log=lambda s: None)
    for _ in range(3):
        trainer.train_step()
    trainer.save()  # step 3, complete
    os.environ["_ZOO_SLOW_SAVE"] = "1"
    for _ in range(3):
        trainer.train_step()
    trainer.save()  # step 6, never finishes


@pytest.mark.slow
def test_sigkill_during_checkpoint_keeps_previous(tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_train_then_die_while_saving, args=(tmp_path, ready))
    proc.start()
    deadline = time.time() + 180
    while not ready.wait(0.5):
        assert proc.is_alive() and time.time() < deadline, "child died or never reached the second checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003"]
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    zoo.load_checkpoint(tmp_path)  # loadable
    trainer, _ = train_toy(tmp_path, resume="auto", max_steps=6)
    assert trainer.step == 6
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003", "step-00000006"]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        trainer = Trainer(toy_recipe(max_steps=4), ToyData(), out, device="cpu", progress=False, log=lambda s: None)
        for _ in range(4):
            trainer.train_step()
        if rank == 0:  # a file, not a queue: shared-memory tensors die with the process
            torch.save(trainer.model.state_dict(), out / "rank0.pt")
        dist.barrier()   # meet before tearing gloo down: see _stop_worker in test_stops.py
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_single(tmp_path):
    single = Trainer(toy_recipe(max_steps=4), ToyData(), tmp_path / "s", device="cpu", progress=False,
                     log=lambda s: None)
    for _ in range(4):
        single.train_step()
    (tmp_path / "d").mkdir()
    launch(_ddp_worker, 2, tmp_path / "d")
    state = torch.load(tmp_path / "d" / "rank0.pt", weights_only=True)
    for name, want in single.model.state_dict().items():
        assert torch.allclose(state[name], want, rtol=1e-4, atol=1e-6), name


def _fsdp_worker(rank, world, port, out, resume):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        trainer = Trainer(toy_recipe(max_steps=4, save_every=2, fsdp=True), ToyData(), out, device="cpu", resume=resume,
                          progress=False, log=lambda s: None)
        assert isinstance(trainer.model.embed.weight, torch.distributed.tensor.DTensor)  # sharded, not replicated
        result = trainer.train()
        state = trainer._full_model_state()  # a collective: every rank takes part
        if rank == 0:
            torch.save({"state": state, "loss": result.train_loss, "val_loss": result.val_loss}, out / "rank0.pt")
        dist.barrier()   # meet before tearing gloo down: see _stop_worker in test_stops.py
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_match_single_and_resume(tmp_path):
    """FSDP2 (fully_shard per layer and at the root) on gloo: the same updates as one process with the same
    global batch; its checkpoints hold full weights that load in one process, and it resumes from them."""
    single, result = train_toy(tmp_path / "s", max_steps=4, save_every=2)
    (tmp_path / "f").mkdir()
    launch(_fsdp_worker, 2, tmp_path / "f", None)
    sharded = torch.load(tmp_path / "f" / "rank0.pt", weights_only=True)
    for name, want in single.model.state_dict().items():
        assert torch.allclose(sharded["state"][name], want, rtol=1e-4, atol=1e-6), name
    assert math.isclose(sharded["loss"], result.train_loss, rel_tol=1e-4)
    assert math.isclose(sharded["val_loss"], result.val_loss, rel_tol=1e-4)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "f" / "checkpoints")] == ["step-00000002", "step-00000004"]
    loaded = zoo.load_checkpoint(tmp_path / "f")
    for name, want in sharded["state"].items():
        assert torch.equal(loaded.state_dict()[name], want), name

    # resume under FSDP2 from the step-2 checkpoint alone: the same weights as the straight FSDP2 run
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "f" / "checkpoints" / "step-00000002", tmp_path / "r" / "checkpoints" / "step-00000002")
    launch(_fsdp_worker, 2, tmp_path / "r", "auto")
    resumed = torch.load(tmp_path / "r" / "rank0.pt", weights_only=True)
    for name, want in sharded["state"].items():
        assert torch.allclose(resumed["state"][name], want, rtol=1e-6, atol=1e-9), name
    assert math.isclose(resumed["loss"], sharded["loss"], rel_tol=1e-6)

    # and one process resumes the same checkpoint (its optimizer state is keyed by parameter name)
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "f" / "checkpoints" / "step-00000002", tmp_path / "one" / "checkpoints" / "step-00000002")
    alone, _ = train_toy(tmp_path / "one", resume="auto", max_steps=4, save_every=2)
    for name, want in sharded["state"].items():
        assert torch.allclose(alone.model.state_dict()[name], want, rtol=1e-4, atol=1e-6), name


def test_batch_not_divisible_by_world():
    class FakeWorld(Trainer):
        pass
    import zoo.train.trainer as t
    orig = t.dp_info
    t.dp_info = lambda: (0, 3)
    try:
        with pytest.raises(TrainingError, match="train.batch_size: 4 rows are not divisible by the data-parallel world size 3"):
            Trainer(toy_recipe(), ToyData(), "unused", device="cpu")
    finally:
        t.dp_info = orig


def test_checkpoint_from_another_recipe(tmp_path):
    train_toy(tmp_path, max_steps=3)
    other = zoo.load_recipe(TOY_RECIPE, ["model.d_model=48", "model.blocks.A.n_heads=4", "model.blocks.S.n_heads=4"])
    with pytest.raises(ckpt.CheckpointError, match=r"model\.d_model differs: checkpoint 32 vs recipe 48"):
        Trainer(other, ToyData(), tmp_path, device="cpu", resume="auto", progress=False)


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        zoo.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        zoo.load_checkpoint(tmp_path / "empty")
    train_toy(tmp_path / "r", max_steps=3)
    path = ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        zoo.load_checkpoint(path)


def test_non_finite_loss_stops_and_keeps_last_good(tmp_path, monkeypatch):
    trainer = Trainer(toy_recipe(max_steps=6, save_every=2), ToyData(), tmp_path, device="cpu", progress=False,
                      log=lambda s: None)
    original = trainer.train_module.forward

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        if trainer.step == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.train_module, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss nan at step 3; the last good checkpoint is .*step-00000002"):
        trainer.train()
    zoo.load_checkpoint(tmp_path)


def test_blocks_auxiliary_losses_are_trained_and_logged(tmp_path):
    # The selective block's memory loss (and taipan's capacity loss) join the objective; the metrics log
    # shows their sum per step, and plain blocks log none.
    selective = {"type": "selective", "n_heads": 2, "mem_loss_weight": 0.5}
    rec = zoo.load_recipe({**TOY_RECIPE, "model": {**TOY_RECIPE["model"], "pattern": "LA",
                                               "blocks": {**TOY_RECIPE["model"]["blocks"], "L": selective}}})
    trainer = Trainer(rec, ToyData(), tmp_path / "mem", device="cpu", progress=False, log=lambda s: None)
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "mem" / "metrics.jsonl").read_text().splitlines()]
    aux = [r["aux_loss"] for r in lines]
    assert len(aux) == 6 and all(0 < a <= 0.5 for a in aux)  # w * max_i M / L is at most w
    train_toy(tmp_path / "plain", max_steps=2)
    assert all("aux_loss" not in json.loads(line)
               for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines())


def test_init_from_starts_from_the_weights_only_and_resume_wins(tmp_path):
    base, _ = train_toy(tmp_path / "base", max_steps=4)
    weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    ft = Trainer(toy_recipe(max_steps=3, save_every=3), ToyData(), tmp_path / "ft", device="cpu", progress=False,
                 log=lambda s: None, init_from=str(tmp_path / "base"))
    assert ft.step == 0 and ft.scheduler.last_epoch == 0 and not ft.optimizer.state   # a fresh optimizer
    for k, v in ft.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    ft.train()
    tuned = {k: v.clone() for k, v in ft.model.state_dict().items()}
    # an interrupted fine-tune continues from its own checkpoint, not from init_from again
    again = Trainer(toy_recipe(max_steps=3, save_every=3), ToyData(), tmp_path / "ft", device="cpu",
                    progress=False, log=lambda s: None, init_from=str(tmp_path / "base"), resume="auto")
    assert again.step == 3
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, tuned[k]), k


def test_init_from_refuses_another_model_and_a_missing_checkpoint(tmp_path):
    train_toy(tmp_path / "base", max_steps=2)
    other = zoo.load_recipe(toy_recipe(max_steps=2).to_dict(), ["model.d_model=48"])
    with pytest.raises(ckpt.CheckpointError, match="model.d_model differs: checkpoint 32 vs recipe 48"):
        Trainer(other, ToyData(), tmp_path / "x", device="cpu", progress=False, log=lambda s: None,
                init_from=str(tmp_path / "base"))
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        Trainer(toy_recipe(max_steps=2), ToyData(), tmp_path / "y", device="cpu", progress=False,
                log=lambda s: None, init_from=str(tmp_path / "nowhere"))
    assert not (tmp_path / "y" / "train.lock").exists()   # a trainer that failed to start holds no directory


def test_resume_refuses_a_changed_training_setting_and_takes_a_longer_run(tmp_path):
    """--resume auto with train.lr changed used to train on at the old rate while the new checkpoints recorded
    the new one: now the setting is refused naming it; the run's length may change, and is said."""
    train_toy(tmp_path, max_steps=4, save_every=2)
    with pytest.raises(TrainingError, match=r"train.lr: .*step-00000004 trained with 0.003, this run asks 0.5; a "
                                            r"resumed run keeps its optimizer, schedule and data order"):
        train_toy(tmp_path, resume="auto", max_steps=6, lr=0.5)
    said = []
    trainer = Trainer(toy_recipe(max_steps=6, save_every=2), ToyData(), tmp_path, device="cpu", resume="auto",
                      progress=False, log=said.append)
    assert trainer.step == 4 and any("train.max_steps 4 -> 6" in s for s in said)
    assert trainer.train().step == 6


def test_model_differences_name_a_new_block_once():
    """A pattern that re-types layers into a new letter (local layers from a global model) is one entry for the
    new block, not one per field it has."""
    base = zoo.load_recipe("recipes/transformer.yaml")
    local = zoo.load_recipe("recipes/transformer.yaml", ["model.pattern=SA", "model.blocks.S.type=swa",
                                                         "model.blocks.S.n_heads=4", "model.blocks.S.window=64",
                                                         "model.blocks.A.rope_base=20000"])
    assert ckpt.model_differences(base, local) == [
        "model.pattern: 'A' -> 'SA'", "model.blocks.A.rope_base: 10000.0 -> 20000.0",
        "model.blocks.S: added (type 'swa')"]
    assert ckpt.model_differences(local, base)[-1] == "model.blocks.S: removed"


def test_init_from_takes_weights_under_settings_that_hold_none(tmp_path):
    """Context extension: the fine-tune may change a setting without weights (here RoPE's base and a log-length
    query scale); the weights load as they are and the log names what changed."""
    train_toy(tmp_path / "base", max_steps=2)
    base = zoo.load_checkpoint(tmp_path / "base")
    letter = next(iter(base.recipe.to_dict()["model"]["blocks"]))
    extended = zoo.load_recipe(toy_recipe(max_steps=2).to_dict(), [f"model.blocks.{letter}.rope_base=40000",
                                                                   f"model.blocks.{letter}.logn_length=8"])
    lines = []
    tuned = Trainer(extended, ToyData(), tmp_path / "x", device="cpu", progress=False, log=lines.append,
                    init_from=str(tmp_path / "base"))
    for k, v in base.state_dict().items():
        assert torch.equal(v, tuned.model.state_dict()[k]), k
    said = next(line for line in lines if line.startswith("initialised from"))
    assert (f"settings changed: model.blocks.{letter}.logn_length: None -> 8, model.blocks.{letter}.rope_base: "
            "10000.0 -> 40000.0") in said
