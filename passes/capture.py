"""capture: nn.Module + example inputs -> a trainable fx.GraphModule with a dynamic batch dimension.

torch.export comes first: it sees through Python (and captures models that plain symbolic tracing
cannot, such as transformers 5). fx.symbolic_trace is the fallback for modules export rejects.
Dim 0 of every tensor input is exported as dynamic, because stages later run on row slices of any
size; the export shape guards are dropped for the same reason (the planner never feeds a stage a
shape the model did not accept at capture time, apart from the batch size).

Guarantees: the returned graph's placeholders are the flattened positional then keyword inputs;
``Captured.in_spec`` / ``out_spec`` rebuild the user's structures; every parameter and buffer is a
``get_attr`` node of the returned module; node.meta["val"] holds a fake tensor (or SymInt) for
every value; the user's module is not modified (capture works on a deep copy).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree


class CaptureError(ValueError):
    """The model could not be captured; the message names the construct and what to do."""


@dataclasses.dataclass(frozen=True)
class Captured:
    module: fx.GraphModule
    method: str  # "export" | "symbolic_trace"
    in_spec: pytree.TreeSpec  # of (args, kwargs)
    out_spec: pytree.TreeSpec
    batch_symbol: Any  # the sympy symbol of the batch size (None for symbolic_trace)
    example_batch: int
    example_inputs: tuple[torch.Tensor, ...]  # flattened, as the placeholders take them

    def unflatten_outputs(self, flat: list[Any]) -> Any:
        return pytree.tree_unflatten(flat, self.out_spec)

    def is_batched(self, val: Any) -> bool:
        """Whether a traced value is a tensor whose dim 0 is the batch (so it can be row-sliced)."""
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            return False
        size = val.shape[0]
        if self.batch_symbol is not None:
            return isinstance(size, torch.SymInt) and size.node.expr == self.batch_symbol
        return int(size) == self.example_batch

    def is_batch_sym(self, val: Any) -> bool:
        """Whether a traced value is a SymInt that depends on the batch size only."""
        return (isinstance(val, torch.SymInt) and self.batch_symbol is not None
                and val.node.expr.free_symbols == {self.batch_symbol})


def _dynamic_batch_spec(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return {0: torch.export.Dim.AUTO}
        return None

    return pytree.tree_map(spec, args), pytree.tree_map(spec, kwargs)


def _batch_size(flat_inputs: list[Any]) -> int:
    sizes = {x.shape[0] for x in flat_inputs if isinstance(x, torch.Tensor) and x.dim() > 0}
    if len(sizes) != 1:
        raise CaptureError(
            "every tensor input must share its first dimension (the batch); got first dimensions "
            f"{sorted(sizes)}. Pass per-sample inputs with the batch first, and constants as module "
            "buffers instead of inputs."
        )
    return sizes.pop()


def _strip_guards(gm: fx.GraphModule) -> None:
    """Remove export's shape guards: they pin the batch range seen at capture time."""
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


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    dyn_args, dyn_kwargs = _dynamic_batch_spec(args, kwargs)
    dynamic_shapes: Any = dyn_args if not kwargs else {**dict(zip(_arg_names(model, len(args)), dyn_args)), **dyn_kwargs}
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    gm = ep.module()
    in_spec, out_spec = gm._in_spec, gm._out_spec
    _strip_guards(gm)
    _plain_codegen(gm)
    flat, _ = pytree.tree_flatten((args, kwargs))
    batch = _batch_size(flat)
    symbol = None
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() > 0:
            size = val.shape[0]
            if isinstance(size, torch.SymInt):
                symbol = size.node.expr
            break
    return Captured(gm, "export", in_spec, out_spec, symbol, batch, tuple(flat))


def _arg_names(model: torch.nn.Module, n: int) -> list[str]:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params[:n]


def _symbolic_trace(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.symbolic_trace(model)
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    if kwargs:
        raise CaptureError("symbolic tracing fallback does not take keyword inputs; pass them positionally")
    batch = _batch_size(flat)
    ShapeProp(gm).propagate(*flat)
    for node in gm.graph.nodes:
        if "tensor_meta" in node.meta and "val" not in node.meta:
            tm = node.meta["tensor_meta"]
            if hasattr(tm, "shape"):
                node.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    out = gm(*flat)
    _, out_spec = pytree.tree_flatten(out)
    return Captured(gm, "symbolic_trace", in_spec, out_spec, None, batch, tuple(flat))


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Captured:
    """Capture ``model`` called as ``model(*args, **kwargs)``; raises CaptureError with advice."""
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    model = copy.deepcopy(model)
    model.train()
    try:
        return _export(model, args, kwargs)
    except CaptureError:
        raise
    except Exception as export_error:  # noqa: BLE001 - every export failure falls back, then is reported
        try:
            return _symbolic_trace(model, args, kwargs)
        except Exception as trace_error:  # noqa: BLE001
            raise CaptureError(_explain(export_error, trace_error)) from export_error


def _explain(export_error: Exception, trace_error: Exception) -> str:
    first = str(export_error).strip().splitlines()
    headline = next((line for line in first if line.strip()), type(export_error).__name__)
    tip = (
        "Common causes: Python control flow on tensor values (use torch.where or torch.cond), "
        "calls into non-torch code (numpy, .item(), .tolist()) inside forward, or shapes that "
        "depend on data. Rewrite that part of forward, or wrap it in a submodule that is a leaf."
    )
    return (
        "could not capture the model.\n"
        f"  torch.export: {type(export_error).__name__}: {headline}\n"
        f"  fx.symbolic_trace: {type(trace_error).__name__}: {str(trace_error).strip().splitlines()[0] if str(trace_error).strip() else ''}\n"
        f"  {tip}"
    )
