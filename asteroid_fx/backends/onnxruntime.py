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
as a torch.export program with dynamic rows (stage_<p>.eval.pt2), the example batch
(check_inputs.pt) and check.json naming them, all written by ``save_check_files`` (torch only);
the check writes stage_<p>.onnx there.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import re
import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from asteroid_fx.ir.atomic import write_bytes
from asteroid_fx.ir.program import Action, Op, Program
from asteroid_fx.ir.verify import execution_order
from asteroid_fx.passes.eval_mode import eval_mode

if TYPE_CHECKING:
    import onnx

    from asteroid_fx.compiler import Compiled

OPSET = 18
RTOL, ATOL = 1e-4, 1e-5
# How many times PyTorch's own float32 error (float32 against float64) a difference may add to
# atol: ORT and PyTorch each within that error of the exact value are up to twice it apart; twice
# that again leaves room for kernels that round differently, while a real mismatch (a wrong op, a
# wrong weight) is orders of magnitude larger on any model that is not all rounding.
ROUNDING = 4.0
ROWS = "rows"  # the name of the dynamic dim 0 in every exported stage
FX_NODE = "asteroid.fx_node"  # node.meta["custom"] key and ONNX node metadata key
EXPORTERS = ("auto", "torch.export", "torchscript")
MANIFEST = "check.json"
MANIFEST_VERSION = 1
INPUTS_FILE = "check_inputs.pt"


class UnsupportedOpError(ValueError):
    """A stage uses an op that ONNX or ONNX Runtime cannot run."""

    def __init__(self, stage: int, op: str, fx_nodes: Sequence[str], detail: str, advice: str):
        self.stage, self.op, self.fx_nodes = stage, op, tuple(fx_nodes)
        where = f"fx node {', '.join(self.fx_nodes)}" if self.fx_nodes else "fx node unknown"
        super().__init__(f"stage {stage}: ONNX Runtime cannot run {op} ({where}): {detail}\n{advice}")


_NO_TRANSLATION = ("Write that part of the model with ops ONNX has, give the exporter a translation for the op "
                   "(torch.onnx.export's custom_translation_table), or check this model with the local backend only.")
_NO_KERNEL = ("ONNX Runtime's CPU provider has no kernel for the op on these element types: run that part of the "
              "model in float32, or check this model with the local backend only.")


class CheckFailed(AssertionError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance; ``report`` holds the table."""

    def __init__(self, report: CheckReport):
        self.report = report
        super().__init__(f"the ONNX Runtime check failed\n{report}")


# --- stages in eval mode ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CheckStage:
    """One stage as the check runs it: an eval-mode GraphModule with flat inputs and outputs whose
    nodes carry their stage fx names in node.meta["custom"][FX_NODE] (export keeps that meta)."""

    index: int
    module: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _tag_nodes(gm: fx.GraphModule) -> fx.GraphModule:
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            node.meta["custom"] = {**node.meta.get("custom", {}), FX_NODE: node.name}
    return gm


def check_stages(compiled: Compiled) -> tuple[CheckStage, ...]:
    """The compiled stages in eval mode (copies: the compiled ones keep training)."""
    return tuple(CheckStage(s.index, _tag_nodes(eval_mode(s.module)), s.inputs, s.outputs) for s in compiled.stages)


def _plain_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """``program.module()`` as a plain GraphModule: flat inputs and outputs, no input guards, and
    no refusal of ``.train()`` (which the TorchScript exporter calls)."""
    gm = program.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0]) if isinstance(out.args[0], (tuple, list)) else (out.args[0],),)
    plain = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    plain.eval()
    return plain


# --- export ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StageOnnx:
    index: int
    model: Any  # onnx.ModelProto
    exporter: str  # "torch.export" | "torchscript"
    note: str  # why the fallback was taken, "" if it was not

    @property
    def opset(self) -> int:
        return next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters warn about things that do not apply here (training mode: the graph is in
    eval mode; torchvision ops; their own deprecations): keep the check's output readable."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export",
                                                    "torch.fx.experimental.symbolic_shapes")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _export_torch(module: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    rows = torch.export.Dim(ROWS, min=1)
    with _quiet():
        exported = torch.onnx.export(module, example, dynamo=True, opset_version=OPSET, verbose=False,
                                     dynamic_shapes=tuple({0: rows} for _ in example))
    model = exported.model_proto
    # ONNX node -> the exported program's node (its fx_node metadata) -> the stage node (custom meta)
    meta = {n.name: n.meta.get("custom", {}).get(FX_NODE) for n in exported.exported_program.graph.nodes}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        m = re.match(r"%(\S+) :", props.get("pkg.torch.onnx.fx_node", ""))
        if m and meta.get(m.group(1)):
            entry = node.metadata_props.add()
            entry.key, entry.value = FX_NODE, meta[m.group(1)]
    return model


def _export_torchscript(module: fx.GraphModule, example: tuple[torch.Tensor, ...], stage: CheckStage) -> onnx.ModelProto:
    import onnx

    inputs = [f"input_{i}" for i in range(len(example))]
    outputs = [f"output_{i}" for i in range(len(stage.outputs))]
    f = io.BytesIO()
    with _quiet():
        torch.onnx.export(module, example, f, dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes={n: {0: ROWS} for n in inputs + outputs})
    return onnx.load_from_string(f.getvalue())


def export_stage(stage: CheckStage, example: Sequence[torch.Tensor], exporter: str = "auto") -> StageOnnx:
    """``stage`` as an ONNX model whose every input and output has a dynamic dim 0; ``example``
    is one batch of its inputs (any rows but 0 and 1, which export would fix). ``exporter``:
    "auto" (torch.export-based, then TorchScript where that fails), or one of the two only.
    Raises UnsupportedOpError naming the op and its fx node when no exporter can express an op."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    example = tuple(example)
    first: Exception | None = None
    if exporter in ("auto", "torch.export"):
        try:
            model = _export_torch(stage.module, example)
            return StageOnnx(stage.index, _label(model, stage.index, "torch.export"), "torch.export", "")
        except Exception as e:  # noqa: BLE001 - whatever stops it, the TorchScript exporter may do
            if exporter == "torch.export":
                raise _export_error(stage, e, None) from e
            first = e
    try:
        model = _export_torchscript(stage.module, example, stage)
    except Exception as e:  # noqa: BLE001
        raise _export_error(stage, first, e) from (first or e)
    note = ""
    if first is not None:
        note = f"the torch.export-based exporter failed: {_headline(first)}"
        warnings.warn(f"stage {stage.index}: exported with the TorchScript exporter, because {note}", stacklevel=2)
    return StageOnnx(stage.index, _label(model, stage.index, "torchscript"), "torchscript", note)


def _label(model: onnx.ModelProto, index: int, exporter: str) -> onnx.ModelProto:
    for key, value in (("asteroid.stage", str(index)), ("asteroid.exporter", exporter)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"asteroid_fx stage {index} in eval mode, exported by {exporter}; dim 0 of every input is '{ROWS}'"
    return model


def _headline(error: BaseException) -> str:
    """The line of an exporter's error that says what went wrong (they open with generic advice)."""
    text = "\n".join(str(e) for e in _chain(error))
    for pattern in (r"No ONNX function found for [^\n]*", r"Exporting the operator [^\n]*",
                    r"ONNX export failed on an operator [^\n]*"):
        m = re.search(pattern, text)
        if m:
            return m.group(0).strip()
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _chain(error: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


# the op an exporter could not translate: (pattern over its error text, how to spell the op as torch does)
_MISSING_OP = (
    (r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", lambda m: f"{m[1]}.{m[2]}"),
    (r"operator with unrecognized namespace (\w+)::(\w+)", lambda m: f"{m[1]}.{m[2]}"),
    (r"Exporting the operator '?(\w+)::(\w+)'? to ONNX", lambda m: f"{m[1]}.{m[2]}"),
)


def _export_error(stage: CheckStage, first: Exception | None, second: Exception | None) -> ValueError:
    text = "\n".join(str(e) for err in (first, second) for e in _chain(err))
    for pattern, spell in _MISSING_OP:
        m = re.search(pattern, text)
        if m:
            op = spell(m)
            nodes = [n.name for n in stage.module.graph.nodes
                     if n.op == "call_function" and (str(n.target) == op or str(n.target).startswith(op + "."))]
            return UnsupportedOpError(stage.index, op, nodes, "no ONNX exporter can translate it", _NO_TRANSLATION)
    tried = [f"{name}: {_headline(e)}" for name, e in (("torch.export-based", first), ("TorchScript", second)) if e]
    return ValueError(f"stage {stage.index}: the ONNX export failed ({'; '.join(tried)})")


# --- ONNX Runtime ----------------------------------------------------------------------------------

def session(onnx_stage: StageOnnx) -> Any:
    """An ORT CPU session for one stage; an op ORT has no kernel for raises UnsupportedOpError."""
    import onnxruntime as ort  # the top-level package: this module is asteroid_fx.backends.onnxruntime

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(onnx_stage.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/NotImplemented/InvalidGraph
        raise _ort_error(onnx_stage, e) from e


def _ort_error(onnx_stage: StageOnnx, error: Exception) -> ValueError:
    text = str(error)
    name = re.search(r"node with name '([^']*)'", text)
    kernel = re.search(r"implementation for (\w+)\((\d+)\)", text)
    node = next((n for n in onnx_stage.model.graph.node if name and n.name == name.group(1)), None)
    if node is None:
        return ValueError(f"stage {onnx_stage.index}: ONNX Runtime cannot load the exported stage: {text}")
    props = {p.key: p.value for p in node.metadata_props}
    source = re.search(r"target=([\w.]+)", props.get("pkg.torch.onnx.fx_node", ""))
    op = f"ONNX {node.op_type}" + (f"-{kernel.group(2)}" if kernel else "")
    op += f" (from {source.group(1).removeprefix('torch.ops.')})" if source else ""
    dtypes = _input_types(onnx_stage.model, node)
    detail = f"no kernel for it{f' on {dtypes}' if dtypes else ''} (ONNX node {node.name!r}): {text.strip()}"
    return UnsupportedOpError(onnx_stage.index, op, [props[FX_NODE]] if FX_NODE in props else [], detail,
                              _NO_KERNEL if kernel else _NO_TRANSLATION)


def _input_types(model: onnx.ModelProto, node: Any) -> str:
    """The element types of an ONNX node's inputs, where the model records them."""
    import onnx

    known = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.value_info)}
    names = [onnx.TensorProto.DataType.Name(known[i]).lower() for i in node.input if i in known]
    return ", ".join(dict.fromkeys(names))


StageRunner = Callable[[int, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]  # (stage, inputs) -> outputs


def _ort_runner(sessions: Sequence[Any]) -> StageRunner:
    def run(index: int, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        sess = sessions[index]
        names = [i.name for i in sess.get_inputs()]
        if len(names) != len(inputs):
            raise ValueError(f"stage {index}: the ONNX model takes {len(names)} inputs, the stage {len(inputs)}")
        feeds = {n: t.detach().contiguous().numpy() for n, t in zip(names, inputs)}
        try:
            outs = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"stage {index}: ONNX Runtime failed on {inputs[0].shape[0]} rows: {e}") from e
        return tuple(torch.from_numpy(o) for o in outs)
    return run


def _torch_runner(stages: Sequence[CheckStage]) -> StageRunner:
    def run(index: int, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = stages[index].module(*inputs)
        return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    return run


# --- the program's forward -------------------------------------------------------------------------


@dataclasses.dataclass
class Forward:
    """One forward pass of a program: what every F action produced and how long each stage took."""

    program: Program
    stage_inputs: Sequence[Sequence[str]]
    run_stage: StageRunner
    inputs: Mapping[str, torch.Tensor]  # stage 0's inputs by name, whole batch
    outputs: dict[tuple[int, int, tuple[int, int]], tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    seconds: list[float] = dataclasses.field(default_factory=list)
    _mailbox: dict[tuple, tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    _received: dict[tuple[str, int], dict[tuple[int, int], tuple[torch.Tensor, ...]]] = dataclasses.field(default_factory=dict)

    def run(self) -> Forward:
        self.seconds = [0.0] * len(self.program.stages)
        actions = dict(self.program.actions)
        for device, i in execution_order(self.program):
            a = actions[device][i]
            FORWARD_RULES.get(a.op, Forward._skip)(self, device, a)
        return self

    def _rows(self, mb: int, rows: tuple[int, int]) -> slice:
        base = mb * self.program.microbatch_rows
        return slice(base + rows[0], base + rows[1])

    def _forward(self, device: str, a: Action) -> None:
        if a.stage == 0:
            sl = self._rows(a.mb, a.rows)
            inputs = tuple(self.inputs[name][sl] for name in self.stage_inputs[0])
        else:
            got = self._received.pop((device, a.mb))
            pieces = [got[r] for r in sorted(got)]
            inputs = tuple(torch.cat([piece[i] for piece in pieces]) for i in range(len(self.stage_inputs[a.stage])))
        started = time.perf_counter()
        outputs = self.run_stage(a.stage, inputs)
        self.seconds[a.stage] += time.perf_counter() - started
        self.outputs[(a.stage, a.mb, a.rows)] = outputs

    def _send(self, device: str, a: Action) -> None:
        if a.payload != "act":
            return
        lo, hi = next(r for s, mb, r in self.outputs if s == a.stage and mb == a.mb and r[0] <= a.rows[0] and a.rows[1] <= r[1])
        outputs = self.outputs[(a.stage, a.mb, (lo, hi))]
        sl = slice(a.rows[0] - lo, a.rows[1] - lo)
        self._mailbox[(device, a.peer, a.stage, a.mb, a.rows)] = tuple(t[sl] for t in outputs)

    def _recv(self, device: str, a: Action) -> None:
        if a.payload != "act":
            return
        data = self._mailbox.pop((a.peer, device, a.stage, a.mb, a.rows))
        self._received.setdefault((device, a.mb), {})[a.rows] = data

    def _skip(self, device: str, a: Action) -> None:
        pass

    def stage_outputs(self, stage: int) -> tuple[torch.Tensor, ...]:
        """The outputs of ``stage`` over the whole batch: every F action's rows, in row order."""
        b = self.program.microbatch_rows
        pieces = sorted(((mb * b + r[0], mb * b + r[1], out) for (s, mb, r), out in self.outputs.items() if s == stage),
                        key=lambda piece: piece[:2])
        covered = [(lo, hi) for lo, hi, _ in pieces]
        expected = self.program.microbatches * b
        if any(x[1] != y[0] for x, y in zip(covered, covered[1:])) or not covered or covered[0][0] != 0 or covered[-1][1] != expected:
            raise ValueError(f"stage {stage}: the program's F actions do not cover rows [0, {expected}) once "
                             f"(they cover {covered}); run verify(program)")
        outs = [p[2] for p in pieces]
        for i, t in enumerate(outs[0]):
            if t.dim() == 0:
                raise ValueError(f"stage {stage}: output {i} is a 0-dim tensor; the check re-assembles outputs "
                                 "by rows, so every output must be batch-first")
        return tuple(torch.cat([o[i] for o in outs]) for i in range(len(outs[0])))


FORWARD_RULES: dict[Op, Callable[[Forward, str, Action], None]] = {
    Op.F: Forward._forward,
    Op.SEND: Forward._send,
    Op.RECV: Forward._recv,
}


def run_forward(program: Program, stages: Sequence[CheckStage], run_stage: StageRunner,
                inputs: Mapping[str, torch.Tensor]) -> Forward:
    """Run the program's forward actions with ``run_stage`` computing each stage."""
    return Forward(program, [s.inputs for s in stages], run_stage, inputs).run()


# --- comparison and report -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Agreement:
    max_abs: float
    max_rel: float
    off: int  # elements beyond atol + rtol * |ref|
    elements: int
    atol_to_pass: float  # the smallest atol under which every element agrees, rtol kept, no widening (inf: never)
    float32_error: float | None = None  # PyTorch's own: max |ref - ref in float64| (None: not measured)
    slack: float | None = None  # what the rounding rule added to atol (the largest over the outputs)

    @property
    def ok(self) -> bool:
        return self.off == 0


def float_error(ref: Sequence[torch.Tensor], wide: Sequence[torch.Tensor] | None) -> tuple[float, ...] | None:
    """Per output, max |ref - wide| over its finite elements: PyTorch's own rounding error where
    ``wide`` is the same computation in float64 (0 for outputs that are not floating point)."""
    if wide is None:
        return None
    if len(wide) != len(ref):
        raise ValueError(f"{len(wide)} float64 outputs for {len(ref)} outputs")
    errors = []
    for r, w in zip(ref, wide):
        if not r.is_floating_point() or r.shape != w.shape or r.dtype == torch.float64:
            errors.append(0.0)
            continue
        d = (r.detach().to(torch.float64) - w.detach().to(torch.float64)).abs()
        d = d[torch.isfinite(d)]
        errors.append(float(d.max()) if d.numel() else 0.0)
    return tuple(errors)


def compare(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], rtol: float, atol: float, *,
            errors: Sequence[float] | None = None, rounding: float = 0.0) -> Agreement:
    """torch.testing's rule and error measures, over all the tensors together; ``errors`` (from
    ``float_error``), times ``rounding``, widen each output's atol by PyTorch's own float32 error."""
    if len(got) != len(ref):
        raise ValueError(f"{len(got)} outputs to compare with {len(ref)}")
    max_abs = max_rel = atol_to_pass = 0.0
    off = elements = 0
    for i, (g, r) in enumerate(zip(got, ref)):
        elements += r.numel()
        if g.shape != r.shape:
            off, max_abs, max_rel, atol_to_pass = off + r.numel(), float("inf"), float("inf"), float("inf")
            continue
        if r.is_complex():
            g, r = torch.view_as_real(g), torch.view_as_real(r)
        g64, r64 = g.detach().to(torch.float64), r.detach().to(torch.float64)
        # equal (infinities included) or both NaN: no error; otherwise a NaN on one side is an infinite one
        same = (g64 == r64) | (torch.isnan(g64) & torch.isnan(r64))
        diff = torch.where(same, torch.zeros_like(r64), (g64 - r64).abs().nan_to_num(nan=float("inf")))
        finite = torch.isfinite(r64)
        slack = rounding * errors[i] if errors is not None else 0.0
        tolerance = torch.where(finite, atol + slack + rtol * r64.abs(), torch.zeros_like(r64))
        if not r.is_floating_point():  # integers and booleans agree exactly or not at all
            tolerance = torch.zeros_like(r64)
        off += int((diff > tolerance).sum())
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            if r.is_floating_point():
                beyond_rtol = torch.where(finite, diff - rtol * r64.abs(), diff.masked_fill(diff > 0, float("inf")))
            else:
                beyond_rtol = diff.masked_fill(diff > 0, float("inf"))
            atol_to_pass = max(atol_to_pass, float(beyond_rtol.max()))
            scaled = finite & (r64 != 0)
            if scaled.any():
                max_rel = max(max_rel, float((diff[scaled] / r64[scaled].abs()).max()))
    slack = max((rounding * e for e in errors), default=0.0) if errors is not None else None
    return Agreement(max_abs, max_rel, off, elements, atol_to_pass,
                     max(errors, default=0.0) if errors is not None else None, slack)


@dataclasses.dataclass(frozen=True)
class StageCheck:
    index: int
    devices: tuple[str, ...]
    rows: tuple[int, ...]
    exporter: str
    note: str
    agreement: Agreement  # ORT against PyTorch, both through the program
    ort_s: float | None  # per global batch, median
    torch_s: float | None
    export_s: float  # ONNX export, checker and ORT session creation


@dataclasses.dataclass(frozen=True)
class CheckReport:
    backend: str
    opset: int
    rtol: float
    atol: float
    rounding: float  # atol widened by this many times PyTorch's own float32 error per output
    wide: str  # "" when the float64 run worked, else why it could not be made (no widening then)
    repeats: int
    threads: int
    stages: tuple[StageCheck, ...]
    eager: str  # what the model's outputs are compared with
    local_vs_eager: Agreement
    ort_vs_eager: Agreement
    onnx_files: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(s.agreement.ok for s in self.stages) and self.local_vs_eager.ok and self.ort_vs_eager.ok

    def __str__(self) -> str:
        if self.rounding and not self.wide:
            rule = (f"atol + rtol * |ref| + {self.rounding:g} * f32 err, where f32 err is PyTorch's own float32 error "
                    "on that output, against the program run in float64")
        else:
            rule = "atol + rtol * |ref|"
        head = (f"ONNX Runtime check: {len(self.stages)} stage(s), opset {self.opset}, rtol {self.rtol:g}, "
                f"atol {self.atol:g}, rounding {self.rounding:g} (an element is off when |x - ref| > {rule})")
        timing = (f"latency: a stage's F actions over one global batch, median of {self.repeats}, "
                  f"{self.threads} thread(s)") if self.repeats else "latency: not measured (repeats=0)"
        header = ["stage", "devices (rows)", "exporter", "max abs err", "max rel err", "f32 err", "off/elements",
                  "ORT ms", "PyTorch ms", "ORT/PyTorch", "export s", "ok"]
        rows = [[str(s.index), ",".join(f"{d}({r})" for d, r in zip(s.devices, s.rows)), s.exporter,
                 f"{s.agreement.max_abs:.2e}", f"{s.agreement.max_rel:.2e}", _err(s.agreement.float32_error),
                 f"{s.agreement.off}/{s.agreement.elements}", _ms(s.ort_s), _ms(s.torch_s),
                 f"{s.ort_s / s.torch_s:.2f}x" if s.ort_s and s.torch_s else "-", f"{s.export_s:.1f}",
                 "yes" if s.agreement.ok else "NO"] for s in self.stages]
        lines = [head, timing, "", *_table(header, rows), "", f"model outputs against {self.eager}:"]
        for name, a in (("PyTorch through the program (local)", self.local_vs_eager),
                        ("ONNX Runtime through the program", self.ort_vs_eager)):
            lines.append(f"  {name:<37} max abs err {a.max_abs:.2e}  max rel err {a.max_rel:.2e}  "
                         f"f32 err {_err(a.float32_error)}  off {a.off}/{a.elements}  {'ok' if a.ok else 'MISMATCH'}")
        if self.wide:
            lines.append(f"note: PyTorch's float32 error is not measured, so atol is not widened: {self.wide}")
        lines += [f"note: stage {s.index}: {s.exporter} exporter, because {s.note}" for s in self.stages if s.note]
        needed = max(a.atol_to_pass for a in (*(s.agreement for s in self.stages), self.local_vs_eager, self.ort_vs_eager))
        if not self.ok and needed < float("inf"):
            lines.append(f"every element agrees with atol {needed:.1e} at this rtol; compare it with the f32 err "
                         "column (PyTorch's own float32 error) before calling it a bug")
        lines.append("result: " + ("pass" if self.ok else "MISMATCH"))
        return "\n".join(lines)


def _err(error: float | None) -> str:
    return "-" if error is None else f"{error:.2e}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, 1, 2, len(header) - 1}
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header).rstrip(), *(fmt(r).rstrip() for r in rows)]


# --- the check -------------------------------------------------------------------------------------

def _widened(t: Any) -> Any:
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _wide_forward(program: Program, stages: Sequence[CheckStage], inputs: Mapping[str, torch.Tensor]) -> Forward:
    """The program's forward in float64: every stage's floating weights and buffers, and the
    floating inputs, widened. Raises whatever PyTorch raises where the model insists on float32."""
    wide = [dataclasses.replace(s, module=copy.deepcopy(s.module).double()) for s in stages]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_forward(program, wide, _torch_runner(wide), {n: _widened(t) for n, t in inputs.items()})


def _check(program: Program, stages: Sequence[CheckStage], inputs: Mapping[str, torch.Tensor],
           eager_outputs: Sequence[torch.Tensor], eager: str, *, rtol: float, atol: float, rounding: float,
           repeats: int, exporter: str, folder: Path | None) -> CheckReport:
    import onnx

    if repeats < 0:
        raise ValueError(f"repeats must be >= 0, got {repeats}")
    if not rounding >= 0:
        raise ValueError(f"rounding must be >= 0 (0: compare with atol and rtol alone), got {rounding}")
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
            raise ValueError(f"the program runs batches of {batch} rows ({program.microbatches} micro-batches x "
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


def _pt2_bytes(program: torch.export.ExportedProgram) -> bytes:
    f = io.BytesIO()
    torch.export.save(program, f)
    return f.getvalue()


def save_check_files(compiled: Compiled, folder: str | os.PathLike) -> None:
    """Write what ``asteroid check PLAN_DIR`` needs beside program.json: stage_<p>.eval.pt2 (the
    stage in eval mode, exported with dynamic rows; a graph and weights, no code to run),
    check_inputs.pt (stage 0's tensors of the example batch) and check.json naming them. Needs
    torch only. A stage that torch.export cannot export is recorded in check.json with the reason
    (the check then reports it) instead of failing the save."""
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
            entry["torch"] = f"stage_{s.index}.eval.pt2"
            _atomic(out / entry["torch"], _pt2_bytes(program))
        except Exception as e:  # noqa: BLE001 - the save goes on; the check reports this stage
            entry["error"] = f"torch.export failed: {_headline(e)}"
        entries.append(entry)
    buffer = io.BytesIO()
    torch.save({n: inputs[n] for n in stages[0].inputs}, buffer)
    _atomic(out / INPUTS_FILE, buffer.getvalue())
    manifest = {"format": "asteroid-check", "version": MANIFEST_VERSION, "inputs": INPUTS_FILE, "stages": entries}
    _atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _load_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not (folder / "program.json").exists():
        raise ValueError(f"{folder} holds no compiled program (program.json missing); run "
                         f"`asteroid compile ... --out {folder}`")
    if not path.exists():
        raise ValueError(f"{folder} has no {MANIFEST}: the stages in eval mode are saved by Compiled.save in this "
                         f"version, or by compiled.check(folder={str(folder)!r}) / "
                         "asteroid_fx.backends.onnxruntime.save_check_files(compiled, folder); compile again")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "asteroid-check" or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} is not a version {MANIFEST_VERSION} asteroid check manifest; compile again with "
                         "this version")
    return manifest


def folder_stages(folder: str | os.PathLike) -> tuple[CheckStage, ...]:
    """The eval-mode stages a plan folder holds (stage_<p>.eval.pt2), as the check runs them."""
    folder = Path(folder)
    stages = []
    for entry in _load_manifest(folder)["stages"]:
        if "error" in entry:
            raise ValueError(f"stage {entry['index']} could not be saved for the check: {entry['error']}")
        with _quiet():
            program = torch.export.load(folder / entry["torch"])
        stages.append(CheckStage(entry["index"], _plain_module(program), tuple(entry["inputs"]), tuple(entry["outputs"])))
    return tuple(stages)


def check_folder(folder: str | os.PathLike, *, rtol: float = RTOL, atol: float = ATOL, rounding: float = ROUNDING,
                 repeats: int = 3, exporter: str = "auto", strict: bool = False) -> CheckReport:
    """The check on a plan folder (see ``save_check_files``), on the example batch saved there; the
    eager reference is the stages chained on the whole batch. Writes stage_<p>.onnx into it."""
    from asteroid_fx.ir.program_text import program_from_json

    folder = Path(folder)
    manifest = _load_manifest(folder)
    program = program_from_json(json.loads((folder / "program.json").read_text()))
    stages = folder_stages(folder)
    if len(stages) != len(program.stages):
        raise ValueError(f"{folder}: {MANIFEST} has {len(stages)} stages, program.json {len(program.stages)}; "
                         "compile again")
    inputs = torch.load(folder / manifest["inputs"], weights_only=True)
    batch_inputs = _batch_inputs(program, list(inputs), list(inputs.values()))
    outputs: tuple[torch.Tensor, ...] = tuple(batch_inputs[n] for n in stages[0].inputs)
    for s in stages:
        outputs = _torch_runner(stages)(s.index, outputs)
    report = _check(program, stages, batch_inputs, outputs, "the stages chained on the whole batch", rtol=rtol,
                    atol=atol, rounding=rounding, repeats=repeats, exporter=exporter, folder=folder)
    if strict and not report.ok:
        raise CheckFailed(report)
    return report
