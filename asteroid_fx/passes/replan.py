"""replan: move a running program to another plan at an iteration boundary.

Pipeline replay (passes/replay.py) answers a failure at once with a local rewrite: the stage that
lost a device merges into a neighbour or re-splits its rows, whatever the rest of the plan. That is
fast and exact, but the plan it leaves is rarely what the planner would choose for the survivors
(on a cluster with one fast device the best plan may run on that device alone). And a device that
joins a running job should be put to work. Both are a change of plan between two iterations:

  ``replan(compiled, devices)``   the planner's program for ``devices`` on the compiled model,
                                  with the same layer graph and costs (no capture, no profiling);
  ``switch(before, after)``       the Switch that takes every device from ``before``'s stage to
                                  its stage in ``after``: a hand-over of state, printed as IR.

A hand-over runs at an iteration boundary, when every device of ``before`` holds its stage's state
at the start of the next iteration (its rollback point). For every device of ``after`` that lacks
some layers of its new stage (or of a stage whose backup it holds in ``after``: until the first
backup of the new plan, that copy is what a failure falls back on), one device of each old stage
holding them sends it a copy of that
stage (``BACKUP s -> d``, stage indices of ``before``) and it files the copy (``RESTORE s <-
sender``); the device then loads its new stage from what it holds (``ROLLBACK``) and runs
``after``. Devices of ``before`` that ``after`` leaves out only send; devices that join only
receive. Every device sends before it receives, so the hand-over cannot deadlock.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from asteroid_fx.ir.errors import AsteroidError
from asteroid_fx.ir.program import Action, Op, Program, max_norm_of
from asteroid_fx.ir.program_text import format_action, format_program


class ReplanError(AsteroidError):
    """A switch that cannot be made; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Switch:
    """A change of plan at an iteration boundary: ``before`` runs up to it, ``after`` from it on.
    ``handover`` holds, per device of either program, the BACKUP/RESTORE actions (over
    ``before``'s stage table) that give every device of ``after`` the layers of its new stage."""

    before: Program
    after: Program
    handover: tuple[tuple[str, tuple[Action, ...]], ...]
    reason: str = ""

    @property
    def world(self) -> tuple[str, ...]:
        """Every device taking part in the hand-over: ``after``'s, then those it leaves out."""
        return self.after.devices + tuple(d for d in self.before.devices if d not in self.after.devices)

    @property
    def joining(self) -> tuple[str, ...]:
        return tuple(d for d in self.after.devices if d not in self.before.devices)

    @property
    def leaving(self) -> tuple[str, ...]:
        return tuple(d for d in self.before.devices if d not in self.after.devices)

    def of(self, device: str) -> tuple[Action, ...]:
        return dict(self.handover).get(device, ())

    def moved_bytes(self, layer_graph: Any) -> int:
        """Bytes of parameters the hand-over moves (without optimizer state and buffers)."""
        return sum(layer_graph.param_bytes(*self.before.stages[a.stage].layers)
                   for _, acts in self.handover for a in acts if a.op == Op.BACKUP)

    def __str__(self) -> str:
        def shape(p: Program) -> str:
            return " | ".join(f"{st.layers[0]}:{st.layers[1]} on " + " ".join(f"{s.device}[{s.lo}:{s.hi}]" for s in st.slots)
                              for st in p.stages)

        lines = [f"switch{': ' + self.reason if self.reason else ''}",
                 f"  before: {shape(self.before)} ({self.before.microbatches} x {self.before.microbatch_rows} rows)",
                 f"  after:  {shape(self.after)} ({self.after.microbatches} x {self.after.microbatch_rows} rows)"]
        if self.joining:
            lines.append(f"  joining: {', '.join(self.joining)}")
        if self.leaving:
            lines.append(f"  left out: {', '.join(self.leaving)}")
        lines += ["", "--- hand-over (stage indices of 'before'), then ROLLBACK to the new stage on every device of 'after'"]
        for d, acts in self.handover:
            lines.append(f"device {d}")
            lines += [f"  {format_action(a)}" for a in acts] or ["  (holds its new stage)"]
        lines += ["", "--- after", format_program(self.after).rstrip("\n")]
        return "\n".join(lines) + "\n"


def switch(before: Program, after: Program, *, reason: str = "") -> Switch:
    """Expects ``before`` (the running program) and ``after`` (any verified program over the same
    layer graph, on any devices: some of ``before``'s may be left out, new ones may join).
    Guarantees a Switch whose hand-over, run at an iteration boundary, leaves every device of
    ``after`` holding a copy of each of its new stage's layers, and of the layers of every stage
    whose backup it holds in ``after`` (so a failure in the first iteration after the switch,
    before any backup of the new plan, is recovered like any other): a device keeps what its old
    stage holds, and gets each missing old stage from that stage's device with the fewest sends so
    far (ties: program order), so a stage of a group spreads its sends over the group."""
    if max_norm_of(before) != max_norm_of(after):
        def clip(p: Program) -> str:
            return "no clipping" if max_norm_of(p) is None else f"clipping at max_norm {max_norm_of(p)}"

        raise ReplanError(f"the new program has {clip(after)}, the running one {clip(before)}: a switch changes "
                          "where training runs, not what it computes; lower the new plan with the running "
                          "program's clip_grad_norm")
    n_layers = before.stages[-1].layers[1]
    if after.stages[-1].layers[1] != n_layers or after.stages[0].layers[0] != 0:
        raise ReplanError(f"the new program covers layers {after.stages[0].layers[0]}:{after.stages[-1].layers[1]}, the "
                          f"running one 0:{n_layers}: both must be plans of the same layer graph")
    holds = {d: range(*before.stage_of(d).layers) for d in before.devices}
    # what each device of ``after`` needs at the boundary: its new stage, and the stages whose
    # backups it holds in ``after`` (their first backup comes only at the end of the first
    # iteration, and a failure during it must find their state)
    needs = {d: set(range(*after.stage_of(d).layers)) for d in after.devices}
    for _, acts in after.actions:
        for a in acts:
            if a.op == Op.BACKUP:
                needs[a.peer] |= set(range(*after.stages[a.stage].layers))
    sends = dict.fromkeys(before.devices, 0)
    out: dict[str, list[Action]] = {d: [] for d in (*after.devices, *before.devices)}
    received: dict[str, list[Action]] = {d: [] for d in out}
    for d in after.devices:
        have = set(holds.get(d, ()))
        for old in before.stages:
            if not (set(range(*old.layers)) & needs[d]) or set(range(*old.layers)) & have:
                continue  # not needed, or held (a device holds whole old stages)
            sender = min(old.devices, key=lambda s: (sends[s], before.devices.index(s)))
            sends[sender] += 1
            out[sender].append(Action(Op.BACKUP, old.index, peer=d))
            received[d].append(Action(Op.RESTORE, old.index, peer=sender))
    handover = tuple((d, tuple(out[d] + received[d])) for d in Switch(before, after, ()).world)
    return Switch(before, after, handover, reason)


def replan(compiled: Any, devices: Sequence[str], *, planner: str = "asteroid", schedule: str = "1f1b",
           microbatches: int | None = None, opt_state_factor: float = 2.0,
           recovery: bool = True) -> tuple[Any, Program]:
    """The planner's (plan, program) for ``devices`` of ``compiled.cluster`` on the compiled model:
    the captured graph, layer graph and costs are reused (no capture, no profiling); the batch is
    the compiled one, and so is the clipping (the compiled program's NORM). ``microbatches`` None
    lets the planner choose the micro-batching too. A
    re-plan runs in a run with recovery, whose program carries backups again after the switch, so
    by default the plan leaves room for recovery's state copies on every device (``recovery``)."""
    from asteroid_fx.ir.verify import verify
    from asteroid_fx.passes.lower import lower_plan, stage_cut_specs
    from asteroid_fx.passes.partition import partition
    from asteroid_fx.passes.split import split

    unknown = [d for d in devices if d not in compiled.cluster.names]
    if unknown:
        raise ReplanError(f"devices {unknown} are not in the cluster (its devices: {', '.join(compiled.cluster.names)}); "
                          "a device that joins must be described in the run's cluster")
    cluster = compiled.cluster.subset(list(devices))
    plan = partition(compiled.layer_graph, cluster, planner=planner, batch=compiled.captured.example_batch,
                     microbatches=microbatches, schedule=schedule, opt_state_factor=opt_state_factor,
                     recovery=recovery)
    stages = split(compiled.captured, compiled.layer_graph, plan)
    cut_specs = stage_cut_specs(stages)
    program = lower_plan(plan, cut_specs, compiled.layer_graph.ties, max_norm_of(compiled.program))
    verify(program, layers=len(compiled.layer_graph), cut_specs=cut_specs)
    return plan, program
