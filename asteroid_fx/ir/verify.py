"""verify: the one checker of the schedule IR, and the dry run that fixes its execution order.

``verify(p)`` expects any Program and either returns (the program is safe to execute) or raises
VerifyError listing the problems found (missing computes: the first few per device, then a count,
so that verify of any parsed program ends fast), each naming the device, the 1-based line of the
action in ``format_program(p)``, the action's text, what is wrong and what to do. It checks, in order (a
later phase only runs when the earlier ones passed, since it relies on them):

  1. the stage table: at most MAX_MICROBATCHES micro-batches, stages 0..S-1, layers contiguous
     from 0 (to the model's layer count, when given), slots tiling [0, microbatch_rows),
     every device with one action list and in at least one stage, never twice in one stage nor in
     two adjacent stages (a device may hold several stages: virtual stages);
  2. every action's fields: what its op needs is there, nothing else is, indices are in range,
     it names a stage its device holds (or the cut it sends or receives across), peers exist;
  3. compute, dependencies and pairing, per stage a device holds: F and B once per micro-batch on
     each chunk of the device's rows of that stage (its slot, cut at the stage's splits), F before
     B; a SEND's or RECV's rows inside one chunk of its device; received rows tile a chunk before they are
     used (gradients only across a cut with gradient traffic: a cut whose tensors need no gradient
     carries none); a SEND after the compute that produces it, and activations sent before the B
     of their micro-batch frees them; SEND/RECV specs the cut's real tensors (when the stage
     modules' cut specs are given); one ALLREDUCE per device of a stage of two chunks or more (a
     group, or one device running several), after every backward of the stage; exactly one STEP, after every backward and
     the ALLREDUCE; every SEND/BACKUP matched by exactly one RECV/RESTORE with the same rows and
     specs; at most one ROLLBACK, before any compute; a TIE after the stage's last B and its
     ALLREDUCE and before its STEP, run by every holder of its weights (whole stages, in stage and
     slot order), in one order on all of them; a NORM on every device or on none, one each, over
     every device of the program, with one positive max_norm, after the device's last B,
     ALLREDUCE and TIE and before its STEPs;
  4. deadlock freedom, by ``dry_run``.

``dry_run`` (in ``dry_run.py``, with the channel matching it shares with phase 3) is
step-synchronous: at every step each device runs at most its next action, if that is ready (SEND
and BACKUP are buffered and never wait; a RECV/RESTORE waits for its matching send, which may run
in the same step; an ALLREDUCE runs when every member of its group starts the step at that same
ALLREDUCE). ``execution_order`` flattens it; the local backend runs actions in that order.

What each op carries, which stage it names and what it pairs with come from ``ops.OPS``; the
rules here are the checks per op (a table with a default, ``_WALK_RULES``).

One module a little past 500 lines on purpose: its phases share the line index (``_Where``) and the
tables of who holds what; the dry run (dry_run.py), the tie rules (verify_ties.py) and the clipping rules (verify_norm.py)
live apart.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence

from asteroid_fx.ir import ops
from asteroid_fx.ir.dry_run import Step, dry_run, execution_order, format_grid, pair_transfers
from asteroid_fx.ir.errors import DeadlockError, VerifyError
from asteroid_fx.ir.ops import COMPUTE_OPS, OPTIONAL_FIELDS, PAYLOAD_INFO, PAYLOADS, Op
from asteroid_fx.ir.program import FORMAT_VERSION, Action, Program, StageSlot
from asteroid_fx.ir.program_format import ProgramLayout, format_action, format_spec, layout_program
from asteroid_fx.ir.verify_norm import check_norms
from asteroid_fx.ir.verify_ties import check_ties

# verify is where these are looked up; they live beside the dry run and with the other errors
__all__ = ["DeadlockError", "Step", "VerifyError", "dry_run", "execution_order", "format_grid", "verify"]

_MAX_PROBLEMS_SHOWN = 25
# Missing computes are listed per device up to this many, then counted: a program that names a
# million micro-batches and runs none would otherwise collect two million lines.
_MAX_MISSING_LISTED = 20
# No pipeline runs this many micro-batches in one iteration; a larger count is a typo or a crafted
# file, refused before any check walks the micro-batches.
MAX_MICROBATCHES = 1 << 16

Held = Mapping[str, tuple[int, ...]]  # device -> the stages it holds, in order
Slots = Mapping[tuple[str, int], StageSlot]  # (device, stage) -> its rows of the stage


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


def _check_stage_table(p: Program, where: _Where, layers: int | None = None) -> list[str]:
    problems: list[str] = []
    if p.version != FORMAT_VERSION:
        problems.append(f"line 1: version {p.version} is not the version this build runs ({FORMAT_VERSION})")
    if p.microbatches < 1:
        problems.append(f"line 3: microbatches is {p.microbatches}; an iteration needs at least 1 micro-batch")
    if p.microbatches > MAX_MICROBATCHES:
        problems.append(f"line 3: microbatches is {p.microbatches}, more than the {MAX_MICROBATCHES} an iteration "
                        "may have; split the batch into fewer, larger micro-batches")
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
            if k in owner[slot.device]:
                problems.append(f"{at}: device {slot.device} has two slots; a device runs one slot of a stage")
            else:
                owner[slot.device].append(k)
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
        if list(st.splits) != sorted(set(st.splits)):
            problems.append(f"{at}: chunk splits {list(st.splits)} are not ascending and distinct; list each row once, in order")
        for x in st.splits:
            if not any(s.lo < x < s.hi for s in st.slots):
                problems.append(f"{at}: chunk split at row {x} lies inside no slot (a split cuts one device's slot "
                                "into chunks); drop it")

    if layers is not None and p.stages and layer_hi != layers:
        problems.append(f"{where.stage(len(p.stages) - 1)}: the stages end at layer {layer_hi} but the model has "
                        f"{layers} layers (0:{layers}); the last stage must end at layer {layers}")
    for device, stages in owner.items():
        adjacent = [(s, t) for s, t in itertools.pairwise(stages) if t == s + 1]
        if adjacent:
            listed = ", ".join(str(s) for s in stages)
            s, t = adjacent[0]
            problems.append(f"device {device} has slots in stages {listed}, of which {s} and {t} are adjacent: "
                            f"a cut inside one device is no cut; merge stages {s} and {t} into one stage")
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

def _stages_text(stages: Sequence[int]) -> str:
    return f"stage {stages[0]}" if len(stages) == 1 else "stages " + ", ".join(str(s) for s in stages)


def _check_fields(p: Program, where: _Where, held: Held) -> list[str]:
    problems: list[str] = []
    S, M, R = len(p.stages), p.microbatches, p.microbatch_rows
    for device, acts in p.actions:
        mine = held[device]
        for i, a in enumerate(acts):
            at = where.action(device, i)
            info = ops.info(a.op)
            fields = info.fields  # an op whose fields are not stated (None) is not checked here
            if fields is not None:
                for f in OPTIONAL_FIELDS:
                    present = getattr(a, f) not in (None, ())
                    if f in fields and not present:
                        problems.append(f"{at}: {a.op.value} needs a {f}")
                    elif f not in fields and present:
                        problems.append(f"{at}: {a.op.value} takes no {f}; remove it")
            owner = ops.own_stage(a)
            if not 0 <= a.stage < S:
                problems.append(f"{at}: stage {a.stage} does not exist (the program has stages 0..{S - 1})")
            elif owner is not None and owner not in mine:
                names = sorted({ops.named_stage(a, h) for h in mine})
                which = f"stage {names[0]}" if len(names) == 1 else "one of stages " + ", ".join(map(str, names))
                problems.append(f"{at}: names stage {a.stage}, but this device runs {_stages_text(mine)}, "
                                f"so it must name {which}")
            if a.mb is not None and not 0 <= a.mb < M:
                problems.append(f"{at}: micro-batch {a.mb} does not exist (the program has micro-batches 0..{M - 1})")
            if a.rows is not None and not 0 <= a.rows[0] < a.rows[1] <= R:
                problems.append(f"{at}: rows {_r(*a.rows)} are not a non-empty range inside [0:{R}] of the micro-batch")
            if a.payload is not None and info.moves == ops.DATA and a.payload not in PAYLOADS:
                problems.append(f"{at}: unknown payload {a.payload!r} (expected {' or '.join(PAYLOADS)})")
            if a.peer is not None and (a.peer == device or a.peer not in held):
                what = "is this device itself" if a.peer == device else "is not a device of this program"
                problems.append(f"{at}: peer {a.peer} {what}")
            # a device of one stage: its group is that stage's, whatever the action names
            group_stage = mine[0] if len(mine) == 1 else owner if owner in mine else None
            if a.group and group_stage is not None and info.group == "stage":
                stage_devices = p.stages[group_stage].devices
                if a.group != stage_devices:
                    problems.append(
                        f"{at}: the group must be stage {group_stage}'s devices in slot order, [{' '.join(stage_devices)}]"
                    )
    return problems


# ---------------------------------------------------------------------------------------------
# 3. compute, dependencies, pairing


def _check_compute(p: Program, where: _Where, held: Held, slots: Slots) -> list[str]:
    problems: list[str] = []
    for device, acts in p.actions:
        seen: dict[tuple[Op, int, int, tuple[int, int]], list[int]] = defaultdict(list)
        for i, a in enumerate(acts):
            if ops.info(a.op).compute:
                seen[(a.op, a.stage, a.mb, a.rows)].append(i)
                slot = slots[(device, a.stage)]
                chunks = p.stages[a.stage].chunks_of(device)
                if a.rows not in chunks:
                    which = ("a device computes exactly its slot's rows" if len(chunks) == 1 else
                             "it runs its slot as the chunks " + " ".join(f"r{_r(*c)}" for c in chunks)
                             + ", each F and B exactly one of them")
                    problems.append(
                        f"{where.action(device, i)}: runs rows {_r(*a.rows)} but this device's slot is "
                        f"[{_r(slot.lo, slot.hi)}]; {which}"
                    )
        missing = 0
        runs = ((own, mb, chunk) for own in held[device] for mb in range(p.microbatches)
                for chunk in p.stages[own].chunks_of(device))
        for own, mb, chunk in runs:
            slot = slots[(device, own)]
            on = "" if chunk == (slot.lo, slot.hi) else f" on chunk r{_r(*chunk)}"
            for op in COMPUTE_OPS:
                found = seen.get((op, own, mb, chunk), [])
                if not found:
                    missing += 1
                    if missing <= _MAX_MISSING_LISTED:
                        problems.append(
                            f"{where.device(device)}: never runs {op.value} s{own} mb{mb}{on}; "
                            f"add '{op.value} s{own} mb{mb} r{_r(*chunk)}'"
                        )
                for dup in found[1:]:
                    problems.append(
                        f"{where.action(device, dup)}: runs a second time (first on line {where.line(device, found[0])}); "
                        "each micro-batch runs once per chunk"
                    )
            fwd, bwd = seen.get((Op.F, own, mb, chunk)), seen.get((Op.B, own, mb, chunk))
            if fwd and bwd and bwd[0] < fwd[0]:
                problems.append(
                    f"{where.action(device, bwd[0])}: runs before its forward (line {where.line(device, fwd[0])}); "
                    "move the B after the F, which keeps the activations it needs"
                )
        if missing > _MAX_MISSING_LISTED:
            problems.append(f"{where.device(device)}: and {missing - _MAX_MISSING_LISTED} more F or B actions it never "
                            f"runs ({missing} in all, of {2 * p.microbatches * sum(len(p.stages[own].chunks_of(device)) for own in held[device])} it must run)")
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
        self.chunks = p.stages[stage].chunks_of(device)
        # F|B -> (mb, chunk) -> index
        self.computed: dict[Op, dict[tuple[int, tuple[int, int]], int]] = {op: {} for op in COMPUTE_OPS}
        self.received: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)  # (payload, mb) -> rows
        self.allreduces: list[int] = []
        self.steps: list[int] = []
        self.ties: list[int] = []
        self.rollbacks: list[int] = []
        self.problems: list[str] = []

    def at(self, i: int) -> str:
        return self.where.action(self.device, i)

    def line(self, i: int) -> int:
        return self.where.line(self.device, i)

    def chunk_of(self, i: int, a: Action) -> tuple[int, int] | None:
        """The chunk holding a message's rows; None (a problem noted) when they cross a chunk boundary."""
        chunk = next((c for c in self.chunks if c[0] <= a.rows[0] and a.rows[1] <= c[1]), None)
        if chunk is None:
            cut = next((c[1] for c in self.chunks if a.rows[0] < c[1] < a.rows[1]), None)
            if cut is None:  # rows that no chunk of this device holds (outside its slot, or empty)
                self.problems.append(f"{self.at(i)}: rows {_r(*a.rows)} are not rows of {self.device}'s chunks "
                                     f"({', '.join(_r(*c) for c in self.chunks)}); send only rows this device computes")
                return None
            self.problems.append(f"{self.at(i)}: rows {_r(*a.rows)} cross the boundary at row {cut} between two chunks of "
                                 f"{self.device}; split the message there (a chunk's rows travel as its own messages)")
        return chunk

    def need_rows(self, i: int, a: Action, payload: str, cut_stage: int, peer_stage: int) -> None:
        pieces = self.received[(payload, a.mb)]
        lo, hi = a.rows
        missing, doubled = _holes(pieces, lo, hi)
        what = "activations" if payload == "act" else "gradients"
        for lo, hi in missing:
            adds = " and ".join(
                f"'RECV {payload} s{cut_stage} mb{a.mb} r{_r(l, h)} <- {d}'" for d, l, h in _sources(self.p, peer_stage, lo, hi)
            )
            self.problems.append(
                f"{self.at(i)}: needs the {what} of rows {_r(*a.rows)} of mb{a.mb}, but rows "
                f"{_r(lo, hi)} were not received before it; add {adds} before line {self.line(i)}"
            )
        for lo, hi in doubled:
            self.problems.append(f"{self.at(i)}: rows {_r(lo, hi)} of its {what} were received twice; drop one RECV")


def _walk_f(w: _DeviceWalk, i: int, a: Action) -> None:
    if w.stage > 0:
        w.need_rows(i, a, "act", w.stage - 1, w.stage - 1)
    w.computed[Op.F].setdefault((a.mb, a.rows), i)


def _walk_b(w: _DeviceWalk, i: int, a: Action) -> None:
    if w.stage in w.grad_cuts:
        w.need_rows(i, a, "grad", w.stage, w.stage + 1)
    w.computed[Op.B].setdefault((a.mb, a.rows), i)


def _walk_send(w: _DeviceWalk, i: int, a: Action) -> None:
    op = PAYLOAD_INFO[a.payload].produced_by
    chunk = w.chunk_of(i, a)
    if chunk is not None and (a.mb, chunk) not in w.computed[op]:
        w.problems.append(
            f"{w.at(i)}: sends before this device runs {op.value} s{w.stage} mb{a.mb}, which computes it; "
            "move the SEND after it"
        )
    # the backward of a micro-batch frees what its forward kept: activations sent after it are gone
    freed = w.computed[Op.B].get((a.mb, chunk)) if op == Op.F and chunk is not None else None
    if freed is not None:
        w.problems.append(
            f"{w.at(i)}: sends the activations of mb{a.mb} after B s{w.stage} mb{a.mb} (line {w.line(freed)}), "
            "which frees them; move the SEND between the F and the B"
        )


def _walk_recv(w: _DeviceWalk, i: int, a: Action) -> None:
    op = PAYLOAD_INFO[a.payload].produced_by
    chunk = w.chunk_of(i, a)
    used = w.computed[op].get((a.mb, chunk)) if chunk is not None else None
    if used is not None:
        w.problems.append(
            f"{w.at(i)}: arrives after {op.value} s{w.stage} mb{a.mb} (line {w.line(used)}) already needed it; "
            "move the RECV before it"
        )
    w.received[(a.payload, a.mb)].append(a.rows)


def _pending_backward(w: _DeviceWalk) -> str:
    missing = [(mb, c) for mb in range(w.p.microbatches) for c in w.chunks if (mb, c) not in w.computed[Op.B]]
    listed = " ".join(f"mb{mb}" + (f" r{_r(*c)}" if len(w.chunks) > 1 else "") for mb, c in missing[:_MAX_MISSING_LISTED])
    return listed + (f" and {len(missing) - _MAX_MISSING_LISTED} more" if len(missing) > _MAX_MISSING_LISTED else "")


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


def _walk_tie(w: _DeviceWalk, i: int, a: Action) -> None:
    pending = _pending_backward(w)
    if pending:
        w.problems.append(f"{w.at(i)}: runs before the backward of {pending}; a tie sums the gradients once all are done")
    w.ties.append(i)


def _walk_rollback(w: _DeviceWalk, i: int, a: Action) -> None:
    done = [i for by_mb in w.computed.values() for i in by_mb.values()]
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
    Op.TIE: _walk_tie,
    Op.ROLLBACK: _walk_rollback,
}


def _check_dependencies(p: Program, where: _Where, held: Held, slots: Slots) -> list[str]:
    problems: list[str] = []
    # A cut whose tensors need no gradient carries no gradient messages at all (lower_comm leaves
    # them out); the backward of its lower stage then waits for nothing. Any gradient traffic
    # across a cut means every backward below it needs its rows' gradients.
    grad_cuts = {a.stage for _, acts in p.actions for a in acts if ops.info(a.op).moves == ops.DATA and a.payload == "grad"}
    for device, acts in p.actions:
        # one walk per stage the device holds; an action goes to the walk of the stage it works on
        # (one of any stage, a backup's, checks nothing here and goes to the first)
        walks = {own: _DeviceWalk(p, where, device, own, slots[(device, own)], grad_cuts) for own in held[device]}
        first = walks[held[device][0]]
        for i, a in enumerate(acts):
            owner = ops.own_stage(a)
            _WALK_RULES.get(a.op, _walk_nothing)(walks.get(owner, first) if owner is not None else first, i, a)
        for own, w in walks.items():
            problems += _check_stage_walk(p, where, device, own, w)
    return problems


def _check_stage_walk(p: Program, where: _Where, device: str, own: int, w: _DeviceWalk) -> list[str]:
    """What one stage of a device must have done by the end of its actions."""
    problems = list(w.problems)
    group = p.stages[own].devices
    if len(group) > 1 and not w.allreduces:
        problems.append(
            f"{where.device(device)}: stage {own} runs on {len(group)} devices but {device} never sums their "
            f"gradients; add 'ALLREDUCE s{own} [{' '.join(group)}]' after its last B and before STEP"
        )
    elif len(w.chunks) > 1 and not w.allreduces:
        problems.append(
            f"{where.device(device)}: runs stage {own} as {len(w.chunks)} chunks but never sums their gradients; "
            f"add 'ALLREDUCE s{own} [{' '.join(group)}]' after its last B and before STEP"
        )
    for extra in w.allreduces[1:]:
        problems.append(f"{w.at(extra)}: a second ALLREDUCE of stage {own}; a group sums its gradients once")
    if w.allreduces and w.steps and w.steps[0] < w.allreduces[0]:
        problems.append(
            f"{w.at(w.steps[0])}: runs before ALLREDUCE (line {w.line(w.allreduces[0])}); "
            "the optimizer must see the group's summed gradients"
        )
    for t in w.ties:
        if w.allreduces and t < w.allreduces[0]:
            problems.append(f"{w.at(t)}: runs before ALLREDUCE (line {w.line(w.allreduces[0])}); a tie sums the "
                            "stages' sums, so it comes after the stage's own")
        if w.steps and w.steps[0] < t:
            problems.append(f"{w.at(w.steps[0])}: runs before TIE (line {w.line(t)}); the optimizer must see the "
                            "tied weights' summed gradients")
    if not w.steps:
        problems.append(f"{where.device(device)}: never runs STEP s{own}; add it at the end of its actions")
    for extra in w.steps[1:]:
        problems.append(f"{w.at(extra)}: a second STEP; the optimizer steps once per iteration")
    return problems


def _near(a: Action, b: Action) -> bool:
    """Two unmatched transfers that were meant for each other but disagree on their rows."""
    return a.payload == b.payload and a.stage == b.stage and a.mb == b.mb


def _check_pairing(p: Program, where: _Where, held: Held, slots: Slots) -> list[str]:
    problems: list[str] = []
    acts = where.acts
    for device, items in p.actions:
        for i, a in enumerate(items):
            if ops.info(a.op).moves != ops.DATA:
                continue
            # activations go up across the cut (a.stage -> a.stage+1), gradients come back down
            peer_stage = a.stage if ops.peer_is_lower(a) else a.stage + 1
            theirs = held[a.peer]
            if peer_stage not in theirs:
                problems.append(
                    f"{where.action(device, i)}: {a.peer} runs {_stages_text(theirs)}, but this {a.payload} crosses "
                    f"the cut between stages {a.stage} and {a.stage + 1}, so its peer must run stage {peer_stage}"
                )
            # a peer of one stage is held to that stage's rows even when it runs the wrong stage
            peer_slot = slots.get((a.peer, peer_stage if peer_stage in theirs or len(theirs) > 1 else theirs[0]))
            for who, slot in ((device, slots[(device, ops.own_stage(a))]), (a.peer, peer_slot)):
                if slot is not None and not slot.lo <= a.rows[0] < a.rows[1] <= slot.hi:
                    problems.append(
                        f"{where.action(device, i)}: rows {_r(*a.rows)} lie outside {who}'s slot [{_r(slot.lo, slot.hi)}]"
                    )

    pairs = pair_transfers(p)
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
                if d == a.peer and acts[d][j].peer == device and acts[d][j].op == ops.info(a.op).counterpart and _near(a, acts[d][j])
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
            f"{where.action(device, i)}: has no matching {ops.info(a.op).counterpart.value} on {a.peer}; "
            f"add '{format_action(ops.counterpart(device, a))}' to {a.peer}'s actions"
        )
    return problems


# ---------------------------------------------------------------------------------------------


def _check_cut_specs(p: Program, where: _Where, cut_specs: Sequence[tuple[Sequence, Sequence]]) -> list[str]:
    """Every SEND/RECV carries the tensors its cut really has: ``cut_specs[c]`` = (activation specs,
    gradient specs) of the cut after stage c, from the stage modules (passes.lower.stage_cut_specs)."""
    problems: list[str] = []
    if len(cut_specs) != len(p.stages) - 1:
        return [f"the program has {len(p.stages)} stages, so {max(len(p.stages) - 1, 0)} cuts, but the stage modules "
                f"have {len(cut_specs)}; compile the program and the stages together"]
    for device, acts in p.actions:
        for i, a in enumerate(acts):
            if ops.info(a.op).moves != ops.DATA or a.payload not in PAYLOADS or not 0 <= a.stage < len(cut_specs):
                continue
            want = tuple(cut_specs[a.stage][0 if a.payload == "act" else 1])
            if tuple(a.specs) != want:
                problems.append(
                    f"{where.action(device, i)}: carries {' '.join(map(format_spec, a.specs)) or 'nothing'}, but the "
                    f"cut after stage {a.stage} has {a.payload} tensors {' '.join(map(format_spec, want)) or 'none'}; "
                    "the specs must be the stage's real tensors (compile again)"
                )
    return problems


def verify(p: Program, *, layers: int | None = None,
           cut_specs: Sequence[tuple[Sequence, Sequence]] | None = None, origin: str | None = None) -> None:
    """Check ``p`` (see the module docstring); raise VerifyError listing what is wrong, else return.
    Where the model is known: ``layers`` is its layer count (the stages must cover layers
    0..layers-1), ``cut_specs`` its stage modules' cut tensors (what every SEND/RECV must carry).
    ``origin`` (the file the program was read from) starts the error's message."""
    try:
        _verify(p, layers, cut_specs)
    except VerifyError as e:
        if origin is not None:
            e.args = (f"{origin}: {e.args[0]}", *e.args[1:])
        raise


def _verify(p: Program, layers: int | None, cut_specs: Sequence[tuple[Sequence, Sequence]] | None) -> None:
    layout = layout_program(p)
    where = _Where(p, layout)
    _fail(_check_stage_table(p, where, layers))
    held: dict[str, tuple[int, ...]] = {}
    for st in p.stages:
        for slot in st.slots:
            held[slot.device] = (*held.get(slot.device, ()), st.index)
    slots = {(slot.device, st.index): slot for st in p.stages for slot in st.slots}
    _fail(_check_fields(p, where, held))
    _fail(
        _check_compute(p, where, held, slots)
        + _check_dependencies(p, where, held, slots)
        + _check_pairing(p, where, held, slots)
        + check_ties(p, where, held)
        + check_norms(p, where, held)
        + (_check_cut_specs(p, where, cut_specs) if cut_specs is not None else [])
    )
    dry_run(p)
