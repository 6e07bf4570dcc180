"""verify: the one checker of the schedule IR, and the dry run that fixes its execution order.

``verify(p)`` expects any Program and either returns (the program is safe to execute) or raises
VerifyError listing every problem found, each naming the device, the 1-based line of the action in
``format_program(p)``, the action's text, what is wrong and what to do. It checks, in order (a
later phase only runs when the earlier ones passed, since it relies on them):

  1. the stage table: stages 0..S-1, layers contiguous from 0, slots tiling [0, microbatch_rows),
     every device in exactly one stage and with one action list;
  2. every action's fields: what its op needs is there, nothing else is, indices are in range,
     it names its own stage (or the cut it sends or receives across), peers exist;
  3. compute, dependencies and pairing: F and B once per micro-batch on the device's rows, F before
     B; received rows tile the device's rows before they are used (gradients only across a cut with
     gradient traffic: a cut whose tensors need no gradient carries none); a SEND after the compute
     that produces it; one ALLREDUCE per device of a group of two or more, after every backward;
     exactly one STEP, after every backward and the ALLREDUCE; every SEND/BACKUP matched by exactly
     one RECV/RESTORE with the same rows and specs; at most one ROLLBACK, before any compute;
  4. deadlock freedom, by ``dry_run``.

``dry_run`` is step-synchronous: at every step each device runs at most its next action, if that is
ready (SEND and BACKUP are buffered and never wait; a RECV/RESTORE waits for its matching send, which
may run in the same step; an ALLREDUCE runs when every member of its group starts the step at that
same ALLREDUCE). ``execution_order`` flattens it; the local backend runs actions in that order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from asteroid_fx.ir.errors import AsteroidError
from asteroid_fx.ir.program import FORMAT_VERSION, Action, Op, Program, StageSlot
from asteroid_fx.ir.program_text import PAYLOADS, ProgramLayout, format_action, format_spec, layout_program

Step = list[tuple[str, int]]

_MAX_PROBLEMS_SHOWN = 25


class VerifyError(AsteroidError):
    """A Program that must not be executed; ``problems`` holds one line per problem found."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems) or (message,)


class DeadlockError(VerifyError):
    """The dry run stopped with actions left: ``steps`` ran, then ``blocked`` (device -> index) waited."""

    def __init__(self, message: str, steps: Sequence[Step], blocked: Mapping[str, int]) -> None:
        super().__init__(message)
        self.steps = [list(s) for s in steps]
        self.blocked = dict(blocked)


def _fail(problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:_MAX_PROBLEMS_SHOWN]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    noun = "problem" if len(problems) == 1 else "problems"
    body = "\n".join(f"  {p}" for p in shown)
    raise VerifyError(f"program failed verification ({len(problems)} {noun}):\n{body}{more}", problems)


def _r(lo: int, hi: int) -> str:
    return f"{lo}:{hi}"


class _Where:
    """Names places in the canonical text, so every message can cite a line."""

    def __init__(self, p: Program, layout: ProgramLayout) -> None:
        self.p = p
        self.layout = layout
        self.acts = {d: acts for d, acts in reversed(p.actions)}  # the first block wins, as in layout

    def line(self, device: str, i: int) -> int:
        return self.layout.action_lines[(device, i)]

    def action(self, device: str, i: int) -> str:
        return f"device {device}, line {self.line(device, i)}: {format_action(self.acts[device][i])}"

    def device(self, device: str) -> str:
        return f"device {device} (line {self.layout.device_lines[device]})"

    def stage(self, k: int) -> str:
        return f"stage line {self.layout.stage_lines[k]}"


# ---------------------------------------------------------------------------------------------
# 1. header and stage table


def _check_stage_table(p: Program, where: _Where) -> list[str]:
    problems: list[str] = []
    if p.version != FORMAT_VERSION:
        problems.append(f"line 1: version {p.version} is not the version this build runs ({FORMAT_VERSION})")
    if p.microbatches < 1:
        problems.append(f"line 3: microbatches is {p.microbatches}; an iteration needs at least 1 micro-batch")
    if p.microbatch_rows < 1:
        problems.append(f"line 4: microbatch_rows is {p.microbatch_rows}; a micro-batch needs at least 1 row")
    if not p.stages:
        problems.append("the program has no stages; add a 'stage 0 layers LO:HI DEVICE[0:ROWS]' line")

    layer_hi = 0
    owner: dict[str, list[int]] = defaultdict(list)
    for k, st in enumerate(p.stages):
        at = where.stage(k)
        if st.index != k:
            problems.append(f"{at}: stage index {st.index} where {k} is expected (stages are numbered 0..S-1 in order)")
        lo, hi = st.layers
        if lo != layer_hi:
            problems.append(f"{at}: layers {_r(lo, hi)} should start at layer {layer_hi}, where the previous stage ends")
        if hi <= lo:
            problems.append(f"{at}: layers {_r(lo, hi)} is empty; every stage runs at least one layer")
        layer_hi = hi
        if not st.slots:
            problems.append(f"{at}: stage {st.index} has no devices; give it at least one DEVICE[LO:HI] slot")
        row = 0
        for slot in st.slots:
            owner[slot.device].append(st.index)
            if slot.lo != row:
                gap = "leaves rows " + _r(row, slot.lo) + " to no device" if slot.lo > row else "overlaps the slot before"
                problems.append(f"{at}: slot {slot.device}[{_r(slot.lo, slot.hi)}] {gap}; slots must tile the rows in order")
            if slot.hi <= slot.lo:
                problems.append(f"{at}: slot {slot.device}[{_r(slot.lo, slot.hi)}] is empty; drop the device or give it rows")
            row = slot.hi
        if st.slots and row != p.microbatch_rows:
            problems.append(
                f"{at}: the slots end at row {row} but a micro-batch has {p.microbatch_rows} rows; "
                f"the last slot must end at {p.microbatch_rows}"
            )

    for device, stages in owner.items():
        if len(stages) > 1:
            listed = ", ".join(str(s) for s in stages)
            problems.append(f"device {device} has slots in stages {listed}; a device runs exactly one slot of one stage")
    blocks = Counter(p.devices)
    for device, n in blocks.items():
        if n > 1:
            problems.append(f"{where.device(device)}: {n} action lists; merge them into one")
        if device not in owner:
            problems.append(f"{where.device(device)}: runs no stage; give it a slot in the stage table or drop its actions")
    for device in owner:
        if device not in blocks:
            problems.append(f"device {device} has a slot in the stage table but no action list; add a 'device {device}' block")
    return problems


# ---------------------------------------------------------------------------------------------
# 2. fields of every action

# The fields each op carries beyond op and stage; every other field must keep its default. An op
# without an entry (one a future rewrite adds) is not checked here.
_OP_FIELDS: Mapping[Op, frozenset[str]] = {
    Op.F: frozenset({"mb", "rows"}),
    Op.B: frozenset({"mb", "rows"}),
    Op.SEND: frozenset({"mb", "rows", "peer", "payload", "specs"}),
    Op.RECV: frozenset({"mb", "rows", "peer", "payload", "specs"}),
    Op.ALLREDUCE: frozenset({"group"}),
    Op.STEP: frozenset(),
    Op.BACKUP: frozenset({"peer"}),
    Op.RESTORE: frozenset({"peer"}),
    Op.ROLLBACK: frozenset(),
}
_OPTIONAL_FIELDS = ("mb", "rows", "peer", "payload", "specs", "group")


def _any_stage(own: int) -> None:
    return None


# Which stage an action of a stage-`own` device must name (None: any stage of the program).
# Activations come from the cut before (stage own-1) and gradients go back across it; weights may
# be backed up on, or restored from, any device whatever stage it runs.
_STAGE_RULES: Mapping[tuple[Op, str | None], Callable[[int], int | None]] = {
    (Op.RECV, "act"): lambda own: own - 1,
    (Op.SEND, "grad"): lambda own: own - 1,
    (Op.BACKUP, None): _any_stage,
    (Op.RESTORE, None): _any_stage,
}


def _own_stage(own: int) -> int | None:
    return own


def _check_fields(p: Program, where: _Where, stage_of: Mapping[str, int]) -> list[str]:
    problems: list[str] = []
    S, M, R = len(p.stages), p.microbatches, p.microbatch_rows
    for device, acts in p.actions:
        own = stage_of[device]
        for i, a in enumerate(acts):
            at = where.action(device, i)
            fields = _OP_FIELDS.get(a.op)
            if fields is not None:
                for f in _OPTIONAL_FIELDS:
                    present = getattr(a, f) not in (None, ())
                    if f in fields and not present:
                        problems.append(f"{at}: {a.op.value} needs a {f}")
                    elif f not in fields and present:
                        problems.append(f"{at}: {a.op.value} takes no {f}; remove it")
            expected = _STAGE_RULES.get((a.op, a.payload), _own_stage)(own)
            if not 0 <= a.stage < S:
                problems.append(f"{at}: stage {a.stage} does not exist (the program has stages 0..{S - 1})")
            elif expected is not None and a.stage != expected:
                problems.append(
                    f"{at}: names stage {a.stage}, but this device runs stage {own}, so it must name stage {expected}"
                )
            if a.mb is not None and not 0 <= a.mb < M:
                problems.append(f"{at}: micro-batch {a.mb} does not exist (the program has micro-batches 0..{M - 1})")
            if a.rows is not None and not 0 <= a.rows[0] < a.rows[1] <= R:
                problems.append(f"{at}: rows {_r(*a.rows)} are not a non-empty range inside [0:{R}] of the micro-batch")
            if a.payload is not None and a.op in (Op.SEND, Op.RECV) and a.payload not in PAYLOADS:
                problems.append(f"{at}: unknown payload {a.payload!r} (expected {' or '.join(PAYLOADS)})")
            if a.peer is not None and (a.peer == device or a.peer not in stage_of):
                what = "is this device itself" if a.peer == device else "is not a device of this program"
                problems.append(f"{at}: peer {a.peer} {what}")
            if a.group:
                stage_devices = p.stages[own].devices
                if a.group != stage_devices:
                    problems.append(
                        f"{at}: the group must be stage {own}'s devices in slot order, [{' '.join(stage_devices)}]"
                    )
    return problems


# ---------------------------------------------------------------------------------------------
# 3. compute, dependencies, pairing


def _check_compute(p: Program, where: _Where, stage_of: Mapping[str, int], slot_of: Mapping[str, StageSlot]) -> list[str]:
    problems: list[str] = []
    for device, acts in p.actions:
        own, slot = stage_of[device], slot_of[device]
        seen: dict[tuple[Op, int], list[int]] = defaultdict(list)
        for i, a in enumerate(acts):
            if a.op in (Op.F, Op.B):
                seen[(a.op, a.mb)].append(i)
                if a.rows != (slot.lo, slot.hi):
                    problems.append(
                        f"{where.action(device, i)}: runs rows {_r(*a.rows)} but this device's slot is "
                        f"[{_r(slot.lo, slot.hi)}]; a device computes exactly its slot's rows"
                    )
        for mb in range(p.microbatches):
            for op in (Op.F, Op.B):
                found = seen[(op, mb)]
                if not found:
                    problems.append(
                        f"{where.device(device)}: never runs {op.value} s{own} mb{mb}; "
                        f"add '{op.value} s{own} mb{mb} r{_r(slot.lo, slot.hi)}'"
                    )
                for dup in found[1:]:
                    problems.append(
                        f"{where.action(device, dup)}: runs a second time (first on line {where.line(device, found[0])}); "
                        "each micro-batch runs once per device"
                    )
            fwd, bwd = seen[(Op.F, mb)], seen[(Op.B, mb)]
            if fwd and bwd and bwd[0] < fwd[0]:
                problems.append(
                    f"{where.action(device, bwd[0])}: runs before its forward (line {where.line(device, fwd[0])}); "
                    "move the B after the F, which keeps the activations it needs"
                )
    return problems


def _holes(pieces: Sequence[tuple[int, int]], lo: int, hi: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The row ranges of [lo, hi) that ``pieces`` leave uncovered, and those they cover twice."""
    # coverage only changes at piece boundaries, so count it once per span between two boundaries
    points = sorted({lo, hi, *(min(max(x, lo), hi) for piece in pieces for x in piece)})
    missing: list[tuple[int, int]] = []
    doubled: list[tuple[int, int]] = []
    for a, b in zip(points, points[1:]):
        cover = sum(1 for x, y in pieces if x <= a and b <= y)
        spans = missing if cover == 0 else doubled if cover > 1 else None
        if spans is not None and spans and spans[-1][1] == a:
            spans[-1] = (spans[-1][0], b)
        elif spans is not None:
            spans.append((a, b))
    return missing, doubled


def _sources(p: Program, stage: int, lo: int, hi: int) -> list[tuple[str, int, int]]:
    """The devices of ``stage`` owning rows [lo, hi), with the part each owns."""
    return [(s.device, max(lo, s.lo), min(hi, s.hi)) for s in p.stages[stage].slots if max(lo, s.lo) < min(hi, s.hi)]


class _DeviceWalk:
    """What one device has done so far, walking its actions in order (analysis state, not IR)."""

    def __init__(self, p: Program, where: _Where, device: str, stage: int, slot: StageSlot, grad_cuts: set[int]) -> None:
        self.p, self.where, self.device, self.stage, self.slot = p, where, device, stage, slot
        self.grad_cuts = grad_cuts
        self.computed: dict[Op, dict[int, int]] = {Op.F: {}, Op.B: {}}  # F|B -> mb -> index
        self.received: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)  # (payload, mb) -> rows
        self.allreduces: list[int] = []
        self.steps: list[int] = []
        self.rollbacks: list[int] = []
        self.problems: list[str] = []

    def at(self, i: int) -> str:
        return self.where.action(self.device, i)

    def line(self, i: int) -> int:
        return self.where.line(self.device, i)

    def need_rows(self, i: int, a: Action, payload: str, cut_stage: int, peer_stage: int) -> None:
        pieces = self.received[(payload, a.mb)]
        missing, doubled = _holes(pieces, self.slot.lo, self.slot.hi)
        what = "activations" if payload == "act" else "gradients"
        for lo, hi in missing:
            adds = " and ".join(
                f"'RECV {payload} s{cut_stage} mb{a.mb} r{_r(l, h)} <- {d}'" for d, l, h in _sources(self.p, peer_stage, lo, hi)
            )
            self.problems.append(
                f"{self.at(i)}: needs the {what} of rows {_r(self.slot.lo, self.slot.hi)} of mb{a.mb}, but rows "
                f"{_r(lo, hi)} were not received before it; add {adds} before line {self.line(i)}"
            )
        for lo, hi in doubled:
            self.problems.append(f"{self.at(i)}: rows {_r(lo, hi)} of its {what} were received twice; drop one RECV")


def _walk_f(w: _DeviceWalk, i: int, a: Action) -> None:
    if w.stage > 0:
        w.need_rows(i, a, "act", w.stage - 1, w.stage - 1)
    w.computed[Op.F].setdefault(a.mb, i)


def _walk_b(w: _DeviceWalk, i: int, a: Action) -> None:
    if w.stage in w.grad_cuts:
        w.need_rows(i, a, "grad", w.stage, w.stage + 1)
    w.computed[Op.B].setdefault(a.mb, i)


# The compute a SEND must follow on its device, and that a RECV must arrive before, per payload.
_PRODUCED_BY: Mapping[str, Op] = {"act": Op.F, "grad": Op.B}


def _walk_send(w: _DeviceWalk, i: int, a: Action) -> None:
    op = _PRODUCED_BY[a.payload]
    if a.mb not in w.computed[op]:
        w.problems.append(
            f"{w.at(i)}: sends before this device runs {op.value} s{w.stage} mb{a.mb}, which computes it; "
            "move the SEND after it"
        )


def _walk_recv(w: _DeviceWalk, i: int, a: Action) -> None:
    op = _PRODUCED_BY[a.payload]
    used = w.computed[op].get(a.mb)
    if used is not None:
        w.problems.append(
            f"{w.at(i)}: arrives after {op.value} s{w.stage} mb{a.mb} (line {w.line(used)}) already needed it; "
            "move the RECV before it"
        )
    w.received[(a.payload, a.mb)].append(a.rows)


def _pending_backward(w: _DeviceWalk) -> str:
    missing = [mb for mb in range(w.p.microbatches) if mb not in w.computed[Op.B]]
    return " ".join(f"mb{mb}" for mb in missing)


def _walk_allreduce(w: _DeviceWalk, i: int, a: Action) -> None:
    pending = _pending_backward(w)
    if pending:
        w.problems.append(f"{w.at(i)}: runs before the backward of {pending}; gradients are summed once all are done")
    w.allreduces.append(i)


def _walk_step(w: _DeviceWalk, i: int, a: Action) -> None:
    pending = _pending_backward(w)
    if pending:
        w.problems.append(f"{w.at(i)}: runs before the backward of {pending}; move STEP after the last B")
    w.steps.append(i)


def _walk_rollback(w: _DeviceWalk, i: int, a: Action) -> None:
    done = [*w.computed[Op.F].values(), *w.computed[Op.B].values()]
    if done:
        w.problems.append(
            f"{w.at(i)}: comes after compute (line {w.line(min(done))}) that it would throw away; "
            "a ROLLBACK starts a recovery program, before the first F"
        )
    if w.rollbacks:
        w.problems.append(f"{w.at(i)}: a second ROLLBACK (first on line {w.line(w.rollbacks[0])}); one is enough")
    w.rollbacks.append(i)


def _walk_nothing(w: _DeviceWalk, i: int, a: Action) -> None:
    pass


_WALK_RULES: Mapping[Op, Callable[[_DeviceWalk, int, Action], None]] = {
    Op.F: _walk_f,
    Op.B: _walk_b,
    Op.SEND: _walk_send,
    Op.RECV: _walk_recv,
    Op.ALLREDUCE: _walk_allreduce,
    Op.STEP: _walk_step,
    Op.ROLLBACK: _walk_rollback,
}


def _check_dependencies(p: Program, where: _Where, stage_of: Mapping[str, int], slot_of: Mapping[str, StageSlot]) -> list[str]:
    problems: list[str] = []
    # A cut whose tensors need no gradient carries no gradient messages at all (lower_comm leaves
    # them out); the backward of its lower stage then waits for nothing. Any gradient traffic
    # across a cut means every backward below it needs its rows' gradients.
    grad_cuts = {a.stage for _, acts in p.actions for a in acts if a.op in (Op.SEND, Op.RECV) and a.payload == "grad"}
    for device, acts in p.actions:
        own = stage_of[device]
        w = _DeviceWalk(p, where, device, own, slot_of[device], grad_cuts)
        for i, a in enumerate(acts):
            _WALK_RULES.get(a.op, _walk_nothing)(w, i, a)
        problems += w.problems
        group = p.stages[own].devices
        if len(group) > 1 and not w.allreduces:
            problems.append(
                f"{where.device(device)}: stage {own} runs on {len(group)} devices but {device} never sums their "
                f"gradients; add 'ALLREDUCE s{own} [{' '.join(group)}]' after its last B and before STEP"
            )
        for extra in w.allreduces[1:]:
            problems.append(f"{w.at(extra)}: a second ALLREDUCE of stage {own}; a group sums its gradients once")
        if w.allreduces and w.steps and w.steps[0] < w.allreduces[0]:
            problems.append(
                f"{w.at(w.steps[0])}: runs before ALLREDUCE (line {w.line(w.allreduces[0])}); "
                "the optimizer must see the group's summed gradients"
            )
        if not w.steps:
            problems.append(f"{where.device(device)}: never runs STEP s{own}; add it at the end of its actions")
        for extra in w.steps[1:]:
            problems.append(f"{w.at(extra)}: a second STEP; the optimizer steps once per iteration")
    return problems


class _Channel(NamedTuple):
    """A SEND/RECV (or BACKUP/RESTORE) pairs with the same-ordinal action on the same key."""

    key: tuple[object, ...]
    sends: bool  # True on the sending side


# How each transfer op pairs with its counterpart; an op without an entry transfers nothing.
_CHANNELS: Mapping[Op, Callable[[str, Action], _Channel]] = {
    Op.SEND: lambda dev, a: _Channel(("data", dev, a.peer, a.payload, a.stage, a.mb, a.rows), True),
    Op.RECV: lambda dev, a: _Channel(("data", a.peer, dev, a.payload, a.stage, a.mb, a.rows), False),
    Op.BACKUP: lambda dev, a: _Channel(("weights", dev, a.peer, a.stage), True),
    Op.RESTORE: lambda dev, a: _Channel(("weights", a.peer, dev, a.stage), False),
}
_COUNTERPART: Mapping[Op, Op] = {Op.SEND: Op.RECV, Op.RECV: Op.SEND, Op.BACKUP: Op.RESTORE, Op.RESTORE: Op.BACKUP}


def _counterpart(device: str, a: Action) -> Action:
    """The action ``a.peer`` must run to pair with ``a`` on ``device``."""
    return a._replace(op=_COUNTERPART[a.op], peer=device)


class _Pairs(NamedTuple):
    matched: list[tuple[tuple[str, int], tuple[str, int]]]  # (sender, receiver)
    unmatched: list[tuple[str, int]]


def _pair_transfers(p: Program) -> _Pairs:
    sides: dict[tuple[object, ...], tuple[list[tuple[str, int]], list[tuple[str, int]]]] = defaultdict(lambda: ([], []))
    for device, acts in p.actions:
        for i, a in enumerate(acts):
            rule = _CHANNELS.get(a.op)
            if rule is not None:
                ch = rule(device, a)
                sides[ch.key][0 if ch.sends else 1].append((device, i))
    matched, unmatched = [], []
    for sends, recvs in sides.values():
        matched += zip(sends, recvs)
        unmatched += sends[len(recvs):] + recvs[len(sends):]
    return _Pairs(matched, unmatched)


def _near(a: Action, b: Action) -> bool:
    """Two unmatched transfers that were meant for each other but disagree on their rows."""
    return a.payload == b.payload and a.stage == b.stage and a.mb == b.mb


def _check_pairing(p: Program, where: _Where, stage_of: Mapping[str, int], slot_of: Mapping[str, StageSlot]) -> list[str]:
    problems: list[str] = []
    acts = where.acts
    for device, items in p.actions:
        for i, a in enumerate(items):
            if a.op not in (Op.SEND, Op.RECV):
                continue
            # activations go up across the cut (a.stage -> a.stage+1), gradients come back down
            peer_is_lower = (a.op == Op.SEND) == (a.payload == "grad")
            peer_stage = a.stage if peer_is_lower else a.stage + 1
            if stage_of[a.peer] != peer_stage:
                problems.append(
                    f"{where.action(device, i)}: {a.peer} runs stage {stage_of[a.peer]}, but this {a.payload} crosses "
                    f"the cut between stages {a.stage} and {a.stage + 1}, so its peer must run stage {peer_stage}"
                )
            for who in (device, a.peer):
                slot = slot_of[who]
                if not slot.lo <= a.rows[0] < a.rows[1] <= slot.hi:
                    problems.append(
                        f"{where.action(device, i)}: rows {_r(*a.rows)} lie outside {who}'s slot [{_r(slot.lo, slot.hi)}]"
                    )

    pairs = _pair_transfers(p)
    for (sd, si), (rd, ri) in pairs.matched:
        send, recv = acts[sd][si], acts[rd][ri]
        if send.specs != recv.specs:
            problems.append(
                f"{where.action(rd, ri)}: specs differ from its {send.op.value} on {sd} (line {where.line(sd, si)}), "
                f"which sends {' '.join(map(format_spec, send.specs)) or 'nothing'}; make both list the same tensors"
            )
    leftover = list(pairs.unmatched)
    while leftover:
        device, i = leftover.pop(0)
        a = acts[device][i]
        twin = next(
            (
                (d, j)
                for d, j in leftover
                if d == a.peer and acts[d][j].peer == device and acts[d][j].op == _COUNTERPART[a.op] and _near(a, acts[d][j])
            ),
            None,
        )
        if twin is not None and a.rows is not None:
            leftover.remove(twin)
            b = acts[twin[0]][twin[1]]
            problems.append(
                f"{where.action(device, i)}: rows differ from its {b.op.value} on {twin[0]} "
                f"(line {where.line(*twin)}: {format_action(b)}); both sides must name the same rows"
            )
            continue
        problems.append(
            f"{where.action(device, i)}: has no matching {_COUNTERPART[a.op].value} on {a.peer}; "
            f"add '{format_action(_counterpart(device, a))}' to {a.peer}'s actions"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# 4. the dry run


class _Sim:
    """The dry run's state: how far each device got and what has been sent (analysis state)."""

    def __init__(self, p: Program) -> None:
        self.p = p
        self.order = list(dict.fromkeys(d for d, _ in p.actions))
        self.acts = {d: acts for d, acts in reversed(p.actions)}
        self.pos = dict.fromkeys(self.order, 0)
        self.start = dict(self.pos)  # positions when the current step began
        self.sent: Counter[tuple[object, ...]] = Counter()
        self.ordinal: dict[tuple[str, int], int] = {}  # k-th of its channel (or of its stage's ALLREDUCEs)
        self.senders: dict[tuple[object, ...], list[tuple[str, int]]] = defaultdict(list)
        for device, acts in self.acts.items():
            seen: Counter[tuple[object, ...]] = Counter()
            for i, a in enumerate(acts):
                rule = _CHANNELS.get(a.op)
                key = rule(device, a).key if rule is not None else (a.op, a.stage)
                if rule is not None and rule(device, a).sends:
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


def _ready_always(sim: _Sim, device: str, i: int, a: Action) -> bool:
    return True


def _ready_channel(sim: _Sim, device: str, i: int, a: Action) -> bool:
    return sim.sent[_CHANNELS[a.op](device, a).key] > sim.ordinal[(device, i)]


def _waits_channel(sim: _Sim, device: str, i: int, a: Action, layout: ProgramLayout) -> str:
    key = _CHANNELS[a.op](device, a).key
    k = sim.ordinal[(device, i)]
    wanted = format_action(_counterpart(device, a))
    senders = sim.senders.get(key, [])
    if k >= len(senders):
        return f"waits for '{wanted}' on {a.peer}, which {a.peer} never runs"
    src, j = senders[k]
    return f"waits for '{wanted}' on {src} (line {layout.action_lines[(src, j)]}), but {sim.where_is(src, layout)}"


def _members(device: str, a: Action) -> tuple[str, ...]:
    return a.group if device in a.group else (*a.group, device)


def _at_collective(sim: _Sim, member: str, a: Action, k: int, positions: Mapping[str, int]) -> bool:
    b = sim.next_of(member, positions)
    return b is not None and b.op == a.op and b.stage == a.stage and sim.ordinal[(member, positions[member])] == k


def _ready_collective(sim: _Sim, device: str, i: int, a: Action) -> bool:
    # every member starts this step at the same (k-th of the stage) ALLREDUCE; then they all run it
    k = sim.ordinal[(device, i)]
    return all(_at_collective(sim, m, a, k, sim.start) for m in _members(device, a))


def _waits_collective(sim: _Sim, device: str, i: int, a: Action, layout: ProgramLayout) -> str:
    k = sim.ordinal[(device, i)]
    late = [m for m in _members(device, a) if not _at_collective(sim, m, a, k, sim.pos)]
    return "waits for its group to reach this ALLREDUCE together, but " + "; ".join(sim.where_is(m, layout) for m in late)


def _waits_nothing(sim: _Sim, device: str, i: int, a: Action, layout: ProgramLayout) -> str:
    return "waits for nothing (this is a bug in the dry run)"


class _Readiness(NamedTuple):
    ready: Callable[[_Sim, str, int, Action], bool]
    waits_for: Callable[[_Sim, str, int, Action, ProgramLayout], str]


# When each op may run in a step; ops without an entry (F, B, STEP, and the buffered SEND and
# BACKUP) never wait.
_READINESS: Mapping[Op, _Readiness] = {
    Op.RECV: _Readiness(_ready_channel, _waits_channel),
    Op.RESTORE: _Readiness(_ready_channel, _waits_channel),
    Op.ALLREDUCE: _Readiness(_ready_collective, _waits_collective),
}
_ALWAYS_READY = _Readiness(_ready_always, _waits_nothing)


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
                if _READINESS.get(a.op, _ALWAYS_READY).ready(sim, device, i, a):
                    rule = _CHANNELS.get(a.op)
                    if rule is not None and rule(device, a).sends:
                        sim.sent[rule(device, a).key] += 1
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
        waits = _READINESS.get(a.op, _ALWAYS_READY).waits_for(sim, device, i, a, layout)
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


# ---------------------------------------------------------------------------------------------


def verify(p: Program) -> None:
    """Check ``p`` (see the module docstring); raise VerifyError listing what is wrong, else return."""
    layout = layout_program(p)
    where = _Where(p, layout)
    _fail(_check_stage_table(p, where))
    stage_of = {slot.device: st.index for st in p.stages for slot in st.slots}
    slot_of = {slot.device: slot for st in p.stages for slot in st.slots}
    _fail(_check_fields(p, where, stage_of))
    _fail(
        _check_compute(p, where, stage_of, slot_of)
        + _check_dependencies(p, where, stage_of, slot_of)
        + _check_pairing(p, where, stage_of, slot_of)
    )
    dry_run(p)
