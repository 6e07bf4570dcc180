"""Plan: the planner's answer. Stages in pipeline order, each a layer range run data-parallel by a
group of devices that split every micro-batch's rows unevenly, plus what the planner predicts. A
device may hold several stages, never two adjacent ones (virtual stages; the planners make one
stage per device)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from asteroid_fx.ir.errors import AsteroidError, InputError, SeveralStagesError
from asteroid_fx.ir.json_fields import Fields, read_json

PLAN_FORMAT = "asteroid-plan"
PLAN_VERSION = 1


INTERLEAVED = "interleaved"  # 1F1B over the stages a device holds (passes/schedule.py)


def warmup_depth(schedule: str) -> int | None:
    """The extra warm-up of a 1F1B-family schedule ("1f1b" = 0, "1f1b+N" = N), None for GPipe;
    InputError for any other name. Under "1f1b+N" stage p of S holds up to (S - p - 1)(1 + N) + 1
    micro-batches in flight: N more per later stage than plain 1F1B, which lets it run ahead of a
    slow link (and costs their activations' memory). "interleaved" is 1F1B over the stages a
    device holds; with one stage per device (every plan a planner makes) it is "1f1b", so 0."""
    if schedule == "gpipe":
        return None
    if schedule in ("1f1b", INTERLEAVED):
        return 0
    m = re.fullmatch(r"1f1b\+([0-9]+)", schedule)
    if m is None:
        raise InputError(f"unknown schedule {schedule!r}; use 'gpipe', '1f1b', '1f1b+N' (N extra warm-up "
                         f"micro-batches per later stage) or '{INTERLEAVED}' (1F1B over virtual stages)")
    return int(m.group(1))


def backup_holder_stage(stage: int, stages: int) -> int:
    """The stage whose first device holds ``stage``'s backup when a plan of ``stages`` stages (at
    least two) runs with recovery: the next stage, and for the last stage the one before it (a ring
    of stages folded at its end; passes.replay.default_holders places backups by this rule)."""
    if stages < 2:
        raise InputError(f"a plan of {stages} stage has no other stage to hold a backup")
    return stage + 1 if stage + 1 < stages else stage - 1


class NoPlanError(AsteroidError):
    """No plan fits; the message says what memory or devices would make one fit."""


@dataclasses.dataclass(frozen=True)
class StagePlan:
    layers: tuple[int, int]  # [lo, hi) of the LayerGraph
    devices: tuple[str, ...]
    rows: tuple[int, ...]  # rows of every micro-batch per device, same order as devices

    def __post_init__(self) -> None:
        if len(self.devices) != len(self.rows):
            raise InputError(f"stage {self.layers}: {len(self.devices)} devices but {len(self.rows)} row counts")

    @property
    def slots(self) -> tuple[tuple[str, int, int], ...]:
        """(device, lo, hi) row ranges, in order."""
        out, lo = [], 0
        for d, r in zip(self.devices, self.rows):
            out.append((d, lo, lo + r))
            lo += r
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class DeviceUse:
    device: str
    stage: int | None  # None: left out of the plan
    memory_bytes: int  # predicted peak
    budget_bytes: int
    compute_s: float  # predicted forward+backward seconds per iteration
    note: str = ""  # why it was left out, or what binds


@dataclasses.dataclass(frozen=True)
class Prediction:
    iteration_s: float
    throughput: float  # samples per second
    devices: tuple[DeviceUse, ...]
    binding: str  # the constraint or stage that sets the iteration time


@dataclasses.dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    microbatches: int
    microbatch_rows: int
    schedule: str  # "gpipe" | "1f1b" | "1f1b+N" | "interleaved" (see warmup_depth)
    planner: str
    prediction: Prediction | None = None
    # made for a run with recovery: every device's memory holds its rollback point, and the first
    # device of a stage holds two copies of each stage it backs up (``backups_held``)
    recovery: bool = False

    @property
    def batch(self) -> int:
        return self.microbatches * self.microbatch_rows

    def __post_init__(self) -> None:
        warmup_depth(self.schedule)  # a known schedule name, else InputError
        if self.microbatches < 1 or self.microbatch_rows < 1:
            raise InputError("a plan needs at least one micro-batch of at least one row")
        expect = 0
        for i, st in enumerate(self.stages):
            if st.layers[0] != expect or st.layers[1] <= st.layers[0]:
                raise InputError(f"stage {i}: layers {st.layers[0]}:{st.layers[1]} do not continue from layer {expect}")
            expect = st.layers[1]
            if sum(st.rows) != self.microbatch_rows or min(st.rows) < 1:
                raise InputError(f"stage {i}: rows {list(st.rows)} must be >= 1 each and add up to "
                                 f"the micro-batch size {self.microbatch_rows}")
            twice = sorted({d for d in st.devices if st.devices.count(d) > 1})
            if twice:
                raise InputError(f"stage {i}: device {twice[0]!r} has two slots; give it one slot of the rows")
            # a device may hold several stages (virtual stages), but two adjacent ones would put a
            # cut inside one device, which is no cut at all
            if i > 0:
                both = [d for d in st.devices if d in self.stages[i - 1].devices]
                if both:
                    raise InputError(f"device {both[0]!r} holds stages {i - 1} and {i}, which are adjacent: a cut "
                                     f"inside one device is no cut; merge stages {i - 1} and {i} into one stage")

    def stages_of(self, device: str) -> tuple[int, ...]:
        """The indices of the stages ``device`` holds, in order (empty for a device of no stage)."""
        return tuple(i for i, st in enumerate(self.stages) if device in st.devices)

    def stage_of(self, device: str) -> int:
        """The one stage ``device`` holds; SeveralStagesError when it holds several, KeyError when none."""
        held = self.stages_of(device)
        if not held:
            raise KeyError(device)
        if len(held) > 1:
            raise SeveralStagesError(device, held)
        return held[0]

    def backups_held(self, device: str) -> tuple[int, ...]:
        """The stages whose backups ``device`` holds when the plan runs with recovery: those whose
        holder stage (``backup_holder_stage``) has ``device`` first."""
        S = len(self.stages)
        if S < 2:
            return ()
        return tuple(p for p in range(S) if self.stages[backup_holder_stage(p, S)].devices[0] == device)

    def __str__(self) -> str:
        lines = [f"Plan ({self.planner}): {len(self.stages)} stages, {self.microbatches} micro-batches x "
                 f"{self.microbatch_rows} rows = batch {self.batch}, schedule {self.schedule}"]
        uses = {u.device: u for u in self.prediction.devices} if self.prediction else {}
        header = f"  {'stage':>5}  {'layers':>9}  {'device':<16} {'rows':>5}  {'memory':>21}  {'compute':>9}"
        lines.append(header)
        for i, st in enumerate(self.stages):
            for j, (d, r) in enumerate(zip(st.devices, st.rows)):
                u = uses.get(d)
                mem = f"{_gib(u.memory_bytes)} / {_gib(u.budget_bytes)}" if u else ""
                comp = f"{u.compute_s * 1e3:7.1f}ms" if u else ""
                stage_col = f"{i:>5}  {st.layers[0]:>4}:{st.layers[1]:<4}" if j == 0 else " " * 16
                lines.append(f"  {stage_col}  {d:<16} {r:>5}  {mem:>21}  {comp:>9}")
        if self.recovery:
            S = len(self.stages)
            held = [f"stage {p} on {self.stages[backup_holder_stage(p, S)].devices[0]}" for p in range(S)] if S > 1 else []
            lines.append("  recovery: every device's memory includes its rollback point (a copy of its stage's state)"
                         + (f"; backups, two copies each: {', '.join(held)}" if held else "; one stage, no backups"))
        if self.prediction:
            p = self.prediction
            for u in p.devices:
                if u.stage is None:
                    lines.append(f"  left out: {u.device} ({u.note})")
            lines.append(f"  predicted: {p.iteration_s * 1e3:.1f} ms/iteration, {p.throughput:.1f} samples/s; "
                         f"bound by {p.binding}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.recovery:  # written only when on: a plan without recovery reads as it always did
            del d["recovery"]
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **d}

    @classmethod
    def from_json(cls, data: Any, *, origin: str = "plan JSON") -> "Plan":
        """Inverse of ``to_json``. A malformed document raises InputError starting with ``origin``
        (the file, when ``load`` reads one) and naming the field."""
        top = Fields(data, origin)
        if top.data.get("format") != PLAN_FORMAT:
            raise top.fail(f"not a plan: format is {top.data.get('format')!r}, expected {PLAN_FORMAT!r}")
        if top.data.get("version") != PLAN_VERSION:
            raise top.fail(f"plan version {top.data.get('version')} is not supported (this build reads {PLAN_VERSION})")
        prediction = None
        if top.data.get("prediction") is not None:
            pred = top.obj("prediction")
            uses = tuple(DeviceUse(u.string("device"), u.integer_or_null("stage", minimum=0),
                                   u.integer("memory_bytes", minimum=0), u.integer("budget_bytes", minimum=0),
                                   u.number("compute_s", minimum=0), u.string("note", ""))
                         for u in pred.objs("devices"))
            prediction = Prediction(pred.number("iteration_s", minimum=0), pred.number("throughput", minimum=0), uses,
                                    pred.string("binding"))
        stages = [(s.span("layers"), s.strings("devices"), s.integers("rows", minimum=1)) for s in top.objs("stages")]
        if not stages:
            raise top.fail("field 'stages' must list at least one stage, got []")
        fields = (top.integer("microbatches", minimum=1), top.integer("microbatch_rows", minimum=1),
                  top.string("schedule"), top.string("planner"))
        try:  # every field read; what is left is a plan that does not hold together
            return cls(tuple(StagePlan(*st) for st in stages), *fields, prediction, top.boolean("recovery", False))
        except InputError as e:
            raise top.fail(str(e)) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        """Read ``plan.json``; errors name the file and the field."""
        return cls.from_json(read_json(path, "plan"), origin=str(path))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB"
