"""annotate_costs: write what every node costs into node.meta.

Expects a ``Captured`` graph. Runs it on the example inputs with gradients (no backward; buffers
restored after) and records, per compute node:
  node.meta["asteroid.stats"] = NodeStats    FLOPs (torch's FlopCounterMode), bytes moved, params,
                                             and the bytes autograd saves for backward
  node.meta["asteroid.cost"]  = {device kind: Cost}   the roofline of that kind over those stats
Saved bytes are what autograd's saved-tensor hooks see the node keep, each storage once (at the
first node that saves it), weights left out, per row: what a run on one more row adds, so what
does not grow with the batch drops out. Measured profiles replace the Cost entries later; the stats
stay, since the planner's memory model reads them.
"""

from __future__ import annotations

import dataclasses
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


class _SavingInterpreter(fx.Interpreter):
    """Runs the graph (with gradients, under ``saved_tensors_hooks``) and records per compute node
    the bytes of the storages autograd saves while it runs that no earlier node saved; weights
    (parameters and buffers) are left out, the planner counts them apart.

    A storage counts once, at the first node that saves it: the views of one tensor (q, k, v split
    from one projection), an output kept by its producer's backward and its consumer's (ReLU keeps
    its output, the convolution after it its input), a tensor written in place after it was saved
    are one storage. At a layer boundary that means a tensor saved by layer k-1 and again by layer
    k belongs to layer k-1: while both run in one stage it is held once. When a stage boundary
    falls between them, the later stage holds its own copy, the rows it received, and that is
    charged to it as the stage's input (``Cut.bytes_per_row`` in cost/stage.activation_memory);
    a tensor received there that only the later stage saves is charged twice, input and saved,
    which errs on the safe side."""

    def __init__(self, captured: Captured):
        super().__init__(captured.module)
        gm = captured.module
        self.weights = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}
        self.saved: dict[fx.Node, int] = {}
        self._seen: set[tuple[int, int]] = set()
        self._held: list[torch.Tensor] = []  # every saved tensor, so no freed storage's address is reused
        self.current: fx.Node | None = None  # the node running now, for the error when one fails

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._held.append(t)
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if self.current is not None and key[0] not in self.weights and key not in self._seen:
            self._seen.add(key)
            self.saved[self.current] = self.saved.get(self.current, 0) + st.nbytes()
        return t

    def run(self, *args: Any) -> Any:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            out = super().run(*args)
        self._held.clear()
        return out

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


class _StatsInterpreter(_SavingInterpreter):
    def __init__(self, captured: Captured, rows: int):
        super().__init__(captured)
        self.captured = captured
        self.rows = rows
        self.params = {id(t) for t in captured.module.parameters()} | {id(t) for t in captured.module.buffers()}

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in COMPUTE_OPS:
            return super().run_node(n)
        counter = FlopCounterMode(display=False)
        with counter:
            out = super().run_node(n)
        batch = self.rows
        ins = [pair for a in n.all_input_nodes for pair in _leaves(self.env[a], a.meta.get("val"))]
        outs = _leaves(out, n.meta.get("val"))
        flat_in = [v for v, _ in ins]
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
        n.meta["asteroid.stats"] = NodeStats(
            flops_per_row=flops / batch if batched else 0.0,
            flops_fixed=0.0 if batched else flops,
            bytes_per_row=in_row + out_row,
            param_bytes=int(param_bytes),
            out_bytes_per_row=out_row,
            saved_bytes_per_row=0.0,  # from the saved storages, once the runs are done
        )
        return out


def _with_rows(captured: Captured, rows: int) -> list[Any]:
    """The example inputs with ``rows`` rows in every batch-first one: its rows, repeated as often
    as needed, in a storage of their own (a slice's would hold the whole example, and the saved
    bytes count storages)."""
    placeholders = [n for n in captured.module.graph.nodes if n.op == "placeholder"]
    out = []
    for node, x in zip(placeholders, captured.example_inputs):
        if isinstance(x, torch.Tensor) and captured.is_batched(node.meta.get("val")):
            x = torch.cat([x] * -(-rows // x.shape[0]))[:rows].clone()
        out.append(x)
    return out


def _cuda_devices(gm: fx.GraphModule) -> list[int]:
    return sorted({t.device.index or 0 for t in (*gm.parameters(), *gm.buffers()) if t.device.type == "cuda"})


def _node_stats(gm: fx.GraphModule) -> list[tuple[fx.Node, NodeStats]]:
    return [(n, n.meta["asteroid.stats"]) for n in gm.graph.nodes if "asteroid.stats" in n.meta]


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
    interpreter = _StatsInterpreter(captured, rows)
    try:
        interpreter.run(*_with_rows(captured, rows))
        if captured.batch_symbol is not None:
            # saved bytes per row: what one more row adds (storages grow linearly in the rows), so
            # what does not grow with the batch (masks and tables built from sizes) drops out; on
            # its own random state, so the runs leave the generator where the stats run leaves it
            at_rows = interpreter.saved
            interpreter = _SavingInterpreter(captured)
            with torch.random.fork_rng(devices=_cuda_devices(gm)):
                interpreter.run(*_with_rows(captured, rows + 1))
            for n, stats in _node_stats(gm):
                per_row = interpreter.saved.get(n, 0) - at_rows.get(n, 0)
                n.meta["asteroid.stats"] = dataclasses.replace(stats, saved_bytes_per_row=max(0.0, per_row))
    except Exception as e:  # the example does not run through its own graph: say where, not how
        raise InputError(f"the model fails on the example inputs at {_where(interpreter.current)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}; check the example's dtypes and "
                         f"shapes against what forward expects (model(*example) must run eagerly)") from None
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])
    specs = dict(kinds) if isinstance(kinds, Mapping) else {k: catalog.kind(k) for k in set(kinds)}
    for n, stats in _node_stats(gm):
        n.meta["asteroid.cost"] = {
            k: roofline(stats, s.peak_flops, s.memory_bandwidth, s.efficiency, s.overhead_s)
            for k, s in specs.items()
        }
    return captured
