"""Processes spawned as the ranks of a CPU (gloo) process group, for the tests that check a step
under DDP or FSDP against one process: a free local port for the rendezvous, and a spawn that
fails the test (after killing the ranks) rather than hang when a rank never finishes."""
from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, args: tuple, nprocs: int, timeout_s: float) -> None:
    """``worker(rank, *args)`` in ``nprocs`` spawned processes, joined within ``timeout_s``."""
    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} ranks did not finish within {timeout_s} s")
