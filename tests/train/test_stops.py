"""Stops and faults: SIGTERM / Ctrl-C save and exit 0, and --resume auto then ends where an uninterrupted run
ends; a checkpoint that fails to load is skipped (auto) or named (explicit); a failed save leaves no
temporary directory; validation data too small for the recipe is refused before training."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import zoo
from zoo.data import DataError, PreparedData
from zoo.train import checkpoint as ckpt
from zoo.train.trainer import Trainer

from tests.helpers import CLI_RECIPE, ToyData, launch, load_script, toy_recipe, train_toy, write_prepared

ROOT = Path(__file__).resolve().parents[2]
LONG = ["train.max_steps=300", "train.save_every=100", "train.eval_every=100"]
train_script = load_script("train")


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of scripts/train.py main(argv) in this process."""
    rc = train_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def spawn(recipe, data, out, *extra):
    """scripts/train.py in its own process, one thread (the same kernels in every run, so losses compare)."""
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe), *LONG, "--out", str(out),
                             "--data", str(data), "--device", "cpu", "--no-progress", *extra], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(stdout):
    return json.loads(stdout.rsplit("summary: ", 1)[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    recipe, data = root / "tiny-cli.yaml", write_prepared(root / "data")
    recipe.write_text(zoo.load_recipe(CLI_RECIPE).to_yaml())
    proc = spawn(recipe, data, root / "out")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return recipe, data, summary(stdout), rows(root / "out")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_resume_reaches_the_same_loss(uninterrupted, tmp_path, signum):
    recipe, data, want, want_rows = uninterrupted
    out = tmp_path / "out"
    proc = spawn(recipe, data, out)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(rows(out)) >= 30):  # mid-run
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    [(step, path)] = re.findall(rf"^stopped by {signum.name} at step (\d+): checkpoint (\S+) "
                                r"\(continue with --resume auto\)$", stdout, flags=re.M)
    step = int(step)
    assert 30 <= step < 300 and path == str(out / "checkpoints" / f"step-{step:08d}")
    assert summary(stdout)["stopped"] == signum.name and summary(stdout)["step"] == step
    assert ckpt.latest_checkpoint(out / "checkpoints") == Path(path)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]

    proc = spawn(recipe, data, out, "--resume", "auto")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    got = summary(stdout)
    assert got["step"] == 300 and got["train_loss"] == want["train_loss"] and got["val_loss"] == want["val_loss"]
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in rows(out)] == \
        [(r["step"], r["loss"], r.get("val_loss")) for r in want_rows]


def test_second_ctrl_c_exits_at_once(cli_recipe, prepared_bytes, tmp_path, capsys, monkeypatch):
    step = Trainer.train_step

    def interrupted_twice(self):
        loss = step(self)
        if self.step == 5:
            signal.raise_signal(signal.SIGINT)  # the first: stop after this step ...
            signal.raise_signal(signal.SIGINT)  # ... the second: now
        return loss

    monkeypatch.setattr(Trainer, "train_step", interrupted_twice)
    before = signal.getsignal(signal.SIGINT)
    rc, _, err = cli(capsys, cli_recipe, "--out", tmp_path, "--data", prepared_bytes, "--device", "cpu",
                     "--no-progress")
    assert rc == 130 and err == "interrupted: stopped at once, without a checkpoint\n"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]
    assert signal.getsignal(signal.SIGINT) is before  # the trainer's handlers are gone with it
    assert not (tmp_path / "train.lock").exists()


class _SignalOnRank1(ToyData):
    def __init__(self, rank, at):
        self.rank, self.at = rank, at

    def train_batch(self, step, micro, batch_size, seq_len):
        if self.rank == 1 and step == self.at:
            signal.raise_signal(signal.SIGTERM)
        return super().train_batch(step, micro, batch_size, seq_len)


def _stop_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        trainer = Trainer(toy_recipe(max_steps=20, save_every=10, eval_every=10), _SignalOnRank1(rank, 4), out,
                          device="cpu", progress=False, log=lambda s: None)
        result = trainer.train()
        (out / f"rank{rank}.json").write_text(json.dumps({"step": result.step, "stopped": result.stopped}))
        # both ranks reach the teardown together: a rank that closes its gloo pairs while the other still has
        # them open aborted the other (exit -6, "terminate called without an active exception") about 1 run in 10
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Under torchrun the flag is all-reduced with the loss: rank 1's SIGTERM during step 5 stops both ranks
    after step 5, and they save it together."""
    launch(_stop_worker, 2, tmp_path, timeout=120)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got == [{"step": 5, "stopped": "a signal to another rank"}, {"step": 5, "stopped": "SIGTERM"}]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000005"]


# -- checkpoints that fail to load -------------------------------------------------------------------------

def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage, why", [
    # the reason in parentheses is the library's first sentence, e.g. "Error while deserializing header:
    # incomplete metadata, file not fully covered"; it varies with the version and with where the cut falls
    (lambda p: _truncate(p / "model.safetensors"), "model.safetensors is unreadable or corrupt ("),
    (lambda p: _truncate(p / "state.pt"), "state.pt is unreadable or corrupt ("),
    (lambda p: (p / "trainer.json").unlink(), "trainer.json is missing"),
    (lambda p: (p / "trainer.json").write_text('{"step": 6, "tok'), "trainer.json is unreadable or corrupt"),
])
def test_resume_auto_skips_a_checkpoint_that_fails_to_load(tmp_path, damage, why):
    straight, _ = train_toy(tmp_path / "a", max_steps=6, save_every=3)
    train_toy(tmp_path / "b", max_steps=6, save_every=3)
    newest = tmp_path / "b" / "checkpoints" / "step-00000006"
    damage(newest)
    logs = []
    trainer = Trainer(toy_recipe(max_steps=6, save_every=3), ToyData(), tmp_path / "b", device="cpu", resume="auto",
                      progress=False, log=logs.append)
    assert logs[0].startswith(f"warning: resume auto: skipped {newest} ({newest}/{why}")
    assert logs[0].endswith(f"; moved it to {newest.with_name('broken-step-00000006')}")
    assert logs[1] == f"resumed from {newest.with_name('step-00000003')} at step 3"
    trainer.train()
    for (name, a), b in zip(straight.model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [p.name for p in ckpt.step_dirs(tmp_path / "b" / "checkpoints")] == ["step-00000003", "step-00000006"]


def test_no_checkpoint_loads(tmp_path):
    train_toy(tmp_path, max_steps=6, save_every=3)
    for path in ckpt.step_dirs(tmp_path / "checkpoints"):
        _truncate(path / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=rf"resume auto: no checkpoint in {tmp_path}/checkpoints loads "
                                                   r"\(2 skipped, see the warnings above\)"):
        train_toy(tmp_path, resume="auto")
    assert not (tmp_path / "train.lock").exists()  # released at once, not when the trainer is collected


def test_explicit_corrupt_checkpoint_is_an_error_naming_the_file(cli_recipe, prepared_bytes, tmp_path, capsys):
    args = ("--data", prepared_bytes, "--device", "cpu", "--no-progress")
    assert cli(capsys, cli_recipe, "--out", tmp_path / "a", *args)[0] == 0
    path = tmp_path / "a" / "checkpoints" / "step-00000008"
    _truncate(path / "state.pt")
    rc, _, err = cli(capsys, cli_recipe, "--out", tmp_path / "b", "--resume", path, *args)
    assert rc == 2 and err.startswith(f"error: checkpoint: {path}/state.pt is unreadable or corrupt (")
    assert err.count("\n") == 1 and err.endswith(")\n")  # one line, no traceback
    (path / "recipe.yaml").unlink()
    rc, _, err = cli(capsys, cli_recipe, "--out", tmp_path / "b", "--resume", path, *args)
    assert rc == 2 and err == f"error: checkpoint: {path}/recipe.yaml is missing\n"
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


# -- saves that fail -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("where, error, reason", [
    ("save_file", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device (ENOSPC)"),
    ("torch_save", PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied (EACCES)"),
])
def test_failed_save_keeps_the_previous_checkpoint(cli_recipe, prepared_bytes, tmp_path, capsys, monkeypatch,
                                                   where, error, reason):
    calls = []

    def failing(original):
        def write(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint
                raise error
            return original(*args, **kwargs)
        return write

    if where == "save_file":
        monkeypatch.setattr(ckpt, "save_file", failing(ckpt.save_file))
    else:
        monkeypatch.setattr(ckpt.torch, "save", failing(torch.save))
    rc, _, err = cli(capsys, cli_recipe, "--out", tmp_path, "--data", prepared_bytes, "--device", "cpu",
                     "--no-progress")
    root = tmp_path / "checkpoints"
    assert rc == 2 and err == (f"error: checkpoint: could not write {root}/step-00000008 ({reason}); the previous "
                               f"checkpoint {root}/step-00000004 is kept\n")
    assert [p.name for p in root.iterdir()] == ["step-00000004"]  # no .tmp-*
    zoo.load_checkpoint(tmp_path)


def test_failed_resave_of_the_same_step_keeps_it(tmp_path, monkeypatch):
    trainer, _ = train_toy(tmp_path, max_steps=3)
    monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(ckpt.CheckpointError, match=r"could not write .*step-00000003 \(I/O error \(EIO\)\)"):
        trainer.save()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]
    ckpt.read_checkpoint(tmp_path / "checkpoints" / "step-00000003")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_save_into_a_read_only_directory(tmp_path):
    trainer, _ = train_toy(tmp_path, max_steps=3)
    (tmp_path / "checkpoints").chmod(0o555)
    try:
        trainer.step = 4
        with pytest.raises(ckpt.CheckpointError, match=r"could not write .*step-00000004 \(Permission denied "
                                                       r"\(EACCES\)\); the previous checkpoint .*-00000003 is kept"):
            trainer.save()
    finally:
        (tmp_path / "checkpoints").chmod(0o755)


# -- validation data checked at start-up ---------------------------------------------------------------------

def test_validation_data_too_short_is_refused_before_training(cli_recipe, tmp_path, capsys):
    short = write_prepared(tmp_path / "short", val=10)
    rc, _, err = cli(capsys, cli_recipe, "--out", tmp_path / "run", "--data", short, "--device", "cpu",
                     "--no-progress")
    assert rc == 2 and err == f"error: validation data: {short}/val holds 10 tokens, fewer than train.seq_len 16\n"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    few = write_prepared(tmp_path / "few", val=18)  # 3 windows of 16, an evaluation takes 2 x 2
    with pytest.raises(DataError, match=re.escape(
            f"validation data: {few}/val holds 18 tokens, 3 distinct windows of train.seq_len 16, fewer than the "
            "train.eval_batches x train.batch_size = 2 x 2 = 4 that an evaluation takes; lower train.eval_batches")):
        Trainer(zoo.load_recipe(CLI_RECIPE), PreparedData(few), tmp_path / "run", device="cpu", progress=False)
    Trainer(zoo.load_recipe(CLI_RECIPE, ["train.eval_batches=1"]), PreparedData(few), tmp_path / "run",
            device="cpu", progress=False, log=lambda s: None)


def test_validation_data_of_any_source_is_checked(tmp_path):
    class FewBatches(ToyData):
        def val_batches(self, n, batch_size, seq_len):
            return super().val_batches(1, batch_size, seq_len)

    class Short(ToyData):
        def val_batches(self, n, batch_size, seq_len):
            raise DataError(f"seq_len: {seq_len} is longer than the data")

    with pytest.raises(DataError, match=r"^validation data: 1 batches, fewer than train.eval_batches 2$"):
        Trainer(toy_recipe(), FewBatches(), tmp_path, device="cpu")
    with pytest.raises(DataError, match=r"^validation data: seq_len: 16 is longer than the data$"):
        Trainer(toy_recipe(), Short(), tmp_path, device="cpu")
    assert not (tmp_path / "train.lock").exists() and np.isfinite(train_toy(tmp_path)[1].val_loss)
