"""capture: nn.Module + example inputs -> a trainable fx.GraphModule with a dynamic batch dimension.

Expects ``model(*args, **kwargs)`` to run, every tensor input to be batch-first (dim 0 = rows,
the same number of rows in every tensor input, at least 2), and forward to treat the batch
dimension as a size only: stages later run it on row slices of any size.

torch.export (non-strict) comes first: it sees through Python and captures models that plain
symbolic tracing cannot, such as transformers 5. Dim 0 of every tensor input is one shared dynamic
dimension ``batch`` (so inputs that never meet in forward still share it). A forward that fixes
the batch size (``view(8, ...)``) is rejected; one that only bounds it (``x[:4]`` needs batch >= 4,
a reshape across rows needs an even batch) is captured as default export does, with each input's
dim 0 an independent Dim.AUTO and those guards dropped (refused if the inputs then do not share
one batch size). Export's shape guards are dropped in any case: the planner changes no size but
the batch. fx.symbolic_trace is the fallback for models export rejects for any other reason;
there the batch-first values are found by running forward on the example batch and on the
example doubled (a forward that fails on the doubled batch is refused).

Guarantees, on both paths:
  - the graph's placeholders are the leaves of ``(args, kwargs)`` in pytree order (positional
    inputs, then keyword inputs in the example's key order), non-tensor leaves included: this is
    the flat input order ``Captured.flatten_inputs`` produces and the backends take;
  - the output node returns a flat tuple; ``Captured.unflatten_outputs`` rebuilds the user's
    structure (tuple, dict, ...), which is what the loss function receives;
  - node.meta["val"] holds a fake tensor (or SymInt) for every value; dim 0 of batch-first values
    is a SymInt whose expression is ``Captured.batch_symbol``;
  - export: every parameter and buffer is a ``get_attr`` node; symbolic_trace: submodules are
    ``call_module`` nodes that own their parameters, direct parameters are ``get_attr`` nodes;
  - the user's module is not modified: capture works on a deep copy in train mode, and the
    captured module's parameters and buffers hold the user's values (the runs capture makes
    leave no trace in them).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import logging
import os
import re
import sys
import sysconfig
import traceback
from collections.abc import Mapping
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from asteroid_fx.ir.errors import AsteroidError, InputError


class CaptureError(AsteroidError):
    """The model could not be captured; the message names the construct and what to do."""


class _BatchSizeError(CaptureError):
    """Forward cannot run on another batch size: final, whatever made export fail."""


@dataclasses.dataclass(frozen=True)
class Captured:
    module: fx.GraphModule
    method: str  # "export" | "symbolic_trace"
    in_spec: pytree.TreeSpec  # of (args, kwargs)
    out_spec: pytree.TreeSpec
    batch_symbol: Any  # the sympy symbol of the batch size
    example_batch: int
    example_inputs: tuple[Any, ...]  # flattened, as the placeholders take them

    def flatten_inputs(self, args: Any, kwargs: Mapping | None = None) -> tuple[Any, ...]:
        """The flat inputs, in placeholder order, of the call ``model(*args, **kwargs)``; keyword
        inputs may come in any order. Without ``kwargs``, ``args`` is one batch as ``call_inputs``
        reads it (a dict: keyword inputs). This is what ``Compiled.run`` and the runners take."""
        if kwargs is None:
            return self.call_inputs(args)
        args = args if isinstance(args, tuple) else (args,)
        flat = self._flat(args, kwargs)
        if flat is None:
            raise self._structure_error(args, kwargs)
        return flat

    def call_inputs(self, inputs: Any) -> tuple[Any, ...]:
        """The flat inputs of one batch as a user writes it: a tensor (the one positional input), a
        tuple or list of positional inputs, a dict (or any Mapping, a tokenizer's output) of keyword
        inputs, a pair (positional tuple, keyword dict), or the flat inputs themselves. Where a
        value reads two ways (a model that takes a dict positionally), the reading that has the
        example's structure wins."""
        readings = []
        if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], Mapping):
            readings.append((inputs[0] if isinstance(inputs[0], tuple) else (inputs[0],), inputs[1]))
        if isinstance(inputs, Mapping):
            readings.append(((), inputs))
        readings.append((tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {}))
        for args, kwargs in readings:
            flat = self._flat(args, kwargs)
            if flat is not None:
                return flat
        if isinstance(inputs, tuple) and len(inputs) == self.in_spec.num_leaves:
            return inputs  # already flat: what this method returns, passed again
        raise self._structure_error(*readings[0])

    def _flat(self, args: tuple, kwargs: Mapping) -> tuple[Any, ...] | None:
        """The leaves of (args, kwargs) if they have the example's structure, dict keys in any
        order (taken in the example's), else None."""
        try:
            leaves = self.in_spec.flatten_up_to((args, dict(kwargs)))
        except (TypeError, ValueError):
            return None
        # flatten_up_to takes a container where the example had a leaf: the round trip tells
        flat, spec = pytree.tree_flatten(pytree.tree_unflatten(leaves, self.in_spec))
        return tuple(flat) if spec == self.in_spec else None

    def _structure_error(self, args: tuple, kwargs: Mapping) -> InputError:
        expected_args, expected_kwargs = self.in_spec.child(0), self.in_spec.child(1)
        return InputError(
            f"the inputs do not have the structure of the example given at capture: expected "
            f"{expected_args.num_leaves} positional leaves and keywords {list(expected_kwargs.context)}, got "
            f"{len(pytree.tree_leaves(args))} positional leaves and keywords {list(kwargs)}")

    def unflatten_outputs(self, flat: list[Any]) -> Any:
        return pytree.tree_unflatten(flat, self.out_spec)

    def is_batched(self, val: Any) -> bool:
        """Whether a traced value is a tensor whose dim 0 is the batch (so it can be row-sliced)."""
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            return False
        size = val.shape[0]
        return isinstance(size, torch.SymInt) and size.node.expr == self.batch_symbol

    def is_batch_sym(self, val: Any) -> bool:
        """Whether a traced value is a SymInt that depends on the batch size only."""
        return (isinstance(val, torch.SymInt) and self.batch_symbol is not None
                and val.node.expr.free_symbols == {self.batch_symbol})


def capture(model: torch.nn.Module, args: Any, kwargs: dict | None = None) -> Captured:
    """Capture ``model`` called as ``model(*args, **kwargs)``; raises CaptureError with advice."""
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture takes a torch.nn.Module, got {type(model).__name__}; wrap the "
                           "computation in an nn.Module whose forward takes the batch")
    if not isinstance(args, tuple):
        args = (args,)
    batch = _check_inputs(model, args, kwargs)
    model = copy.deepcopy(model)
    model.train()
    captured = _capture(model, args, kwargs, batch)
    _check_output_rows(captured, type(model).__name__)
    return captured


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict, batch: int) -> Captured:
    """torch.export, else the symbolic_trace fallback, else a CaptureError saying why neither."""
    try:
        return _export(model, args, kwargs)
    except CaptureError:
        raise
    except Exception as export_error:  # noqa: BLE001 - every other export failure falls back
        fixed = _fixed_batch(export_error)
        if fixed is not None:  # the fallback would capture it for this one batch size: refuse
            raise CaptureError(f"cannot capture {type(model).__name__}: forward depends on the batch "
                               f"size, {_FIXED_BATCH.format(n=fixed)}. {_ROW_SLICES}") from export_error
        try:
            return _symbolic_trace(model, args, kwargs, batch)
        except _BatchSizeError:
            raise
        except Exception as trace_error:  # noqa: BLE001
            raise CaptureError(_explain(model, export_error, trace_error) + _keywords_note(model, kwargs)) \
                from export_error


# --- inputs ------------------------------------------------------------------------------------

def _check_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """The example batch size, after checking that the inputs fit forward and are batch-first."""
    name = type(model).__name__
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        keywords = (f"; the keyword inputs {list(kwargs)} go to forward's parameters of those names (a forward "
                    "that takes one dict gets example=(d,))") if kwargs else ""
        raise CaptureError(f"the example inputs do not fit {name}.forward: {e}{keywords}") from None
    leaves = pytree.tree_flatten_with_path((args, kwargs))[0]
    tensors = [(_input_name(path), x) for path, x in leaves if isinstance(x, torch.Tensor)]
    if not tensors:
        raise CaptureError(f"{name} got no tensor input: the batch is split across devices along dim 0 "
                           "of the inputs, so pass at least one batch-first tensor in example=")
    for where, x in tensors:
        if x.dim() == 0:
            raise CaptureError(f"input {where} is a 0-dim tensor, but every tensor input must be "
                               "batch-first; pass a constant as a Python number or a module buffer")
    sizes = {where: x.shape[0] for where, x in tensors}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{w}: {s}" for w, s in sizes.items())
        raise CaptureError(f"every tensor input must have the batch as its first dimension, but their "
                           f"first dimensions differ ({listed}); pass constants as module buffers")
    batch = next(iter(sizes.values()))
    if batch < 2:
        raise CaptureError(f"the example batch has {batch} row(s); give at least 2, so that the batch "
                           "dimension can be told apart from fixed sizes")
    return batch


def _keywords_note(model: torch.nn.Module, kwargs: dict) -> str:
    """For a failed capture: the keyword inputs that reach forward only through its ``**kwargs``
    (a misspelt input name passes the signature there and fails deep inside forward)."""
    params = inspect.signature(model.forward).parameters
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return ""
    named = [n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                            inspect.Parameter.VAR_KEYWORD)]
    unnamed = [k for k in kwargs if k not in named]
    if not unnamed:
        return ""
    return (f"\nnote: the keyword inputs {unnamed} are not parameters of {type(model).__name__}.forward, which "
            f"takes them in **kwargs; its parameters are {', '.join(named)}")


def _input_name(path: tuple) -> str:
    """``args[0]`` / ``kwargs['mask']`` for a leaf of (args, kwargs)."""
    return ("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])


# --- outputs -----------------------------------------------------------------------------------

class RowsError(CaptureError, InputError):
    """An output whose rows are not the inputs' rows: a row count that depends on the batch's values."""


def _check_output_rows(captured: Captured, name: str) -> None:
    """Every tensor output keeps its rows in step with the input rows, or has none of its own.

    A stage runs on a device's rows of a micro-batch and the loss takes that device's outputs with
    the labels of the same rows, so an output whose row count depends on the batch's values (a
    boolean-mask selection ``x[x.sum(1) > 0]``, indexing by ``nonzero``) has no rows to pair with
    the labels: the run would fail in the loss with a shape error. A size made from the batch size
    (``B * S`` rows after a reshape) and an output without the batch (a reduction, a scalar loss)
    are fine. export gives a size learnt from the data a symbol of its own; the symbolic_trace
    fallback, which sees two runs with concrete sizes, cannot tell it apart and lets it through."""
    gm = captured.module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = out.args[0]
    paths = [pytree.keystr(p) for p, _ in
             pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(len(leaves))), captured.out_spec))[0]]
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, fx.Node) or not _data_dependent_rows(leaf.meta.get("val"), captured):
            continue
        origin = _first_data_dependent(leaf, captured)
        at = _stack_line(origin)
        made = f" (rows chosen by {origin.name}, {origin.target}{at})" if origin is not None else ""
        raise RowsError(
            f"cannot compile {name}: the row count of output{paths[i]} depends on the values in the batch, not on "
            f"its size{made}, so its rows are not the input rows. Every "
            "device computes the outputs of its own rows of each micro-batch and the loss pairs them with the "
            "labels of those rows, so an output must keep one row per input row (or reduce the rows away). Keep "
            "every row and mask in the loss: return the whole tensor and the mask (return logits, keep) and weight "
            "the rows' losses by it, (F.cross_entropy(logits, labels, reduction='none') * keep).mean(), a mean "
            "over every row that splits across devices exactly; or zero the rows instead of dropping them, "
            "torch.where(keep[:, None], x, 0).")


def _data_dependent_rows(val: Any, captured: Captured) -> bool:
    """Whether ``val`` is a tensor whose dim 0 is a size export could only learn from the data."""
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or not isinstance(val.shape[0], torch.SymInt):
        return False
    return bool(val.shape[0].node.expr.free_symbols - {captured.batch_symbol})


def _first_data_dependent(node: fx.Node, captured: Captured) -> fx.Node | None:
    """The first node, in graph order, of ``node`` and what it depends on, whose rows depend on the data."""
    seen, stack = {node}, [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return next((n for n in node.graph.nodes if n in seen and _data_dependent_rows(n.meta.get("val"), captured)),
                None)


def _stack_line(node: fx.Node | None) -> str:
    """``, at file:line`` and the code there, from the node's recorded stack ("" when none)."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', (node.meta.get("stack_trace") or "")
                        if node is not None else "")
    if not frames:
        return ""
    path, line, code = frames[-1]
    return f", at {path}:{line}: {code.strip()}"


# --- torch.export ------------------------------------------------------------------------------

def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    bound = ""
    try:
        ep = _export_program(model, args, kwargs, shared=True)
    except Exception as e:  # noqa: BLE001
        if "Constraints violated (batch)" not in str(e) or _fixed_batch(e) is not None:
            raise
        # forward bounds the batch size (batch >= 4, an even batch, ...): what the default export
        # does then is to capture it anyway without those guards, which we keep doing
        bound = _batch_guard(e)
        ep = _export_program(model, args, kwargs, shared=False)
    gm = ep.module()
    in_spec, out_spec = gm._in_spec, gm._out_spec
    _strip_guards(gm)
    _plain_codegen(gm)
    flat = pytree.tree_leaves((args, kwargs))
    batch = next(x.shape[0] for x in flat if isinstance(x, torch.Tensor))
    sizes = [n.meta["val"].shape[0] for n in gm.graph.nodes
             if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    symbols = {s.node.expr if isinstance(s, torch.SymInt) else s for s in sizes}
    if len(symbols) > 1 or not isinstance(sizes[0], torch.SymInt):
        # without the shared dimension, inputs that never meet in forward get a batch size each
        why = f"it needs {bound} (so its inputs get no common batch)" if bound else _FIXED_BATCH.format(n=batch)
        raise CaptureError(f"cannot capture {type(model).__name__}: forward depends on the batch size, "
                           f"{why}. {_ROW_SLICES}")
    return Captured(gm, "export", in_spec, out_spec, sizes[0].node.expr, batch, tuple(flat))


def _export_program(model: torch.nn.Module, args: tuple, kwargs: dict,
                    shared: bool) -> torch.export.ExportedProgram:
    """Export with dim 0 of every tensor input dynamic: one shared ``batch`` dimension, or (not
    ``shared``) one Dim.AUTO per input, which lets export drop the guards it finds on it."""
    batch_dim = torch.export.Dim("batch", min=2) if shared else torch.export.Dim.AUTO

    def spec(x: Any) -> Any:
        return {0: batch_dim} if isinstance(x, torch.Tensor) else None

    # one entry per parameter of forward, as export binds them (a dict by name trips on **kwargs)
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    dynamic_shapes = tuple(pytree.tree_map(spec, v) for v in bound.values())
    with _quiet():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back what export prints while it fails (a partial graph, symbolic-shape warnings):
    the CaptureError says what went wrong. What it prints on success is passed on."""
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        shapes_log.setLevel(level)
    sys.stderr.write(held.getvalue())


def _strip_guards(gm: fx.GraphModule) -> None:
    """Remove export's shape guards: they check non-batch sizes that never change."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph.lint()
    gm.recompile()


def _plain_codegen(gm: fx.GraphModule) -> None:
    """Replace export's pytree codegen by plain flat placeholders and a flat output tuple."""
    gm.graph._codegen = fx.graph.CodeGen()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0]
    if not isinstance(flat, (tuple, list)):
        flat = (flat,)
    out.args = (tuple(flat),)
    gm.recompile()


_FIXED_BATCH = ("it only runs on batches of {n} rows (a fixed size such as view({n}, ...), or a "
                "tensor of {n} rows that is not an input)")
_ROW_SLICES = ("Stages run on row slices of any size, so write x.shape[0] or -1 where forward needs "
               "the batch size")


def _batch_guard(error: Exception) -> str:
    """The first condition export found forward puts on the batch size, e.g. ``4 <= batch``."""
    guards = re.findall(r"satisfy the generated guard (.+?)\.?$", str(error), re.MULTILINE)
    if not guards:
        return "a bounded batch size"
    guard = re.sub(r"L\[[^\]]*\]\.size\(\)\[0\]", "batch", guards[0])
    return guard.replace(" and batch <= IntInfinity()", "")


def _fixed_batch(error: Exception) -> int | None:
    """The batch size export found forward fixed, from its constraint violation (else None)."""
    fixed = re.search(r"marked batch as dynamic but your code specialized it to be a constant \((\d+)\)",
                      str(error))
    return int(fixed.group(1)) if fixed else None


# --- fx.symbolic_trace fallback ----------------------------------------------------------------

def _symbolic_trace(model: torch.nn.Module, args: tuple, kwargs: dict, batch: int) -> Captured:
    gm, flat, in_spec = _trace(model, args, kwargs)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, out_spec = pytree.tree_flatten(_mutable(out.args[0]))
    out.args = (tuple(leaves),)
    gm.recompile()
    symbol = _fake_values(gm, flat, batch)
    return Captured(gm, "symbolic_trace", in_spec, out_spec, symbol, batch, tuple(flat))


def _mutable(x: Any) -> Any:
    """fx stores an output structure as immutable_dict/list; the loss gets plain dict/list."""
    if isinstance(x, dict):
        return {k: _mutable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_mutable(v) for v in x]
    if isinstance(x, tuple):
        items = [_mutable(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def _trace(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, list, pytree.TreeSpec]:
    """symbolic_trace with non-tensor inputs and unpassed defaults as constants; placeholders
    rearranged to the leaves of (args, kwargs)."""
    params = inspect.signature(model.forward).parameters
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    for name, value in bound.items():
        if params[name].kind in variadic and value:
            star = "*" if params[name].kind == inspect.Parameter.VAR_POSITIONAL else "**"
            raise CaptureError(f"the fallback cannot pass inputs through {star}{name}; name them in forward")
        if isinstance(value, (tuple, list, dict)) and params[name].kind not in variadic:
            raise CaptureError(f"the fallback takes tensors and constants, not containers ({name})")
    concrete = {name: bound.get(name, p.default) for name, p in params.items()
                if p.kind not in variadic and not isinstance(bound.get(name), torch.Tensor)}
    gm = fx.symbolic_trace(model, concrete_args=concrete)

    graph = gm.graph
    placeholders = dict(zip(params, [n for n in graph.nodes if n.op == "placeholder"]))
    for name, node in placeholders.items():
        node.args = ()  # no defaults: every input is passed
        if name in concrete:  # drop the guards that check a constant input's value
            for user in reversed(_downstream(node)):
                graph.erase_node(user)
        if name not in bound or params[name].kind in variadic:
            graph.erase_node(node)
    # in pytree order of (args, kwargs): positional inputs in order, then keywords as given
    positional = [n for n in bound if n not in kwargs and params[n].kind not in variadic]
    order = [placeholders[n] for n in positional + list(kwargs)]
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for node in order:
        anchor.prepend(node)
    graph.lint()
    gm.recompile()
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    return gm, flat, in_spec


def _downstream(node: fx.Node) -> list[fx.Node]:
    """Every node that depends on ``node``, in graph order."""
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return [n for n in node.graph.nodes if n in seen]


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps every node's value."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)


def _run_values(gm: fx.GraphModule, flat: list) -> dict[fx.Node, Any]:
    buffers = {name: b.detach().clone() for name, b in gm.named_buffers()}
    recorder = _Recorder(gm)
    try:
        with torch.no_grad():
            recorder.run(*flat)
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(buffers[name])
    return recorder.env


def _fake_values(gm: fx.GraphModule, flat: list, batch: int) -> Any:
    """node.meta["val"] as export writes it, from two runs: the example batch, and the example
    doubled; values whose dim 0 follows the batch get a symbolic batch size. Returns the symbol."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    first = _run_values(gm, flat)
    doubled = [torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in flat]
    try:
        second = _run_values(gm, doubled)
    except Exception as e:  # noqa: BLE001
        raise _BatchSizeError(f"cannot capture {type(gm).__name__}: forward runs on the example batch "
                              f"of {batch} rows but not on {2 * batch} ({_headline(e)}). {_ROW_SLICES}") from e

    shape_env = ShapeEnv()
    symbol = shape_env.create_symbol(batch, ConstantSource("batch"), dynamic_dim=DimDynamic.DYNAMIC)
    batch_size = shape_env.create_symintnode(symbol, hint=batch)

    def fake(a: Any, b: Any) -> Any:
        if isinstance(a, torch.Tensor):
            follows = (isinstance(b, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch
                       and b.shape[0] == 2 * batch and a.shape[1:] == b.shape[1:])
            shape = (batch_size, *a.shape[1:]) if follows else tuple(a.shape)
            return torch.empty(shape, dtype=a.dtype, device=a.device, requires_grad=a.requires_grad)
        if isinstance(a, int) and not isinstance(a, bool):
            if a > 0 and a % batch == 0 and b == 2 * a:
                return batch_size * (a // batch) if a != batch else batch_size
            return a
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
            return tuple(fake(u, v) for u, v in zip(a, b))
        return a

    with FakeTensorMode(shape_env=shape_env):
        for node in gm.graph.nodes:
            if node in first and node.op != "output":
                node.meta["val"] = fake(first[node], second.get(node))
    return symbol


# --- errors ------------------------------------------------------------------------------------

_DATA_DEPENDENT = ("data-dependent", "symbolically traced variables cannot be used as inputs to control flow")
_NOT_USER_CODE = (os.path.dirname(torch.__file__), sysconfig.get_paths()["stdlib"], __file__)


def _user_line(error: BaseException) -> str | None:
    """``file:line`` and the code there, for the innermost frame of ``error``'s traceback that is
    neither torch, the standard library nor capture itself: the user's forward, usually."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(_NOT_USER_CODE)]
    if not frames:
        return None
    f = frames[-1]
    return f"{f.filename}:{f.lineno}" + (f"\n    {f.line.strip()}" if f.line else "")


def _headline(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output, which is not a known type")


def _explain(model: torch.nn.Module, export_error: Exception, trace_error: Exception) -> str:
    name = type(model).__name__
    where = _user_line(trace_error) or _user_line(export_error)
    at = f", at {where}" if where else ""
    unknown = _UNKNOWN_OUTPUT.search(str(export_error))
    if unknown and unknown.group(1).endswith("Cache"):  # transformers' key/value cache, for generation
        return (f"cannot capture {name}: forward returns a {unknown.group(1).rsplit('.', 1)[-1]} (the key/value "
                "cache of generation), which training does not use and a graph cannot return. Pass "
                "use_cache=False, in the model's config or as a keyword input.")
    if unknown:
        return (f"cannot capture {name}: forward returns a {unknown.group(1)}, which torch.export cannot look "
                "into. Return tensors (in tuples, lists or dicts), or register the type with "
                "torch.utils._pytree.register_pytree_node.")
    if any(marker in str(e) for e in (export_error, trace_error) for marker in _DATA_DEPENDENT):
        return (
            f"cannot capture {name}: forward makes a Python decision on a tensor's value{at}\n"
            "Neither torch.export nor fx.symbolic_trace can follow control flow that depends on data "
            "(an if or while on a tensor, .item(), int(tensor), a size computed from values). Use "
            "torch.where(cond, a, b) to choose between values, torch.cond(pred, true_fn, false_fn, "
            "(x,)) to choose between computations, or move the decision out of forward."
        )
    return (
        f"cannot capture {name}{at}\n"
        f"  torch.export: {_headline(export_error)}\n"
        f"  fx.symbolic_trace: {_headline(trace_error)}\n"
        "Rewrite that part of forward with torch operations, or move it out of forward."
    )
