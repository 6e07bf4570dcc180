"""``asteroid.train``: a job trained across a cluster's devices, from Python.

Three ways to run the same job, the same rows, the same optimizer and the same checkpoints:

  backend="local"      every device's replica in this process (backends/local.py, the meaning of
                       the program); the job may be a ``Job`` object or an entry
  backend="processes"  one worker process per device on this machine, around a store this process
                       serves (runtime/launcher.py: emulation, recovery and re-planning are there);
                       the job is an entry "package.module:attribute", which every worker imports
  backend="torchrun"   this process is one rank of a torchrun job (``torchrun --nproc-per-node N
                       script.py``, the script calling ``asteroid.train(..., backend="torchrun")``):
                       rank r runs the program's r-th device; rank 0 compiles and publishes the
                       plan in torchrun's own store, every rank checks that it compiles the same
                       program, and rank 0 returns the run's results (the others return theirs).
                       Every rank signs the store's values with the secret in ASTEROID_RUN_SECRET
                       (or the file ASTEROID_RUN_SECRET_FILE names) that the user gives them all

Every way writes a checkpoint into ``out`` at the end (and every ``checkpoint_every``
iterations); ``resume`` continues from a run folder's newest one. Returns a ``Trained``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from asteroid_fx.backends.base import step_swapped
from asteroid_fx.ir.cluster import resolve_cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime import checkpoint
from asteroid_fx.runtime.data import Batches
from asteroid_fx.runtime.evaluate import evaluate
from asteroid_fx.runtime.metrics import Metrics, Progress
from asteroid_fx.runtime.job import Job
from asteroid_fx.runtime.spec import RunSpec, call_inputs, check_job, compile_job, job_of, smaller_program

BACKENDS = ("local", "processes", "torchrun")


@dataclasses.dataclass
class Trained:
    """What a training run gives back: the losses of the iterations it ran (from ``start``), their
    seconds, the model's trained state_dict (its own keys: ``model.load_state_dict(state,
    strict=True)`` takes it), the plan and program it ran, and the run folder."""

    losses: list[float]
    seconds: list[float]
    state_dict: dict[str, torch.Tensor]
    plan: Any
    program: Any
    out: Path | None
    start: int = 0
    failures: list = dataclasses.field(default_factory=list)
    validation: list = dataclasses.field(default_factory=list)  # per checkpoint (runtime/evaluate.py)


def train(job: Job | str, devices: Any, *, out: str | os.PathLike | None = None, backend: str = "local",
          iterations: int | None = None, microbatches: int | None = None, stages: int | None = None,
          planner: str = "asteroid", schedule: str = "1f1b", groups=None, rows=None, seed: int = 0,
          checkpoint_every: int = 0,
          resume: str | os.PathLike | None = None, new_cluster: bool = False, recovery: bool = False,
          emulate: bool = False, last_batch: str | None = None, timeout_s: float = 600.0,
          log: Callable[[str], None] | None = None, progress: bool = False) -> Trained:
    """Train ``job`` (a Job, or its entry "package.module:attribute", or a zoo name) on ``devices``
    (a Cluster, a preset name, a cluster JSON path or a list of devices). ``iterations``: default
    the job's epochs over its dataset; ``microbatches``, ``stages``, ``planner``, ``schedule``,
    ``groups`` and ``rows`` as ``asteroid.compile`` takes them; ``last_batch`` ("drop" or
    "smaller"; None: the job's) replaces the job's choice for an epoch's last partial batch. See
    the module docstring for ``backend``."""
    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    if checkpoint_every < 0:
        raise InputError(f"checkpoint_every={checkpoint_every}: give 0 (only at the end) or a number of iterations")
    if backend != "local" and not isinstance(job, str):
        raise InputError(f"backend={backend!r} starts processes that each import the job: give its entry "
                         "'package.module:attribute' instead of a Job object")
    cluster = resolve_cluster(devices)
    entry = job if isinstance(job, str) else (job.name or "job")
    spec = RunSpec(model=entry, iterations=iterations, microbatches=microbatches, stages=stages, planner=planner,
                   schedule=schedule, seed=seed, groups=None if groups is None else tuple(tuple(g) for g in groups),
                   rows=None if rows is None else tuple(tuple(r) for r in rows), checkpoint_every=checkpoint_every, recovery=recovery,
                   emulate=emulate, last_batch=last_batch)
    if backend == "processes":
        return _processes(spec, cluster, out, resume, new_cluster, timeout_s, log, progress)
    if backend == "torchrun":
        if recovery:
            raise InputError("recovery needs the launcher's supervision (backend='processes' or `asteroid launch "
                             "--recover`); torchrun restarts a failed job itself")
        return _torchrun(spec, cluster, out, resume, new_cluster, log)
    if emulate or recovery:
        raise InputError("emulation and recovery run on worker processes: use backend='processes'")
    return _local(job.with_last_batch(last_batch) if isinstance(job, Job) else job_of(spec), spec, cluster, out,
                  resume, new_cluster, log, progress)


def _local(job: Job, spec: RunSpec, cluster, out, resume, new_cluster: bool, log, progress: bool) -> Trained:
    compiled = compile_job(job, cluster, spec)
    check_job(job, compiled)
    runner = compiled.runner(optimizer=job.settings, loss=job.loss)
    data = Batches(job, seed=spec.seed, flatten=lambda x: call_inputs(compiled.captured, x))
    keys = compiled.captured.module.state_dict()
    total = spec.iterations if spec.iterations is not None else job.iterations
    start = 0
    if resume is not None:
        manifest = checkpoint.find(resume)
        checkpoint.check_model(manifest, spec.model, keys)
        checkpoint.check_devices(manifest, list(cluster.names), new_cluster)
        start = manifest["iteration"]
        if start >= total:
            raise InputError(f"checkpoint {manifest['folder']} is after {start} iterations: the run of {total} is done")
        runner.load_copy(checkpoint.read_state(manifest))
        runner.iteration = start
    smaller = smaller_program(job, compiled)  # the program of an epoch's smaller last batch, if any
    losses, seconds, validation = [], [], []
    metrics = Metrics(out) if out is not None else None
    bar = Progress(total - start) if progress and total > start else None
    groups = 2 if job.no_decay else 1
    for i in range(start, total):
        inputs, labels = data.whole(i)
        rows = job.rows_at(i)
        began = time.perf_counter()
        if rows < job.batch:  # swapped in for this iteration: the same stages and groups, nothing moves
            losses.append(step_swapped(runner, smaller, compiled.program, inputs, labels))
        else:
            losses.append(runner.step(inputs, labels))
        seconds.append(time.perf_counter() - began)
        if log is not None:
            log(f"iteration {i + 1}/{total}: loss {losses[-1]:.4f}")
        if metrics is not None:
            metrics.iteration(i, i // job.steps_per_epoch, losses[-1], list(job.settings.lr_at(i)[:groups]), seconds[-1],
                              rows)
        if bar is not None:
            bar.update(i - start, losses[-1], rows / seconds[-1])
        done = i + 1
        if out is not None and (done == total or (spec.checkpoint_every and done % spec.checkpoint_every == 0)):
            stages = [{**checkpoint.write_stage(out, done, p, runner.stage_copy(p)), "layers": list(st.layers)}
                      for p, st in enumerate(compiled.program.stages)]
            checkpoint.write_manifest(out, done, model=spec.model, seed=spec.seed, keys=keys,
                                      devices=list(cluster.names), stages=stages)
            if job.validation is not None:
                validation.append({"iteration": done, **evaluate(job, runner.state_dict()), "time": time.time()})
                v = validation[-1]
                metrics.validation(done, i // job.steps_per_epoch, v["val_loss"], v["val_accuracy"], v["samples"])
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    return Trained(losses, seconds, runner.state_dict(), compiled.plan, compiled.program,
                   Path(out) if out is not None else None, start, validation=validation)


def _processes(spec: RunSpec, cluster, out, resume, new_cluster: bool, timeout_s: float, log,
               progress: bool) -> Trained:
    from asteroid_fx.runtime.launcher import launch, load_weights

    if out is None:
        raise InputError("backend='processes' needs out= (the run folder the workers write their weights, logs and "
                         "checkpoints into)")
    result = launch(spec, cluster, out, timeout_s=timeout_s, log=log, resume=resume, new_cluster=new_cluster,
                    progress=progress)
    return Trained(result["losses"], result["seconds"], load_weights(out, result["program"].devices), result["plan"],
                   result["program"], Path(out), result["start"], result["failures"], result["validation"])


def _torchrun(spec: RunSpec, cluster, out, resume, new_cluster: bool, log) -> Trained:
    """One rank of a torchrun job: rank 0 plans and publishes, every rank trains its device."""
    from asteroid_fx.ir.program_text import format_program
    from asteroid_fx.runtime.auth import SignedStore, secret_from_env
    from asteroid_fx.runtime.launcher import _Report, _resumed, load_weights, results_of
    from asteroid_fx.runtime.spec import pinned
    from asteroid_fx.runtime.build import build_of
    from asteroid_fx.runtime.store import BUILD, CLUSTER, PROGRAM, SPEC, connect, result_key
    from asteroid_fx.runtime.worker import run_worker

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise InputError(f"backend='torchrun' runs inside a torchrun job, which sets {', '.join(missing)}; start the "
                         "script with `torchrun --nproc-per-node N script.py`")
    if out is None:
        raise InputError("backend='torchrun' needs out= (the run folder)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # the ranks sign every value with the secret the user gave them all (runtime/auth.py): torchrun's
    # store is as open as the launcher's
    secret = secret_from_env()
    # torchrun's own store (its keys are under torchelastic/ and rendezvous prefixes: ours do not meet
    # them); the process groups connect to it again by its host and port, as the launcher's
    store = SignedStore(connect(f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"), secret, f"rank{rank}")
    compiled = None
    if rank == 0:
        compiled = compile_job(job_of(spec), cluster, spec)
        check_job(job_of(spec), compiled)
        spec = pinned(spec, compiled.plan)
        if resume is not None:
            spec = _resumed(spec, compiled, cluster, resume, new_cluster, _Report(log))
        devices = compiled.program.devices
        if len(devices) != world:
            store.set(PROGRAM, "")  # the other ranks stop with the same reason
            raise InputError(f"the plan runs on {len(devices)} devices ({', '.join(devices)}) and torchrun started "
                             f"{world} processes; start it with --nproc-per-node {len(devices)}, or pin stages so that "
                             "every device of the cluster is used")
        store.set(SPEC, spec.to_json())
        store.set(CLUSTER, json.dumps(cluster.to_json()))
        store.set(BUILD, json.dumps(build_of(compiled)))  # before the program, as the launcher does
        store.set(PROGRAM, format_program(compiled.program))
    elif not store.get(PROGRAM):
        raise InputError("rank 0 found that the plan does not use every torchrun process (its error says how many)")
    run_worker(None, None, out, store=store)
    if rank != 0:
        return Trained([], [], {}, None, None, Path(out))
    devices = compiled.program.devices
    store.wait([result_key(d) for d in devices])
    result = results_of(spec, store, compiled, devices, {}, Path(out), _Report(log))
    return Trained(result["losses"], result["seconds"], load_weights(out, devices), result["plan"],
                   result["program"], Path(out), result["start"])
