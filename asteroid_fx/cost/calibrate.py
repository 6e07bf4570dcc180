"""calibrate: the catalog's analytic costs scaled by what one real device measured, so that device
kinds you do not have get realistic profiles.

The roofline gets the shape of a layer's cost right (which ops, how many FLOPs and bytes, how many
ops pay a fixed overhead) but not how efficient each kind of op really is. A ``Calibration`` holds,
per direction, one factor per op class on the roofline's compute time (convolutions, matrix
products, normalisations, ...) and one on its per-op overhead, fitted so that
``sum(factor x analytic)`` matches every (layer, rows) cell of a measured profile (non-negative
least squares on relative error). Applied to another kind's roofline it assumes that kind falls
short of its spec sheet the way the measured one did, which holds best between devices of one
family (CPU to CPU, GPU to GPU): calibrate from the device nearest to the one you lack.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.fx as fx

from asteroid_fx.ir import catalog
from asteroid_fx.cost.roofline import roofline
from asteroid_fx.ir.costs import Cost, NodeStats
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.profile import (Cell, DeviceInfo, DeviceProfile, LayerProfile, Method, Overhead, Timing,
                                 graph_key)

if TYPE_CHECKING:  # calibration reads only a capture's graph (``.module``), and needs no pass to run
    from asteroid_fx.passes.capture import Captured

# Op classes by aten op name (the overload packet); ops not listed are elementwise.
OP_CLASSES: dict[str, str] = {
    **dict.fromkeys(("convolution", "conv1d", "conv2d", "conv3d", "conv_transpose2d", "_convolution"), "conv"),
    **dict.fromkeys(("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "einsum",
                     "scaled_dot_product_attention", "_scaled_dot_product_flash_attention"), "matmul"),
    **dict.fromkeys(("batch_norm", "_native_batch_norm_legit_functional", "_native_batch_norm_legit",
                     "native_batch_norm", "layer_norm", "native_layer_norm", "group_norm", "rms_norm",
                     "softmax", "_softmax", "log_softmax", "_log_softmax"), "norm"),
    **dict.fromkeys(("max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                     "_adaptive_avg_pool2d", "mean", "sum", "amax", "cross_entropy", "nll_loss"), "reduce"),
    **dict.fromkeys(("view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "flatten",
                     "squeeze", "unsqueeze", "slice", "select", "getitem", "contiguous", "clone",
                     "split", "chunk", "alias", "detach", "size", "sym_size", "cat", "embedding"), "layout"),
}
DEFAULT_CLASS = "elementwise"
CLASSES = ("conv", "matmul", "norm", "reduce", "layout", DEFAULT_CLASS)
OVERHEAD = "overhead"  # the factor on the roofline's fixed per-op cost


def op_class(node: fx.Node) -> str:
    """The class of an fx node: by its aten op name, or its module/method name, default elementwise."""
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    if hasattr(target, "overloadpacket"):
        name = target.overloadpacket.__name__
    if node.op == "call_module":
        name = type(node.graph.owning_module.get_submodule(node.target)).__name__.lower()
        name = {"conv2d": "conv2d", "linear": "linear", "batchnorm2d": "batch_norm",
                "layernorm": "layer_norm"}.get(name, name)
    return OP_CLASSES.get(name.split(".")[0], DEFAULT_CLASS)


@dataclasses.dataclass(frozen=True)
class Calibration:
    kind: str  # the device kind that was measured
    fwd: tuple[tuple[str, float], ...]  # (op class or OVERHEAD, factor on the roofline)
    bwd: tuple[tuple[str, float], ...]
    stage_overhead_ops: tuple[float, float]  # typical call overhead per stage, in the kind's overhead_s
    fit_error: tuple[float, float]  # median relative error of the fit on its own cells (fwd, bwd)
    sources: tuple[str, ...] = ()  # models whose profiles it was fitted on

    def factor(self, direction: str, name: str) -> float:
        table = dict(self.fwd if direction == "fwd" else self.bwd)
        return table.get(name, table.get("all", 1.0))

    def __str__(self) -> str:
        lines = [f"Calibration from {self.kind} ({', '.join(self.sources) or 'unknown models'}): factor on the "
                 f"roofline per op class; fit error fwd {self.fit_error[0]:.1%}, bwd {self.fit_error[1]:.1%}"]
        names = [n for n, _ in self.fwd]
        lines.append("  " + " ".join(f"{n:>11}" for n in ["", *names]))
        for direction, table in (("fwd", self.fwd), ("bwd", self.bwd)):
            lines.append("  " + f"{direction:>11}" + " ".join(f"{v:>11.3g}" for _, v in table))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Features: the roofline of each layer split by op class


def _layer_nodes(captured: Captured, lg: LayerGraph) -> list[list[fx.Node]]:
    by_name = {n.name: n for n in captured.module.graph.nodes}
    return [[by_name[name] for name in layer.nodes] for layer in lg.layers]


def _features(nodes: Sequence[fx.Node], kind: catalog.DeviceKind) -> list[tuple[str, Cost, int]]:
    """(class, compute-only roofline Cost, 1) per node with stats; the overhead is counted apart."""
    out = []
    for n in nodes:
        stats: NodeStats | None = n.meta.get("asteroid.stats")
        if stats is None:
            continue
        out.append((op_class(n), roofline(stats, kind.peak_flops, kind.memory_bandwidth, kind.efficiency, 0.0), 1))
    return out


def _row(feats: list[tuple[str, Cost, int]], kind: catalog.DeviceKind, direction: str, rows: float) -> np.ndarray:
    x = np.zeros(len(CLASSES) + 1)
    for cls, cost, _ in feats:
        x[CLASSES.index(cls)] += (cost.fwd if direction == "fwd" else cost.bwd)(rows)
    x[-1] = len(feats) * kind.overhead_s
    return x


def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Non-negative least squares, min |a x - b| with x >= 0 (Lawson and Hanson's active set)."""
    n = a.shape[1]
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    for _ in range(3 * n + 1):
        w = a.T @ (b - a @ x)
        if passive.all() or (w[~passive] <= tol).all():
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            shrink = passive & (z <= tol)
            alpha = np.min(x[shrink] / np.maximum(x[shrink] - z[shrink], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def fit(sources: Sequence[tuple[Captured, LayerGraph, DeviceProfile]]) -> Calibration:
    """Fit a Calibration to measured profiles (of one device kind; one model or several)."""
    if not sources:
        raise InputError("calibrate.fit needs at least one measured profile")
    kinds = {p.kind for _, _, p in sources}
    if len(kinds) != 1:
        raise InputError(f"calibrate from one device kind at a time, got profiles of {', '.join(sorted(kinds))}")
    kind_name = kinds.pop()
    spec = catalog.kind(kind_name)
    tables, errors = {}, []
    for direction in ("fwd", "bwd"):
        xs, ys = [], []
        for captured, lg, profile in sources:
            for nodes, lp in zip(_layer_nodes(captured, lg), profile.layers):
                feats = _features(nodes, spec)
                cost = profile.layer_cost(lp.index)
                for cell in lp.cells:
                    y = (cost.fwd if direction == "fwd" else cost.bwd)(cell.rows)
                    if y > 1e-6:  # a direction that ran nothing says nothing about efficiency
                        xs.append(_row(feats, spec, direction, cell.rows))
                        ys.append(y)
        if not ys:  # nothing ran in this direction (e.g. no parameters): no evidence, no scaling
            tables[direction] = tuple((c, 1.0) for c in (*CLASSES, OVERHEAD, "all"))
            errors.append(0.0)
            continue
        a, y = np.array(xs), np.array(ys)
        weights = 1.0 / y  # relative error: small layers count as much as big ones
        used = a.sum(axis=0) > 0
        factors = np.ones(a.shape[1])
        factors[used] = nnls(a[:, used] * weights[:, None], np.ones(len(y)))
        # classes a model does not have take the overall ratio of compute measured to modelled
        compute = a[:, :-1].sum(axis=1)
        overall = float(nnls(np.stack([compute, a[:, -1]], 1) * weights[:, None], np.ones(len(y)))[0])
        table = [(c, float(factors[i]) if used[i] else overall) for i, c in enumerate(CLASSES)]
        table += [(OVERHEAD, float(factors[-1])), ("all", overall)]
        tables[direction] = tuple(table)
        errors.append(float(statistics.median(np.abs(a @ factors / y - 1.0))))
    c = [statistics.mean(getattr(p.overhead, d) for _, _, p in sources) for d in ("fwd", "bwd")]
    return Calibration(kind=kind_name, fwd=tables["fwd"], bwd=tables["bwd"],
                       stage_overhead_ops=(c[0] / spec.overhead_s, c[1] / spec.overhead_s),
                       fit_error=(errors[0], errors[1]), sources=tuple(sorted({p.model for _, _, p in sources})))


# ----------------------------------------------------------------------------------------------
# Applying a calibration


def layer_time(nodes: Sequence[fx.Node], calibration: Calibration, kind: str, direction: str, rows: float) -> float:
    """Calibrated seconds of one layer (without the per-stage call cost) on ``kind``."""
    spec = catalog.kind(kind)
    x = _row(_features(nodes, spec), spec, direction, rows)
    f = np.array([calibration.factor(direction, c) for c in CLASSES] + [calibration.factor(direction, OVERHEAD)])
    return float(x @ f)


def calibrated_profile(captured: Captured, lg: LayerGraph, calibration: Calibration, kind: str, *,
                       rows: Sequence[int], model: str = "", max_layers: int | None = None,
                       memory_from: DeviceProfile | None = None) -> DeviceProfile:
    """A DeviceProfile (source "calibrated") of ``lg`` for ``kind``: the calibrated roofline at
    ``rows``. Memory per cell (saved bytes, which of them are boundary tensors, peak) comes from
    ``memory_from`` (a measured profile of this graph) when given, else from the analytic saved
    bytes, which count each tensor once already."""
    spec = catalog.kind(kind)
    overhead = Overhead(calibration.stage_overhead_ops[0] * spec.overhead_s,
                        calibration.stage_overhead_ops[1] * spec.overhead_s)
    rows = tuple(sorted(set(rows)))
    layers = []
    for i, nodes in enumerate(_layer_nodes(captured, lg)):
        layer = lg.layers[i]
        measured = memory_from.layers[i] if memory_from is not None else None
        cells = []
        for r in rows:
            mem = measured.cell(r) if measured is not None else None
            saved = mem.saved_bytes if mem else int(layer.saved_bytes_per_row * r)
            cells.append(Cell(r, Timing.exact(layer_time(nodes, calibration, kind, "fwd", r) + overhead.fwd),
                              Timing.exact(layer_time(nodes, calibration, kind, "bwd", r) + overhead.bwd),
                              saved_bytes=saved, peak_bytes=mem.peak_bytes if mem else saved,
                              boundary=mem.boundary if mem else None))
        layers.append(LayerProfile(index=i, first=layer.nodes[0] if layer.nodes else "",
                                   last=layer.nodes[-1] if layer.nodes else "", nodes=len(layer.nodes),
                                   param_bytes=layer.param_bytes, buffer_bytes=layer.buffer_bytes,
                                   grad_bytes=measured.grad_bytes if measured else layer.param_bytes,
                                   optimizer_bytes=measured.optimizer_bytes if measured else 2 * layer.param_bytes,
                                   cells=tuple(cells), overhead=overhead))
    device = DeviceInfo(kind=kind, torch_device="none", name=f"{kind}, calibrated from {calibration.kind}",
                        threads=0, torch_version=torch.__version__, memory_bytes=int(spec.memory_bytes))
    return DeviceProfile(model=model, graph=graph_key(lg, max_layers), device=device,
                         method=Method(warmup=0, min_repeats=0, max_repeats=0, budget_s=0.0, clock="wall"),
                         rows=rows, layers=tuple(layers), overhead=overhead, complete=True, source="calibrated")
