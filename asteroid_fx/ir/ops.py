"""The schedule IR's vocabulary and every fact about each op, in one table.

``Op`` names the actions a Program is made of (``program.py`` documents what each one does);
``OPS`` says, per op, what the rest of the code needs to know about it: the fields it carries, the
stage it names, whether it computes, whether it moves data and which, its counterpart on the peer,
and the arrow its text form puts before the peer. verify, the text and JSON forms and the
simulator read these facts here instead of restating them; an op without an entry gets
``DEFAULT``, which says "nothing special": no field check, no compute, no transfer.

Adding an op: a member of ``Op`` and its ``OpInfo`` here; then its meaning in each backend.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from asteroid_fx.ir.program import Action


class Op(str, enum.Enum):
    F = "F"
    B = "B"
    SEND = "SEND"
    RECV = "RECV"
    ALLREDUCE = "ALLREDUCE"
    STEP = "STEP"
    TIE = "TIE"
    NORM = "NORM"
    BACKUP = "BACKUP"
    RESTORE = "RESTORE"
    ROLLBACK = "ROLLBACK"

    def __str__(self) -> str:
        return self.value


# Action fields past op and stage, in Action's order; every op leaves the ones it does not use at
# their default, and the text and JSON forms leave those out.
OPTIONAL_FIELDS = ("mb", "rows", "peer", "payload", "specs", "group", "params", "max_norm")

# What a transfer moves: a cut's tensors (row slices of a micro-batch) or a stage's whole state.
DATA = "data"
WEIGHTS = "weights"


@dataclasses.dataclass(frozen=True)
class OpInfo:
    # the optional fields the op carries (all others keep their default); None: not checked
    fields: frozenset[str] | None = None
    # "fwd" | "bwd": runs its stage's layers in that direction on its rows; None: no compute
    compute: str | None = None
    # DATA | WEIGHTS: one side of a point-to-point transfer with ``peer``; None: moves nothing
    moves: str | None = None
    sends: bool = False  # the sending side of its transfer (buffered: it never waits)
    counterpart: Op | None = None  # the op ``peer`` runs to pair with it
    collective: bool = False  # every member of ``group`` runs it together
    # a collective's members run the same one when these fields agree (its key, ``collective_key``):
    # an ALLREDUCE's members hold one stage, a TIE's hold different stages of one weight, a NORM's
    # are every device, each naming its own first stage
    joins_by: tuple[str, ...] = ("stage", "group")
    # what ``group`` must be: "stage" (the stage's devices in slot order), "holders" (every device
    # of every stage holding ``params``, in stage and slot order), "program" (every device of the
    # program, in program order); None: no group
    group: str | None = None
    # which stage it names: "own" (its device's), "cut" (the lower stage of the cut it crosses),
    # "any" (a stage of any device, as a backup's)
    stage: str = "own"
    arrow: str = "@"  # printed before ``peer``: which way its data flows


DEFAULT = OpInfo()

_ROWS = frozenset({"mb", "rows"})
_TRANSFER = frozenset({"mb", "rows", "peer", "payload", "specs"})

OPS: Mapping[Op, OpInfo] = {
    Op.F: OpInfo(fields=_ROWS, compute="fwd"),
    Op.B: OpInfo(fields=_ROWS, compute="bwd"),
    Op.SEND: OpInfo(fields=_TRANSFER, moves=DATA, sends=True, counterpart=Op.RECV, stage="cut", arrow="->"),
    Op.RECV: OpInfo(fields=_TRANSFER, moves=DATA, counterpart=Op.SEND, stage="cut", arrow="<-"),
    Op.ALLREDUCE: OpInfo(fields=frozenset({"group"}), collective=True, group="stage"),
    Op.STEP: OpInfo(fields=frozenset()),
    # ``specs`` are the whole shapes of ``params`` (not per row): what the all-reduce moves
    Op.TIE: OpInfo(fields=frozenset({"group", "params", "specs"}), collective=True, joins_by=("group", "params"),
                   group="holders"),
    # one per device, covering every stage it holds; ``max_norm`` is the clipping threshold
    Op.NORM: OpInfo(fields=frozenset({"group", "max_norm"}), collective=True, joins_by=("group",),
                    group="program"),
    Op.BACKUP: OpInfo(fields=frozenset({"peer"}), moves=WEIGHTS, sends=True, counterpart=Op.RESTORE, stage="any",
                      arrow="->"),
    Op.RESTORE: OpInfo(fields=frozenset({"peer"}), moves=WEIGHTS, counterpart=Op.BACKUP, stage="any", arrow="<-"),
    Op.ROLLBACK: OpInfo(fields=frozenset()),
}


def info(op: Op) -> OpInfo:
    """The facts of ``op`` (``DEFAULT`` for an op without an entry)."""
    return OPS.get(op, DEFAULT)


COMPUTE_OPS: tuple[Op, ...] = tuple(op for op in Op if info(op).compute)
SEND_OPS: frozenset[Op] = frozenset(op for op in Op if info(op).moves and info(op).sends)
ARROWS: frozenset[str] = frozenset(info(op).arrow for op in Op) | {DEFAULT.arrow}


class PayloadInfo(NamedTuple):
    produced_by: Op  # the compute whose result it carries (a SEND follows it, a RECV precedes it)
    upward: bool  # True: from a stage to the next (activations); False: back down (gradients)


# What a DATA transfer carries; a payload not listed is kept, but verify rejects it.
PAYLOAD_INFO: Mapping[str, PayloadInfo] = {
    "act": PayloadInfo(Op.F, upward=True),
    "grad": PayloadInfo(Op.B, upward=False),
}
PAYLOADS: tuple[str, ...] = tuple(PAYLOAD_INFO)


def peer_is_lower(a: Action) -> bool:
    """Whether a DATA transfer's peer runs the lower stage of its cut: activations go up the
    pipeline, gradients come back down. Expects a payload in ``PAYLOAD_INFO``."""
    return info(a.op).sends != PAYLOAD_INFO[a.payload].upward


def named_stage(a: Action, own: int) -> int | None:
    """The stage an action of a stage-``own`` device must name (None: any stage of the program)."""
    rule = info(a.op).stage
    if rule == "any":
        return None
    if rule == "cut" and a.payload in PAYLOAD_INFO:
        return own - 1 if peer_is_lower(a) else own
    return own


def own_stage(a: Action) -> int | None:
    """The stage, of those its device holds, that an action works on: the one it names, or for a
    transfer of a cut's data the side of the cut its device is on (None: any stage, as a
    backup's). The inverse of ``named_stage``; a device holding several stages needs it to tell
    which of them a RECV feeds or a SEND reads."""
    rule = info(a.op).stage
    if rule == "any":
        return None
    if rule == "cut" and a.payload in PAYLOAD_INFO:
        return a.stage + 1 if peer_is_lower(a) else a.stage
    return a.stage


def collective_key(a: Action) -> tuple[object, ...]:
    """What the members of one collective agree on (``OpInfo.joins_by``): the k-th action of a
    device with this key runs together with the k-th of every other member's."""
    return (a.op, *(getattr(a, f) for f in info(a.op).joins_by))


class Channel(NamedTuple):
    """A transfer pairs with the same-ordinal action of its counterpart on the same ``key``."""

    key: tuple[object, ...]
    sends: bool  # True on the sending side


def channel(device: str, a: Action) -> Channel | None:
    """The channel an action of ``device`` sends or receives on; None for an op that moves nothing.

    The key names what moves, from whom to whom, and which piece: a cut's payload of a micro-batch's
    rows, or a stage's state."""
    op = info(a.op)
    if op.moves is None:
        return None
    src, dst = (device, a.peer) if op.sends else (a.peer, device)
    if op.moves == DATA:
        return Channel((DATA, src, dst, a.payload, a.stage, a.mb, a.rows), op.sends)
    return Channel((op.moves, src, dst, a.stage), op.sends)


def counterpart(device: str, a: Action) -> Action:
    """The action ``a.peer`` must run to pair with ``a`` on ``device``."""
    other = info(a.op).counterpart
    if other is None:
        raise AssertionError(f"{a.op} has no counterpart")
    return a._replace(op=other, peer=device)
