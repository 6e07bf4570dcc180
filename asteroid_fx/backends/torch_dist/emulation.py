"""Emulation: a torch_dist worker stands in for a slower device of the cluster.

Compute is padded to the cost model's time for the emulated device kind (a host faster than the
emulated device sleeps the difference; a slower one cannot and the lag is counted); every message
carries the time it would arrive over the emulated link (sender's link busy until its previous
message has gone, then latency + bytes / bandwidth), and the receiver waits until then; an
all-reduce is padded to the ring time of the group's slowest link. With a time dilation d every
emulated duration is d times longer (a host slower than the emulated devices can still keep their
pace). A worker whose links are shaped by the kernel (runtime/netns.py runs it in a network
namespace and says so in its environment) paces only its compute: its messages and all-reduces
take the time they take over the shaped links (``Emulation.links`` is False, every arrival time
sent is 0). Every wait goes through ``pause_s``: pacing only imitates a device, and nothing it
computes (a wait made negative by a busy host, a NaN, a garbled arrival time) may end or hang a run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Sequence

from asteroid_fx.cost.stage import allreduce_s, compute_s, tensor_bytes, tie_s
from asteroid_fx.ir.program import Action, Op

# Set (to "1") in the environment of a worker whose links the kernel shapes (runtime/netns.py):
# the emulation then paces compute only, since pacing messages too would count the links twice.
SHAPED_LINKS_ENV = "ASTEROID_SHAPED_LINKS"

PACED = (Op.F, Op.B, Op.ALLREDUCE, Op.TIE)  # the actions an emulated device pads to the cost model's time

# the longest wait pacing takes: a peer waits no longer for a message (the groups' timeout), so a
# longer one, from a garbled arrival time or a cost off by orders of magnitude, could only hang
MAX_PAUSE_S = 60.0


@dataclasses.dataclass(frozen=True)
class Emulation:
    """Pace a worker like the cluster's device: costs from the LayerGraph, links from the Cluster."""

    layer_graph: Any
    cluster: Any
    # time dilation: every emulated duration (compute, latency, bytes over bandwidth) this many
    # times longer, for a host slower than the devices it emulates; divide measured times by it
    dilation: float = 1.0
    # pace messages and all-reduces too; False where the kernel shapes the links (a worker started
    # in a shaped network has SHAPED_LINKS_ENV set), which pacing them here would count twice
    links: bool = dataclasses.field(default_factory=lambda: os.environ.get(SHAPED_LINKS_ENV) != "1")

    def compute_s(self, device: str, a: Action, layers: tuple[int, int]) -> float:
        return self.dilation * compute_s(self.layer_graph, self.cluster.device(device).kind, a.op, layers,
                                         a.rows[1] - a.rows[0])

    def allreduce_s(self, group: Sequence[str], layers: tuple[int, int]) -> float:
        # parameters and floating buffers, as the worker reduces them (and the planner and the
        # simulator count them)
        return self.dilation * allreduce_s(self.layer_graph, self.cluster, group, layers)

    def tie_s(self, a: Action) -> float:
        """A TIE's ring over its holders, of its weights' bytes (its specs' whole shapes)."""
        return self.dilation * tie_s(self.cluster, a.group, sum(tensor_bytes(s.dtype, s.shape) for s in a.specs))

    def link(self, a: str, b: str) -> tuple[float, float]:
        """(bandwidth, latency) of the emulated link, dilated."""
        bandwidth, latency = self.cluster.link(a, b)
        return bandwidth / self.dilation, latency * self.dilation


def pause_s(seconds: float) -> float:
    """The wait pacing takes for ``seconds``: never negative (a busy host is already late), never
    NaN, at most MAX_PAUSE_S. Pacing only imitates a device: what it computes must never end a run."""
    if not seconds > 0:  # negative, zero or NaN
        return 0.0
    return min(seconds, MAX_PAUSE_S)


def wait_until(when: float, *, clock: Callable[[], float] = time.time,
               sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until wall time ``when`` (a message's emulated arrival; at once if it is past) and return
    the wait. The clock is read once: read again for the sleep, a host busy between the two reads
    made the wait negative, and ``time.sleep`` raised."""
    wait = pause_s(when - clock())
    if wait > 0:
        sleep(wait)
    return wait


def pad(took: float, target: float, *, sleep: Callable[[float], None] = time.sleep) -> float:
    """Pad an action that took ``took`` seconds to the emulated device's ``target``; returns the lag,
    the time it took beyond the target (a host slower than the device it emulates cannot keep up)."""
    wait = pause_s(target - took)
    if wait > 0:
        sleep(wait)
    return max(took - target, 0.0) if math.isfinite(took - target) else 0.0
