"""The simulator's network: transfers as flows that share each device's NIC channels (and, on one
shared medium, the air) max-min fairly; the engine (engine.py) moves them through time."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# the network: flows sharing channels max-min fairly

AIR = -1  # the resource id of the shared medium; device i's out channel is 2i, its in channel 2i+1


class Flow:
    """Bytes draining through some channels. ``rate`` is in bytes/s of each of its edges; an
    ALLREDUCE ring is one flow whose edges move in lockstep."""

    __slots__ = ("uses", "nominal", "remaining", "rate", "latency", "on_done", "edges", "posted", "started",
                 "pair", "first_record")

    def __init__(self, uses, nominal, nbytes, latency, on_done, edges, posted, pair):
        self.uses: tuple[tuple[int, float], ...] = uses  # (channel, share used at the nominal rate)
        self.nominal: float = nominal
        self.remaining: float = nbytes
        self.rate: float = 0.0
        self.latency: float = latency
        self.on_done = on_done
        self.edges: tuple[tuple[str, str, str, float], ...] = edges  # (src, dst, label, bytes) for Transfer records
        self.posted: float = posted
        self.started: float = posted
        self.pair = pair  # the (src, dst) queue it waits in, or None (a collective's own connection)
        self.first_record = -1  # index of its first Transfer record, once drained


def fair_rates(flows: list[Flow]) -> None:
    """Max-min fair shares by progressive filling: raise every flow's fraction of its nominal rate
    together until a channel is full or a flow runs at its nominal rate; freeze those; repeat."""
    load: dict[int, float] = {}
    for f in flows:
        for r, c in f.uses:
            load[r] = load.get(r, 0.0) + c
    if max(load.values(), default=0.0) <= 1.0 + 1e-12:  # nothing oversubscribed: all at full speed
        for f in flows:
            f.rate = f.nominal
        return
    left = dict.fromkeys(load, 1.0)
    active = list(flows)
    level = 0.0  # the fraction every active flow runs at
    while active:
        step = 1.0 - level
        for r, c in load.items():
            if c > 1e-15 and left[r] < step * c:
                step = left[r] / c
        step = max(step, 0.0)
        level += step
        full = set()
        for r, c in load.items():
            left[r] -= step * c
            if c > 1e-15 and left[r] <= 1e-12:
                full.add(r)
        still = []
        for f in active:
            if level >= 1.0 - 1e-12 or any(r in full for r, _ in f.uses):
                f.rate = level * f.nominal
                for r, c in f.uses:
                    load[r] -= c
            else:
                still.append(f)
        if len(still) == len(active):  # cannot happen with exact arithmetic; never loop on rounding
            for f in still:
                f.rate = level * f.nominal
            return
        active = still
