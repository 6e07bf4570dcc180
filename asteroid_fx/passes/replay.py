"""replay: rewrite a running Program for the devices that survive a failure (pipeline replay).

``add_backups(program)`` makes a program fault tolerant: after its STEP, one device of every stage
sends a copy of the stage (weights, buffers, optimizer state) to a holder on a neighbouring stage,
which files it at the end of its own iteration. The copy is the state the next iteration starts
from.

``replay(program, failure)`` expects the program that was running and a Failure (which devices died
at the same moment, in which iteration, how far every device got). It returns a Rewrite holding:
  after     the program for the survivors from the next iteration on, verified: in a stage that
            kept group members a survivor next to each lost device takes its rows over as chunks
            of its own (``take_over``: the same rows per F/B, the same batch statistics, the
            gradients summed in the failure-free order); a stage that lost every device next to a
            group that keeps two survivors is lent the member holding its backup, which runs it on
            the lost stage's own chunks while its group takes its rows over (exact, batch
            statistics included; ``_lends``); any other stage that lost every device is merged
            into the stage of a survivor that holds its backup (a neighbour, once the other lost
            stages have merged), and its layers run over that stage's chunks; backups are placed
            again when the program had them, and a program that clips its gradients (NORM) clips
            them to the same norm over the devices of the new stage table; a weight tied across
            stages (TIE) is tied again over every device of the new stages that hold it
            (``program_ties``, placed by lower_comm as at compile time), and a tie whose holder
            stages merged into one has no TIE left;
  recovery  ``after`` with a prologue that rolls every survivor back to the start of the
            interrupted iteration (ROLLBACK; a member of a merged stage that holds no copy of the
            layers it takes over first gets one from the holder by BACKUP/RESTORE); running it
            redoes the interrupted iteration, so its update equals the failure-free one.
Which neighbour takes a lost device's rows goes by speed (``lg`` and ``cluster`` give each
device's time for the stage's layers) or, without them, by the rows each runs. docs/replay.md says
why it rolls the iteration back rather than replaying logged messages, what every survivor holds,
and where the update cannot be the failure-free one ("Chunks").
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from asteroid_fx.cost.stage import step_s, tensor_bytes, within
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.errors import AsteroidError
from asteroid_fx.ir.layer_graph import LayerGraph, Tie
from asteroid_fx.ir.program import (Action, Op, Program, StageInfo, StageSlot, TensorSpec, backup_holders,
                                    default_holders, max_norm_of, slot_chunks)
from asteroid_fx.ir.program_text import format_action, format_program
from asteroid_fx.ir.verify import execution_order, verify
from asteroid_fx.passes.lower import lower
from asteroid_fx.passes.lower_comm import CutSpecs
from asteroid_fx.passes.schedule import order_of


class ReplayError(AsteroidError):
    """A failure the program cannot be rewritten for; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """``device`` died in iteration ``iteration`` (0-based) when every device had completed the
    number of its actions that ``progress`` gives ((device, count) pairs; empty: unknown). ``also``
    names the devices that died at the same moment (before any survivor noticed the first)."""

    device: str
    iteration: int = 0
    progress: tuple[tuple[str, int], ...] = ()
    also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "also", tuple(self.also))  # a list would make the value unhashable
        if len(set(self.devices)) < len(self.devices):
            raise ReplayError(f"a device is named twice among the failed ({', '.join(self.devices)}); name each once")

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device that failed, ``device`` first."""
        return (self.device, *self.also)

    @classmethod
    def at(cls, program: Program, device: str, k: int, iteration: int = 0, also: Sequence[str] = ()) -> "Failure":
        """``device`` dies after its first ``k`` actions, and the devices in ``also`` at the same
        moment; the others have run every action that comes before that point in
        ``verify.execution_order`` (the order the local backend runs)."""
        acts = _actions_of(program, device)
        for d in also:
            _actions_of(program, d)
        if not 0 <= k <= len(acts):
            raise ReplayError(f"{device} has {len(acts)} actions; a failure position is 0..{len(acts)}, not {k}")
        order = execution_order(program)
        cut = order.index((device, k)) if k < len(acts) else order.index((device, k - 1)) + 1 if k else 0
        done = dict.fromkeys(program.devices, 0)
        for d, _ in order[:cut]:
            done[d] += 1
        return cls(device, iteration, tuple(done.items()), tuple(also))

    def __str__(self) -> str:
        done = dict(self.progress)
        if not self.also:
            where = f" after {done[self.device]} of its actions" if self.device in done else ""
            return f"{self.device} failed in iteration {self.iteration}{where}"
        where = (f", after {_and(str(done[d]) for d in self.devices)} of their actions"
                 if all(d in done for d in self.devices) else "")
        return f"{_and(self.devices)} failed at the same moment in iteration {self.iteration}{where}"


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
    left out, but ``keep`` gets some: it holds state the others need; a device joins with
    ``lg.min_rows`` rows, more than one where a layer takes batch statistics); otherwise in
    proportion to ``current`` rows (at least one each, the next row always to the device furthest
    below its share). ``replay`` itself does not re-split (``take_over`` keeps the failure-free
    chunks); this is the balanced split by speed, for a caller that trades exactness for it."""
    if lg is not None and cluster is not None:
        kinds = {d: cluster.device(d).kind for d in devices}
        least = lg.min_rows(*layers)
        share = dict.fromkeys(devices, 0)
        if keep is not None:
            share[keep] = min(least, rows)
        left = rows - sum(share.values())
        while left > 0:
            more = {d: 1 if share[d] else least for d in devices}
            takers = [d for d in devices if more[d] <= left] or list(devices)
            best = min(takers, key=lambda d: step_s(lg, kinds[d], layers, share[d] + more[d]))
            step = min(more[best], left)
            share[best] += step
            left -= step
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
    """The lowered program of ``before``'s schedule over a new stage table (cuts are cuts of before),
    clipping as ``before`` does (its NORM, now over the new table's devices)."""
    try:
        order_of(before.schedule)
    except ValueError:
        raise ReplayError(f"cannot re-schedule a {before.schedule!r} program; replay knows gpipe, 1f1b and "
                          "1f1b+N") from None
    specs = _cut_specs(before)
    return lower(before.schedule, before.microbatches, before.microbatch_rows, table,
                 [specs[st.layers[1]] for st in table[:-1]], program_ties(before), clip_grad_norm=max_norm_of(before))


def program_ties(program: Program) -> tuple[Tie, ...]:
    """The tied weights of ``program``'s TIEs, one Tie per weight, each read (``Tie.layers``) at the
    first layer of every stage holding it: what ``lower_comm`` needs to place the TIEs of a stage
    table whose stages are unions of ``program``'s (a rewrite's), since a new stage holds the
    weight exactly when it holds one of those stages."""
    holders: dict[tuple[str, TensorSpec], set[int]] = {}
    for _, acts in program.actions:
        for a in acts:
            if a.op == Op.TIE:
                for name, spec in zip(a.params, a.specs):
                    holders.setdefault((name, spec), set()).add(a.stage)
    return tuple(Tie((name, ), spec.dtype, spec.shape, tuple(program.stages[s].layers[0] for s in sorted(stages)),
                     tensor_bytes(spec.dtype, spec.shape)) for (name, spec), stages in sorted(holders.items()))


def replay(program: Program, failure: Failure, lg: LayerGraph | None = None,
           cluster: Cluster | None = None) -> Rewrite:
    """The Rewrite of ``program`` for the devices that survive ``failure`` (see the module docstring),
    one device or several at once: in every stage that keeps members the survivors take the lost
    devices' rows over as chunks (``take_over``); a stage that keeps none is lent a member of a
    neighbouring group that keeps two survivors and holds its backup (``_lends``; with ``lg`` and
    ``cluster`` only one that fits its memory), else merges into the stage of a survivor that
    holds its backup, which must be next to it once the other lost stages have merged. Raises
    ReplayError when a device is
    not in the program, when no device survives, when a lost stage's state is held by no survivor
    (no backup, or its holder failed too), when its holder is not next to it, and when stages merged
    from both sides have no survivor holding all of them."""
    failed = failure.devices
    for x in failed:
        _actions_of(program, x)
    survivors = [d for d in program.devices if d not in failed]
    if not survivors:
        only = "the only device" if len(failed) == 1 else "all the devices"
        raise ReplayError(f"no device survives: {_and(failed)} {'was' if len(failed) == 1 else 'were'} {only} of the "
                          "program; training cannot go on here (restart from a checkpoint on new devices)")
    holds = _held_stages(program, survivors)
    # a neighbouring group that keeps two survivors lends one to a stage that lost every device,
    # so the stage keeps its own chunks (a merge would run its layers over the neighbour's)
    lent = _lends(program, failed, holds, lg, cluster)
    refused: list[str] = []
    while True:
        table, changes = _stage_table(program, failed, holds, lent, lg, cluster)
        # a lent device must hold the lost stage all iteration; one that cannot leaves it to merge
        crowded = _over_memory(program, table, lent, lg, cluster)
        if not crowded:
            break
        for p in crowded:
            refused.append(f"stage {p}: {lent.pop(p)} would exceed its memory running it alone, so it merges")
    changes += refused
    idle = [d for d in survivors if not any(d in st.devices for st in table)]
    if idle:
        changes.append(f"left out (slower than giving their rows to others): {', '.join(idle)}")
    after = _program(program, table)
    changes += _tie_changes(program, after)
    held = backup_holders(program)
    if held and len(table) > 1:
        after = add_backups(after)
        changes.append("backups: " + ", ".join(f"s{s} -> {h}" for s, h in sorted(backup_holders(after).items())))
    elif held:
        changes.append("no backups: the program has one stage left")
    recovery = _with_prologue(program, after, holds)
    verify(after)
    verify(recovery)
    return Rewrite(failure, program, recovery, after, tuple(changes))


def _stage_table(program: Program, failed: Sequence[str], holds: Mapping[str, frozenset[int]],
                 lent: Mapping[int, str], lg: LayerGraph | None,
                 cluster: Cluster | None) -> tuple[tuple[StageInfo, ...], list[str]]:
    """The survivors' stage table and its change lines: a lent device runs its lost stage on that
    stage's own chunks, its group's other members take its rows over (``take_over``), every other
    lost stage merges into a neighbour."""
    into = _merge_targets(program, failed, lent)
    away = {*failed, *lent.values()}
    changes: list[str] = []
    new: list[tuple[tuple[int, int], tuple[StageSlot, ...], tuple[int, ...]]] = []
    for st in program.stages:
        if st.index in lent:
            d = lent[st.index]
            slots = (StageSlot(d, st.slots[0].lo, st.slots[-1].hi),)
            splits = _edges(st.slots, st.splits)[1:-1]
            new.append((st.layers, slots, splits))
            changes.append(f"stage {st.index} lost {_only(st.devices)}; {d} (stage {program.stage_of(d).index}, holds "
                           f"the backup) is lent to it and runs its chunks as they ran: {_slots(slots, splits)}")
            continue
        if st.index in into:
            continue
        q = st.index
        merged = sorted(p for p, (target, _) in into.items() if target == q)
        gone = [d for d in st.devices if d in away]
        rest = [d for d in st.devices if d not in away]
        layers = (program.stages[min([q, *merged])].layers[0], program.stages[max([q, *merged])].layers[1])
        # a survivor takes a lost device's rows over as chunks of their own: the same rows per F/B,
        # the same batch statistics and the same gradient sums as the failure-free group's
        slots, splits = take_over(st, away, layers, lg=lg, cluster=cluster) if gone else (st.slots, st.splits)
        if not merged:
            new.append((st.layers, slots, splits))
            if gone:
                changes.append(f"{_taken(st, slots, gone, lent)}: {_slots(slots, splits)}")
            continue
        group = [program.stages[i] for i in sorted([q, *merged])]
        # the prologue hands the merged stage to the other members from one device that holds it whole
        whole = [d for d in rest if {g.index for g in group} <= holds[d]]
        if not whole:
            held_by = "; ".join(f"stage {p}'s backup is on {into[p][1]}" for p in merged)
            raise ReplayError(f"stages {_and(str(p) for p in merged)} merge into stage {q}, but no surviving device of "
                              f"stage {q} holds all of them ({held_by}), so the merged stage cannot be handed to its "
                              "members; place the backups of stages that may merge into one stage on one device "
                              "(passes.replay.default_holders does), or give those stages a second device")
        new.append((layers, slots, splits))
        if gone:
            changes.append(_taken(st, slots, gone, lent))
        chunks = _edges(slots, splits)
        for i, p in enumerate(merged):
            lost = program.stages[p]
            now = f", now layers {layers[0]}:{layers[1]} on {_slots(slots, splits)}" if i == len(merged) - 1 else ""
            changes.append(f"stage {p} lost {_only(lost.devices)}; its layers {lost.layers[0]}:{lost.layers[1]} move "
                           f"to stage {q} ({into[p][1]} holds the backup){now}")
            if _edges(lost.slots, lost.splits) != chunks:
                changes.append(_inexact(lost, chunks, lg))
    return tuple(StageInfo(i, layers, slots, splits) for i, (layers, slots, splits) in enumerate(new)), changes


def _lends(program: Program, failed: Sequence[str], holds: Mapping[str, frozenset[int]], lg: LayerGraph | None,
           cluster: Cluster | None) -> dict[int, str]:
    """Lost stage -> the survivor lent to run it: a member of a neighbouring group that keeps
    another survivor, holding the lost stage's copy (nothing to transfer) and no other lost
    stage's (which may need it to merge into its stage); the fastest for the stage's layers
    (``lg`` and ``cluster``), else the first. A lost stage no such device is next to merges."""
    lost = {st.index for st in program.stages if all(d in failed for d in st.devices)}
    lent: dict[int, str] = {}
    for p in sorted(lost):
        st = program.stages[p]
        candidates = []
        for q in (p - 1, p + 1):
            if q in lost or not 0 <= q < len(program.stages):
                continue
            rest = [d for d in program.stages[q].devices if d not in failed and d not in lent.values()]
            if len(rest) >= 2:
                candidates += [d for d in rest if p in holds[d] and not holds[d] & (lost - {p})]

        def time(d: str) -> float:
            if lg is None or cluster is None:
                return 0.0
            return step_s(lg, cluster.device(d).kind, st.layers, st.slots[-1].hi - st.slots[0].lo)

        if candidates:
            lent[p] = min(candidates, key=time)
    return lent


def _over_memory(program: Program, table: tuple[StageInfo, ...], lent: Mapping[int, str], lg: LayerGraph | None,
                 cluster: Cluster | None) -> list[int]:
    """The lent stages whose lent device would exceed its memory budget in the simulator (the
    program after, its backups and rollback copies included); none without ``lg`` and ``cluster``."""
    if not lent or lg is None or cluster is None:
        return []
    from asteroid_fx.sim import simulate

    after = _program(program, table)
    backed = bool(backup_holders(program)) and len(table) > 1
    if backed:
        after = add_backups(after)
    sim = simulate(after, lg, cluster, recovery=backed)
    return [p for p, d in lent.items()
            if not within(sim.device(d).memory.peak_bytes, sim.device(d).memory.budget_bytes)]


def _tie_changes(before: Program, after: Program) -> list[str]:
    """The change lines of the tied weights whose holders the rewrite changed."""
    def holders(p: Program) -> dict[str, tuple[str, ...]]:
        return {n: a.group for _, acts in p.actions for a in acts if a.op == Op.TIE for n in a.params}

    now = holders(after)
    out = []
    for name, group in holders(before).items():
        if name not in now:
            one = after.stage_of(next(d for d in group if d in after.devices)).index
            out.append(f"tie {name}: stage {one} now holds it alone (its uses' gradients sum in that stage's "
                       "backward, no TIE)")
        elif now[name] != group:
            out.append(f"tie {name}: held by {' '.join(now[name])} (was {' '.join(group)})")
    return out


def _held_stages(program: Program, survivors: Sequence[str]) -> dict[str, frozenset[int]]:
    """Survivor -> the stages whose state at the start of the iteration it holds: its own (its
    rollback point) and those it RESTOREs (their copies arrived in the iteration before). Only the
    program that was running counts: backups the rewrite places hold nothing yet."""
    return {d: frozenset({program.stage_of(d).index} | {a.stage for a in program.of(d) if a.op == Op.RESTORE})
            for d in survivors}


def _merge_targets(program: Program, failed: Sequence[str],
                   lent: Mapping[int, str] | None = None) -> dict[int, tuple[int, str]]:
    """Stage that lost every device and is not ``lent`` a device -> (the stage it merges into, the
    survivor holding its backup)."""
    into: dict[int, tuple[int, str]] = {}
    for st in program.stages:
        if any(d not in failed for d in st.devices) or st.index in (lent or {}):
            continue
        p = st.index
        holders = [d for d, acts in program.actions if any(a.op == Op.RESTORE and a.stage == p for a in acts)]
        alive = [d for d in holders if d not in failed]
        if not holders:
            raise ReplayError(f"stage {p} lost {_only(st.devices)} and no device holds a backup of it (the program "
                              f"has no 'BACKUP s{p} -> ...'); run passes.replay.add_backups on the program before "
                              f"training, or give stage {p} a second device")
        if not alive:
            raise ReplayError(f"stage {p} lost {_only(st.devices)} and, at the same moment, {_and(holders)}, which "
                              f"held its backup: no survivor holds stage {p}'s state, so replay cannot recover it; "
                              f"restart from a checkpoint, or train with stage {p}'s backup on a device that does not "
                              f"fail with it (passes.replay.add_backups(holders=...)) or give stage {p} a second device")
        into[p] = (program.stage_of(alive[0]).index, alive[0])
    for p, (q, holder) in into.items():
        # the stages between p and q must merge into q too, or p's layers would not be contiguous
        if any(into.get(r, (None,))[0] != q for r in range(min(p, q) + 1, max(p, q))):
            merged = ", even after the other lost stages merged" if len(into) > 1 else ""
            raise ReplayError(f"stage {p} lost {_only(program.stages[p].devices)}; its backup is on {holder} (stage "
                              f"{q}), which is not next to stage {p}{merged}, so the layers cannot move there and stay "
                              "contiguous; place backups on a neighbouring stage (passes.replay.default_holders)")
    return into


def _and(items: Iterable[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return " and ".join(filter(None, [", ".join(items[:-1]), items[-1]]))


def _only(devices: Sequence[str]) -> str:
    return f"its only device {devices[0]}" if len(devices) == 1 else f"all its devices ({_and(devices)})"


def _slots(slots: Sequence[StageSlot], splits: Sequence[int] = ()) -> str:
    return " ".join(f"{s.device}[{':'.join(str(x) for x in [s.lo, *(hi for _, hi in slot_chunks(s, tuple(splits)))])}]"
                    for s in slots)


def _edges(slots: Sequence[StageSlot], splits: Sequence[int]) -> tuple[int, ...]:
    """Where a stage's chunks begin and end: its slot boundaries and its splits."""
    return tuple(sorted({0, *splits, *(s.hi for s in slots)}))


def _taken(before: StageInfo, slots: Sequence[StageSlot], gone: Sequence[str], lent: Mapping[int, str]) -> str:
    """The change line of a stage whose survivors took over the rows of ``gone`` (failed, or
    ``lent`` to a lost stage)."""
    old = {s.device: (s.lo, s.hi) for s in before.slots}
    takers = [s.device for s in slots if old[s.device] != (s.lo, s.hi)]
    one = len(takers) == 1
    to = {d: p for p, d in lent.items()}
    lost = [d for d in gone if d not in to]
    what = " and ".join(filter(None, [f"lost {_and(lost)}" if lost else "",
                                      *(f"lends {d} to stage {to[d]}" for d in gone if d in to)]))
    return (f"stage {before.index} {what}; {_and(takers)} take{'s' if one else ''} over "
            f"{'its' if len(gone) == 1 else 'their'} rows as chunks of {'its' if one else 'their'} own")


def _inexact(lost: StageInfo, chunks: Sequence[int], lg: LayerGraph | None) -> str:
    """The change line of a lost stage whose layers now run over another stage's chunks."""
    spans = " ".join(f"r{a}:{b}" for a, b in zip(chunks, chunks[1:]))
    before = " ".join(f"r{a}:{b}" for a, b in itertools.pairwise(_edges(lost.slots, lost.splits)))
    stats = lg is not None and lg.min_rows(*lost.layers) > 1
    effect = ("its batch statistics are over other rows: the update is not the failure-free one" if stats else
              "batch-statistics layers (BatchNorm) among them would not give the failure-free update, "
              "others differ by rounding only" if lg is None else
              "gradients summed in another order (rounding only)")
    return f"stage {lost.index}'s layers run over the chunks {spans}, not its own {before}: {effect}"


def take_over(st: StageInfo, failed: Sequence[str], layers: tuple[int, int], *, lg: LayerGraph | None = None,
              cluster: Cluster | None = None) -> tuple[tuple[StageSlot, ...], tuple[int, ...]]:
    """The slots and splits of stage ``st`` once ``failed`` devices are gone, their rows taken over
    by survivors: expects a stage that keeps a device. Every run of consecutive lost slots goes
    whole to the survivor next to it (before or after) that then finishes ``layers`` sooner
    (``lg`` and ``cluster``: by the cost model; otherwise the one with fewer rows, the one before
    on a tie). Guarantees: every chunk of ``st`` (its slots cut at its splits) is a chunk of the
    result, so every F/B runs the rows it ran before, on one survivor."""
    slots = list(st.slots)
    alive = [i for i, s in enumerate(slots) if s.device not in failed]
    if not alive:
        raise ReplayError(f"stage {st.index} lost every device; it merges into a neighbour instead of re-splitting")
    rows = {i: slots[i].hi - slots[i].lo for i in alive}

    def cost(i: int, extra: int) -> float:
        if lg is not None and cluster is not None:
            return step_s(lg, cluster.device(slots[i].device).kind, layers, rows[i] + extra)
        return float(rows[i] + extra)

    owner = {i: i for i in alive}
    k = 0
    while k < len(slots):
        if k in owner:
            k += 1
            continue
        j = k
        while j < len(slots) and j not in owner:
            j += 1
        run = sum(slots[x].hi - slots[x].lo for x in range(k, j))
        sides = [i for i in (k - 1, j) if i in owner and 0 <= i < len(slots)]
        taker = min(sides, key=lambda i: cost(i, run))  # the one before first on a tie
        rows[taker] += run
        for x in range(k, j):
            owner[x] = taker
        k = j
    out = [StageSlot(slots[i].device, min(slots[x].lo for x in owner if owner[x] == i),
                     max(slots[x].hi for x in owner if owner[x] == i)) for i in alive]
    inside = {x for x in (*st.splits, *(s.hi for s in slots)) if any(o.lo < x < o.hi for o in out)}
    return tuple(out), tuple(sorted(inside))


def _with_prologue(before: Program, after: Program, holds: Mapping[str, frozenset[int]]) -> Program:
    """``after`` preceded by a ROLLBACK on every device; a device that will run layers of which it
    holds no copy (``holds``: the stages of ``before`` each survivor holds) first receives the
    rolled-back stage from a group member that holds them all."""
    layers_held = {d: set().union(*(range(*before.stages[s].layers) for s in stages)) for d, stages in holds.items()}
    pre: dict[str, list[Action]] = {d: [] for d in after.devices}
    post: dict[str, list[Action]] = {d: [] for d in after.devices}
    for st in after.stages:
        need = set(range(*st.layers))
        whole = [d for d in st.devices if need <= layers_held[d]]
        for d in st.devices:
            if need <= layers_held[d]:
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
    from asteroid_fx.ir.plan import Plan, StagePlan
    from asteroid_fx.passes.split import split

    plan = Plan(stages=tuple(StagePlan(st.layers, st.devices, tuple(s.hi - s.lo for s in st.slots)) for st in program.stages),
                microbatches=program.microbatches, microbatch_rows=program.microbatch_rows,
                schedule=program.schedule, planner="replay")
    return split(captured, lg, plan)
