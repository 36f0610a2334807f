"""A run directory belongs to one run.

    runs/x/  train.lock  metrics.jsonl  checkpoints/step-*/  tensorboard/  [replaced-<time>/]

`claim` is what a trainer does first: lock the directory, then check that what it holds is this run's.
A directory that holds another run's checkpoints or metrics is refused unless the trainer continues that
run (resume) or replaces it (overwrite: the old run is moved into `replaced-<time>/`, never deleted).
Without this a fresh run in an old directory started at step 0, had its new checkpoints pruned as
"older" than the old run's, and appended its metrics to the old run's.

The lock is an `flock` on train.lock, held for the trainer's life: the kernel drops it when the process
dies, so a lock never outlives its holder, and the file's text (pid, host) names the holder in the
error a second trainer gives. A file left by a dead process is taken over with a line saying so.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Callable, Optional

from zoo.train.checkpoint import checkpoint_step, reason, resolve_checkpoint, step_dirs

RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard")  # what a run writes; `replaced-*` is not a run


class RunDirError(RuntimeError):
    pass


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']}"
    except (ValueError, KeyError, TypeError):
        return f"a process that wrote {text[:80]!r}" if text else ""


def _release(fd: int, path: str):
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)  # before unlocking: a waiter then finds no file to take over
    except OSError:
        pass
    os.close(fd)


class RunLock:
    """train.lock of `directory`, held until `release()` or until this object is collected."""

    NAME = "train.lock"

    def __init__(self, directory, log: Callable[[str], None] = print, name: Optional[str] = None):
        directory = Path(directory)
        self.path = directory / (name or self.NAME)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd) or "another process"
                    os.close(fd)
                    raise RunDirError(f"run directory {directory} is in use by {holder} (lock {self.path}); "
                                      "wait for that run to end or stop it") from None
                try:  # the holder may have released (unlinked) the file between our open and our flock
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            stale = _holder(fd)
            if stale:
                log(f"lock: took over {self.path}, left by {stale}, which no longer holds it")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode())
        except OSError as err:
            raise RunDirError(f"run directory {directory}: cannot write its lock file {self.path} "
                              f"({reason(err)})") from None
        self._finalizer = weakref.finalize(self, _release, fd, str(self.path))

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self):
        self._finalizer()


def previous_run(directory) -> Optional[str]:
    """What another run left in `directory` ('newest checkpoint ...; metrics.jsonl to step N'), or None."""
    directory = Path(directory)
    found = step_dirs(directory / "checkpoints")
    rows = _read_rows(directory / "metrics.jsonl")
    tb = directory / "tensorboard"
    has_tb = tb.is_dir() and any(p.is_file() for p in tb.rglob("*"))
    if not (found or rows or has_tb):
        return None
    parts = [f"newest checkpoint {found[-1]}" if found else "no checkpoint"]
    if rows:
        parts.append(f"metrics.jsonl to step {max(r.get('step', 0) for r in rows)}")
    if has_tb:
        parts.append("tensorboard logs")
    return "; ".join(parts)


def move_aside(directory, names=RUN_FILES) -> Path:
    """Move the run files (`names`) of `directory` into a new `directory/replaced-<time>/`, which is returned."""
    directory = Path(directory)
    dest = directory / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = directory / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir()
    for name in names:
        if (directory / name).exists():
            os.rename(directory / name, dest / name)
    return dest


def claim(directory, resume: Optional[str], overwrite: bool, log: Callable[[str], None] = print) -> RunLock:
    """Lock `directory` for one run and check that what it holds may be continued or replaced."""
    directory = Path(directory)
    existed = directory.exists()
    lock = RunLock(directory, log)
    try:
        _check(directory, resume, overwrite, log)
    except BaseException:
        lock.release()
        if not existed:   # a run that never started leaves no empty directory behind
            try:
                directory.rmdir()
            except OSError:
                pass
        raise
    return lock


def _check(directory: Path, resume: Optional[str], overwrite: bool, log):
    root = directory / "checkpoints"
    if resume == "auto":
        if overwrite:
            raise RunDirError("--overwrite and --resume auto contradict each other (one replaces the run in "
                              f"{directory}, the other continues it); give one of them")
        return
    if resume:
        path = resolve_checkpoint(resume)
        if path.resolve().parent == root.resolve():  # a checkpoint of this very run
            if overwrite:
                raise RunDirError(f"--overwrite would move aside {path}, the checkpoint that --resume names")
            newer = [p for p in step_dirs(root) if checkpoint_step(p) > checkpoint_step(path)]
            if newer:
                raise RunDirError(f"run directory {directory} holds {newer[-1]}, newer than {path} that --resume "
                                  "names: continuing from the older step would mix two histories; use --resume "
                                  "auto, or copy the older checkpoint into a new --out")
            return
    found = previous_run(directory)
    if found is None:
        return
    if not overwrite:
        raise RunDirError(f"run directory {directory} holds another run ({found}): continue it with --resume auto, "
                          f"or start over with --overwrite (moves it into {directory / 'replaced-<time>'})")
    dest = move_aside(directory)
    log(f"overwrite: moved the previous run in {directory} ({found}) to {dest}; delete it when no longer needed")


def _read_rows(path: Path) -> list:
    """The JSON rows of a metrics file; a torn last line (a kill mid-write) is not a row."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trim_metrics(path, step: int) -> int:
    """Drop the rows of metrics file `path` after `step` (a resumed run writes them again), atomically;
    returns how many lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)
