"""Run a function on W gloo processes and bring each rank's result back, without ever hanging.

A `RankPool` spawns W processes once (torch import and process-group setup cost seconds each on a
small machine) and then runs any number of checks on them: `pool.run(fn, *args)` calls fn(*args) on
every rank and returns the per-rank results. A rank whose check raises reports its traceback and
exits at once, which closes its sockets, so the ranks blocked in a collective with it fail within
seconds instead of waiting for the process-group timeout; the parent then collects every rank's
outcome, stops the pool and raises `RankError`. A pool that failed is rebuilt by `PoolCache` on next
use. A deadline on every wait in the parent bounds the rest (a rank that neither answers nor dies).
"""
from __future__ import annotations

import io
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """One or more ranks failed; `outcomes` maps rank -> traceback text or a description."""

    def __init__(self, outcomes: dict):
        self.outcomes = outcomes
        text = "\n".join(f"--- rank {r}: {msg}" for r, msg in sorted(outcomes.items()))
        super().__init__(f"{len(outcomes)} rank(s) failed\n{text}")


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank, world_size, init_file, tasks, results, pg_timeout_s):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            out = _dumps(fn(*args))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
            results.close()
            results.join_thread()  # the report must leave before the process does
            os._exit(1)  # closing the sockets now makes peers blocked in a collective fail fast
        results.put((rank, "ok", out))
    results.close()
    results.join_thread()
    # no destroy_process_group: it can wait on peers that are already gone; exiting closes everything
    os._exit(0)


class RankPool:
    def __init__(self, world_size: int, pg_timeout_s: float = 60.0):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        fd, self._init_file = tempfile.mkstemp(prefix="zoo_cp_")
        os.close(fd)
        os.unlink(self._init_file)  # the file store creates it
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [ctx.Process(target=_worker, args=(r, world_size, self._init_file, self._tasks[r],
                                                          self._results, pg_timeout_s), daemon=True)
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self.alive = True

    def run(self, fn, *args, timeout: float = 300.0, grace: float = 30.0):
        """fn(*args) on every rank; returns [result of rank 0, ..., rank W-1]. Raises RankError if any
        rank raised, died or missed `timeout` seconds (then the pool is stopped)."""
        if not self.alive:
            raise RuntimeError("this RankPool was stopped after a failure")
        for q in self._tasks:
            q.put((fn, args))
        done, failed = {}, {}
        deadline = time.monotonic() + timeout
        while len(done) + len(failed) < self.world_size:
            now = time.monotonic()
            if now >= deadline:
                for r in range(self.world_size):
                    if r not in done and r not in failed:
                        failed[r] = f"no answer within the deadline ({timeout:.0f} s, or {grace:.0f} s after a failure)"
                break
            try:
                rank, status, payload = self._results.get(timeout=min(1.0, deadline - now))
            except queue.Empty:
                for r, p in enumerate(self._procs):
                    if r not in done and r not in failed and not p.is_alive():
                        # died without a report (killed, segfault): give its queue a moment to drain first
                        try:
                            rank, status, payload = self._results.get(timeout=1.0)
                        except queue.Empty:
                            failed[r] = f"process died with exit code {p.exitcode} without a report"
                            deadline = min(deadline, time.monotonic() + grace)
                        else:
                            (done if status == "ok" else failed)[rank] = _loads(payload) if status == "ok" else payload
                        break
                continue
            if status == "ok":
                done[rank] = _loads(payload)
            else:
                failed[rank] = payload
                deadline = min(deadline, time.monotonic() + grace)
        if failed:
            self.close(force=True)
            raise RankError(failed)
        return [done[r] for r in range(self.world_size)]

    def close(self, force: bool = False):
        if not self.alive:
            return
        self.alive = False
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)


class PoolCache:
    """One live RankPool per world size, rebuilt after a failure; `run(W, fn, *args)`."""

    def __init__(self):
        self._pools: dict[int, RankPool] = {}

    def run(self, world_size: int, fn, *args, timeout: float = 300.0):
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = RankPool(world_size)
        return pool.run(fn, *args, timeout=timeout)

    def close(self):
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
