"""asteroid.compile: a model and a cluster in, a verified per-device training program out."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from asteroid_fx.backends.base import step_swapped
from asteroid_fx.ir.atomic import write_text
from asteroid_fx.ir.cluster import Cluster, resolve_cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import DEFAULT_MAX_LAYERS, LayerGraph, write_costs
from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.program import Program
from asteroid_fx.ir.program_text import format_program, program_to_json
from asteroid_fx.ir.verify import verify
from asteroid_fx.passes.annotate_costs import annotate_costs
from asteroid_fx.passes.capture import Captured, capture
from asteroid_fx.passes.capture_check import verify_capture
from asteroid_fx.passes.linearize import linearize
from asteroid_fx.passes.lower import lower_plan, stage_cut_specs
from asteroid_fx.passes.lower_comm import check_clip
from asteroid_fx.passes.partition import partition
from asteroid_fx.passes.profile_costs import profile_costs
from asteroid_fx.passes.split import Stage, split



@dataclasses.dataclass(frozen=True)
class Compiled:
    captured: Captured
    cluster: Cluster
    layer_graph: LayerGraph
    plan: Plan
    stages: tuple[Stage, ...]
    program: Program
    loss: Callable | None

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The captured, cost-annotated fx graph (node.meta["asteroid.*"])."""
        return self.captured.module

    def __str__(self) -> str:
        return f"{self.plan}\n\n{self.program}"

    def runner(self, *, optimizer="sgd", lr: float = 1e-3, loss: Callable | None = None,
               loss_reduction: str = "mean"):
        """A local-backend runner holding one replica of its stage per device."""
        from asteroid_fx.backends.local import LocalRunner

        loss = loss or self.loss
        if loss is None:
            raise InputError("no loss function: pass loss= to compile() or to run()")
        names = [n.name for n in self.captured.module.graph.nodes if n.op == "placeholder"]
        return LocalRunner(self.program, self.stages, loss=loss, unflatten=self.captured.unflatten_outputs,
                           input_names=names, optimizer=optimizer, lr=lr, loss_reduction=loss_reduction,
                           state_keys=self.captured.module.state_dict().keys())

    def run(self, data: Iterable, iterations: int, *, optimizer="sgd", lr: float = 1e-3,
            loss: Callable | None = None, log: Callable[[str], None] | None = None):
        """Train ``iterations`` steps on the local backend; ``data`` yields (inputs, labels) of one
        global batch, inputs a tensor, a tuple of positional tensors, a dict of keyword inputs, or
        (args tuple, kwargs dict) (``Captured.call_inputs``). A batch of fewer rows than the
        program's (a dataset's last partial batch) trains on the same stages and groups with the
        smaller program of passes/remainder.py, swapped in for that iteration. Returns (runner,
        losses)."""
        from asteroid_fx.passes.remainder import remainder_program

        runner = self.runner(optimizer=optimizer, lr=lr, loss=loss)
        losses = []
        smaller: dict[int, Any] = {}  # rows -> the program of a batch of that many rows
        it = iter(data)
        for i in range(iterations):
            try:
                inputs, labels = next(it)
            except StopIteration:
                raise InputError(f"the data ran out after {i} of {iterations} iterations") from None
            inputs = self.captured.call_inputs(inputs)
            rows = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), self.plan.batch)
            if rows < self.plan.batch:
                if rows not in smaller:
                    smaller[rows] = remainder_program(self, rows)
                losses.append(step_swapped(runner, smaller[rows], self.program, inputs, labels))
            else:
                losses.append(runner.step(inputs, labels))
            if log:
                log(f"iteration {i + 1}/{iterations}: loss {losses[-1]:.4f}")
        return runner, losses

    def check(self, backend: str = "onnxruntime", *, inputs: Any = None, kwargs: dict | None = None,
              model: torch.nn.Module | None = None, rtol: float = 1e-4, atol: float = 1e-5, rounding: float = 4.0,
              repeats: int = 3, folder: str | os.PathLike | None = None, exporter: str = "auto", strict: bool = True):
        """Inference check: the program's forward through ``backend`` (every stage in eval mode)
        against PyTorch stage by stage, and the model's outputs against eager on the whole batch
        (``model`` in eval mode if given, else the captured graph in eval mode). ``inputs`` is one
        global batch (default: the compile example); atol is widened by ``rounding`` times PyTorch's
        own float32 error on each output (0: off). Returns the report (print it for the table);
        raises CheckFailed on a mismatch when ``strict``. See backends/onnxruntime/."""
        if backend != "onnxruntime":
            raise InputError(f"unknown check backend {backend!r}; there is one: 'onnxruntime'")
        from asteroid_fx.backends.onnxruntime import check

        return check(self, inputs=inputs, kwargs=kwargs, model=model, rtol=rtol, atol=atol, rounding=rounding,
                     repeats=repeats, folder=folder, exporter=exporter, strict=strict)

    def simulate(self, *, shared_medium: bool = False, opt_state_factor: float = 2.0,
                 recovery: bool | None = None):
        """Time one iteration of the program with the cost model (``asteroid_fx.sim``): iteration
        time, throughput, per-device busy time and memory; ``.trace(path)``, ``.gantt(path)`` and
        ``.grid()`` show it. ``opt_state_factor`` as given to compile (2 for Adam); ``recovery``
        counts recovery's state copies in memory (default: as compiled)."""
        from asteroid_fx.sim import simulate

        return simulate(self.program, self.layer_graph, self.cluster, shared_medium=shared_medium,
                        opt_state_factor=opt_state_factor,
                        recovery=self.plan.recovery if recovery is None else recovery)

    def save(self, folder: str | os.PathLike) -> Path:
        """plan.json, plan.txt, program.txt, program.json, layers.txt, cluster.json, costs.json,
        stage_<p>.py/.pt (fx code + weights) and the check files, written whole into a folder beside
        ``folder`` that then takes its place: a save that fails leaves ``folder`` as it was, and a
        folder saved before with more stages keeps none of their files. Files in ``folder`` that a
        save does not write (the user's own) move over to the new one."""
        out = Path(folder)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out} exists and is not a folder; give --out a folder (new or one saved before)")
        out.parent.mkdir(parents=True, exist_ok=True)
        beside = out.parent / f".{out.name}.saving-{os.getpid()}"
        shutil.rmtree(beside, ignore_errors=True)
        try:
            self._save_files(beside)
            if not out.exists():
                os.replace(beside, out)
                return out
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            try:
                os.replace(beside, out)
            except BaseException:
                os.replace(old, out)
                raise
        finally:
            shutil.rmtree(beside, ignore_errors=True)
        for path in old.iterdir():  # the user's files go along; the older save's own go with ``old``
            if not _saved_name(path.name) and not (out / path.name).exists():
                os.replace(path, out / path.name)
        shutil.rmtree(old)
        return out

    def _save_files(self, out: Path) -> None:
        out.mkdir(parents=True)
        _write(out / "plan.json", self.plan.dumps() + "\n")
        _write(out / "plan.txt", str(self.plan) + "\n")
        _write(out / "program.txt", format_program(self.program))
        _write(out / "program.json", json.dumps(program_to_json(self.program), indent=1) + "\n")
        _write(out / "layers.txt", str(self.layer_graph) + "\n")
        self.cluster.save(out / "cluster.json")
        write_costs(self.layer_graph, out / "costs.json")  # what `asteroid simulate` times the program with
        # the model's own keys: every name of a tied weight in each stage holding it, and no
        # buffer the model keeps out of its state_dict, so the stages' files load strict into it
        keys = self.captured.module.state_dict().keys()
        for st in self.stages:
            _write(out / f"stage_{st.index}.py", st.module.code)
            torch.save({k: v for k, v in st.module.state_dict().items() if k in keys}, out / f"stage_{st.index}.pt")
        from asteroid_fx.backends.onnxruntime import save_check_files

        save_check_files(self, out)  # stage_<p>.eval.json/.pt, check_inputs.pt, check.json: what `asteroid check` reads


SAVED_FILES = {"plan.json", "plan.txt", "program.txt", "program.json", "layers.txt", "cluster.json", "costs.json"}


def _saved_name(name: str) -> bool:
    """Whether ``name`` is a file ``Compiled.save`` writes (for some layout): not the user's."""
    from asteroid_fx.backends.onnxruntime import INPUTS_FILE, MANIFEST  # the check files' own names

    if name in SAVED_FILES or name in (MANIFEST, INPUTS_FILE):
        return True
    index = name[len("stage_"):].split(".", 1)[0] if name.startswith("stage_") else ""
    return index.isdigit()


def _write(path: Path, text: str) -> None:
    write_text(path, text)


def _example_call(example: Any, kwargs: Mapping | None) -> tuple[tuple, dict | None]:
    """compile's ``example`` and ``kwargs`` -> the example call's (args, kwargs): a Mapping example
    is the keyword inputs, as a job's dict of inputs is (runtime/job.py)."""
    if isinstance(example, Mapping):
        if kwargs:
            raise InputError("example= is a dict of keyword inputs and kwargs= gives keyword inputs too; give "
                             "them once: example={...} alone, or example=(positional inputs) with kwargs={...}")
        return (), dict(example)
    return (example if isinstance(example, tuple) else (example,)), kwargs


def compile(model: torch.nn.Module, devices: Any, *, example: Any, kwargs: dict | None = None,
            loss: Callable | None = None, microbatches: int | None = None, microbatch_rows: int | None = None,
            planner: str = "asteroid",
            schedule_kind: str = "1f1b", stages: int | None = None,
            groups: Sequence[Sequence[str]] | None = None, rows: Sequence[Sequence[int]] | None = None,
            layers: Sequence[int] | None = None, max_layers: int | None = DEFAULT_MAX_LAYERS,
            opt_state_factor: float = 2.0, check: bool = True, profiles: Sequence[Any] = (),
            recovery: bool = False, clip_grad_norm: float | None = None, check_capture: bool = True) -> Compiled:
    """Compile ``model`` for ``devices`` (a Cluster, a list of Devices or kind names, a preset name
    or a cluster JSON path). ``example`` is one global batch of inputs: a tensor, a tuple of
    positional inputs, or a dict (any Mapping, a tokenizer's output) of keyword inputs, the same as
    ``example=()`` with ``kwargs=`` that dict (a forward that takes one dict gets ``example=(d,)``);
    ``planner`` is one of passes.partition.PLANNER_NAMES ("asteroid" by default; the others are
    the baselines it is compared with). Unless ``microbatches`` or ``microbatch_rows`` pins it,
    the planner also chooses the micro-batching of the batch. ``profiles`` (DeviceProfiles or profile
    paths, one per device kind, from `asteroid profile`) replace those kinds' analytic costs. With
    ``recovery`` the plan is for a run with pipeline replay (`asteroid launch --recover`): every
    device's memory must also hold its rollback point and, on the first device of a stage, two
    copies of each stage it backs up (docs/planner.md, "Memory"). With ``clip_grad_norm`` every
    iteration clips the gradients by their global norm before the step, as
    ``torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)`` does in eager training
    (a NORM on every device; docs/semantics.md, "Gradient clipping"). With ``check_capture`` (the
    default) the captured graph must compute what the model's forward does, in train mode, on the
    example and on a second batch drawn like it, both cut to the example's first 2 rows when the
    batch is symbolic (docs/semantics.md, "Capture self-check")."""
    max_norm = check_clip(clip_grad_norm)  # a bad value fails before the capture and the planner
    cluster = resolve_cluster(devices)
    args, kwargs = _example_call(example, kwargs)
    # capture with a dynamic batch so stages run on row slices of any size
    captured = capture(model, args, kwargs)
    batch = captured.example_batch
    for name, value in (("microbatches", microbatches), ("microbatch_rows", microbatch_rows)):
        if value is not None and (value < 1 or batch % value):
            raise InputError(f"{name}={value} does not divide the example batch of {batch} rows; "
                             f"pass a divisor of {batch}, or leave both out and the planner chooses")
    if not any(p.requires_grad for p in captured.module.parameters()):
        raise InputError(f"{type(model).__name__} has no parameter that requires grad: there is nothing to "
                         f"train; give the model parameters (or unfreeze them) before compiling")
    # the first real run of the graph: an example the model cannot take fails here, naming the node
    annotate_costs(captured, cluster.device_kinds())  # a measured kind (host-cpu) as the cluster carries it
    if check_capture:  # a graph that computes something else would train another model, silently
        verify_capture(captured, model, args, kwargs)
    lg = linearize(captured, max_layers=max_layers)
    if profiles:  # measured layer times replace the roofline for the kinds they were measured on
        lg = profile_costs(lg, profiles, max_layers=max_layers)
    # the planner picks stages, groups, rows and (unless pinned) the micro-batching, within every
    # device's memory (with recovery's state copies when the run will recover from failures)
    plan = partition(lg, cluster, planner=planner, batch=batch, microbatches=microbatches,
                     microbatch_rows=microbatch_rows, schedule=schedule_kind, stages=stages, groups=groups,
                     rows=rows, layers=layers, opt_state_factor=opt_state_factor, recovery=recovery)
    stage_modules = split(captured, lg, plan)
    # the schedule's F/B order per device, then the row-slice messages, all-reduces, ties, the
    # clipping and steps
    cut_specs = stage_cut_specs(stage_modules)
    program = lower_plan(plan, cut_specs, lg.ties, max_norm)
    if check:
        verify(program, layers=len(lg), cut_specs=cut_specs)  # cheap, and a wrong program must never reach a backend
    return Compiled(captured, cluster, lg, plan, stage_modules, program, loss)
