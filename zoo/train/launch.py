"""Processes started by torchrun: the process group from the environment, and work that rank 0 does first.

    init_from_env()                        # gloo on CPU, NCCL on GPUs; a no-op for a single process
    data = rank0_first(lambda: prepared_data(recipe))   # rank 0 writes the cache, the others then read it
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when this call created it (and
    `close()` should end it), False when there is none or the caller made its own."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return True
    return False


def rank0_first(fn: Callable[[], T]) -> T:
    """fn() on rank 0, then on the other ranks: a cache that rank 0 writes (prepared data) is read, not
    written W times at once. An error on rank 0 reaches the others as an error, not a hang."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    failed = [None]
    if dist.get_rank() == 0:
        try:
            out = fn()
        except Exception as err:
            failed[0] = f"{type(err).__name__}: {err}"
            dist.broadcast_object_list(failed, src=0)
            raise
    dist.broadcast_object_list(failed, src=0)
    if dist.get_rank() != 0:
        if failed[0] is not None:
            raise RuntimeError(f"rank 0 failed: {failed[0]}")
        out = fn()
    return out


def close():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
