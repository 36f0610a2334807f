"""A run directory belongs to one run: another run's directory is refused (or moved aside with --overwrite),
a lock keeps a second trainer out, and a resumed run's metrics.jsonl holds each step once."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from zoo.train import checkpoint as ckpt
from zoo.train.run_dir import RunDirError, RunLock
from zoo.train.trainer import Trainer

from tests.helpers import ToyData, launch, load_script, toy_recipe, train_toy

train_script = load_script("train")


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of scripts/train.py main(argv) in this process."""
    rc = train_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_refuses_another_runs_directory(cli_recipe, prepared_bytes, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--out", out, "--data", prepared_bytes, "--device", "cpu", "--no-progress")
    assert cli(capsys, cli_recipe, *args)[0] == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    rc, _, err = cli(capsys, cli_recipe, "train.max_steps=12", *args)
    assert rc == 2
    assert err == (f"error: run directory {out} holds another run (newest checkpoint {out}/checkpoints/step-00000008; "
                   f"metrics.jsonl to step 8): continue it with --resume auto, or start over with --overwrite "
                   f"(moves it into {out}/replaced-<time>)\n")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # untouched
    assert steps(out) == list(range(1, 9))

    # --resume auto continues it: each step once in metrics.jsonl
    rc, stdout, _ = cli(capsys, cli_recipe, "train.max_steps=12", *args, "--resume", "auto")
    assert rc == 0 and f"resumed from {out}/checkpoints/step-00000008 at step 8" in stdout
    assert steps(out) == list(range(1, 13))

    # --overwrite moves the old run aside and starts at step 0
    rc, stdout, _ = cli(capsys, cli_recipe, *args, "--overwrite")
    assert rc == 0
    [aside] = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert (f"overwrite: moved the previous run in {out} (newest checkpoint {out}/checkpoints/step-00000012; "
            f"metrics.jsonl to step 12) to {aside}; delete it when no longer needed") in stdout
    assert steps(out) == list(range(1, 9)) and steps(aside) == list(range(1, 13))
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000004", "step-00000008"]
    assert [p.name for p in ckpt.list_checkpoints(aside / "checkpoints")] == ["step-00000008", "step-00000012"]

    rc, _, err = cli(capsys, cli_recipe, *args, "--overwrite", "--resume", "auto")
    assert rc == 2 and err == (f"error: --overwrite and --resume auto contradict each other (one replaces the run "
                               f"in {out}, the other continues it); give one of them\n")


def test_metrics_alone_are_another_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n{"step": 2, "loss": 3.9}\n')
    (tmp_path / "notes.txt").write_text("not a run file")
    with pytest.raises(RunDirError, match=r"holds another run \(no checkpoint; metrics.jsonl to step 2\)"):
        train_toy(tmp_path)
    train_toy(tmp_path / "fresh")  # a directory with other files only is free: prepared data, notes
    (tmp_path / "fresh" / "metrics.jsonl").unlink()
    (tmp_path / "fresh" / "checkpoints").rename(tmp_path / "fresh" / "kept")
    train_toy(tmp_path / "fresh")


def test_resume_older_checkpoint_of_the_same_run_is_refused(tmp_path):
    train_toy(tmp_path / "run", max_steps=6, save_every=3)
    older = tmp_path / "run" / "checkpoints" / "step-00000003"
    with pytest.raises(RunDirError, match=(f"run directory {tmp_path / 'run'} holds {older.parent}/step-00000006, "
                                           f"newer than {older} that --resume names: continuing from the older step "
                                           "would mix two histories")):
        train_toy(tmp_path / "run", resume=str(older), max_steps=6)
    # an explicit checkpoint from elsewhere into a directory that holds a run: refused as without --resume
    shutil.copytree(older, tmp_path / "elsewhere" / older.name)
    with pytest.raises(RunDirError, match="holds another run"):
        train_toy(tmp_path / "run", resume=str(tmp_path / "elsewhere" / older.name), max_steps=6)
    # ... and into an empty directory it continues from the checkpoint's step
    trainer, _ = train_toy(tmp_path / "new", resume=str(older), max_steps=6)
    assert trainer.step == 6 and steps(tmp_path / "new") == [4, 5, 6]


def test_metrics_hold_each_step_once_after_resume(tmp_path):
    """A run killed after logging step 6 but before saving it resumes from step 3: rows 4-6 are written again,
    not appended beside the first ones; a torn last line goes too."""
    straight, _ = train_toy(tmp_path / "a", max_steps=6, save_every=3)
    train_toy(tmp_path / "b", max_steps=6, save_every=3)
    os.rename(tmp_path / "b" / "checkpoints" / "step-00000006", tmp_path / "b-step6")
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    logs = []
    resumed = Trainer(toy_recipe(max_steps=6, save_every=3), ToyData(), tmp_path / "b", device="cpu",
                      resume="auto", progress=False, log=logs.append)
    resumed.train()
    assert f"metrics: dropped 4 rows after step 3 from {tmp_path / 'b' / 'metrics.jsonl'}" in logs
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r.get("val_loss")) for r in rows] == [(r["loss"], r.get("val_loss")) for r in want]


def test_second_trainer_on_a_locked_directory(tmp_path, cli_recipe, prepared_bytes, capsys):
    holder = Trainer(toy_recipe(), ToyData(), tmp_path, device="cpu", progress=False, log=lambda s: None)
    lock = tmp_path / "train.lock"
    msg = (f"run directory {tmp_path} is in use by process {os.getpid()} on {socket.gethostname()} (lock {lock}); "
           "wait for that run to end or stop it")
    with pytest.raises(RunDirError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        Trainer(toy_recipe(), ToyData(), tmp_path, device="cpu", resume="auto", progress=False)
    rc, _, err = cli(capsys, cli_recipe, "--out", tmp_path, "--data", prepared_bytes, "--device", "cpu",
                     "--no-progress", "--resume", "auto")
    assert rc == 2 and err == f"error: {msg}\n"
    holder.train()  # releases the lock when done
    assert not lock.exists()
    train_toy(tmp_path, resume="auto", max_steps=8)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "train.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}) + "\n")
    logs = []
    Trainer(toy_recipe(), ToyData(), tmp_path, device="cpu", progress=False, log=logs.append).train()
    assert logs[0] == (f"lock: took over {lock}, left by process {dead.pid} on {socket.gethostname()}, "
                       "which no longer holds it")
    assert not lock.exists()


def test_lock_is_released_when_the_trainer_is_collected(tmp_path):
    trainer = Trainer(toy_recipe(), ToyData(), tmp_path, device="cpu", progress=False, log=lambda s: None)
    assert trainer.lock.held and (tmp_path / "train.lock").exists()
    del trainer
    assert not (tmp_path / "train.lock").exists()
    RunLock(tmp_path).release()


def _refusing_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        try:
            Trainer(toy_recipe(), ToyData(), out, device="cpu", progress=False, log=lambda s: None)
        except RunDirError as err:
            (out / f"error{rank}.txt").write_text(str(err))
        dist.barrier()   # meet before tearing gloo down: see _stop_worker in test_stops.py
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_refuses_together(tmp_path):
    """Only rank 0 looks at the directory; the others learn its refusal instead of waiting in a collective."""
    train_toy(tmp_path, max_steps=3)
    launch(_refusing_worker, 2, tmp_path, timeout=120)
    for rank in (0, 1):
        assert "holds another run" in (tmp_path / f"error{rank}.txt").read_text()
