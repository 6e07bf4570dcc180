"""split: Plan + captured graph -> one fx GraphModule per stage.

Expects a plan whose stage bounds are allowed cuts of the LayerGraph (so a weight read by several
stages is one they may share: ``LayerGraph.ties``). Guarantees, for stage p over layers [lo, hi):
  - its placeholders are the batch-first tensors live across cut lo, in the cut's order;
  - SymInts live across cut lo (functions of the batch size, e.g. a view's leading size) are not
    received but recomputed from the rows of the first input, so any row slice runs;
  - the other values of the cut's ``recomputed`` (position ids, rotary tables, masks built from
    sizes: values that do not depend on the batch's data) are not received either: the ops that
    compute them are copied into the stage, with the buffers they read registered as
    non-persistent copies (``Stage.copies``: not in its state_dict, not among what it owns);
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
from asteroid_fx.passes.recompute import batch_coeffs, is_literal, recompute_closure


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
    # buffers it holds only to recompute values that do not depend on the batch (another stage owns them)
    copies: tuple[str, ...] = ()

    @property
    def owned(self) -> tuple[str, ...]:
        """Every name of its parameters and buffers (a tied weight under each of its names), not
        the copies."""
        return (tuple(n for n, _ in self.module.named_parameters(remove_duplicate=False))
                + tuple(n for n, _ in self.module.named_buffers(remove_duplicate=False) if n not in self.copies))


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
        recomputed = {by_name[v] for v in lg.cuts[lo].recomputed}
        in_vals = [by_name[v] for v in lg.cuts[lo].values]
        graph = fx.Graph()
        env: dict[fx.Node, Any] = {}
        tensors = [v for v in in_vals if captured.is_batched(v.meta.get("val")) and v not in recomputed]
        for v in tensors:
            ph = graph.placeholder(v.name)
            ph.meta = dict(v.meta)
            env[v] = ph
        batch: list[fx.Node] = []  # the rows of the first input, read once where first needed

        def literal(val: Any) -> Any:
            """A constant as it is; a size polynomial in the batch from this stage's rows."""
            if isinstance(val, torch.SymInt):
                if not batch:
                    batch.append(graph.call_function(torch.ops.aten.sym_size.int, (env[tensors[0]], 0)))
                coeffs = batch_coeffs(val, captured)  # linearize allows no other sizes
                return batch[0] if coeffs == (1, 0) else graph.call_function(batch_poly, (batch[0], coeffs))
            if isinstance(val, (tuple, list)):
                return (list if isinstance(val, list) else tuple)(literal(v) for v in val)
            return val

        copied: set[str] = set()

        def recompute(value: fx.Node) -> None:
            """Copy the ops computing ``value`` (it does not depend on the batch's data) into the stage."""
            for n in recompute_closure(value, captured):
                if n in env:
                    continue
                val = n.meta.get("val")
                if is_literal(val, captured):
                    env[n] = literal(val)
                    continue
                if n.op == "get_attr":
                    env[n] = graph.get_attr(n.target)
                    copied.add(n.target)
                else:
                    env[n] = graph.node_copy(n, env.__getitem__)
                env[n].meta = dict(n.meta)

        for v in in_vals:
            if v not in env and captured.is_batch_sym(v.meta.get("val")):
                env[v] = literal(v.meta["val"])

        def arg(n: fx.Node) -> Any:
            if n not in env:
                if n in recomputed:
                    recompute(n)
                elif n.op == "get_attr":
                    env[n] = graph.get_attr(n.target)
                    env[n].meta = dict(n.meta)
                else:
                    raise AssertionError(f"stage {p}: value {n.name!r} is neither received nor computed here")
            return env[n]

        for name in node_names:
            node = by_name[name]
            env[node] = graph.node_copy(node, arg)
        if p == last:
            flat = output_node.args[0]
            out_vals = [a for a in flat if isinstance(a, fx.Node)]
            graph.output(tuple(arg(a) if isinstance(a, fx.Node) else a for a in flat))
        else:
            sent = set(lg.cuts[hi].values) - set(lg.cuts[hi].recomputed)
            out_vals = [by_name[v] for v in lg.cuts[hi].values
                        if v in sent and captured.is_batched(by_name[v].meta.get("val"))]
            graph.output(tuple(arg(v) for v in out_vals))
        graph.eliminate_dead_code = None  # type: ignore[assignment]  # keep side-effect nodes (buffer updates)
        module = fx.GraphModule(gm, graph, class_name=f"Stage{p}")
        # a buffer its own nodes read too is its own, not a copy
        read = {a.target for name in node_names for a in by_name[name].all_input_nodes if a.op == "get_attr"}
        copies = tuple(sorted(copied - read))
        _hold_copies(module, copies)
        _hold_under_every_name(module, gm)
        stages.append(Stage(
            index=p, layers=(lo, hi), module=module,
            inputs=tuple(v.name for v in tensors),
            input_specs=tuple(tensor_spec(v.meta["val"]) for v in tensors),
            input_grads=tuple(v.name in flows for v in tensors),
            outputs=tuple(v.name for v in out_vals),
            output_specs=tuple(tensor_spec(v.meta["val"]) for v in out_vals if isinstance(v.meta.get("val"), torch.Tensor)),
            output_grads=tuple(v.name in flows for v in out_vals),
            copies=copies,
        ))
    return tuple(stages)


def _hold_copies(module: fx.GraphModule, names: tuple[str, ...]) -> None:
    """A buffer a stage reads only to recompute a batch-independent value is held as a
    non-persistent buffer: its owner stage saves it, so the weights count it once. No op writes
    it (``recompute`` allows none), so the copies stay equal to the owner's."""
    for name in names:
        *path, leaf = name.split(".")
        parent = module.get_submodule(".".join(path)) if path else module
        parent.register_buffer(leaf, getattr(parent, leaf), persistent=False)
