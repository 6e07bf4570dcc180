"""The schedule IR: for every device, the ordered list of actions it runs in one training iteration.

A Program is self-contained: besides the per-device action lists it carries the stage table (which
layers each stage runs, which devices run it and which rows of every micro-batch each device owns),
so a backend needs nothing else to execute it. A device may hold several stages ("virtual stages",
as in interleaved 1F1B), never two adjacent ones: each of its actions names the stage it works on
(docs/semantics.md, "Virtual stages").

Vocabulary (``Op``; what each op carries, computes and moves is in ``ops.OPS``):
  F / B           forward / backward of ``stage`` on rows ``rows`` of micro-batch ``mb``
  SEND / RECV     a row slice of a cut's tensors to / from ``peer``; ``payload`` is "act" (forward
                  activations, stage -> stage+1) or "grad" (their gradients, stage+1 -> stage);
                  ``stage`` is always the producing (lower) stage of the cut; ``specs`` are the
                  per-row dtype and shape of each tensor crossing the cut
  ALLREDUCE       sum the gradients of ``stage`` over ``group`` (all members run it, same order)
  STEP            optimizer step of ``stage`` on this device
  TIE             sum the gradients of the tied weights ``params`` (one name each, ``specs`` their
                  whole shapes) over ``group``, every device of every stage holding a copy of them
                  (each holder stage counted once: after its ALLREDUCE every device of a stage has
                  the stage's sum), so every copy takes the same step; after ``stage``'s last B and
                  ALLREDUCE, before its STEP (docs/semantics.md, "Tied weights")
  NORM            clip the gradients by their global norm: over ``group``, every device of the
                  program, sum each stage's squared gradient norm once (its first device's; a tied
                  weight at its first holder stage), and scale every gradient of every stage by
                  min(1, ``max_norm`` / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does;
                  one per device, naming its first stage, after every B, ALLREDUCE and TIE of
                  the device and before any of its STEPs (docs/semantics.md, "Gradient clipping")
  BACKUP/RESTORE  a copy of ``stage``'s state (weights, buffers, optimizer state) to / from ``peer``
                  (fault tolerance; the copy is the state at the start of an iteration, see
                  docs/replay.md)
  ROLLBACK        set this device's ``stage`` to its state at the start of the iteration, dropping
                  the iteration's work (a recovery program's first action, see passes/replay.py)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from asteroid_fx.ir.errors import SeveralStagesError
from asteroid_fx.ir.ops import Op  # the vocabulary lives beside its facts; importable from here too
from asteroid_fx.ir.plan import backup_holder_stage

FORMAT_VERSION = 1


class TensorSpec(NamedTuple):
    """dtype name (torch's, e.g. "float32", "int64") and shape of ONE row (the batch dim removed)."""

    dtype: str
    shape: tuple[int, ...]


class Action(NamedTuple):
    op: Op
    stage: int
    mb: int | None = None
    rows: tuple[int, int] | None = None  # [lo, hi) within the micro-batch
    peer: str | None = None  # SEND: destination, RECV: source, BACKUP/RESTORE: the other device
    payload: str | None = None  # "act" | "grad" for SEND/RECV
    specs: tuple[TensorSpec, ...] = ()
    group: tuple[str, ...] = ()  # ALLREDUCE members, in reduction order; TIE: the weights' holders
    params: tuple[str, ...] = ()  # TIE: the tied weights, by the model's first name of each
    max_norm: float | None = None  # NORM: the global gradient norm to clip to


class StageSlot(NamedTuple):
    """One device's share of a stage: rows [lo, hi) of every micro-batch."""

    device: str
    lo: int
    hi: int


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """A stage: its layers, its slots and, where a device runs its slot as several chunks, the rows
    ``splits`` where one chunk ends and the next begins (each strictly inside a slot).

    A chunk is what one F or B computes: a forward over exactly those rows (a batch-statistics
    layer normalizes over them), its own gradient sum over the micro-batches, summed with the
    other chunks in row order by the stage's ALLREDUCE. A slot without a split is one chunk. Replay
    keeps a lost device's rows as a chunk of the survivor that takes them over, so that the
    survivor computes what the failure-free group computed (docs/replay.md, "Chunks")."""

    index: int
    layers: tuple[int, int]  # [lo, hi) of the LayerGraph
    slots: tuple[StageSlot, ...]  # row ranges tile [0, microbatch_rows) in order
    splits: tuple[int, ...] = ()  # chunk boundaries inside slots, ascending

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.slots)

    def chunks_of(self, device: str) -> tuple[tuple[int, int], ...]:
        """``device``'s chunks of this stage in row order: its slot cut at the splits inside it."""
        for slot in self.slots:
            if slot.device == device:
                return slot_chunks(slot, self.splits)
        raise KeyError(f"device {device!r} holds no slot of stage {self.index}")

    @property
    def chunks(self) -> tuple[tuple[str, int, int], ...]:
        """Every chunk of the stage, (device, lo, hi) in row order: the ALLREDUCE's summation order."""
        return tuple((s.device, lo, hi) for s in self.slots for lo, hi in slot_chunks(s, self.splits))


def slot_chunks(slot: StageSlot, splits: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``slot``'s rows cut at the ``splits`` that lie strictly inside it."""
    edges = [slot.lo, *(x for x in splits if slot.lo < x < slot.hi), slot.hi]
    return tuple(zip(edges, edges[1:]))


@dataclasses.dataclass(frozen=True)
class Program:
    schedule: str  # "gpipe" | "1f1b" | whatever a rewrite produced
    microbatches: int
    microbatch_rows: int
    stages: tuple[StageInfo, ...]
    actions: tuple[tuple[str, tuple[Action, ...]], ...]  # (device, its actions) in stage order
    version: int = FORMAT_VERSION

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.actions)

    def of(self, device: str) -> tuple[Action, ...]:
        for d, acts in self.actions:
            if d == device:
                return acts
        raise KeyError(f"device {device!r} is not in this program (devices: {', '.join(self.devices)})")

    def stages_of(self, device: str) -> tuple[StageInfo, ...]:
        """The stages ``device`` holds, in pipeline order (empty for a device of no stage)."""
        return tuple(st for st in self.stages if device in st.devices)

    @property
    def virtual_stages(self) -> bool:
        """Whether some device holds more than one stage."""
        seen: set[str] = set()
        for st in self.stages:
            if seen & set(st.devices):
                return True
            seen |= set(st.devices)
        return False

    def stage_of(self, device: str) -> StageInfo:
        """The one stage ``device`` holds; SeveralStagesError when it holds several, KeyError when none."""
        held = self.stages_of(device)
        if not held:
            raise KeyError(f"device {device!r} runs no stage of this program")
        if len(held) > 1:
            raise SeveralStagesError(device, tuple(st.index for st in held))
        return held[0]

    def slot_of(self, device: str, stage: int | None = None) -> StageSlot:
        """``device``'s rows of ``stage`` (default: of the one stage it holds, as ``stage_of``)."""
        info = self.stage_of(device) if stage is None else self.stages[stage]
        for slot in info.slots:
            if slot.device == device:
                return slot
        raise KeyError(f"device {device!r} holds no slot of stage {info.index}")

    def __str__(self) -> str:
        from asteroid_fx.ir.program_text import format_program

        return format_program(self)


def backup_holders(program: Program) -> dict[int, str]:
    """Stage -> the device its BACKUP goes to (empty for a program without backups)."""
    return {a.stage: a.peer for _, acts in program.actions for a in acts if a.op == Op.BACKUP}


def max_norm_of(program: Program) -> float | None:
    """The global gradient norm ``program`` clips to (its NORM's ``max_norm``); None: no clipping."""
    return next((a.max_norm for _, acts in program.actions for a in acts if a.op == Op.NORM), None)


def tied_elsewhere(program: Program) -> dict[int, frozenset[str]]:
    """Stage -> the tied weights it holds (its TIEs' names) that an earlier stage holds too: a
    NORM counts a tied weight once, at its first holder stage (after the TIE every holder has the
    same gradient)."""
    holders: dict[tuple[tuple[str, ...], tuple[str, ...]], set[int]] = {}
    for _, acts in program.actions:
        for a in acts:
            if a.op == Op.TIE:
                holders.setdefault((a.group, a.params), set()).add(a.stage)
    out: dict[int, frozenset[str]] = {}
    for (_, params), stages in holders.items():
        for s in stages - {min(stages)}:
            out[s] = out.get(s, frozenset()) | frozenset(params)
    return out


def default_holders(program: Program) -> dict[int, str]:
    """Stage p backs up on the first device of stage p+1, the last stage on stage S-2: a ring of
    stages folded at its end, so every holder is a neighbour its stage can merge into (the rule
    ``plan.backup_holder_stage`` states, by which the planner counts a holder's memory)."""
    S = len(program.stages)
    return {p: program.stages[backup_holder_stage(p, S)].slots[0].device for p in range(S)} if S > 1 else {}
