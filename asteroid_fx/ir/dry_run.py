"""How a Program runs without computing: transfers pair up on their channels, and the dry run.

A SEND/RECV (or BACKUP/RESTORE) pairs with the same-ordinal action of its counterpart on the same
channel (``ops.channel``: what moves, from whom to whom, which piece). ``dry_run`` is
step-synchronous: at every step each device runs at most its next action, if that is ready (a
sending transfer is buffered and never waits; a receiving one waits for its matching send, which
may run in the same step; a collective runs when every member of its group starts the step at that
same collective). ``execution_order`` flattens it; the local backend runs actions in that order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from asteroid_fx.ir import ops
from asteroid_fx.ir.errors import DeadlockError
from asteroid_fx.ir.program import Action, Program
from asteroid_fx.ir.program_format import ProgramLayout, format_action, layout_program

Step = list[tuple[str, int]]  # (device, action index) that ran in one step, in a runnable order

class Pairs(NamedTuple):
    matched: list[tuple[tuple[str, int], tuple[str, int]]]  # (sender, receiver)
    unmatched: list[tuple[str, int]]


def pair_transfers(p: Program) -> Pairs:
    """Every transfer of ``p`` matched k-th with k-th on its channel, and those left unmatched."""
    sides: dict[tuple[object, ...], tuple[list[tuple[str, int]], list[tuple[str, int]]]] = defaultdict(lambda: ([], []))
    for device, acts in p.actions:
        for i, a in enumerate(acts):
            ch = ops.channel(device, a)
            if ch is not None:
                sides[ch.key][0 if ch.sends else 1].append((device, i))
    matched, unmatched = [], []
    for sends, recvs in sides.values():
        matched += zip(sends, recvs)
        unmatched += sends[len(recvs):] + recvs[len(sends):]
    return Pairs(matched, unmatched)


class _Sim:
    """The dry run's state: how far each device got and what has been sent (analysis state)."""

    def __init__(self, p: Program) -> None:
        self.p = p
        self.order = list(dict.fromkeys(d for d, _ in p.actions))
        self.acts = {d: acts for d, acts in reversed(p.actions)}
        self.pos = dict.fromkeys(self.order, 0)
        self.start = dict(self.pos)  # positions when the current step began
        self.sent: Counter[tuple[object, ...]] = Counter()
        self.ordinal: dict[tuple[str, int], int] = {}  # k-th of its channel (or of its collective's key)
        self.senders: dict[tuple[object, ...], list[tuple[str, int]]] = defaultdict(list)
        for device, acts in self.acts.items():
            seen: Counter[tuple[object, ...]] = Counter()
            for i, a in enumerate(acts):
                ch = ops.channel(device, a)
                key = ch.key if ch is not None else ops.collective_key(a)
                if ch is not None and ch.sends:
                    self.senders[key].append((device, i))
                self.ordinal[(device, i)] = seen[key]
                seen[key] += 1

    def next_of(self, device: str, positions: Mapping[str, int]) -> Action | None:
        acts = self.acts.get(device, ())
        return acts[positions[device]] if positions.get(device, len(acts)) < len(acts) else None

    def where_is(self, device: str, layout: ProgramLayout) -> str:
        a = self.next_of(device, self.pos)
        if device not in self.acts:
            return f"{device} is not a device of this program"
        if a is None:
            return f"{device} has finished all its actions"
        line = layout.action_lines[(device, self.pos[device])]
        return f"{device} is blocked at line {line} ({format_action(a, short=True)})"


def _key(device: str, a: Action) -> tuple[object, ...]:
    ch = ops.channel(device, a)
    assert ch is not None, "only transfers wait on a channel"
    return ch.key


def _ready_always(sim: _Sim, device: str, i: int, a: Action) -> bool:
    return True


def _ready_channel(sim: _Sim, device: str, i: int, a: Action) -> bool:
    return sim.sent[_key(device, a)] > sim.ordinal[(device, i)]


def _waits_channel(sim: _Sim, device: str, i: int, a: Action, layout: ProgramLayout) -> str:
    key = _key(device, a)
    k = sim.ordinal[(device, i)]
    wanted = format_action(ops.counterpart(device, a))
    senders = sim.senders.get(key, [])
    if k >= len(senders):
        return f"waits for '{wanted}' on {a.peer}, which {a.peer} never runs"
    src, j = senders[k]
    return f"waits for '{wanted}' on {src} (line {layout.action_lines[(src, j)]}), but {sim.where_is(src, layout)}"


def _members(device: str, a: Action) -> tuple[str, ...]:
    return a.group if device in a.group else (*a.group, device)


def _at_collective(sim: _Sim, member: str, a: Action, k: int, positions: Mapping[str, int]) -> bool:
    b = sim.next_of(member, positions)
    return (b is not None and ops.info(b.op).collective and ops.collective_key(b) == ops.collective_key(a)
            and sim.ordinal[(member, positions[member])] == k)


def _ready_collective(sim: _Sim, device: str, i: int, a: Action) -> bool:
    # every member starts this step at the same (k-th of its key) collective; then they all run it
    k = sim.ordinal[(device, i)]
    return all(_at_collective(sim, m, a, k, sim.start) for m in _members(device, a))


def _waits_collective(sim: _Sim, device: str, i: int, a: Action, layout: ProgramLayout) -> str:
    k = sim.ordinal[(device, i)]
    late = [m for m in _members(device, a) if not _at_collective(sim, m, a, k, sim.pos)]
    return f"waits for its group to reach this {a.op.value} together, but " + "; ".join(sim.where_is(m, layout) for m in late)


def _waits_nothing(sim: _Sim, device: str, i: int, a: Action, layout: ProgramLayout) -> str:
    return "waits for nothing (this is a bug in the dry run)"


class _Readiness(NamedTuple):
    ready: Callable[[_Sim, str, int, Action], bool]
    waits_for: Callable[[_Sim, str, int, Action, ProgramLayout], str]


_ALWAYS_READY = _Readiness(_ready_always, _waits_nothing)
_CHANNEL_READY = _Readiness(_ready_channel, _waits_channel)
_COLLECTIVE_READY = _Readiness(_ready_collective, _waits_collective)


def _readiness(op: ops.Op) -> _Readiness:
    """When an op may run in a step: the receiving side of a transfer once its send ran, a
    collective when its whole group is there; everything else (compute, the buffered sends) at once."""
    info = ops.info(op)
    if info.moves is not None and not info.sends:
        return _CHANNEL_READY
    return _COLLECTIVE_READY if info.collective else _ALWAYS_READY


def dry_run(p: Program) -> list[Step]:
    """Run ``p`` step-synchronously without computing anything; return what ran at every step.

    Each step lists (device, action index) in program device order, except that an action which
    became ready by another one of the same step (a RECV by its SEND) is listed after it; so every
    step, and the steps one after another, can be run in the order listed. Deterministic: the same
    program always gives the same steps. Raises DeadlockError when actions remain but no device can
    move, naming each blocked device, its line and what it waits for, with the schedule grid.
    """
    sim = _Sim(p)
    remaining = sum(len(acts) for acts in sim.acts.values())
    steps: list[Step] = []
    while remaining:
        sim.start = dict(sim.pos)
        step: Step = []
        # Passes over the devices in program order until nothing more is ready: a RECV may run in
        # the step of its SEND, and is then listed after it, so the step's order is runnable as is.
        progress = True
        while progress:
            progress = False
            for device in sim.order:
                a = sim.next_of(device, sim.pos)
                if a is None or sim.pos[device] != sim.start[device]:
                    continue
                i = sim.pos[device]
                if _readiness(a.op).ready(sim, device, i, a):
                    ch = ops.channel(device, a)
                    if ch is not None and ch.sends:
                        sim.sent[ch.key] += 1
                    sim.pos[device] += 1
                    step.append((device, i))
                    progress = True
        if not step:
            raise _deadlock(p, sim, steps)
        steps.append(step)
        remaining -= len(step)
    return steps


def _deadlock(p: Program, sim: _Sim, steps: list[Step]) -> DeadlockError:
    layout = layout_program(p)
    blocked = {d: sim.pos[d] for d in sim.order if sim.next_of(d, sim.pos) is not None}
    lines = []
    for device, i in blocked.items():
        a = sim.acts[device][i]
        waits = _readiness(a.op).waits_for(sim, device, i, a, layout)
        lines.append(f"  device {device}, line {layout.action_lines[(device, i)]}: {format_action(a)}\n    {waits}")
    message = (
        f"deadlock at step {len(steps)}: no device can move, {len(blocked)} blocked:\n"
        + "\n".join(lines)
        + "\nReorder these actions so that every RECV's SEND (and every member of an ALLREDUCE) can run "
        "first; the grid shows where each device stopped:\n"
        + format_grid(p, steps, mark_step=len(steps))
    )
    return DeadlockError(message, steps, blocked)


def execution_order(p: Program) -> list[tuple[str, int]]:
    """Every (device, action index) in the order the local backend runs them: the dry run's steps
    one after another, each in its listed order (so every SEND comes before its RECV and every
    action after the ones before it on its device). Raises DeadlockError as ``dry_run`` does."""
    return [x for step in dry_run(p) for x in step]


def format_grid(p: Program, steps: Sequence[Step], mark_step: int | None = None) -> str:
    """The schedule as a table: a column per device, a row per step, each cell the action's short
    text. In row ``mark_step`` (which may be ``len(steps)``, the step that could not run) a device
    that did not run shows ``(blocked: <its next action>)``; the row is marked ``>>``."""
    devices = [d for d, _ in p.actions]
    acts = {d: a for d, a in reversed(p.actions)}
    pos = dict.fromkeys(devices, 0)
    rows: list[tuple[str, list[str]]] = []
    n_rows = max(len(steps), (mark_step + 1) if mark_step is not None else 0)
    for k in range(n_rows):
        ran = dict(steps[k]) if k < len(steps) else {}
        cells = []
        for d in devices:
            if d in ran:
                cells.append(format_action(acts[d][ran[d]], short=True))
            elif k == mark_step and pos[d] < len(acts[d]):
                cells.append(f"(blocked: {format_action(acts[d][pos[d]], short=True)})")
            elif k == mark_step:
                cells.append("(done)")
            else:
                cells.append("")
        for d, i in ran.items():
            pos[d] = i + 1
        rows.append((f">> {k}" if k == mark_step else str(k), cells))
    header = ("step", devices)
    widths = [max(len(r[0]) for r in [header, *rows])] + [
        max(len(r[1][c]) for r in [header, *rows]) for c in range(len(devices))
    ]

    def render(first: str, cells: Sequence[str]) -> str:
        parts = [first.rjust(widths[0]), *(c.ljust(w) for c, w in zip(cells, widths[1:]))]
        return " | ".join(parts).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([render(*header), rule, *(render(*r) for r in rows)])
