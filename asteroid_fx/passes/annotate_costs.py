"""annotate_costs: write what every node costs into node.meta.

Expects a ``Captured`` graph. Runs it once on the example inputs (no grad; buffers restored after)
and records, per compute node:
  node.meta["asteroid.stats"] = NodeStats    FLOPs (torch's FlopCounterMode), bytes moved, params
  node.meta["asteroid.cost"]  = {device kind: Cost}   the roofline of that kind over those stats
Measured profiles replace the Cost entries later; the stats stay, since the planner's memory model
reads them.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from asteroid_fx.ir import catalog
from asteroid_fx.ir.catalog import DeviceKind
from asteroid_fx.cost.roofline import roofline
from asteroid_fx.ir.costs import NodeStats
from asteroid_fx.ir.errors import InputError
from asteroid_fx.passes.capture import Captured

COMPUTE_OPS = ("call_function", "call_method", "call_module")


def _leaves(value: Any, traced: Any) -> list[tuple[Any, Any]]:
    """(runtime value, traced value) pairs of every leaf; the traced one says which dim is the
    batch (a shape that merely equals the batch size, like a sequence length, is not)."""
    values, metas = pytree.tree_leaves(value), pytree.tree_leaves(traced)
    return list(zip(values, metas)) if len(values) == len(metas) else [(v, None) for v in values]


def _row_bytes(pairs: Iterable[tuple[Any, Any]], captured: Captured, rows: int) -> float:
    return sum(v.numel() * v.element_size() for v, traced in pairs
               if isinstance(v, torch.Tensor) and captured.is_batched(traced)) / rows


def _grows_with_batch(traced: Any, captured: Captured) -> bool:
    """Whether a traced tensor's size depends on the batch: batch-first, or with the batch folded
    into a dim (GPT-2's ``x.view(-1, n)`` before its addmm: dim 0 is rows x sequence)."""
    if captured.is_batched(traced):
        return True
    if not isinstance(traced, torch.Tensor) or captured.batch_symbol is None:
        return False
    return any(isinstance(d, torch.SymInt) and captured.batch_symbol in d.node.expr.free_symbols
               for d in traced.shape)


class _StatsInterpreter(fx.Interpreter):
    def __init__(self, captured: Captured, rows: int):
        super().__init__(captured.module)
        self.captured = captured
        self.rows = rows
        self.params = {id(t) for t in captured.module.parameters()} | {id(t) for t in captured.module.buffers()}
        self.current: fx.Node | None = None  # the node running now, for the error when one fails

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        if n.op not in COMPUTE_OPS:
            return super().run_node(n)
        counter = FlopCounterMode(display=False)
        with counter:
            out = super().run_node(n)
        batch = self.rows
        ins = [pair for a in n.all_input_nodes for pair in _leaves(self.env[a], a.meta.get("val"))]
        outs = _leaves(out, n.meta.get("val"))
        flat_in = [v for v, _ in ins]
        flat_out = [v for v, _ in outs]
        param_bytes = sum(t.numel() * t.element_size() for t in flat_in
                          if isinstance(t, torch.Tensor) and id(t) in self.params)
        if n.op == "call_module":
            mod = self.captured.module.get_submodule(n.target)
            param_bytes += sum(p.numel() * p.element_size() for p in mod.parameters())
        acts_in = [(t, m) for t, m in ins if not (isinstance(t, torch.Tensor) and id(t) in self.params)]
        in_row = _row_bytes(acts_in, self.captured, batch)
        out_row = _row_bytes(outs, self.captured, batch)
        # the FLOPs scale with the rows when any activation's size does (also one whose batch dim
        # is folded into another: a matmul over rows x tokens)
        batched = any(isinstance(t, torch.Tensor) and _grows_with_batch(m, self.captured) for t, m in outs + acts_in)
        flops = float(counter.get_total_flops())
        requires_grad = any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in flat_out)
        n.meta["asteroid.stats"] = NodeStats(
            flops_per_row=flops / batch if batched else 0.0,
            flops_fixed=0.0 if batched else flops,
            bytes_per_row=in_row + out_row,
            param_bytes=int(param_bytes),
            out_bytes_per_row=out_row,
            # most differentiable ops keep their inputs for backward; integer outputs keep nothing
            saved_bytes_per_row=in_row if requires_grad else 0.0,
        )
        return out


def _where(node: fx.Node | None) -> str:
    """A node as a user recognises it: its module path and op, else its graph name."""
    if node is None:
        return "the graph's inputs"
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    op = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} ({op}{' in module ' + repr(path) if path else ''})"


def annotate_costs(captured: Captured, kinds: Iterable[str] | Mapping[str, DeviceKind]) -> Captured:
    """Attach NodeStats and an analytic Cost per device kind to every compute node (in place on meta).
    ``kinds``: kind names (their figures from the catalog) or, by name, the figures to use (a
    cluster's ``device_kinds()``: a measured kind as the cluster carries it)."""
    gm = captured.module
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    # Stats are per row, so two rows give the same numbers as the whole example at a fraction of
    # the time (two, not one: BatchNorm without spatial dims rejects a single row). Only with a
    # symbolic batch dim, which tells batch dims from sizes that merely equal the batch.
    rows = min(captured.example_batch, 2) if captured.batch_symbol is not None else captured.example_batch
    inputs = [x[:rows] if isinstance(x, torch.Tensor) and x.dim() > 0 and rows < captured.example_batch else x
              for x in captured.example_inputs]
    interpreter = _StatsInterpreter(captured, rows)
    try:
        with torch.no_grad():
            interpreter.run(*inputs)
    except Exception as e:  # the example does not run through its own graph: say where, not how
        raise InputError(f"the model fails on the example inputs at {_where(interpreter.current)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}; check the example's dtypes and "
                         f"shapes against what forward expects (model(*example) must run eagerly)") from None
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])
    specs = dict(kinds) if isinstance(kinds, Mapping) else {k: catalog.kind(k) for k in set(kinds)}
    for n in gm.graph.nodes:
        stats = n.meta.get("asteroid.stats")
        if stats is None:
            continue
        n.meta["asteroid.cost"] = {
            k: roofline(stats, s.peak_flops, s.memory_bandwidth, s.efficiency, s.overhead_s)
            for k, s in specs.items()
        }
    return captured
