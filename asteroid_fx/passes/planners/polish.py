"""polish: the planner's last step (beyond the paper): single moves of the chosen plan, scored by
the simulator, applied while one makes the simulated iteration faster.

The search ranks plans by the closed form (cost/estimate.py), a model of the simulator that can
misrank plans close to each other; the plan ``hpp.plan`` returns is the simulator's fastest of a
few. Here its neighbours are simulated too:

- a cut moved by one to three allowed cuts (the stages keep their groups);
- a device moved into the next or the previous stage's group, dropped from its group, or a device
  the plan leaves out added to a group; two devices of different stages trading places;
- the next smaller or larger micro-batch count (every group's rows made exact again);
- rows moved between two members of a group (one row, or an eighth of the giver's);
- the deeper or shallower 1F1B warm-up ("1f1b" <-> "1f1b+N").

Every move keeps every device within its memory (``exact`` gives each group its best rows within
memory; a rows move is checked by ``CostTable.fits``; recovery's copies included when the table
counts them) and keeps what the caller pinned (micro-batch count, stage count, schedule family).
The neighbours are simulated best closed form first; the first that is faster becomes the plan
and its neighbours are tried next. The budget is a number of simulations, not seconds, so a plan
does not depend on the machine's load: it shrinks with the cluster, as a simulation costs about
its devices.

``moves`` is also what benchmarks/planner.py's local-optimality check applies, every one of them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Sequence

from asteroid_fx.cost.estimate import CostTable
from asteroid_fx.ir.plan import StagePlan, warmup_depth
from asteroid_fx.passes.planners.candidates import Candidate, exact, microbatch_choices

CUT_STEPS = (1, 2, 3)  # allowed cuts a cut moves by
DEPTHS = (0, 1, 2, 4)  # 1F1B warm-ups: "1f1b" and "1f1b+N"
SIMULATIONS = 64  # the most simulations on clusters of up to 8 devices
SIMULATED_DEVICES = 256  # beyond 8 devices: simulations x devices stays under this (at least 4)


def budget(devices: int) -> int:
    """How many neighbours the polish may simulate on a cluster of ``devices``."""
    return SIMULATIONS if devices <= 8 else max(4, SIMULATED_DEVICES // devices)


@dataclasses.dataclass(frozen=True)
class Pins:
    """What the caller fixed, which no move changes."""

    batch: int
    microbatches: bool = False  # the micro-batch count (or rows) was given
    stages: int | None = None
    deepen: bool = True  # warm-up moves allowed (the schedule is of the 1F1B family)


def _schedule(depth: int) -> str:
    return "1f1b" if depth == 0 else f"1f1b+{depth}"


def moves(c: Candidate, table_for: Callable[[int], CostTable], devices: Sequence[str],
          pins: Pins, classes: Mapping[str, str] | None = None) -> Iterator[tuple[str, Candidate]]:
    """(what, neighbour) for every single move of ``c`` that fits; ``table_for(R)`` is the cost
    table at R rows per micro-batch. ``classes`` (hpp.twins): devices that trade places without
    changing anything; of neighbours that differ only by such a trade, the first is kept."""
    table = table_for(c.rows)
    lg, M, sched = table.lg, c.microbatches, c.schedule
    bounds = [c.stages[0].layers[0]] + [st.layers[1] for st in c.stages]
    groups = [list(st.devices) for st in c.stages]
    allowed = sorted(lg.allowed_cuts())
    where = {cut: i for i, cut in enumerate(allowed)}

    def made(what: str, nb, ng, m=M, rows=c.rows, schedule=sched):
        if pins.stages is not None and len(ng) != pins.stages:
            return None
        n = exact(table_for(rows), nb, ng, m, schedule)
        return None if n is None else (what, n)

    out = []
    # cuts
    for i in range(1, len(bounds) - 1):
        k = where.get(bounds[i])
        if k is None:
            continue
        for step in CUT_STEPS:
            for k2 in (k - step, k + step):
                if 0 <= k2 < len(allowed) and bounds[i - 1] < allowed[k2] < bounds[i + 1]:
                    nb = list(bounds)
                    nb[i] = allowed[k2]
                    out.append(made(f"cut {i} {bounds[i]}->{allowed[k2]}", nb, groups))
    # devices between neighbouring groups, out of the plan, into the plan
    for p, g in enumerate(groups):
        if len(g) < 2:
            continue
        for d in g:
            for q in (p - 1, p + 1):
                if 0 <= q < len(groups):
                    ng = [list(x) for x in groups]
                    ng[p].remove(d)
                    ng[q].append(d)
                    out.append(made(f"{d} stage {p}->{q}", bounds, ng))
            ng = [list(x) for x in groups]
            ng[p].remove(d)
            out.append(made(f"{d} dropped", bounds, ng))
    # two devices of different stages trade places (a weak device or one with a slow link moved
    # where it costs least)
    for p in range(len(groups)):
        for q in range(p + 1, len(groups)):
            for a in groups[p]:
                for b in groups[q]:
                    ng = [list(x) for x in groups]
                    ng[p].remove(a)
                    ng[q].remove(b)
                    ng[p].append(b)  # last, as a moved device goes: twins' trades then read alike
                    ng[q].append(a)
                    out.append(made(f"{a} <-> {b}", bounds, ng))
    used = {d for g in groups for d in g}
    for d in devices:
        if d in used:
            continue
        for p in range(len(groups)):
            ng = [list(x) for x in groups]
            ng[p].append(d)
            out.append(made(f"{d} added to stage {p}", bounds, ng))
    # micro-batch count
    if not pins.microbatches:
        choices = sorted(microbatch_choices(pins.batch, None, None))
        at = next((i for i, (m, _) in enumerate(choices) if m == M), None)
        if at is not None:
            for j in (at - 1, at + 1):
                if 0 <= j < len(choices):
                    m2, r2 = choices[j]
                    out.append(made(f"{m2} micro-batches", bounds, groups, m=m2, rows=r2))
    # rows between two members of a group
    for p, st in enumerate(c.stages):
        least = int(table.min_rows(*st.layers))
        for i, give in enumerate(st.rows):
            for amount in sorted({1, give // 8}):
                if amount < 1 or give - amount < least:
                    continue
                for j in range(len(st.rows)):
                    if j == i:
                        continue
                    rows = list(st.rows)
                    rows[i] -= amount
                    rows[j] += amount
                    stages = list(c.stages)
                    stages[p] = StagePlan(st.layers, st.devices, tuple(rows))
                    if table.fits(stages, M, sched):
                        out.append((f"{amount} rows {st.devices[i]}->{st.devices[j]}",
                                    Candidate(tuple(stages), M, c.rows, table.iteration_s(stages, M, sched), sched)))
    # warm-up depth
    depth = warmup_depth(sched)
    if pins.deepen and depth is not None and len(c.stages) > 1:
        for d2 in DEPTHS:
            if d2 != depth:
                out.append(made(f"schedule {_schedule(d2)}", bounds, groups, schedule=_schedule(d2)))
    cls = classes or {}

    def key(n: Candidate) -> tuple:
        return (n.microbatches, n.schedule,
                tuple((st.layers, tuple(cls.get(d, d) for d in st.devices), st.rows) for st in n.stages))

    seen = {key(c)}
    for m in out:
        if m is not None and key(m[1]) not in seen:
            seen.add(key(m[1]))
            yield m


def polish(c: Candidate, seconds: float, simulate: Callable[[Candidate], float],
           table_for: Callable[[int], CostTable], devices: Sequence[str], pins: Pins,
           simulations: int, classes: Mapping[str, str] | None = None) -> tuple[Candidate, float]:
    """First-improvement descent from ``c`` (simulated at ``seconds``) over ``moves``, each
    round's neighbours best closed form first, at most ``simulations`` simulations in all; the
    result and its simulated seconds."""
    left = simulations
    while left > 0:
        ranked = sorted((n for _, n in moves(c, table_for, devices, pins, classes)), key=lambda n: n.estimate_s)
        improved = False
        for n in ranked:
            if left <= 0:
                break
            left -= 1
            t = simulate(n)
            if t < seconds * (1 - 1e-9):
                c, seconds, improved = n, t, True
                break
        if not improved:
            break
    return c, seconds
