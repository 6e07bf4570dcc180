"""Worker processes for tests that drive torch.distributed by hand: one spawned process per rank."""

from __future__ import annotations

import socket
from typing import Callable


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, devices: list[str], *args) -> None:
    """``worker(rank, world, port, devices, *args)`` in a spawned process per device, joined; a
    rank's exception fails the caller."""
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(len(devices), free_port(), devices, *args), nprocs=len(devices), join=True,
                       start_method="spawn")
