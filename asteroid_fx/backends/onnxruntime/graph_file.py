"""A stage in eval mode as plain data: its ATen graph as JSON and its weights as plain tensors.

``asteroid check PLAN_DIR`` reads folders that may come from anyone. A torch.export archive is no
safe carrier for them: its loader unpickles payloads marked ``use_pickle`` and sample inputs that
fail ``weights_only``, evaluates symbolic shapes with sympy's ``eval`` and resolves call targets as
any attribute path under ``torch``. This format holds nothing that runs: a node's target is an ATen
op overload or one of a few ``operator`` functions named in ``CALLS``, its arguments are numbers,
strings, dtypes, devices, layouts, lists, tuples and earlier nodes, and the weights are read with
``torch.load(weights_only=True)``. A graph with anything else is refused when saved (the stage is
then recorded as unsaved) and when read (``InputError`` naming the file, the node and the field).
"""

from __future__ import annotations

import math
import operator
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from asteroid_fx.backends.onnxruntime.export import FX_NODE
from asteroid_fx.ir.errors import InputError

FORMAT = "asteroid-stage-graph"
VERSION = 1

# Python-level calls an exported graph makes on sizes (dynamic rows) and multi-output ops; every
# other call must be an ATen op overload.
CALLS: dict[str, Callable[..., Any]] = {f"operator.{name}": getattr(operator, name) for name in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
OPS = ("placeholder", "get_attr", "call_function", "output")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ATEN = re.compile(r"aten\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\Z")
_WEIGHT = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_MEMORY_FORMATS = {str(m).removeprefix("torch."): m for m in (
    torch.contiguous_format, torch.channels_last, torch.preserve_format)}


class UnsavableGraph(ValueError):
    """A graph holding something this format does not carry (the stage is recorded as unsaved)."""


# --- writing ---------------------------------------------------------------------------------------

def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        name = f"aten.{target._opname}.{target._overloadname}"
        if _ATEN.match(name):
            return name
    for name, call in CALLS.items():
        if target is call:
            return name
    raise UnsavableGraph(f"calls {target!r}, which is neither an ATen op nor one of {sorted(CALLS)}")


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v) for v in value]}
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in _DTYPES:
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout) and str(value).removeprefix("torch.") in _LAYOUTS:
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format) and str(value).removeprefix("torch.") in _MEMORY_FORMATS:
        return {"memory_format": str(value).removeprefix("torch.")}
    raise UnsavableGraph(f"has an argument of type {type(value).__name__} ({value!r:.80})")


def graph_to_data(gm: fx.GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The graph as JSON-ready data and its weights (every get_attr target, a tensor). Raises
    UnsavableGraph for a node this format cannot carry."""
    nodes, weights, kinds = [], {}, {}
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op not in OPS:
            raise UnsavableGraph(f"node {node.name} is a {node.op}; the check's graph file holds {', '.join(OPS)}")
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor) or not _WEIGHT.match(node.target):
                raise UnsavableGraph(f"node {node.name} reads {node.target!r}, which is not a tensor")
            weights[node.target] = value.detach()
            kinds[node.target] = "parameter" if isinstance(value, torch.nn.Parameter) else "buffer"
            entry["target"] = node.target
        elif node.op == "call_function":
            entry["target"] = _target_name(node.target)
        entry["args"] = _encode(tuple(node.args))
        entry["kwargs"] = {k: _encode(v) for k, v in node.kwargs.items()}
        fx_node = node.meta.get("custom", {}).get(FX_NODE)
        if isinstance(fx_node, str):
            entry["fx_node"] = fx_node
        nodes.append(entry)
    return {"format": FORMAT, "version": VERSION, "weights": kinds, "nodes": nodes}, weights


# --- reading ---------------------------------------------------------------------------------------

class _Reader:
    def __init__(self, path: Path) -> None:
        self.path, self.where = path, ""

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: {self.where}{what}; this file is not what `asteroid compile` writes: "
                          "compile again")

    def decode(self, value: Any, env: Mapping[str, fx.Node]) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value
        if isinstance(value, dict) and len(value) == 1:
            (tag, inner), = value.items()
            if tag == "node":
                if not isinstance(inner, str) or inner not in env:
                    raise self.fail(f"an argument names node {inner!r}, which no earlier node is")
                return env[inner]
            if tag in ("tuple", "list") and isinstance(inner, list):
                items = [self.decode(v, env) for v in inner]
                return tuple(items) if tag == "tuple" else items
            table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}.get(tag)
            if table is not None and isinstance(inner, str) and inner in table:
                return table[inner]
            if tag == "device" and isinstance(inner, str) and re.fullmatch(r"(cpu|cuda|mps|meta)(:\d{1,3})?", inner):
                return torch.device(inner)
            if tag == "float" and inner in ("inf", "-inf", "nan"):
                return float(inner)
        raise self.fail(f"an argument {value!r:.80} is none of the values a graph holds")

    def target(self, name: Any) -> Callable[..., Any]:
        if isinstance(name, str) and name in CALLS:
            return CALLS[name]
        match = _ATEN.match(name) if isinstance(name, str) else None
        if match and not match[1].startswith("__") and not match[2].startswith("__"):
            packet = getattr(torch.ops.aten, match[1], None)
            op = getattr(packet, match[2], None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
            if isinstance(op, torch._ops.OpOverload):
                return op
        raise self.fail(f"target {name!r:.80} is neither an ATen op (aten.NAME.OVERLOAD) nor one of {sorted(CALLS)}")


def graph_from_data(data: Any, weights: Any, path: Path) -> fx.GraphModule:
    """The GraphModule ``graph_to_data`` wrote, from data read from ``path`` (named in errors).
    Checks every field before building anything; raises InputError on the first that is wrong."""
    r = _Reader(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise r.fail(f"not a version {VERSION} {FORMAT} file")
    kinds, nodes = data.get("weights"), data.get("nodes")
    if not isinstance(kinds, dict) or not isinstance(nodes, list):
        raise r.fail("'weights' must be an object and 'nodes' a list")
    if not isinstance(weights, dict) or set(weights) != set(kinds) \
            or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise r.fail(f"the weights file holds {sorted(weights) if isinstance(weights, dict) else type(weights).__name__}"
                     f" where the graph names {sorted(kinds)}")
    root = torch.nn.Module()
    for name, kind in kinds.items():
        r.where = f"weight {name!r}: "
        if not isinstance(name, str) or not _WEIGHT.match(name) or kind not in ("parameter", "buffer") \
                or any(part.startswith("__") for part in name.split(".")):
            raise r.fail("a weight is a dotted name of letters, digits and _ that is a 'parameter' or a 'buffer'")
        owner = root
        *path_parts, leaf = name.split(".")
        for part in path_parts:
            child = owner._modules.get(part)
            if child is None:
                if hasattr(owner, part):
                    raise r.fail(f"{part!r} is both a weight and a module")
                child = torch.nn.Module()
                owner.add_module(part, child)
            owner = child
        if leaf in owner._modules or hasattr(owner, leaf):
            raise r.fail("named twice")
        tensor = weights[name]
        if kind == "parameter":
            owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
        else:
            owner.register_buffer(leaf, tensor)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    outputs = 0
    for i, entry in enumerate(nodes):
        r.where = f"node {i}: "
        if not isinstance(entry, dict):
            raise r.fail("a node is an object")
        name, op = entry.get("name"), entry.get("op")
        r.where = f"node {i} ({name!r:.40}): "
        if not isinstance(name, str) or not _NAME.match(name) or name in env:
            raise r.fail("'name' must be a new identifier")
        if op not in OPS:
            raise r.fail(f"'op' must be one of {', '.join(OPS)}, not {op!r:.40}")
        args, kwargs = entry.get("args", {"tuple": []}), entry.get("kwargs", {})
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) and _NAME.match(k) for k in kwargs):
            raise r.fail("'kwargs' must map identifiers to values")
        args = r.decode(args, env)
        if not isinstance(args, tuple):
            raise r.fail("'args' must be a tuple")
        kwargs = {k: r.decode(v, env) for k, v in kwargs.items()}
        if op == "placeholder":
            node = graph.placeholder(name)
        elif op == "get_attr":
            if not isinstance(entry.get("target"), str) or entry["target"] not in kinds:
                raise r.fail(f"'target' {entry.get('target')!r:.60} is no weight of this graph")
            node = graph.get_attr(entry["target"])
        elif op == "call_function":
            node = graph.call_function(r.target(entry.get("target")), args, kwargs)
        else:
            if outputs or len(args) != 1:
                raise r.fail("a graph has one output node, with one argument")
            node = graph.output(args[0])
            outputs += 1
        node.name = name
        if isinstance(entry.get("fx_node"), str):
            node.meta["custom"] = {FX_NODE: entry["fx_node"]}
        env[name] = node
    r.where = ""
    if not outputs:
        raise r.fail("the graph has no output node")
    gm = fx.GraphModule(root, graph, class_name="CheckStage")
    gm.eval()
    return gm


def load_weights(path: Path) -> Any:
    """``torch.load(weights_only=True)``: plain tensors only, with an unpickling refusal (a file that
    asks for any other object) as an InputError naming the file."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a file of plain tensors, refused without running it ({first}); "
                         "compile again") from None
