"""remainder: the plan and program of an epoch's last partial batch (``Job.last_batch="smaller"``).

A dataset whose size is not a multiple of the batch leaves ``len(dataset) mod batch`` rows at the
end of every epoch. Trained rather than dropped, they run as one smaller iteration of their own:
the same stages on the same devices in the same groups, so every device keeps its stage's weights,
buffers and optimizer state and nothing moves (unlike a switch between plans, passes/replan.py);
only the rows each device runs and the micro-batching change.

  ``remainder_plan(plan, rows, lg)``   the plan's stages and groups over a batch of ``rows``
  ``remainder_program(compiled, rows)`` that plan lowered like the compiled one and verified

Every stage's rows are split over its group in proportion to the main plan's split, each device
keeping at least one row (two where the stage normalizes over its rows, ``LayerGraph.min_rows``),
and the batch is cut into the most equal micro-batches, at most the main plan's, that leave every
device of every group its least rows: a remainder smaller than the micro-batch count runs in
fewer micro-batches, and one that no count divides evenly in the largest count that does. Each
row's loss is weighted by 1 / ``rows`` (the program's batch), so the iteration's loss is the mean
over its real rows and its update is eager training's on that smaller batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from asteroid_fx.ir.errors import AsteroidError
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.program import Program, max_norm_of


class RemainderError(AsteroidError):
    """A partial batch that the plan's groups cannot share; the message says what to change."""


def remainder_plan(plan: Plan, rows: int, lg: LayerGraph) -> Plan:
    """Expects a verified plan of ``lg`` and 1 <= ``rows`` <= ``plan.batch``. Guarantees a plan
    with the same stages, layers, groups (devices in the same order) and schedule over a batch of
    ``rows`` rows: ``microbatches`` x ``microbatch_rows`` = ``rows``, ``microbatches`` at most the
    plan's, every device's rows of a micro-batch in proportion to its rows in ``plan`` and at least
    its stage's least rows. No prediction (it is the main plan's). RemainderError when the rows
    are too few for some group."""
    if not 1 <= rows <= plan.batch:
        raise RemainderError(f"a partial batch of {rows} rows: give 1 to {plan.batch} rows (the plan's batch)")
    least = [len(st.devices) * lg.min_rows(*st.layers) for st in plan.stages]
    need = max(least)
    counts = [m for m in range(min(plan.microbatches, rows), 0, -1) if rows % m == 0 and rows // m >= need]
    if not counts:
        p = least.index(need)
        st = plan.stages[p]
        each = lg.min_rows(*st.layers)
        raise RemainderError(f"the last partial batch of an epoch has {rows} row{'s' if rows != 1 else ''}, fewer than the {need} that "
                             f"stage {p}'s group of {len(st.devices)} devices ({', '.join(st.devices)}) needs ({each} row"
                             f"{'s' if each > 1 else ''} each); use last_batch='drop', or a batch size that leaves "
                             f"at least {need} rows at the end of an epoch (or none)")
    microbatches = counts[0]
    microbatch_rows = rows // microbatches
    stages = tuple(dataclasses.replace(st, rows=proportional_rows(microbatch_rows, st.rows, lg.min_rows(*st.layers)))
                   for st in plan.stages)
    return dataclasses.replace(plan, stages=stages, microbatches=microbatches, microbatch_rows=microbatch_rows,
                               prediction=None)


def proportional_rows(total: int, shares: Sequence[int], least: int = 1) -> tuple[int, ...]:
    """``total`` rows split in proportion to ``shares`` (a plan's rows of one group), each at
    least ``least``: every device gets its exact share rounded down (or ``least``), then the rows
    still to give go one by one to the devices furthest below their exact share, and rows given
    beyond it are taken back from those furthest above (ties: group order)."""
    if total < least * len(shares):
        raise RemainderError(f"{total} rows cannot give {len(shares)} devices {least} each")
    exact = [total * r / sum(shares) for r in shares]
    rows = [max(least, math.floor(e)) for e in exact]
    while sum(rows) > total:
        i = max((i for i in range(len(rows)) if rows[i] > least), key=lambda i: (rows[i] - exact[i], -i))
        rows[i] -= 1
    while sum(rows) < total:
        i = max(range(len(rows)), key=lambda i: (exact[i] - rows[i], -i))
        rows[i] += 1
    return tuple(rows)


def remainder_program(compiled: Any, rows: int) -> Program:
    """The program of a partial batch of ``rows`` on ``compiled`` (a Compiled): ``remainder_plan``
    of its plan, lowered with its stages' cut specs, ties and clipping, and verified. Its stage
    table has the compiled program's stages on the same devices; a backend swaps it in for one
    iteration without moving any state (``LocalRunner.swap``, ``DistWorker.swap``)."""
    from asteroid_fx.ir.verify import verify
    from asteroid_fx.passes.lower import lower_plan, stage_cut_specs

    plan = remainder_plan(compiled.plan, rows, compiled.layer_graph)
    cut_specs = stage_cut_specs(compiled.stages)
    program = lower_plan(plan, cut_specs, compiled.layer_graph.ties, max_norm_of(compiled.program))
    verify(program, layers=len(compiled.layer_graph), cut_specs=cut_specs)
    return program


def same_stages(running: Program, other: Program) -> str | None:
    """Why ``other`` cannot be swapped in for ``running`` without moving state (None: it can):
    every stage must run the same layers on the same devices, in the same order."""
    if len(running.stages) != len(other.stages):
        return f"it has {len(other.stages)} stages, the running program {len(running.stages)}"
    for a, b in zip(running.stages, other.stages):
        if a.layers != b.layers or a.devices != b.devices:
            return (f"its stage {b.index} runs layers {b.layers[0]}:{b.layers[1]} on {', '.join(b.devices)}, the "
                    f"running program's layers {a.layers[0]}:{a.layers[1]} on {', '.join(a.devices)}")
    return None
