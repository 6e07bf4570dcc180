"""split: Plan + captured graph -> one fx GraphModule per stage.

Expects a plan whose stage bounds are allowed cuts of the LayerGraph (so a weight read by several
stages is one they may share: ``LayerGraph.ties``). Guarantees, for stage p over layers [lo, hi):
  - its placeholders are the batch-first tensors live across cut lo, in the cut's order;
  - SymInts live across cut lo (functions of the batch size, e.g. a view's leading size) are not
    received but recomputed from the rows of the first input, so any row slice runs;
  - it returns the tensors live across cut hi in the cut's order (the last stage: the model's flat
    outputs); values a later stage needs pass through;
  - parameters and buffers live in every stage that uses them (shared with the captured module; a
    backend copies the stage per device), a tied weight under every name the model gives it; a
    weight several stages read is in each of them (each device's copy trains alike: the program's
    TIE sums their gradients), so every stage's state_dict has every name of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.program import TensorSpec
from asteroid_fx.passes.capture import Captured
from asteroid_fx.passes.linearize import batch_coeffs


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple[int, int]
    module: fx.GraphModule
    inputs: tuple[str, ...]  # names of the tensors it receives (row slices), in order
    input_specs: tuple[TensorSpec, ...]
    input_grads: tuple[bool, ...]  # whether each input needs a gradient sent back
    outputs: tuple[str, ...]
    output_specs: tuple[TensorSpec, ...]
    output_grads: tuple[bool, ...]

    @property
    def owned(self) -> tuple[str, ...]:
        """Every name of its parameters and buffers (a tied weight under each of its names)."""
        return (tuple(n for n, _ in self.module.named_parameters(remove_duplicate=False))
                + tuple(n for n, _ in self.module.named_buffers(remove_duplicate=False)))


def batch_poly(batch: int, coeffs: tuple[int, ...]) -> int:
    """Evaluate a SymInt that is a polynomial in the batch size (highest power first)."""
    out = 0
    for c in coeffs:
        out = out * batch + c
    return out


def tensor_spec(val: Any) -> TensorSpec:
    return TensorSpec(str(val.dtype).removeprefix("torch."), tuple(int(s) for s in val.shape[1:]))


# Ops whose output never carries a gradient even when their input does.
NO_GRAD_OPS = {torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.Tensor.detach}


def grad_flow(gm: fx.GraphModule) -> set[str]:
    """Names of the values that depend on a trainable parameter through differentiable ops
    (model inputs are data: they need no gradient)."""
    trainable = {name for name, p in gm.named_parameters() if p.requires_grad}
    flows: set[str] = set()
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        floating = isinstance(val, torch.Tensor) and val.is_floating_point()
        if n.op == "get_attr":
            if n.target in trainable:
                flows.add(n.name)
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if floating and (any(p.requires_grad for p in mod.parameters())
                             or any(a.name in flows for a in n.all_input_nodes)):
                flows.add(n.name)
        elif n.op in ("call_function", "call_method") and n.target not in NO_GRAD_OPS:
            # a tuple-valued op (batch_norm's training form) flows into its getitems
            carries = floating or isinstance(val, (tuple, list))
            if carries and any(a.name in flows for a in n.all_input_nodes):
                flows.add(n.name)
    return flows


def _hold_under_every_name(module: fx.GraphModule, root: torch.nn.Module) -> None:
    """A tied weight is read under one name but the model's state_dict has all of them: the stage
    that holds it registers it under each (one tensor, so optimizers and copies keep the tie)."""
    held = {id(t) for t in (*module.parameters(), *module.buffers())}
    named = [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]
    have = {n for n, _ in (*module.named_parameters(remove_duplicate=False),
                           *module.named_buffers(remove_duplicate=False))}
    for name, t in named:
        if id(t) not in held or name in have:
            continue
        *path, leaf = name.split(".")
        parent, source = module, root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent, source = getattr(parent, part), getattr(source, part)
        if isinstance(t, torch.nn.Parameter):
            parent.register_parameter(leaf, t)
        else:
            parent.register_buffer(leaf, t, persistent=leaf not in source._non_persistent_buffers_set)


def split(captured: Captured, lg: LayerGraph, plan: Plan) -> tuple[Stage, ...]:
    gm = captured.module
    by_name = {n.name: n for n in gm.graph.nodes}
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    stages = []
    last = len(plan.stages) - 1
    flows = grad_flow(gm)
    for p, sp in enumerate(plan.stages):
        lo, hi = sp.layers
        node_names = [name for layer in lg.layers[lo:hi] for name in layer.nodes]
        in_vals = [by_name[v] for v in lg.cuts[lo].values]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        tensors = [v for v in in_vals if captured.is_batched(v.meta.get("val"))]
        for v in tensors:
            ph = graph.placeholder(v.name)
            ph.meta = dict(v.meta)
            env[v] = ph
        syms = [v for v in in_vals if v not in env]
        if syms:
            batch = graph.call_function(torch.ops.aten.sym_size.int, (env[tensors[0]], 0))
            for v in syms:
                coeffs = batch_coeffs(v.meta["val"], captured)  # linearize allows no other sizes
                env[v] = batch if coeffs == (1, 0) else graph.call_function(batch_poly, (batch, coeffs))

        def arg(n: fx.Node) -> fx.Node:
            if n not in env:
                if n.op != "get_attr":
                    raise AssertionError(f"stage {p}: value {n.name!r} is neither received nor computed here")
                env[n] = graph.get_attr(n.target)
                env[n].meta = dict(n.meta)
            return env[n]

        for name in node_names:
            node = by_name[name]
            env[node] = graph.node_copy(node, arg)
        if p == last:
            flat = output_node.args[0]
            out_vals = [a for a in flat if isinstance(a, fx.Node)]
            graph.output(tuple(arg(a) if isinstance(a, fx.Node) else a for a in flat))
        else:
            out_vals = [by_name[v] for v in lg.cuts[hi].values if captured.is_batched(by_name[v].meta.get("val"))]
            graph.output(tuple(arg(v) for v in out_vals))
        graph.eliminate_dead_code = None  # type: ignore[assignment]  # keep side-effect nodes (buffer updates)
        module = fx.GraphModule(gm, graph, class_name=f"Stage{p}")
        _hold_under_every_name(module, gm)
        stages.append(Stage(
            index=p, layers=(lo, hi), module=module,
            inputs=tuple(v.name for v in tensors),
            input_specs=tuple(tensor_spec(v.meta["val"]) for v in tensors),
            input_grads=tuple(v.name in flows for v in tensors),
            outputs=tuple(v.name for v in out_vals),
            output_specs=tuple(tensor_spec(v.meta["val"]) for v in out_vals if isinstance(v.meta.get("val"), torch.Tensor)),
            output_grads=tuple(v.name in flows for v in out_vals),
        ))
    return tuple(stages)
