"""linearize: annotated fx graph -> LayerGraph.

Expects a Captured graph whose compute nodes carry "asteroid.stats" and "asteroid.cost"
(annotate_costs). Guarantees: the layers partition the compute nodes in graph order; a cut is
allowed only if everything live across it either is recomputed by the receiving stage (SymInts
that are integer polynomials in the batch size, and values that do not depend on the batch's data
and are cheap to recompute, listed in ``Cut.recomputed``: passes/recompute.py) or can be sent as
row slices (batch-first tensors), and no buffer written in place, nor module holding buffers, is
used on both sides of it; a parameter or an unwritten buffer read on both sides is a tie
(``LayerGraph.ties``): every stage reading it holds a copy, and a trained one's copies sum their
gradients (a TIE action, docs/semantics.md); a layer lists its nodes that normalize over the rows
they are given in training (``Layer.batch_stats``: BatchNorm, passes/batch_stats.py); with
``max_layers`` the layers are merged until at most that many remain, dropping the most expensive
cuts first while keeping layers balanced (``LayerGraph.coarsening``).
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from asteroid_fx.ir.costs import Cost
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import Cut, Layer, LayerGraph, Tie
from asteroid_fx.passes.batch_stats import batch_stat
from asteroid_fx.passes.capture import Captured
from asteroid_fx.passes.recompute import RECOMPUTE_FLOOR, RECOMPUTE_SHARE, Recompute, analyse, batch_coeffs

COMPUTE_OPS = ("call_function", "call_method", "call_module")


def _value_bytes_per_row(val: Any, captured: Captured) -> float:
    if isinstance(val, torch.Tensor) and captured.is_batched(val):
        per_row = 1
        for s in val.shape[1:]:
            per_row *= int(s)
        return float(per_row * val.element_size())
    return 0.0


def _owned_attrs(node: fx.Node) -> list[str]:
    """Attributes (parameters, buffers, submodules) a compute node reads."""
    owned = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
    if node.op == "call_module":
        owned.append(node.target)
    return owned


def _weight_keys(attr: str, gm: fx.GraphModule) -> list[tuple[Any, str]]:
    """(key, name) pairs that identify what an attribute holds: every tensor under it by identity,
    so a weight tied between two modules (symbolic_trace keeps both modules) is one weight, and a
    submodule that holds buffers by its name (its call may update them)."""
    held = operator.attrgetter(attr)(gm)
    if isinstance(held, torch.nn.Module):
        keys: list[tuple[Any, str]] = [(attr, attr)] if any(True for _ in held.buffers()) else []
        return keys + [(id(t), f"{attr}.{n}") for n, t in (*held.named_parameters(), *held.named_buffers())]
    if isinstance(held, torch.Tensor):
        return [(id(held), attr)]
    return [(attr, attr)]


# Ops that update a buffer they read though their schema does not say so (batch statistics).
_UPDATES_BUFFERS = ("batch_norm", "instance_norm")


def _written(order: list[fx.Node], gm: fx.GraphModule) -> set[int]:
    """Tensors (by identity) that some node may write in place: a copy on every side of a cut
    would drift apart, so their users stay in one stage."""
    out: set[int] = set()
    buffers = {id(b) for b in gm.buffers()}
    for node in order:
        schema = getattr(node.target, "_schema", None)
        name = getattr(node.target, "__name__", str(node.target))
        updates = any(word in name for word in _UPDATES_BUFFERS) or (
            node.op == "call_method" and name.endswith("_") and not name.startswith("__"))
        for i, a in enumerate(node.args):
            if not isinstance(a, fx.Node) or a.op != "get_attr":
                continue
            writes = schema is not None and i < len(schema.arguments) and schema.arguments[i].alias_info is not None \
                and schema.arguments[i].alias_info.is_write
            t = id(operator.attrgetter(a.target)(gm))
            if writes or (updates and t in buffers):
                out.add(t)
    return out


def _may_be_shared(key: Any, written: set[int], tensors: dict[int, Any]) -> bool:
    """Whether a weight may be read on both sides of a cut: each stage then holds a copy, a trained
    parameter's copies summing their gradients (a TIE), a frozen one or a buffer that nothing writes
    staying equal on their own. A buffer written in place, or a module holding buffers, may not."""
    t = tensors.get(key) if isinstance(key, int) else None
    return t is not None and key not in written


def _forbidden_cuts(order: list[fx.Node], gm: fx.GraphModule) -> dict[int, str]:
    """Cuts that would separate two users of one weight that may not be shared: position -> reason."""
    users, names = _weight_users(order, gm)
    written = _written(order, gm)
    tensors = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    forbidden: dict[int, str] = {}
    for key, positions in users.items():
        if _may_be_shared(key, written, tensors):
            continue
        name = " = ".join(repr(n) for n in names[key])
        for k in range(min(positions) + 1, max(positions) + 1):
            forbidden.setdefault(k, f"weight {name} is used on both sides")
    return forbidden


def _weight_users(order: list[fx.Node], gm: fx.GraphModule) -> tuple[dict[Any, list[int]], dict[Any, list[str]]]:
    """Per weight key, the positions of the nodes that read it and the names they read it by."""
    users: dict[Any, list[int]] = {}
    names: dict[Any, list[str]] = {}
    for pos, node in enumerate(order):
        for attr in _owned_attrs(node):
            for key, name in _weight_keys(attr, gm):
                users.setdefault(key, []).append(pos)
                if name not in names.setdefault(key, []):
                    names[key].append(name)
    return users, names


def _ties(order: list[fx.Node], gm: fx.GraphModule, bounds: list[int]) -> tuple[Tie, ...]:
    """The tensors that layers with node bounds ``bounds`` share: read by two layers or more."""
    import bisect

    users, _ = _weight_users(order, gm)
    first_name: dict[int, str] = {}
    every_name: dict[int, list[str]] = {}
    for kind, named in (("param", gm.named_parameters(remove_duplicate=False)),
                        ("buffer", gm.named_buffers(remove_duplicate=False))):
        for n, t in named:
            first_name.setdefault(id(t), n)
            every_name.setdefault(id(t), []).append(n)
    tensors = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    params = {id(t) for t in gm.parameters()}
    out = []
    for key, positions in users.items():
        t = tensors.get(key) if isinstance(key, int) else None
        if t is None:
            continue
        layers = sorted({bisect.bisect_right(bounds, pos) - 1 for pos in positions})
        if len(layers) < 2:
            continue
        kind = ("param" if t.requires_grad else "frozen") if key in params else "buffer"
        names = (first_name[key], *(n for n in every_name[key] if n != first_name[key]))
        out.append(Tie(names, str(t.dtype).removeprefix("torch."), tuple(int(d) for d in t.shape), tuple(layers),
                       t.numel() * t.element_size(), kind))
    return tuple(sorted(out, key=lambda tie: (tie.layers, tie.names)))


def node_cuts(captured: Captured) -> tuple[Cut, ...]:
    """Cut k before the k-th compute node (k = 0..n): what is live across it, and whether a stage
    boundary may go there (``why_not`` says what forbids it). ``linearize`` builds layers on these."""
    gm = captured.module
    order = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    position = {n: i for i, n in enumerate(order)}
    n_nodes = len(order)

    # Every value that can cross a cut: placeholders (defined "before" position 0) and compute nodes.
    first_def: dict[fx.Node, int] = {}
    last_use: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            first_def[n] = 0
        elif n.op in COMPUTE_OPS:
            first_def[n] = position[n] + 1
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            if a in first_def:
                use = n_nodes if n.op == "output" else position.get(n, n_nodes)
                last_use[a] = max(last_use.get(a, -1), use)

    # live[k]: values defined before cut k and used at or after it; cut k is before node order[k].
    live: list[list[fx.Node]] = [[] for _ in range(n_nodes + 1)]
    for v, d in first_def.items():
        for k in range(d, last_use.get(v, -1) + 1):
            live[k].append(v)
    forbidden = _forbidden_cuts(order, gm)
    recompute = analyse(captured)

    cuts: list[Cut] = []
    for k in range(n_nodes + 1):
        vals = sorted(live[k], key=lambda v: (first_def[v], v.name))
        why = forbidden.get(k, "") if 0 < k < n_nodes else ""
        sent, recomputed = [], []
        for v in vals:
            why_v = _crossing(v, captured, recompute)
            if why_v == "recompute":
                recomputed.append(v)
            elif why_v == "send":
                sent.append(v)
            elif not why:
                why = why_v
        if not sent and 0 < k < n_nodes and not why:
            why = "no tensor crosses it"
        cuts.append(Cut(k, tuple(v.name for v in vals),
                        sum(_value_bytes_per_row(v.meta.get("val"), captured) for v in sent),
                        allowed=not why, why_not=why, recomputed=tuple(v.name for v in recomputed)))
    return tuple(cuts)


def _crossing(v: fx.Node, captured: Captured, recompute: Recompute) -> str:
    """How value ``v`` crosses a cut: "recompute" (the receiving stage computes it again: a size
    polynomial in the batch, or a cheap value that does not depend on the batch's data), "send"
    (a batch-first tensor, as row slices), or else why it cannot."""
    val = v.meta.get("val")
    if captured.is_batch_sym(val):
        if batch_coeffs(val, captured) is None:
            return f"size {v.name!r} = {val.node.expr} is not a polynomial in the batch size"
        return "recompute"
    if recompute.recomputable(v):
        return "recompute"
    if captured.is_batched(val):
        return "send"
    why = recompute.why.get(v, "depends on the batch's data")
    if why:
        return f"value {v.name!r} is not a batch-first tensor and {why}"
    return (f"value {v.name!r} is not a batch-first tensor; it does not depend on the batch, but recomputing "
            f"it in the next stage ({recompute.work[v]:.3g} FLOPs) costs over {recompute.limit:.3g} FLOPs "
            f"(the larger of {RECOMPUTE_SHARE:.0%} of one row's forward and {RECOMPUTE_FLOOR:.0e})")


def linearize(captured: Captured, max_layers: int | None = None) -> LayerGraph:
    gm = captured.module
    order = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    n_nodes = len(order)
    if n_nodes == 0:
        raise InputError("the captured graph has no compute nodes: there is nothing to partition")
    cuts = node_cuts(captured)

    # One unit per node, merged across forbidden cuts; then coarsened to max_layers by the
    # layer graph's own rule (LayerGraph.coarsening), which the planner also searches long graphs by
    bounds = [0] + [k for k in range(1, n_nodes) if cuts[k].allowed] + [n_nodes]
    if max_layers is not None and len(bounds) - 1 > max_layers:
        fine = _layer_graph(captured, order, cuts, bounds)
        bounds = [bounds[b] for b in fine.coarsening(max_layers)]
    return _layer_graph(captured, order, cuts, bounds)


def _layer_graph(captured: Captured, order: list[fx.Node], cuts: tuple[Cut, ...], bounds: list[int]) -> LayerGraph:
    """The layers between node positions ``bounds``."""
    gm = captured.module

    # every name of a tied weight: the graph may read it under the alias that named_* drops
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    kinds = _kinds(order)
    layers = []
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        nodes = order[lo:hi]
        owned = sorted({a for n in nodes for a in _owned_attrs(n)})
        names = _expand_attrs(owned, params, buffers)
        layers.append(Layer(
            index=i,
            nodes=tuple(n.name for n in nodes),
            costs=tuple((k, _sum_costs([n.meta["asteroid.cost"][k] for n in nodes if "asteroid.cost" in n.meta]))
                        for k in kinds),
            param_bytes=_unique_bytes(params[p] for p in names if p in params),
            buffer_bytes=_unique_bytes(buffers[b] for b in names if b in buffers),
            saved_bytes_per_row=sum(n.meta["asteroid.stats"].saved_bytes_per_row for n in nodes
                                    if "asteroid.stats" in n.meta),
            params=tuple(names),
            batch_stats=tuple(b for n in nodes if (b := batch_stat(gm, n)) is not None),
            flops_per_row=sum(n.meta["asteroid.stats"].flops_per_row for n in nodes if "asteroid.stats" in n.meta),
        ))
    layer_cuts = tuple(dataclasses_replace_index(cuts[b], i) for i, b in enumerate(bounds))
    # the reason that forbids the most cuts first: an error or `asteroid compile` names the first few
    reasons = Counter(c.why_not for c in cuts[1:-1] if not c.allowed)
    blocked = tuple(sorted(reasons, key=lambda why: -reasons[why]))
    return LayerGraph(tuple(layers), layer_cuts, blocked, _ties(order, gm, bounds))


def _unique_bytes(tensors) -> int:
    """Bytes of distinct tensors: a weight read under two names is stored once."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def dataclasses_replace_index(cut: Cut, index: int) -> Cut:
    import dataclasses

    return dataclasses.replace(cut, index=index)


def _expand_attrs(owned: list[str], params: dict, buffers: dict) -> list[str]:
    """Attribute names -> parameter and buffer names (a call_module owns everything below it)."""
    names: list[str] = []
    for attr in owned:
        if attr in params or attr in buffers:
            names.append(attr)
            continue
        prefix = attr + "."
        names.extend(n for n in list(params) + list(buffers) if n.startswith(prefix))
    # a tied weight is owned under all its names, so the owner stage's state_dict has every key
    tensors = {**params, **buffers}
    held = {id(tensors[n]) for n in names}
    names.extend(n for n, t in tensors.items() if id(t) in held)
    return sorted(set(names))


def _kinds(order: list[fx.Node]) -> list[str]:
    for n in order:
        if "asteroid.cost" in n.meta:
            return sorted(n.meta["asteroid.cost"])
    return []


def _sum_costs(costs: list[Cost]) -> Cost:
    from asteroid_fx.ir.costs import TimeFit

    fwd, bwd = TimeFit.zero(), TimeFit.zero()
    for c in costs:
        fwd, bwd = fwd + c.fwd, bwd + c.bwd
    source = costs[0].source if costs else "analytic"
    return Cost(fwd, bwd, source)


