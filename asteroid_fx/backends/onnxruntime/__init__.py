"""onnxruntime backend: a Program's forward through ONNX Runtime, checked against PyTorch.

Users swap backends to inference-check a partitioned model: every stage is exported to ONNX and
the program's forward actions run through ORT sessions, as the local backend runs them through
PyTorch; the two must give the same outputs. What ``check`` runs and compares:
  - every stage in eval mode (passes/eval_mode: BatchNorm on its running statistics, dropout the
    identity, no buffer written), in PyTorch and in ORT alike; the compiled stages are not touched;
  - the program's F actions in ``verify.execution_order``: stage 0 reads its rows of the inputs,
    a later stage concatenates, in row order, the row slices it received (SEND/RECV "act"). B,
    gradient transfers, ALLREDUCE and STEP mean nothing for a forward and are skipped;
  - per stage, its outputs over the whole batch (every device's rows re-assembled in order): ORT
    chained through ORT against PyTorch chained through PyTorch (the local backend's forward);
  - the model's outputs, from both, against eager PyTorch on the whole batch: the user's model in
    eval mode when given, else the captured graph in eval mode (for a plan folder, which holds no
    whole model: the stages chained on the whole batch, with no row split);
  - an element is off when |x - ref| > atol + rtol * |ref| + rounding * e (torch.testing's rule,
    widened by PyTorch's own float32 error), where e is max |ref - ref64| over that output: how far
    PyTorch's float32 run is from the same program run in float64 (every stage and input widened).
    Over a deep model float32 rounding alone reaches 1e-4 and more; two correct float32
    implementations may each be that far from the exact value, so a fixed atol would call a correct
    export of ResNet-50 a mismatch. ``rounding=0`` turns the widening off; a model that cannot run
    in float64 is compared with atol and rtol alone, and the report says so.
    "max abs err" is max |x - ref| and "max rel err" is max |x - ref| / |ref| over ref != 0, as
    torch.testing reports; "f32 err" is e.

Export: torch.onnx's torch.export-based exporter at opset ``OPSET`` with dim 0 ("rows") of every
input and output dynamic, so one session runs any row slice; where it fails, the TorchScript
exporter with the same dynamic axes (a warning and the table's exporter column say so; it bakes
sizes computed from the rows in, so prefer fixing the first exporter's error). Every ONNX node
carries the name of the stage's fx node it came from (metadata ``asteroid.fx_node``), so an op ORT
cannot run is reported with the op, the stage and the fx node (``UnsupportedOpError``).

Latency: the wall time of a stage's F actions over one global batch (all micro-batches and all
devices of its group, one after another on this machine), median of ``repeats`` forward passes
after a warm-up one; ORT gets as many intra-op threads as torch has.

A plan folder (``asteroid check PLAN_DIR``) needs, beside program.json: each stage in eval mode
as exported by torch.export with dynamic rows, kept as plain data (graph_file: the ATen graph in
stage_<p>.eval.json, its weights in stage_<p>.eval.pt), the example batch (check_inputs.pt) and
check.json naming them, all written by ``save_check_files`` (torch only); the check writes
stage_<p>.onnx there. Nothing in such a folder is unpickled or run as code: a folder may come from
anyone, and a crafted one is refused with the file and the field.
"""

from __future__ import annotations

import copy
import io
import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

# the package's names as they were when it was one module
from asteroid_fx.backends.onnxruntime.export import (  # noqa: F401
    EXPORTERS,
    FX_NODE,
    OPSET,
    ROWS,
    CheckStage,
    ExportError,
    StageOnnx,
    UnsupportedOpError,
    _headline,
    _plain_module,
    _quiet,
    check_stages,
    export_stage,
    session,
)
from asteroid_fx.backends.onnxruntime.forward import (  # noqa: F401
    Agreement,
    Forward,
    StageRunner,
    _ort_runner,
    _torch_runner,
    _wide_forward,
    compare,
    float_error,
    run_forward,
)
from asteroid_fx.backends.onnxruntime.graph_file import UnsavableGraph, graph_from_data, graph_to_data, load_weights
from asteroid_fx.backends.onnxruntime.report import CheckFailed, CheckReport, StageCheck  # noqa: F401
from asteroid_fx.ir.atomic import write_bytes
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program import Program
from asteroid_fx.passes.eval_mode import eval_mode

if TYPE_CHECKING:
    from asteroid_fx.compiler import Compiled

RTOL, ATOL = 1e-4, 1e-5
# How many times PyTorch's own float32 error (float32 against float64) a difference may add to
# atol: ORT and PyTorch each within that error of the exact value are up to twice it apart; twice
# that again leaves room for kernels that round differently, while a real mismatch (a wrong op, a
# wrong weight) is orders of magnitude larger on any model that is not all rounding.
ROUNDING = 4.0
MANIFEST = "check.json"
MANIFEST_VERSION = 2  # 1 held torch.export archives, whose loader unpickles
INPUTS_FILE = "check_inputs.pt"


# --- the check -------------------------------------------------------------------------------------

def _check(program: Program, stages: Sequence[CheckStage], inputs: Mapping[str, torch.Tensor],
           eager_outputs: Sequence[torch.Tensor], eager: str, *, rtol: float, atol: float, rounding: float,
           repeats: int, exporter: str, folder: Path | None) -> CheckReport:
    import onnx

    if repeats < 0:
        raise InputError(f"repeats must be >= 0, got {repeats}")
    if not rounding >= 0:
        raise InputError(f"rounding must be >= 0 (0: compare with atol and rtol alone), got {rounding}")
    local = run_forward(program, stages, _torch_runner(stages), inputs)
    wide: Forward | None = None
    why_not_wide = ""
    if rounding:
        try:
            wide = _wide_forward(program, stages, inputs)
        except Exception as e:  # noqa: BLE001 - any op that refuses float64; the check goes on without it
            why_not_wide = f"the program does not run in float64 ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    exported, sessions, files, export_s = [], [], [], []
    for s in stages:
        started = time.perf_counter()
        example = tuple(inputs[n] for n in s.inputs) if s.index == 0 else local.stage_outputs(s.index - 1)
        onnx_stage = export_stage(s, example, exporter)
        onnx.checker.check_model(onnx_stage.model)
        if folder is not None:
            path = folder / f"stage_{s.index}.onnx"
            _atomic(path, onnx_stage.model.SerializeToString())
            files.append(str(path))
        exported.append(onnx_stage)
        sessions.append(session(onnx_stage))
        export_s.append(time.perf_counter() - started)
    ort_run = _ort_runner(sessions)
    through_ort = run_forward(program, stages, ort_run, inputs)

    torch_times: list[list[float]] = []
    ort_times: list[list[float]] = []
    for _ in range(repeats):  # interleaved, so a machine that slows down slows both
        torch_times.append(run_forward(program, stages, _torch_runner(stages), inputs).seconds)
        ort_times.append(run_forward(program, stages, ort_run, inputs).seconds)

    def errors(stage: int, ref: Sequence[torch.Tensor]) -> tuple[float, ...] | None:
        return float_error(ref, wide.stage_outputs(stage)) if wide is not None else None

    checks = []
    for s, ox in zip(stages, exported):
        info = program.stages[s.index]
        ref = local.stage_outputs(s.index)
        checks.append(StageCheck(
            s.index, info.devices, tuple(slot.hi - slot.lo for slot in info.slots), ox.exporter, ox.note,
            compare(through_ort.stage_outputs(s.index), ref, rtol, atol, errors=errors(s.index, ref), rounding=rounding),
            statistics.median(t[s.index] for t in ort_times) if repeats else None,
            statistics.median(t[s.index] for t in torch_times) if repeats else None, export_s[s.index]))
    last = len(stages) - 1
    # eager's own float32 error: the float64 program run stands for eager in float64 (the two
    # compute the same function; only the row split's summation order differs)
    eager_errors = errors(last, eager_outputs)
    return CheckReport(
        backend="onnxruntime", opset=min(x.opset for x in exported), rtol=rtol, atol=atol, rounding=rounding,
        wide=why_not_wide, repeats=repeats, threads=torch.get_num_threads(), stages=tuple(checks), eager=eager,
        local_vs_eager=compare(local.stage_outputs(last), eager_outputs, rtol, atol, errors=eager_errors,
                               rounding=rounding),
        ort_vs_eager=compare(through_ort.stage_outputs(last), eager_outputs, rtol, atol, errors=eager_errors,
                             rounding=rounding),
        onnx_files=tuple(files))


def _batch_inputs(program: Program, names: Sequence[str], flat: Sequence[Any]) -> dict[str, torch.Tensor]:
    batch = program.microbatches * program.microbatch_rows
    inputs = {n: t for n, t in zip(names, flat) if isinstance(t, torch.Tensor)}
    for name, t in inputs.items():
        if t.dim() == 0 or t.shape[0] != batch:
            raise InputError(f"the program runs batches of {batch} rows ({program.microbatches} micro-batches x "
                             f"{program.microbatch_rows}); input {name!r} has shape {tuple(t.shape)}: pass inputs= "
                             f"with {batch} rows")
    return inputs


def check(compiled: Compiled, *, inputs: Any = None, kwargs: dict | None = None, model: torch.nn.Module | None = None,
          rtol: float = RTOL, atol: float = ATOL, rounding: float = ROUNDING, repeats: int = 3,
          folder: str | os.PathLike | None = None, exporter: str = "auto", strict: bool = True) -> CheckReport:
    """Run ``compiled.program``'s forward through ONNX Runtime and compare it with PyTorch stage by
    stage and with eager on the whole batch (see the module docstring for exactly what). ``inputs``
    (and ``kwargs``) are one global batch, as the model takes it (default: the example given to
    compile); ``model`` is the eager reference (default: the captured graph in eval mode);
    ``folder``, when given, receives stage_<p>.onnx and what ``asteroid check`` needs; ``rounding``
    widens atol by that many times PyTorch's own float32 error on each output (0: off). Raises
    CheckFailed on a mismatch when ``strict``; returns the report (print it for the table)."""
    captured = compiled.captured
    flat = captured.example_inputs if inputs is None else captured.flatten_inputs(inputs, kwargs)
    names = [n.name for n in captured.module.graph.nodes if n.op == "placeholder"]
    batch_inputs = _batch_inputs(compiled.program, names, flat)
    with torch.no_grad():
        if model is not None:
            args, kw = pytree.tree_unflatten(list(flat), captured.in_spec)
            reference = copy.deepcopy(model).eval()(*args, **kw)
            eager = f"eager {type(model).__name__} in eval mode on the whole batch"
        else:
            reference = eval_mode(captured.module)(*flat)
            eager = "the captured graph in eval mode on the whole batch"
    eager_outputs = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    out = Path(folder) if folder is not None else None
    if out is not None:
        save_check_files(compiled, out)
    report = _check(compiled.program, check_stages(compiled), batch_inputs, eager_outputs, eager, rtol=rtol,
                    atol=atol, rounding=rounding, repeats=repeats, exporter=exporter, folder=out)
    if strict and not report.ok:
        raise CheckFailed(report)
    return report



# --- plan folders and the command line -------------------------------------------------------------

def _atomic(path: Path, data: bytes) -> None:
    write_bytes(path, data)


def save_check_files(compiled: Compiled, folder: str | os.PathLike) -> None:
    """Write what ``asteroid check PLAN_DIR`` needs beside program.json: per stage, the stage in eval
    mode exported with dynamic rows, as plain data (stage_<p>.eval.json: its ATen graph; stage_<p>.eval.pt:
    its weights, plain tensors; see graph_file: nothing that runs code), check_inputs.pt (stage 0's
    tensors of the example batch, plain tensors) and check.json naming them. Needs torch only. A
    stage that torch.export cannot export, or whose graph the format cannot carry, is recorded in
    check.json with the reason (the check then reports it) instead of failing the save."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    captured = compiled.captured
    names = [n.name for n in captured.module.graph.nodes if n.op == "placeholder"]
    inputs = {n: t for n, t in zip(names, captured.example_inputs) if isinstance(t, torch.Tensor)}
    stages = check_stages(compiled)
    entries = []
    rows = torch.export.Dim(ROWS, min=1)
    for s, compiled_stage in zip(stages, compiled.stages):
        # export traces shapes, not values: two rows of zeros (valid indices too) stand for any batch
        example = tuple(torch.zeros(2, *spec.shape, dtype=getattr(torch, spec.dtype)) for spec in compiled_stage.input_specs)
        entry: dict[str, Any] = {"index": s.index, "inputs": list(s.inputs), "outputs": list(s.outputs)}
        try:
            with _quiet():
                program = torch.export.export(s.module, example, dynamic_shapes=tuple({0: rows} for _ in example),
                                              strict=False)
            data, weights = graph_to_data(_plain_module(program))
        except UnsavableGraph as e:
            entry["error"] = f"the exported graph {e}"
        except Exception as e:  # noqa: BLE001 - the save goes on; the check reports this stage
            entry["error"] = f"torch.export failed: {_headline(e)}"
        else:
            entry["graph"], entry["weights"] = f"stage_{s.index}.eval.json", f"stage_{s.index}.eval.pt"
            _atomic(out / entry["graph"], (json.dumps(data, indent=None) + "\n").encode())
            _atomic(out / entry["weights"], _tensor_bytes(weights))
        entries.append(entry)
    _atomic(out / INPUTS_FILE, _tensor_bytes({n: inputs[n] for n in stages[0].inputs}))
    manifest = {"format": "asteroid-check", "version": MANIFEST_VERSION, "inputs": INPUTS_FILE, "stages": entries}
    _atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().contiguous().clone() for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


def _manifest_error(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}; this is not the check.json `asteroid compile` writes: compile again")


def _file_field(folder: Path, path: Path, where: str, value: Any) -> Path:
    """A file named in check.json: a bare file name in the folder (no path elsewhere), a regular file."""
    if not isinstance(value, str) or not value or value != Path(value).name or value in (".", ".."):
        raise _manifest_error(path, f"{where} must be a file name in the folder, not {value!r:.80}")
    file = folder / value
    if not file.is_file():
        raise InputError(f"{folder}: {value} (named by {MANIFEST} {where}) is missing or not a regular file; "
                         "compile again")
    return file


def _load_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not (folder / "program.json").exists():
        raise InputError(f"{folder} holds no compiled program (program.json missing); run "
                         f"`asteroid compile ... --out {folder}`")
    if not path.exists():
        raise InputError(f"{folder} has no {MANIFEST}: the stages in eval mode are saved by Compiled.save in this "
                         f"version, or by compiled.check(folder={str(folder)!r}) / "
                         "asteroid_fx.backends.onnxruntime.save_check_files(compiled, folder); compile again")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _manifest_error(path, f"not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "asteroid-check" \
            or manifest.get("version") != MANIFEST_VERSION:
        raise InputError(f"{path} is not a version {MANIFEST_VERSION} asteroid check manifest; compile again with "
                         "this version")
    entries = manifest.get("stages")
    if not isinstance(entries, list) or not entries:
        raise _manifest_error(path, "'stages' must be a non-empty list")
    for i, entry in enumerate(entries):
        where = f"stages[{i}]"
        if not isinstance(entry, dict) or entry.get("index") != i or isinstance(entry.get("index"), bool):
            raise _manifest_error(path, f"{where} must be an object with 'index' {i}")
        for key in ("inputs", "outputs"):
            if not isinstance(entry.get(key), list) or not all(isinstance(n, str) for n in entry[key]):
                raise _manifest_error(path, f"{where}.{key} must be a list of names")
        if "error" in entry and not isinstance(entry["error"], str):
            raise _manifest_error(path, f"{where}.error must be text")
    return manifest


def folder_stages(folder: str | os.PathLike) -> tuple[CheckStage, ...]:
    """The eval-mode stages a plan folder holds (stage_<p>.eval.json and .pt), as the check runs them;
    read as plain data (graph_file), every field checked: InputError naming the file and the field."""
    folder = Path(folder)
    path = folder / MANIFEST
    stages = []
    for entry in _load_manifest(folder)["stages"]:
        if "error" in entry:
            raise InputError(f"stage {entry['index']} could not be saved for the check: {entry['error']}")
        where = f"stages[{entry['index']}]"
        graph_path = _file_field(folder, path, f"{where}.graph", entry.get("graph"))
        weights_path = _file_field(folder, path, f"{where}.weights", entry.get("weights"))
        try:
            data = json.loads(graph_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{graph_path}: not JSON ({e}); compile again") from None
        module = graph_from_data(data, load_weights(weights_path), graph_path)
        stages.append(CheckStage(entry["index"], module, tuple(entry["inputs"]), tuple(entry["outputs"])))
    return tuple(stages)


def check_folder(folder: str | os.PathLike, *, rtol: float = RTOL, atol: float = ATOL, rounding: float = ROUNDING,
                 repeats: int = 3, exporter: str = "auto", strict: bool = False) -> CheckReport:
    """The check on a plan folder (see ``save_check_files``), on the example batch saved there; the
    eager reference is the stages chained on the whole batch. Writes stage_<p>.onnx into it."""
    from asteroid_fx.ir.program_text import read_program_json
    from asteroid_fx.ir.verify import verify

    folder = Path(folder)
    manifest = _load_manifest(folder)
    program = read_program_json(folder / "program.json")
    verify(program, origin=str(folder / "program.json"))  # the check runs its forward actions: they must run
    stages = folder_stages(folder)
    if len(stages) != len(program.stages):
        raise InputError(f"{folder}: {MANIFEST} has {len(stages)} stages, program.json {len(program.stages)}; "
                         "compile again")
    inputs = load_weights(_file_field(folder, folder / MANIFEST, "inputs", manifest.get("inputs")))
    if not isinstance(inputs, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                               for k, t in inputs.items()):
        raise InputError(f"{folder / manifest['inputs']}: holds no mapping of input names to tensors; compile again")
    batch_inputs = _batch_inputs(program, list(inputs), list(inputs.values()))
    absent = [n for n in stages[0].inputs if n not in batch_inputs]
    if absent:
        raise InputError(f"{folder / manifest['inputs']}: holds no input {absent[0]!r}, which stage 0 takes "
                         f"(it holds {', '.join(map(repr, batch_inputs)) or 'none'}); compile again")
    outputs: tuple[torch.Tensor, ...] = tuple(batch_inputs[n] for n in stages[0].inputs)
    manifest_stages = manifest["stages"]
    for s in stages:
        try:  # the first run of graphs read from a folder: one that does not run is the folder's fault
            outputs = _torch_runner(stages)(s.index, outputs)
        except Exception as e:  # noqa: BLE001 - any op's refusal of what the crafted graph asks
            raise InputError(f"{folder / manifest_stages[s.index]['graph']}: stage {s.index} does not run on the "
                             f"saved inputs ({_headline(e)}); compile again") from None
    report = _check(program, stages, batch_inputs, outputs, "the stages chained on the whole batch", rtol=rtol,
                    atol=atol, rounding=rounding, repeats=repeats, exporter=exporter, folder=folder)
    if strict and not report.ok:
        raise CheckFailed(report)
    return report
