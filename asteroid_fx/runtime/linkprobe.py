"""linkprobe: bandwidth and latency between every pair of workers, measured by ping-pong over
torch.distributed (gloo), written into a cluster file.

For every ordered pair (i, j), one pair at a time while the others wait at a barrier: i sends j a
message of each size and j answers with one byte; the round trip is latency(i->j) + latency(j->i)
+ size / bandwidth(i->j). A least-squares line through the fastest round trip at each size gives
the bandwidth (its slope) and the one-way latency (half its intercept, the same both ways), so an
asymmetric link (a Wi-Fi uplink) gets two bandwidths. The fastest, not the median: a round trip
can only be delayed by what else runs (the scheduler, other traffic), never sped up, as for ping.

``probe`` runs inside an initialised process group (every rank calls it; rank 0 gets the result);
``probe_local`` spawns N workers on loopback for an emulated cluster, with bounded timeouts, and
always reaps them. ``asteroid profile --links`` is the command line (cli/profile.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import multiprocessing as mp
import socket
import time
from typing import Any, Sequence

from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime.errors import RunFailed, RunTimedOut

DEFAULT_SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)  # 1 KiB .. 4 MiB
DEFAULT_REPEATS = 7


@dataclasses.dataclass(frozen=True)
class Links:
    """What ``probe`` measured: N x N bandwidth (bytes/s) and one-way latency (s); the diagonal is
    inf / 0 as in a Cluster; ``samples`` keeps (src, dst, size, fastest round trip s)."""

    bandwidth: tuple[tuple[float, ...], ...]
    latency: tuple[tuple[float, ...], ...]
    samples: tuple[tuple[int, int, int, float], ...] = ()

    def __len__(self) -> int:
        return len(self.bandwidth)

    def __str__(self) -> str:
        n = len(self)
        lines = ["links: bandwidth MB/s, latency us (row sends to column)"]
        for i in range(n):
            cells = ["-" if i == j else f"{self.bandwidth[i][j] / 1e6:.0f}/{self.latency[i][j] * 1e6:.0f}"
                     for j in range(n)]
            lines.append(f"  rank {i}: " + "  ".join(f"{c:>12}" for c in cells))
        return "\n".join(lines)


def fit_link(sizes: Sequence[int], round_trips: Sequence[float]) -> tuple[float, float]:
    """(bandwidth bytes/s, one-way latency s) from round trips of messages of ``sizes`` answered
    by one byte: least squares of t = 2 latency + size / bandwidth, both kept positive."""
    n = len(sizes)
    if n < 2:
        raise InputError("fitting a link needs round trips at two or more message sizes")
    mx, my = sum(sizes) / n, sum(round_trips) / n
    var = sum((s - mx) ** 2 for s in sizes)
    slope = sum((s - mx) * (t - my) for s, t in zip(sizes, round_trips)) / var
    if slope <= 0:  # no visible size effect: the link is faster than the largest message shows
        slope = min(round_trips) / max(sizes) / 1e3
    intercept = my - slope * mx
    latency = max(0.0, intercept / 2) if intercept > 0 else min(round_trips) / 2
    return 1.0 / slope, latency


def probe(sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = DEFAULT_REPEATS, warmup: int = 2) -> Links | None:
    """Ping-pong every ordered pair of ranks of the default process group; rank 0 returns the
    Links, the others None. Every rank must call it."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    ack = torch.zeros(1, dtype=torch.uint8)
    results: list[float] = []  # this rank's fastest round trips, in pair order, as the sender
    for i in range(world):
        for j in range(world):
            if i == j:
                continue
            for size in sizes:
                if rank in (i, j):
                    msg = torch.zeros(size, dtype=torch.uint8)
                    times = []
                    for k in range(warmup + repeats):
                        if rank == i:
                            t0 = time.perf_counter()
                            dist.send(msg, j)
                            dist.recv(ack, j)
                            if k >= warmup:
                                times.append(time.perf_counter() - t0)
                        else:
                            dist.recv(msg, i)
                            dist.send(ack, i)
                    if rank == i:
                        results.append(min(times))
                dist.barrier()  # one pair at a time: concurrent traffic would share the links
    # gather every sender's round trips at rank 0, as a fixed-size float64 tensor per rank
    per_rank = (world - 1) * len(sizes)
    mine = torch.tensor(results + [0.0] * (per_rank - len(results)), dtype=torch.float64)
    gathered = [torch.zeros(per_rank, dtype=torch.float64) for _ in range(world)] if rank == 0 else None
    dist.gather(mine, gathered, dst=0)
    if rank != 0:
        return None
    bandwidth = [[math.inf] * world for _ in range(world)]
    latency = [[0.0] * world for _ in range(world)]
    samples = []
    for i in range(world):
        values = gathered[i].tolist()
        peers = [j for j in range(world) if j != i]
        for p, j in enumerate(peers):
            rtts = values[p * len(sizes):(p + 1) * len(sizes)]
            bandwidth[i][j], latency[i][j] = fit_link(sizes, rtts)
            samples += [(i, j, s, t) for s, t in zip(sizes, rtts)]
    # one latency per pair, the mean of both directions' estimates (the fit cannot split them)
    for i in range(world):
        for j in range(i + 1, world):
            latency[i][j] = latency[j][i] = (latency[i][j] + latency[j][i]) / 2
    return Links(tuple(map(tuple, bandwidth)), tuple(map(tuple, latency)), tuple(samples))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, init_method: str, timeout_s: float, sizes: Sequence[int], repeats: int,
            queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            links = probe(sizes, repeats)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            queue.put(("ok", dataclasses.asdict(links)))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        queue.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))


def probe_local(workers: int, *, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = DEFAULT_REPEATS,
                timeout_s: float = 60.0) -> Links:
    """Spawn ``workers`` processes on loopback, probe every pair, reap them; raises TimeoutError
    (after ``timeout_s``) or RuntimeError (a worker failed) with what happened."""
    if workers < 2:
        raise InputError(f"probing links needs at least 2 workers, got {workers}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_worker, args=(r, workers, init, timeout_s, tuple(sizes), repeats, queue),
                         daemon=True) for r in range(workers)]
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunTimedOut(f"link probe of {workers} local workers did not finish in {timeout_s:g}s; "
                                  "raise --timeout on a loaded machine")
            try:
                status, payload = queue.get(timeout=min(left, 0.5))
            except Exception:  # queue.Empty: check the workers are alive and wait on
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RunFailed(f"link probe worker(s) exited with code "
                                    f"{', '.join(str(p.exitcode) for p in dead)} before reporting") from None
                continue
            if status == "error":
                raise RunFailed(f"link probe failed: {payload}")
            return Links(tuple(map(tuple, payload["bandwidth"])), tuple(map(tuple, payload["latency"])),
                         tuple(map(tuple, payload["samples"])))
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join()
        queue.close()


def apply_links(cluster: Cluster, links: Links) -> Cluster:
    """``cluster`` with its bandwidth and latency matrices replaced by the measured ones (rank i is
    ``cluster.devices[i]``)."""
    if len(links) != len(cluster):
        raise InputError(f"measured {len(links)} workers but the cluster has {len(cluster)} devices; "
                         "start one worker per device, rank i for devices[i]")
    return dataclasses.replace(cluster, bandwidth=links.bandwidth, latency=links.latency)
