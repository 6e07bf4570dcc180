"""Candidates of the Asteroid planner (hpp.py): the micro-batchings and device orders it plans
for, and a candidate made exact (each group's best integer rows, scored by the closed form)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Sequence

from asteroid_fx.cost.estimate import CostTable
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.plan import StagePlan
from asteroid_fx.passes.planners.stage_count import computes

RANDOM_ORDERS = 6  # for clusters of up to 8 devices; 2 beyond
ALL_ORDERS_UP_TO = 5  # devices; 5! = 120 orders


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A plan before simulation: stages with exact rows and the closed-form iteration time."""

    stages: tuple[StagePlan, ...]
    microbatches: int
    rows: int
    estimate_s: float
    schedule: str = "1f1b"

    @property
    def key(self) -> tuple:
        return (self.microbatches, self.schedule, tuple((st.layers, st.devices, st.rows) for st in self.stages))


def microbatch_choices(batch: int, microbatches: int | None, microbatch_rows: int | None,
                       max_microbatches: int = 64) -> list[tuple[int, int]]:
    """(M, R) pairs to plan: the pinned one, or every divisor split of the batch."""
    if microbatches is not None and microbatch_rows is not None:
        return [(microbatches, microbatch_rows)]
    if microbatches is not None:
        if batch % microbatches:
            raise InputError(f"a batch of {batch} rows does not split into {microbatches} micro-batches")
        return [(microbatches, batch // microbatches)]
    if microbatch_rows is not None:
        if batch % microbatch_rows:
            raise InputError(f"a batch of {batch} rows does not split into micro-batches of {microbatch_rows}")
        return [(batch // microbatch_rows, microbatch_rows)]
    return [(batch // r, r) for r in range(1, batch + 1) if batch % r == 0 and batch // r <= max_microbatches]


# ---------------------------------------------------------------------------------------------
# device orderings


def _speed(table: CostTable, device: str) -> float:
    t = table.stage_time(device, 0, len(table.lg), table.max_rows)
    return 1.0 / t if t > 0 else 1e12


def orderings(table: CostTable, devices: Sequence[str]) -> list[tuple[str, ...]]:
    """The device orders the DP runs on: groups are contiguous runs of one of them."""
    speed = {d: _speed(table, d) for d in devices}
    mem = table.budget
    out = [
        tuple(sorted(devices, key=lambda d: (-mem[d], -speed[d], d))),  # the paper's order
        tuple(sorted(devices, key=lambda d: (-speed[d], -mem[d], d))),
        tuple(sorted(devices, key=lambda d: (speed[d], -mem[d], d))),
        _locality_chain(table.cluster, devices, speed),
    ]
    # small clusters: every order (groups are contiguous runs of an order, so this reaches every
    # grouping); larger ones: a few seeded random orders widen the DP's reach
    if len(devices) <= ALL_ORDERS_UP_TO:
        out += [tuple(p) for p in itertools.permutations(sorted(devices))]
        return list(dict.fromkeys(out))
    rng = random.Random(len(devices))
    for _ in range(RANDOM_ORDERS if len(devices) <= 8 else 2):
        shuffled = list(devices)
        rng.shuffle(shuffled)
        out.append(tuple(shuffled))
    return list(dict.fromkeys(out))


def _locality_chain(cluster: Cluster, devices: Sequence[str], speed: dict[str, float]) -> tuple[str, ...]:
    """Start at the fastest device and always go on to the unvisited device with the best link:
    neighbours in the order (same group, adjacent stages) then talk over fast links."""
    left = sorted(devices, key=lambda d: -speed[d])
    chain = [left.pop(0)]
    while left:
        nxt = max(left, key=lambda d: (cluster.link(chain[-1], d)[0], speed[d]))
        left.remove(nxt)
        chain.append(nxt)
    return tuple(chain)


def exact(table: CostTable, bounds: Sequence[int], groups: Sequence[Sequence[str]], microbatches: int,
          schedule: str) -> Candidate | None:
    """The candidate with each group's best rows, or None when a stage does not compute
    (stage_count.py) or a group cannot hold its stage."""
    if not all(computes(table.lg, lo, hi) for lo, hi in zip(bounds, bounds[1:])):
        return None
    stages = table.stages_for(bounds, groups, table.max_rows, microbatches, schedule)
    if stages is None:
        return None
    return Candidate(stages, microbatches, table.max_rows, table.iteration_s(stages, microbatches, schedule),
                     schedule)
