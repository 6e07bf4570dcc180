"""schedule: Plan -> compute-only Program (F and B actions per device).

Every device of stage p runs the stage's micro-batch order on its own rows:
  gpipe  all forwards, then all backwards (every micro-batch's activations held at once);
  1f1b   min(S - p - 1, M) warm-up forwards, then one forward / one backward alternately, so stage
         p holds at most min(S - p, M) micro-batches in flight (what the planner's memory assumes);
  1f1b+N the same with min((S - p - 1)(1 + N), M) warm-up forwards: each stage runs N more
         micro-batches ahead of the next, which hides slow links (estimate.in_flight counts them);
  interleaved  1F1B over virtual stages (below); on a table of one stage per device it is 1f1b.

A device holding several stages (virtual stages) runs one order over all of them:
  gpipe        every forward by (stage, micro-batch), then every backward by (stage descending,
               micro-batch): the one global order restricted to the device, so any placement runs;
  interleaved  the looped placement of Narayanan et al. 2021, "Efficient Large-Scale Language
               Model Training on GPU Clusters Using Megatron-LM", section 2.2: D groups of devices,
               group r holding stages r, r + D, ..., r + (v - 1) D (its v "model chunks"). Forwards
               go through the micro-batches in rounds of D, each round through chunk 0, 1, ...,
               v - 1; backwards through the same rounds with the chunks reversed. Group r runs
               2 (D - r - 1) more warm-up forwards than the position of chunk v - 1 of micro-batch
               0 in that order (Megatron-LM's count: (v - 1) D + 2 (D - r - 1) when D divides M;
               with v = 1 plain 1F1B's D - r - 1), then one forward and one backward in turn, then
               the backwards left. Any M runs; the last round is then shorter.
  1f1b, 1f1b+N per-stage orders that do not say how a device interleaves its stages: InputError.
Communication is added by lower_comm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.plan import INTERLEAVED, Plan, warmup_depth
from asteroid_fx.ir.program import Action, Op, Program, StageInfo, StageSlot

Order = list[tuple[Op, int]]  # (F | B, micro-batch) of one stage
DeviceOrder = list[tuple[Op, int, int]]  # (F | B, stage, micro-batch) of one device


def _gpipe(stage: int, stages: int, microbatches: int) -> Order:
    return [(Op.F, m) for m in range(microbatches)] + [(Op.B, m) for m in range(microbatches)]


def _alternate(forwards: Sequence, backwards: Sequence, warmup: int) -> list[tuple[Op, object]]:
    """``warmup`` forwards, then one forward and one backward in turn, then the backwards left."""
    order: list[tuple[Op, object]] = [(Op.F, x) for x in forwards[:warmup]]
    fwd = warmup
    for x in backwards:
        if fwd < len(forwards):
            order.append((Op.F, forwards[fwd]))
            fwd += 1
        order.append((Op.B, x))
    return order


def _one_f_one_b(stage: int, stages: int, microbatches: int, depth: int = 0) -> Order:
    mbs = list(range(microbatches))
    return _alternate(mbs, mbs, min((stages - stage - 1) * (1 + depth), microbatches))  # type: ignore[return-value]


def order_of(name: str) -> Callable[[int, int, int], Order]:
    """The per-stage order function of a schedule name: "gpipe", "1f1b", "1f1b+N" or
    "interleaved" (a stage of its own device: 1f1b)."""
    depth = warmup_depth(name)  # InputError names the known schedules
    if depth is None:
        return _gpipe
    return lambda stage, stages, microbatches: _one_f_one_b(stage, stages, microbatches, depth)


def _looped_gpipe(held: Sequence[int], microbatches: int) -> DeviceOrder:
    return ([(Op.F, s, m) for s in held for m in range(microbatches)]
            + [(Op.B, s, m) for s in reversed(held) for m in range(microbatches)])


def _interleaved(rank: int, groups: int, chunks: int, microbatches: int) -> DeviceOrder:
    """Group ``rank``'s order over its ``chunks`` stages rank, rank + groups, ... (module docstring)."""
    rounds = [range(lo, min(lo + groups, microbatches)) for lo in range(0, microbatches, groups)]
    forwards = [(c, m) for r in rounds for c in range(chunks) for m in r]
    backwards = [(c, m) for r in rounds for c in reversed(range(chunks)) for m in r]
    # the last group's first backward waits for chunk v - 1 of micro-batch 0; every group before
    # it runs ahead by two forwards per group after it, which covers the messages' round trips
    # (Megatron-LM's warm-up); one chunk is plain 1F1B, as Megatron-LM runs it then
    ahead = groups - rank - 1 if chunks == 1 else 2 * (groups - rank - 1)
    warmup = min(forwards.index((chunks - 1, 0)) + ahead, len(forwards))
    return [(op, c * groups + rank, m) for op, (c, m) in _alternate(forwards, backwards, warmup)]  # type: ignore[misc]


def _period(table: Sequence[StageInfo]) -> int:
    """D of a looped placement: stage s has the devices of stage s - D, and stages 0..D-1 none in
    common. InputError for a table that is not one."""
    S = len(table)
    first = {}
    for st in table:
        for d in st.devices:
            first.setdefault(d, st.index)
    again = [st.index for st in table if any(first[d] < st.index for d in st.devices)]
    D = again[0] if again else S
    if S % D or any(set(table[s].devices) != set(table[s % D].devices) for s in range(S)):
        layout = "; ".join(f"stage {st.index}: {' '.join(st.devices)}" for st in table)
        raise InputError(f"schedule 'interleaved' needs a looped placement: stage s on the devices of stage s - D "
                         f"for one D dividing the {S} stages (here D would be {D}); this table has {layout}. "
                         "Place the stages so, or use 'gpipe'")
    return D


def device_orders(schedule_kind: str, table: Sequence[StageInfo], microbatches: int) -> dict[str, DeviceOrder]:
    """Every device's F/B order over the stages it holds, under ``schedule_kind`` (module docstring)."""
    depth = warmup_depth(schedule_kind)  # a known schedule name, else InputError
    S, M = len(table), microbatches
    held: dict[str, list[int]] = {}
    for st in table:
        for d in st.devices:
            held.setdefault(d, []).append(st.index)
    several = {d: h for d, h in held.items() if len(h) > 1}
    if not several:
        order = order_of(schedule_kind)
        return {d: [(op, h[0], m) for op, m in order(h[0], S, M)] for d, h in held.items()}
    if schedule_kind == INTERLEAVED:
        D = _period(table)
        return {d: _interleaved(h[0], D, S // D, M) for d, h in held.items()}
    if depth is None:
        return {d: _looped_gpipe(h, M) for d, h in held.items()}
    d, h = next(iter(several.items()))
    raise InputError(f"schedule {schedule_kind!r} orders one stage per device, but device {d} holds stages "
                     f"{', '.join(map(str, h))}; use '{INTERLEAVED}' (1F1B over a device's stages) or 'gpipe'")


def stage_table(plan: Plan) -> tuple[StageInfo, ...]:
    return tuple(StageInfo(p, st.layers, tuple(StageSlot(d, lo, hi) for d, lo, hi in st.slots))
                 for p, st in enumerate(plan.stages))


def schedule_table(schedule_kind: str, microbatches: int, microbatch_rows: int,
                   table: tuple[StageInfo, ...]) -> Program:
    """The compute-only program of a stage table: every device runs the schedule's order of the
    stages it holds, each on its own rows of that stage (each chunk of them in row order, where the
    stage has splits). Raises InputError for an unknown schedule
    name, or one that cannot order the table's placement."""
    orders = device_orders(schedule_kind, table, microbatches)
    # a slot run as several chunks (a stage with splits) runs each step of its order once per chunk
    chunks = {(d, info.index): info.chunks_of(d) for info in table for d in info.devices}
    actions = tuple((d, tuple(Action(op, s, m, rows) for op, s, m in order for rows in chunks[(d, s)]))
                    for d, order in orders.items())
    return Program(schedule_kind, microbatches, microbatch_rows, table, actions)


def schedule(plan: Plan) -> Program:
    """The compute-only program of ``plan`` (see the module docstring)."""
    return schedule_table(plan.schedule, plan.microbatches, plan.microbatch_rows, stage_table(plan))
