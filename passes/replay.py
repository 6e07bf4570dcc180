"""replay: rewrite a running Program for the devices that survive a failure (pipeline replay).

``add_backups(program)`` makes a program fault tolerant: after its STEP, one device of every stage
sends a copy of the stage (weights, buffers, optimizer state) to a holder on a neighbouring stage,
which files it at the end of its own iteration. The copy is the state the next iteration starts
from.

``replay(program, failure)`` expects the program that was running and a Failure (which device died,
in which iteration, how far every device got). It returns a Rewrite holding:
  after     the program for the survivors from the next iteration on, verified: a stage that kept
            group members re-splits the rows among them; a stage that lost its only device is
            merged into the neighbouring stage that holds its backup, whose group re-splits the
            merged stage's rows; backups are placed again when the program had them;
  recovery  ``after`` with a prologue that rolls every survivor back to the start of the
            interrupted iteration (ROLLBACK; a member of a merged stage that holds no copy of the
            layers it takes over first gets one from the holder by BACKUP/RESTORE); running it
            redoes the interrupted iteration, so its update equals the failure-free one.
Rows are split by speed (``lg`` and ``cluster`` give each device's time for the stage's layers)
or, without them, in proportion to the rows each device ran. docs/replay.md says why it rolls the
iteration back rather than replaying logged messages, and what every survivor holds.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from asteroid_fx.cluster import Cluster
from asteroid_fx.layer_graph import LayerGraph
from asteroid_fx.program import Action, Op, Program, StageInfo, StageSlot, TensorSpec
from asteroid_fx.program_text import format_action, format_program
from asteroid_fx.verify import execution_order, verify
from asteroid_fx.passes.lower_comm import CutSpecs, lower_comm
from asteroid_fx.passes.schedule import order_of


class ReplayError(ValueError):
    """A failure the program cannot be rewritten for; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """``device`` died in iteration ``iteration`` (0-based) when every device had completed the
    number of its actions that ``progress`` gives ((device, count) pairs; empty: unknown)."""

    device: str
    iteration: int = 0
    progress: tuple[tuple[str, int], ...] = ()

    @classmethod
    def at(cls, program: Program, device: str, k: int, iteration: int = 0) -> "Failure":
        """``device`` dies after its first ``k`` actions; the others have run every action that
        comes before that point in ``verify.execution_order`` (the order the local backend runs)."""
        acts = _actions_of(program, device)
        if not 0 <= k <= len(acts):
            raise ReplayError(f"{device} has {len(acts)} actions; a failure position is 0..{len(acts)}, not {k}")
        order = execution_order(program)
        cut = order.index((device, k)) if k < len(acts) else order.index((device, k - 1)) + 1 if k else 0
        done = dict.fromkeys(program.devices, 0)
        for d, _ in order[:cut]:
            done[d] += 1
        return cls(device, iteration, tuple(done.items()))

    def __str__(self) -> str:
        done = dict(self.progress)
        where = f" after {done[self.device]} of its actions" if self.device in done else ""
        return f"{self.device} failed in iteration {self.iteration}{where}"


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """What ``replay`` returns; printing it shows the failure, the changes and the IR before and after."""

    failure: Failure
    before: Program
    recovery: Program  # the interrupted iteration, redone from its start: prologue + ``after``
    after: Program  # every iteration after it
    changes: tuple[str, ...]

    @property
    def prologue(self) -> tuple[tuple[str, tuple[Action, ...]], ...]:
        """The actions ``recovery`` runs before those of ``after``, per device."""
        after = dict(self.after.actions)
        return tuple((d, acts[: len(acts) - len(after[d])]) for d, acts in self.recovery.actions)

    def diff(self) -> str:
        """A unified diff of the program text, before -> after."""
        return "".join(difflib.unified_diff(format_program(self.before).splitlines(True),
                                             format_program(self.after).splitlines(True), "before", "after"))

    def __str__(self) -> str:
        lines = [f"replay: {self.failure}", *(f"  {c}" for c in self.changes), "", "--- before",
                 format_program(self.before).rstrip("\n"), "", "--- after", format_program(self.after).rstrip("\n"),
                 "", f"--- recovery: iteration {self.failure.iteration} is redone by 'after' from its start, "
                 "after this prologue"]
        for d, acts in self.prologue:
            lines.append(f"device {d}")
            lines += [f"  {format_action(a)}" for a in acts]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# backups


def backup_holders(program: Program) -> dict[int, str]:
    """Stage -> the device its BACKUP goes to (empty for a program without backups)."""
    return {a.stage: a.peer for _, acts in program.actions for a in acts if a.op == Op.BACKUP}


def default_holders(program: Program) -> dict[int, str]:
    """Stage p backs up on the first device of stage p+1, the last stage on stage S-2: a ring of
    stages folded at its end, so every holder is a neighbour its stage can merge into."""
    S = len(program.stages)
    return {p: program.stages[p + 1 if p + 1 < S else p - 1].slots[0].device for p in range(S)} if S > 1 else {}


def add_backups(program: Program, holders: Mapping[int, str] | None = None) -> Program:
    """Expects a verified program without backups and (optionally) stage -> holder device, a device
    of another stage (default: ``default_holders``). Guarantees a verified program where the first
    device of every stage runs ``BACKUP s -> holder`` right after its STEP and the holder runs
    ``RESTORE s <- sender`` as its last actions, so the copy moves while the rest of the iteration
    runs and never delays a compute."""
    if backup_holders(program):
        raise ReplayError("the program already has backups; add_backups places them once")
    holders = dict(default_holders(program) if holders is None else holders)
    if len(program.stages) < 2 and holders:
        raise ReplayError("a one-stage program has no other stage to hold its backup")
    acts = {d: list(a) for d, a in program.actions}
    for p, holder in sorted(holders.items()):
        sender = program.stages[p].slots[0].device
        if holder not in acts or program.stage_of(holder).index == p:
            raise ReplayError(f"stage {p}'s backup must go to a device of another stage, not {holder!r}")
        step = next(i for i, a in enumerate(acts[sender]) if a.op == Op.STEP)
        acts[sender].insert(step + 1, Action(Op.BACKUP, p, peer=holder))
        acts[holder].append(Action(Op.RESTORE, p, peer=sender))
    out = dataclasses.replace(program, actions=tuple((d, tuple(acts[d])) for d, _ in program.actions))
    verify(out)
    return out


# ---------------------------------------------------------------------------------------------
# the rewrite


def _actions_of(program: Program, device: str) -> tuple[Action, ...]:
    try:
        return program.of(device)
    except KeyError:
        raise ReplayError(f"device {device!r} is not in the program (devices: {', '.join(program.devices)}); "
                          "name a device the program runs") from None


def split_rows(devices: Sequence[str], rows: int, layers: tuple[int, int], *, lg: LayerGraph | None = None,
               cluster: Cluster | None = None, current: Mapping[str, int] | None = None,
               keep: str | None = None) -> tuple[StageSlot, ...]:
    """``rows`` rows of every micro-batch over ``devices`` for ``layers``: with ``lg`` and ``cluster``
    one row at a time to the device that is then done soonest (a device may get none, and is then
    left out, but ``keep`` gets at least one: it holds state the others need); otherwise in
    proportion to ``current`` rows (at least one each, the next row always to the device furthest
    below its share)."""
    if lg is not None and cluster is not None:
        kinds = {d: cluster.device(d).kind for d in devices}
        share = dict.fromkeys(devices, 0)
        if keep is not None:
            share[keep] = 1
        for _ in range(rows - sum(share.values())):
            best = min(devices, key=lambda d: lg.stage_time(kinds[d], *layers, share[d] + 1))
            share[best] += 1
    else:
        weights = {d: max((current or {}).get(d, 0), 0) for d in devices} if current else {}
        if not any(weights.values()):
            weights = dict.fromkeys(devices, 1)
        # fewer rows than devices: ``keep`` and then the biggest shares stay
        kept = set(sorted(devices, key=lambda d: (d != keep, -weights[d]))[:rows])
        devices = [d for d in devices if d in kept]
        total = sum(weights[d] for d in devices) or 1
        share = dict.fromkeys(devices, 1)
        for _ in range(rows - len(devices)):  # the next row to the device furthest below its share
            best = max(devices, key=lambda d: rows * weights[d] / total - share[d])
            share[best] += 1
    slots, lo = [], 0
    for d in devices:
        if share.get(d):
            slots.append(StageSlot(d, lo, lo + share[d]))
            lo += share[d]
    return tuple(slots)


def _cut_specs(program: Program) -> dict[int, CutSpecs]:
    """Layer index of each cut of ``program`` -> (activation specs, gradient specs) crossing it."""
    act: dict[int, tuple[TensorSpec, ...]] = {}
    grad: dict[int, tuple[TensorSpec, ...]] = {}
    for _, acts in program.actions:
        for a in acts:
            if a.op == Op.SEND:
                (act if a.payload == "act" else grad)[a.stage] = a.specs
    return {st.layers[1]: (act.get(st.index, ()), grad.get(st.index, ())) for st in program.stages[:-1]}


def _program(before: Program, table: tuple[StageInfo, ...]) -> Program:
    """The lowered program of ``before``'s schedule over a new stage table (cuts are cuts of before)."""
    try:
        order = order_of(before.schedule)
    except ValueError:
        raise ReplayError(f"cannot re-schedule a {before.schedule!r} program; replay knows gpipe, 1f1b and "
                          "1f1b+N") from None
    S, M = len(table), before.microbatches
    compute = tuple((slot.device, tuple(Action(op, st.index, m, (slot.lo, slot.hi)) for op, m in order(st.index, S, M)))
                    for st in table for slot in st.slots)
    specs = _cut_specs(before)
    program = Program(before.schedule, M, before.microbatch_rows, table, compute)
    return lower_comm(program, [specs[st.layers[1]] for st in table[:-1]])


def replay(program: Program, failure: Failure, lg: LayerGraph | None = None,
           cluster: Cluster | None = None) -> Rewrite:
    """The Rewrite of ``program`` for the devices that survive ``failure`` (see the module docstring).
    Raises ReplayError when the device is not in the program, when no device survives, and when a
    stage lost its only device and no surviving neighbour holds its backup."""
    x = failure.device
    _actions_of(program, x)
    survivors = [d for d in program.devices if d != x]
    if not survivors:
        raise ReplayError(f"no device survives: {x} was the only device of the program; training cannot go on "
                          "here (restart from a checkpoint on new devices)")
    held = backup_holders(program)
    lost = program.stage_of(x)
    p = lost.index
    changes: list[str] = []
    R = program.microbatch_rows

    def rows_for(devices: Sequence[str], layers: tuple[int, int], current: Mapping[str, int],
                 keep: str | None = None) -> tuple[StageSlot, ...]:
        return split_rows(devices, R, layers, lg=lg, cluster=cluster, current=current, keep=keep)

    new: list[tuple[tuple[int, int], tuple[StageSlot, ...]]] = [(st.layers, st.slots) for st in program.stages]
    if len(lost.slots) > 1:
        rest = [s.device for s in lost.slots if s.device != x]
        slots = rows_for(rest, lost.layers, {s.device: s.hi - s.lo for s in lost.slots})
        new[p] = (lost.layers, slots)
        changes.append(f"stage {p} lost {x}; its group re-splits the rows: {_slots(slots)}")
    else:
        holder = held.get(p)
        if holder is None:
            raise ReplayError(f"stage {p} lost its only device {x} and no device holds a backup of it (the program has "
                              f"no 'BACKUP s{p} -> ...'); run passes.replay.add_backups on the program before training, "
                              f"or give stage {p} a second device")
        q = program.stage_of(holder).index
        if abs(q - p) != 1:
            raise ReplayError(f"stage {p} lost its only device {x}; its backup is on {holder} (stage {q}), which is not "
                              f"next to stage {p}, so the layers cannot move there and stay contiguous; place backups "
                              "on a neighbouring stage (passes.replay.default_holders)")
        into = program.stages[q]
        layers = (min(lost.layers[0], into.layers[0]), max(lost.layers[1], into.layers[1]))
        slots = rows_for(into.devices, layers, {s.device: s.hi - s.lo for s in into.slots}, keep=holder)
        new[q] = (layers, slots)
        del new[p]
        changes.append(f"stage {p} lost its only device {x}; its layers {lost.layers[0]}:{lost.layers[1]} move to "
                       f"stage {q} ({holder} holds the backup), now layers {layers[0]}:{layers[1]} on {_slots(slots)}")
    table = tuple(StageInfo(i, layers, slots) for i, (layers, slots) in enumerate(new))
    idle = [d for d in survivors if not any(d in st.devices for st in table)]
    if idle:
        changes.append(f"left out (slower than giving their rows to others): {', '.join(idle)}")
    after = _program(program, table)
    if held and len(table) > 1:
        after = add_backups(after)
        changes.append("backups: " + ", ".join(f"s{s} -> {h}" for s, h in sorted(backup_holders(after).items())))
    elif held:
        changes.append("no backups: the program has one stage left")
    recovery = _with_prologue(program, after, survivors)
    verify(after)
    verify(recovery)
    return Rewrite(failure, program, recovery, after, tuple(changes))


def _slots(slots: Sequence[StageSlot]) -> str:
    return " ".join(f"{s.device}[{s.lo}:{s.hi}]" for s in slots)


def _with_prologue(before: Program, after: Program, survivors: Sequence[str]) -> Program:
    """``after`` preceded by a ROLLBACK on every device; a device that will run layers of which it
    holds no copy (neither its own stage's nor a backup's) first receives the rolled-back stage from a
    group member that holds them all."""
    holds: dict[str, set[int]] = {}
    for d in survivors:
        layers = set(range(*before.stage_of(d).layers))
        for a in before.of(d):
            if a.op == Op.RESTORE:
                layers |= set(range(*before.stages[a.stage].layers))
        holds[d] = layers
    pre: dict[str, list[Action]] = {d: [] for d in after.devices}
    post: dict[str, list[Action]] = {d: [] for d in after.devices}
    for st in after.stages:
        need = set(range(*st.layers))
        whole = [d for d in st.devices if need <= holds[d]]
        for d in st.devices:
            if need <= holds[d]:
                continue
            if not whole:
                raise ReplayError(f"no device of the new stage {st.index} holds all of layers {st.layers[0]}:{st.layers[1]} "
                                  f"to give {d}; place backups on the stage a lost stage merges into")
            pre[d].append(Action(Op.RESTORE, st.index, peer=whole[0]))
            post[whole[0]].append(Action(Op.BACKUP, st.index, peer=d))
    actions = []
    for d, acts in after.actions:
        rollback = Action(Op.ROLLBACK, after.stage_of(d).index)
        actions.append((d, (*pre[d], rollback, *post[d], *acts)))
    return dataclasses.replace(after, actions=tuple(actions))


# ---------------------------------------------------------------------------------------------
# for backends


def split_stages(program: Program, captured: Any, lg: LayerGraph) -> tuple[Any, ...]:
    """The stage modules of ``program``'s stage table (passes.split over a plan of that table):
    what a backend runs a rewritten program with when stages were merged."""
    from asteroid_fx.plan import Plan, StagePlan
    from asteroid_fx.passes.split import split

    plan = Plan(stages=tuple(StagePlan(st.layers, st.devices, tuple(s.hi - s.lo for s in st.slots)) for st in program.stages),
                microbatches=program.microbatches, microbatch_rows=program.microbatch_rows,
                schedule=program.schedule, planner="replay")
    return split(captured, lg, plan)
