"""The run's configuration (``RunSpec``) and what every process derives from it alike: the job
(runtime/job.py: model, data, loss, optimizer), the iteration batches and the compiled program.
It travels to the workers as JSON, never a pickle: each process imports the job's entry itself."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from asteroid_fx.backends.state import OptimizerSettings
from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime.data import Batches
from asteroid_fx.runtime.job import LAST_BATCH, Job, load_job


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What every process needs to build the same program: travels as JSON."""

    # the job: "package.module:attribute" (a runtime.job.Job, or a callable returning one), or a
    # zoo name, with ":small" for the test configuration
    model: str
    batch: int | None = None  # rows per iteration; None: the job's (a zoo job: 32)
    microbatches: int | None = None  # None: the planner chooses
    schedule: str = "1f1b"
    # None: the job's epochs over its dataset (a zoo job: 3 iterations of generated samples)
    iterations: int | None = None
    optimizer: str | None = None  # None: the job's (a zoo job: SGD at lr 0.05)
    lr: float | None = None
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
    # (device, iteration, action index, "kill" | "leave" | "kill-redo" | "kill-regroup" |
    # "kill-handover"): the device SIGKILLs itself, or leaves announced, just before that action;
    # "kill-redo": only when a recovery has it run that iteration again; "kill-regroup": as the
    # survivors of a failure in that iteration build their groups; "kill-handover": before that action of
    # a switch's hand-over before that iteration (-1: the first switch), the count of its actions
    # meaning just before the hand-over commits (for tests and benchmarks: only with
    # ASTEROID_FAULT_INJECTION=1 in the launcher's environment, never through the store; runtime/faults.py)
    faults: tuple[tuple[str, int, int, str], ...] = ()
    start: int = 0  # the first iteration to run (a resumed run: the checkpoint's)
    checkpoint_every: int = 0  # iterations between checkpoints in the run folder (0: only at the end)
    resume: str | None = None  # a checkpoint folder (runtime/checkpoint.py) whose state the run starts from
    last_batch: str | None = None  # "drop" | "smaller" (runtime/job.py); None: the job's (a zoo job: "drop")

    def __post_init__(self):
        if self.backup_every is not None and self.backup_every < 1:
            raise InputError(f"backup_every={self.backup_every}: give a number of iterations (1 or more), or None "
                             "to pace backups by their measured cost")
        for name in ("batch", "iterations", "checkpoint_every", "start"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name in ("start", "checkpoint_every") else 1)):
                raise InputError(f"{name}={value!r}: give a {'non-negative' if name in ('start', 'checkpoint_every') else 'positive'} "
                                 "number of " + ("rows" if name == "batch" else "iterations"))
        if self.last_batch is not None and self.last_batch not in LAST_BATCH:
            raise InputError(f"last_batch={self.last_batch!r}: give 'drop' or 'smaller', or None for the job's choice")
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


ZOO_ITERATIONS = 3  # a zoo job's length when the spec gives none


@functools.lru_cache(maxsize=8)
def _job(model: str, batch: int | None, iterations: int | None, seed: int, optimizer: str | None,
         lr: float | None, last_batch: str | None) -> Job:
    job = load_job(model, batch=batch, iterations=iterations or ZOO_ITERATIONS, seed=seed)
    return job.with_optimizer(optimizer, lr).with_last_batch(last_batch)


def job_of(spec: RunSpec) -> Job:
    """The spec's job (imported once per process), with the spec's batch, optimizer and
    last-batch choices."""
    return _job(spec.model, spec.batch, spec.iterations, spec.seed, spec.optimizer, spec.lr, spec.last_batch)


def check_last_batch(spec: RunSpec, job: Job) -> None:
    """Refuse, before any work starts, what a smaller last batch does not go with yet: recovery
    (a replay or a re-plan would have to rewrite the partial batch's program too)."""
    if spec.recovery and job.last_batch == "smaller":
        raise InputError("recovery (--recover) does not support last_batch='smaller' yet: drop the last partial "
                         "batch (--last-batch drop), or train without --recover")


def iterations_of(spec: RunSpec) -> int:
    """How many iterations the run trains: the spec's, or the job's epochs over its data."""
    return spec.iterations if spec.iterations is not None else job_of(spec).iterations


def optimizer_of(spec: RunSpec) -> OptimizerSettings:
    """The optimizer every replica builds (the job's, with the spec's name and lr where given)."""
    return job_of(spec).settings


def batches_of(spec: RunSpec, compiled=None, validation: bool = False) -> Batches:
    """The run's batches, iteration by iteration, the same on every process; ``compiled`` orders
    keyword inputs as its captured graph takes them."""
    flatten = None if compiled is None else functools.partial(call_inputs, compiled.captured)
    return Batches(job_of(spec), seed=spec.seed, flatten=flatten, validation=validation)


def call_inputs(captured, inputs: Any) -> tuple[torch.Tensor, ...]:
    """A batch of inputs as the job gives them (a tensor, a tuple of positional inputs or a dict
    of keyword inputs) -> the captured graph's flat inputs."""
    return captured.call_inputs(inputs)


def batches(spec: RunSpec, compiled=None) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """The run's whole batches (inputs, labels), as eager training or the local backend takes them."""
    data = batches_of(spec, compiled)
    for i in range(spec.start, iterations_of(spec)):
        yield data.whole(i)


def batch_at(spec: RunSpec, i: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Iteration ``i``'s whole batch (a recovery redoes iterations from the same batches)."""
    return batches_of(spec).whole(i)


def example_of(job: Job) -> tuple[tuple, dict]:
    """The job's capture example as (positional inputs, keyword inputs): its own, or ``batch``
    copies of sample 0's inputs."""
    example = job.example
    if example is None:
        sample = job.dataset[0]
        if job.labels is None:
            if not isinstance(sample, (tuple, list)) or len(sample) != 2:
                raise InputError("sample 0 of the job's dataset is not an (inputs, label) pair; return (inputs, "
                                 "label), or give the labels apart as Job.labels")
            sample = sample[0]
        example = (job.collate or torch.utils.data.default_collate)([sample] * job.batch)
    if isinstance(example, dict):
        return (), example
    return (tuple(example) if isinstance(example, (tuple, list)) else (example,)), {}


def compile_spec(spec: RunSpec, cluster):
    """The spec's job compiled for ``cluster``: every process gets the same program from it."""
    return compile_job(job_of(spec), cluster, spec)


def compile_job(job: Job, cluster, spec: RunSpec):
    """``job``'s model (built under the spec's seed) compiled for ``cluster`` with the spec's
    plan choices, and its optimizer's state counted in every device's memory."""
    import asteroid_fx as asteroid

    torch.manual_seed(spec.seed)
    model = job.model()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"the job's model factory returned a {type(model).__name__}, not a torch.nn.Module")
    args, kwargs = example_of(job)
    # a spec the launcher pinned (``pinned``) names the plan it chose: every process rebuilds that
    # plan by hand; ``spec.planner`` stays the one a re-plan uses
    planner = spec.planner if spec.groups is None and spec.rows is None and spec.layers is None else "balanced"
    return asteroid.compile(model, cluster, example=args, kwargs=kwargs or None, loss=job.loss,
                            microbatches=spec.microbatches, planner=planner, schedule_kind=spec.schedule,
                            stages=spec.stages, groups=spec.groups, rows=spec.rows, layers=spec.layers,
                            recovery=spec.recovery, opt_state_factor=job.settings.state_factor(),
                            clip_grad_norm=job.clip_grad_norm)


def check_job(job: Job, compiled) -> None:
    """Before a run starts: the job's samples must fit the example the model was captured with
    (as many inputs, each of the example's shape past the batch dimension and its dtype), and its
    loss must give a scalar on the model's outputs for two of them (the captured graph in eval
    mode, so nothing of the model changes). Reads samples 0 and 1: run it where no device runs."""
    from asteroid_fx.passes.eval_mode import eval_mode

    data = Batches(job, seed=0, flatten=functools.partial(call_inputs, compiled.captured))
    try:
        inputs, labels = data.rows(range(min(2, len(job.dataset))))
    except InputError as e:
        raise InputError(f"the job's samples do not fit its model's inputs: {e}") from e
    captured = compiled.captured
    names = [n.name for n in captured.module.graph.nodes if n.op == "placeholder"]
    for name, got, want in zip(names, inputs, captured.example_inputs):
        if isinstance(want, torch.Tensor) and (not isinstance(got, torch.Tensor) or got.shape[1:] != want.shape[1:]
                                               or got.dtype != want.dtype):
            shown = f"{tuple(got.shape[1:])} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise InputError(f"the job's samples give input {name!r} as {shown} per row, and the example the model "
                             f"was captured with has {tuple(want.shape[1:])} {want.dtype}; make the dataset's samples "
                             "match Job.example (or leave the example out: it is then made from sample 0)")
    with torch.no_grad():
        outputs = captured.unflatten_outputs(list(eval_mode(captured.module)(*inputs)))
        try:
            value = job.loss(outputs, labels)
        except Exception as e:
            raise InputError(f"the job's loss fails on the model's outputs and two samples' labels "
                             f"({type(e).__name__}: {e})") from e
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"the job's loss returned {shown}; it must return a scalar float tensor (the mean over "
                         "the rows it is given)")


def smaller_program(job: Job, compiled):
    """The program of the job's smaller last batch (passes/remainder.py), or None where every
    batch is whole (``last_batch`` "drop", or a dataset a multiple of the batch)."""
    from asteroid_fx.passes.remainder import remainder_program

    return remainder_program(compiled, job.remainder) if job.remainder else None


def pinned(spec: RunSpec, plan) -> RunSpec:
    """The spec with the plan's micro-batching, stages, groups, rows and layer bounds fixed."""
    return dataclasses.replace(spec, microbatches=plan.microbatches, schedule=plan.schedule,
                               iterations=iterations_of(spec),
                               groups=tuple(st.devices for st in plan.stages),
                               rows=tuple(st.rows for st in plan.stages),
                               layers=tuple([st.layers[0] for st in plan.stages] + [plan.stages[-1].layers[1]]))


# the run folder: each worker writes its weights there, the launcher its workers' logs
def weights_path(out: str | os.PathLike, device: str) -> Path:
    return Path(out) / f"worker_{device}.pt"


def log_path(out: str | os.PathLike, device: str) -> Path:
    return Path(out) / f"worker_{device}.log"
