"""schedule: Plan -> compute-only Program (F and B actions per device).

Every device of stage p runs the stage's micro-batch order on its own rows:
  gpipe  all forwards, then all backwards (every micro-batch's activations held at once);
  1f1b   min(S - p - 1, M) warm-up forwards, then one forward / one backward alternately, so stage
         p holds at most min(S - p, M) micro-batches in flight (what the planner's memory assumes);
  1f1b+N the same with min((S - p - 1)(1 + N), M) warm-up forwards: each stage runs N more
         micro-batches ahead of the next, which hides slow links (estimate.in_flight counts them).
Communication is added by lower_comm.
"""

from __future__ import annotations

from asteroid_fx.ir.plan import Plan, warmup_depth
from asteroid_fx.ir.program import Action, Op, Program, StageInfo, StageSlot


def _gpipe(stage: int, stages: int, microbatches: int) -> list[tuple[Op, int]]:
    return [(Op.F, m) for m in range(microbatches)] + [(Op.B, m) for m in range(microbatches)]


def _one_f_one_b(stage: int, stages: int, microbatches: int, depth: int = 0) -> list[tuple[Op, int]]:
    order = []
    warmup = min((stages - stage - 1) * (1 + depth), microbatches)
    fwd = bwd = 0
    for _ in range(warmup):
        order.append((Op.F, fwd))
        fwd += 1
    while bwd < microbatches:
        if fwd < microbatches:
            order.append((Op.F, fwd))
            fwd += 1
        order.append((Op.B, bwd))
        bwd += 1
    return order


def order_of(name: str):
    """The per-stage order function of a schedule name: "gpipe", "1f1b" or "1f1b+N"."""
    depth = warmup_depth(name)  # ValueError names the known schedules
    if depth is None:
        return _gpipe
    return lambda stage, stages, microbatches: _one_f_one_b(stage, stages, microbatches, depth)


def stage_table(plan: Plan) -> tuple[StageInfo, ...]:
    return tuple(StageInfo(p, st.layers, tuple(StageSlot(d, lo, hi) for d, lo, hi in st.slots))
                 for p, st in enumerate(plan.stages))


def schedule_table(schedule_kind: str, microbatches: int, microbatch_rows: int,
                   table: tuple[StageInfo, ...]) -> Program:
    """The compute-only program of a stage table: every device of a stage runs the schedule's
    order of that stage on its own rows. Raises ValueError for an unknown schedule name."""
    order = order_of(schedule_kind)
    S, M = len(table), microbatches
    actions = []
    for info in table:
        steps = order(info.index, S, M)
        for slot in info.slots:
            actions.append((slot.device, tuple(Action(op, info.index, m, (slot.lo, slot.hi)) for op, m in steps)))
    return Program(schedule_kind, M, microbatch_rows, table, tuple(actions))


def schedule(plan: Plan) -> Program:
    """The compute-only program of ``plan`` (see the module docstring)."""
    return schedule_table(plan.schedule, plan.microbatches, plan.microbatch_rows, stage_table(plan))
