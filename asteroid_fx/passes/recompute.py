"""recompute: which values of a captured graph do not depend on the batch's data, and what
recomputing them costs.

Position ids from ``arange``, rotary ``cos``/``sin`` from a buffer, causal masks built from sizes:
such a value is the same whatever rows a stage runs, so a stage that needs it computes it again
instead of receiving it (docs/semantics.md, "Values that do not depend on the batch").
``linearize`` decides from ``Recompute`` which values crossing a cut are recomputed; ``split``
copies their ops (``recompute_closure``) into the stage that needs them.

A value is batch-independent when it is
  - a size, dtype or device read off any tensor (``x.shape[1]`` does not depend on x's data), a
    plain number, or a SymInt that is an integer polynomial in the batch size (recomputed from the
    stage's rows, as ``split`` does for sizes);
  - a buffer or tensor constant that no op writes in place (a BatchNorm running mean is not);
  - the output of a deterministic op whose every input is batch-independent.
It is not when it reads a placeholder's data, a parameter (a parameter has one owner stage, and
its gradient one path), a module call, a random op (a second draw would differ), or a tensor that
an op writes in place (recomputed, it would miss the write).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import sympy
import torch
from torch import fx

from asteroid_fx.passes.capture import Captured

COMPUTE_OPS = ("call_function", "call_method", "call_module")

# A value is recomputed only when its ops cost at most this share of one row's forward pass
# through the whole model. Below it the recomputation is left out of the cost model: once per
# micro-batch per stage, it stays under a few percent of a stage's compute even for one-row chunks
# on the deepest pipelines the planner builds. Above it a batch-first value is sent instead, and
# any other forbids the cuts it crosses (the reason says so).
RECOMPUTE_SHARE = 0.01
# ... or at most this many operations, whatever the model: microseconds on any device, less than
# the launch overhead of the stage's own ops (tiny models would otherwise recompute nothing)
RECOMPUTE_FLOOR = 1e5

_ATEN = torch.ops.aten
_SIZE_OPS = {_ATEN.sym_size.int, _ATEN.sym_numel.default, _ATEN.sym_stride.int,
             _ATEN.sym_storage_offset.default}
_SIZE_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "stride", "get_device"}
_SIZE_ATTRS = {"shape", "ndim", "dtype", "device", "layout", "is_cuda"}
# random functions and methods outside aten (the symbolic_trace fallback); aten ops carry a tag
_RANDOM_NAMES = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli",
                 "normal", "multinomial", "poisson", "dropout", "dropout1d", "dropout2d", "dropout3d",
                 "alpha_dropout", "feature_alpha_dropout", "rrelu", "uniform", "random", "exponential",
                 "geometric", "cauchy", "log_normal"}
_DATA = "depends on the batch's data"
_LITERALS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def batch_coeffs(val: Any, captured: Captured) -> tuple[int, ...] | None:
    """A SymInt's integer polynomial in the batch size (highest power first), or None when it is
    not one (e.g. ``batch // 2``): only such sizes can be recomputed from a row slice's batch."""
    if not captured.is_batch_sym(val):
        return None
    try:
        coeffs = sympy.Poly(val.node.expr, captured.batch_symbol).all_coeffs()
    except sympy.PolynomialError:
        return None
    if not all(getattr(c, "is_integer", False) for c in coeffs):
        return None
    return tuple(int(c) for c in coeffs)


def is_literal(val: Any, captured: Captured) -> bool:
    """Whether a traced value can be written into a stage as it is: a plain constant, a size that
    is a polynomial in the batch (``split`` rebuilds it from the stage's rows), or a tuple of them."""
    if isinstance(val, torch.SymInt):
        return batch_coeffs(val, captured) is not None
    if isinstance(val, (torch.SymFloat, torch.SymBool)):
        return False
    if isinstance(val, (tuple, list)):
        return all(is_literal(v, captured) for v in val)
    return isinstance(val, _LITERALS)


def _is_size_query(node: fx.Node) -> bool:
    """A read of a tensor's size, dtype or device: its value does not depend on the tensor's data."""
    t = node.target
    if node.op == "call_method":
        return t in _SIZE_METHODS
    if node.op != "call_function":
        return False
    if t in _SIZE_OPS:
        return True
    if t is getattr and len(node.args) == 2:
        return node.args[1] in _SIZE_ATTRS
    return getattr(t, "__name__", None) in _SIZE_METHODS and getattr(t, "__objclass__", None) is torch.Tensor


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    return getattr(t, "__name__", str(t))


def _is_random(node: fx.Node) -> bool:
    if isinstance(node.target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in node.target.tags
    return _op_name(node).rstrip("_") in _RANDOM_NAMES


def _written(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """The inputs ``node`` writes in place."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        out = []
        for i, a in enumerate(t._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            out.extend(x for x in (v if isinstance(v, (tuple, list)) else (v,)) if isinstance(x, fx.Node))
        return out
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return []
    name = _op_name(node)
    in_place = (t is operator.setitem or node.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.startswith("__")))
    if node.op == "call_module":
        in_place = getattr(gm.get_submodule(t), "inplace", False) is True
    return [first] if in_place else []


def _aliases(node: fx.Node) -> set[fx.Node]:
    """``node`` and every tensor it may be a view of: back through ops whose output may alias an
    input (every op outside aten, to be safe)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        t = n.target
        if isinstance(t, torch._ops.OpOverload) and all(r.alias_info is None for r in t._schema.returns):
            continue  # a fresh tensor: writing it changes none of its inputs
        if n.op in COMPUTE_OPS:
            stack.extend(a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor))
    return seen


@dataclasses.dataclass(frozen=True)
class Recompute:
    """What ``analyse`` found: ``why`` maps every value to the reason it depends on the batch's
    data ("" when it does not); ``work`` maps every batch-independent value to what recomputing
    it costs (FLOPs per the stats, plus one per element each op writes, a batch size counted as
    one row); ``limit`` is ``RECOMPUTE_SHARE`` of one row's forward through the whole model, or
    ``RECOMPUTE_FLOOR`` if more."""

    captured: Captured
    why: dict[fx.Node, str]
    work: dict[fx.Node, float]
    limit: float

    def recomputable(self, node: fx.Node) -> bool:
        return self.why.get(node) == "" and self.work[node] <= self.limit



def recompute_closure(node: fx.Node, captured: Captured) -> list[fx.Node]:
    """The nodes a stage copies to recompute ``node``, in graph order: literals (constants and
    batch-size polynomials) end the walk and are kept, as ``split`` writes them in."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if not is_literal(n.meta.get("val"), captured):
            stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _elements_per_row(val: Any, captured: Captured) -> float:
    if isinstance(val, (tuple, list)):
        return sum(_elements_per_row(v, captured) for v in val)
    if not isinstance(val, torch.Tensor):
        return 0.0
    count = 1.0
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            d = expr.subs(captured.batch_symbol, 1) if captured.batch_symbol is not None else expr
            d = int(d) if getattr(d, "is_number", False) else captured.example_batch
        count *= int(d)
    return count


def _node_work(node: fx.Node, captured: Captured) -> float:
    stats = node.meta.get("asteroid.stats")
    flops = stats.flops_per_row + stats.flops_fixed if stats is not None else 0.0
    return flops + _elements_per_row(node.meta.get("val"), captured)


def analyse(captured: Captured) -> Recompute:
    """Every value's dependence on the batch's data and, for those that have none, the cost of
    recomputing it (see the module docstring for the rules)."""
    gm = captured.module
    parameters = dict(gm.named_parameters(remove_duplicate=False))
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    written: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        for target in _written(n, gm) if n.op in COMPUTE_OPS else ():
            for a in _aliases(target):
                written.setdefault(a, n.name)

    why: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        literal = is_literal(val, captured)
        if n in written:
            why[n] = f"is written in place (by {written[n]!r})"
        elif n.op == "placeholder":
            why[n] = _DATA
        elif n.op == "output":
            continue
        elif n.op == "get_attr":
            held = operator.attrgetter(n.target)(gm)
            if n.target in parameters or isinstance(held, torch.nn.Parameter):
                why[n] = f"is computed from parameter {n.target!r}"
            elif not isinstance(held, torch.Tensor):
                why[n] = f"is computed from module {n.target!r}"
            elif any(n.target.startswith(m + ".") for m in modules):
                why[n] = f"is computed from {n.target!r}, a buffer of a module call"
            else:
                why[n] = ""
        elif _is_size_query(n) and literal:
            why[n] = ""
        elif isinstance(val, torch.SymInt) and captured.is_batch_sym(val) and not literal:
            why[n] = f"is the size {val.node.expr}, not a polynomial in the batch size"
        else:
            # the batch's data first, then what the op is, then the first reason an input has
            reasons = [r for r in (why.get(a, _DATA) for a in n.all_input_nodes) if r]
            if _DATA in reasons:
                why[n] = _DATA
            elif n.op == "call_module":
                why[n] = f"comes from module {n.target!r}"
            elif _is_random(n):
                why[n] = f"is random ({_op_name(n)!r}: another stage would draw other numbers)"
            else:
                why[n] = (reasons or [""])[0]

    work: dict[fx.Node, float] = {}
    for n in gm.graph.nodes:
        if why.get(n) == "":
            nodes = recompute_closure(n, captured)
            work[n] = sum(_node_work(m, captured) for m in nodes
                          if m.op in COMPUTE_OPS and not is_literal(m.meta.get("val"), captured))
    total = sum(_node_work(n, captured) for n in gm.graph.nodes if n.op in COMPUTE_OPS)
    return Recompute(captured, why, work, max(RECOMPUTE_FLOOR, RECOMPUTE_SHARE * total))
