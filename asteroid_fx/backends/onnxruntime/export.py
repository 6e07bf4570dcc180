"""Export of the onnxruntime check: each compiled stage in eval mode (``CheckStage``) to ONNX
(``export_stage``) and to an ORT session (``session``), and the error that names an op ONNX or
ORT cannot run with its stage and fx node (``UnsupportedOpError``). See the package docstring."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.fx as fx

from asteroid_fx.ir.errors import AsteroidError, InputError
from asteroid_fx.passes.eval_mode import eval_mode

if TYPE_CHECKING:
    import onnx

    from asteroid_fx.compiler import Compiled

OPSET = 18
ROWS = "rows"  # the name of the dynamic dim 0 in every exported stage
FX_NODE = "asteroid.fx_node"  # node.meta["custom"] key and ONNX node metadata key
EXPORTERS = ("auto", "torch.export", "torchscript")


class ExportError(AsteroidError):
    """A stage that the ONNX exporters or ONNX Runtime cannot take; the message says which and why."""


class UnsupportedOpError(ExportError):
    """A stage uses an op that ONNX or ONNX Runtime cannot run."""

    def __init__(self, stage: int, op: str, fx_nodes: Sequence[str], detail: str, advice: str):
        self.stage, self.op, self.fx_nodes = stage, op, tuple(fx_nodes)
        where = f"fx node {', '.join(self.fx_nodes)}" if self.fx_nodes else "fx node unknown"
        super().__init__(f"stage {stage}: ONNX Runtime cannot run {op} ({where}): {detail}\n{advice}")


_NO_TRANSLATION = ("Write that part of the model with ops ONNX has, give the exporter a translation for the op "
                   "(torch.onnx.export's custom_translation_table), or check this model with the local backend only.")
_NO_KERNEL = ("ONNX Runtime's CPU provider has no kernel for the op on these element types: run that part of the "
              "model in float32, or check this model with the local backend only.")


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
        raise InputError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
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


def _export_error(stage: CheckStage, first: Exception | None, second: Exception | None) -> ExportError:
    text = "\n".join(str(e) for err in (first, second) for e in _chain(err))
    for pattern, spell in _MISSING_OP:
        m = re.search(pattern, text)
        if m:
            op = spell(m)
            nodes = [n.name for n in stage.module.graph.nodes
                     if n.op == "call_function" and (str(n.target) == op or str(n.target).startswith(op + "."))]
            return UnsupportedOpError(stage.index, op, nodes, "no ONNX exporter can translate it", _NO_TRANSLATION)
    tried = [f"{name}: {_headline(e)}" for name, e in (("torch.export-based", first), ("TorchScript", second)) if e]
    return ExportError(f"stage {stage.index}: the ONNX export failed ({'; '.join(tried)})")


# --- ONNX Runtime ----------------------------------------------------------------------------------

def session(onnx_stage: StageOnnx) -> Any:
    """An ORT CPU session for one stage; an op ORT has no kernel for raises UnsupportedOpError."""
    import onnxruntime as ort  # the top-level package, not this one (imports are absolute)

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(onnx_stage.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/NotImplemented/InvalidGraph
        raise _ort_error(onnx_stage, e) from e


def _ort_error(onnx_stage: StageOnnx, error: Exception) -> ExportError:
    text = str(error)
    name = re.search(r"node with name '([^']*)'", text)
    kernel = re.search(r"implementation for (\w+)\((\d+)\)", text)
    node = next((n for n in onnx_stage.model.graph.node if name and n.name == name.group(1)), None)
    if node is None:
        return ExportError(f"stage {onnx_stage.index}: ONNX Runtime cannot load the exported stage: {text}")
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
