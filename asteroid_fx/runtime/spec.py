"""The run's configuration (``RunSpec``) and what every process derives from it alike: the model,
the iteration batches and the compiled program. It travels to the workers as JSON, never a pickle."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from asteroid_fx.ir.errors import InputError


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What every process needs to build the same program: travels as JSON."""

    model: str  # zoo name, with ":small" for the test configuration
    batch: int
    microbatches: int | None  # None: the planner chooses
    schedule: str = "1f1b"
    iterations: int = 3
    optimizer: str = "sgd"
    lr: float = 0.05
    seed: int = 0
    stages: int | None = None
    groups: tuple[tuple[str, ...], ...] | None = None
    rows: tuple[tuple[int, ...], ...] | None = None
    layers: tuple[int, ...] | None = None
    planner: str = "asteroid"
    emulate: bool = False  # pace every worker like its device in the cluster (backends/torch_dist.Emulation)
    dilation: float = 1.0  # with emulate: every emulated duration this many times longer
    recovery: bool = False  # survive failed and departing devices by pipeline replay
    # iterations between backups (a failure redoes up to this many); None: as few as keep the
    # backups' measured cost within backup_budget of the run's time (``BackupPace``)
    backup_every: int | None = None
    backup_budget: float = 0.02
    # with recovery: after a failure, and when a device asks to join, run the planner in the
    # background and switch to its plan at an iteration boundary when it predicts a gain
    replan: bool = True
    heartbeat_s: float = 0.1  # heartbeat interval
    heartbeat_timeout_s: float = 1.5  # a device silent this long has failed
    # (device, iteration, action index, "kill" | "leave" | "kill-handover"): the device SIGKILLs
    # itself, or leaves announced, just before that action; "kill-handover": before that action of
    # a switch's hand-over before that iteration (-1: the first switch), the count of its actions
    # meaning just before the hand-over commits (for tests and benchmarks; runtime/faults.py)
    faults: tuple[tuple[str, int, int, str], ...] = ()

    def __post_init__(self):
        if self.backup_every is not None and self.backup_every < 1:
            raise InputError(f"backup_every={self.backup_every}: give a number of iterations (1 or more), or None "
                             "to pace backups by their measured cost")
        if not 0 < self.backup_budget < 1:
            raise InputError(f"backup_budget={self.backup_budget} is not a fraction of the run's time; give one "
                             "in (0, 1), for example 0.02")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        d = json.loads(text)
        for k in ("groups", "rows"):
            if d[k] is not None:
                d[k] = tuple(tuple(x) for x in d[k])
        if d["layers"] is not None:
            d["layers"] = tuple(d["layers"])
        d["faults"] = tuple(tuple(f) for f in d.get("faults", ()))
        return cls(**d)

    def backups_text(self) -> str:
        """How often this run backs up, in words (the launcher's first line says it)."""
        if self.backup_every is None:
            return f"as often as {self.backup_budget:.0%} of the run's time allows"
        return f"every {self.backup_every} iteration{'s' if self.backup_every > 1 else ''}"


def zoo_entry(model: str):
    from asteroid_fx import models

    name, _, variant = model.partition(":")
    if variant not in ("", "small"):
        raise InputError(f"model {model!r}: the only variant is ':small'")
    return models.get(name), variant == "small"


def batches(spec: RunSpec) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """The run's synthetic data: the same on every process, iteration by iteration."""
    for i in range(spec.iterations):
        yield batch_at(spec, i)


def batch_at(spec: RunSpec, i: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Iteration ``i``'s batch (a recovery redoes iterations from the same batches)."""
    entry, small = zoo_entry(spec.model)
    torch.manual_seed(spec.seed * 100_003 + i + 1)
    return entry.example(spec.batch, small), entry.labels(spec.batch, small)


def compile_spec(spec: RunSpec, cluster):
    import asteroid_fx as asteroid

    entry, small = zoo_entry(spec.model)
    torch.manual_seed(spec.seed)
    model = entry.build(small=small)
    torch.manual_seed(spec.seed)
    example = entry.example(spec.batch, small)
    # a spec the launcher pinned (``pinned``) names the plan it chose: every process rebuilds that
    # plan by hand; ``spec.planner`` stays the one a re-plan uses
    planner = spec.planner if spec.groups is None and spec.rows is None and spec.layers is None else "balanced"
    return asteroid.compile(model, cluster, example=example, loss=entry.loss, microbatches=spec.microbatches,
                            planner=planner, schedule_kind=spec.schedule, stages=spec.stages, groups=spec.groups, rows=spec.rows,
                            layers=spec.layers, recovery=spec.recovery)


def pinned(spec: RunSpec, plan) -> RunSpec:
    """The spec with the plan's micro-batching, stages, groups, rows and layer bounds fixed."""
    return dataclasses.replace(spec, microbatches=plan.microbatches, schedule=plan.schedule,
                               groups=tuple(st.devices for st in plan.stages),
                               rows=tuple(st.rows for st in plan.stages),
                               layers=tuple([st.layers[0] for st in plan.stages] + [plan.stages[-1].layers[1]]))


# the run folder: each worker writes its weights there, the launcher its workers' logs
def weights_path(out: str | os.PathLike, device: str) -> Path:
    return Path(out) / f"worker_{device}.pt"


def log_path(out: str | os.PathLike, device: str) -> Path:
    return Path(out) / f"worker_{device}.log"
