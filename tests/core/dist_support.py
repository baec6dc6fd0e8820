"""Helpers of the multi-process (gloo) tests: start ranks with a hard timeout, so that a hang
fails the test instead of stalling CI."""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

#: Wall-clock limit of one multi-process job (spawn, every case, teardown).
JOB_TIMEOUT_S = 120
#: gloo's own collective timeout: a rank left alone in a collective errors out after this.
COLLECTIVE_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def run_ranks(fn: Callable[..., None], world: int, args: tuple[Any, ...]) -> None:
    """``fn(rank, *args)`` on ``world`` spawned processes; fails the test (and kills them) when
    they are not all done within JOB_TIMEOUT_S, re-raises a rank's exception."""
    context = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{world} ranks did not finish within {JOB_TIMEOUT_S} s (a hang)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
