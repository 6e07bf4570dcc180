"""LayerGraph: the planner's view of a model, a chain of layers separated by cuts.

Layer i is a run of fx nodes in topological order. Cut k sits before layer k (cut 0 carries the
model inputs, cut L the outputs); it lists every value live across it, skip connections included,
and says whether a stage boundary may be placed there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from asteroid_fx.ir.atomic import write_text
from asteroid_fx.ir.costs import Cost, TimeFit
from asteroid_fx.ir.json_fields import MAX_INTEGER, Fields, read_json
from asteroid_fx.ir.profile import MAX_SECONDS


# The fewest rows the planners give a device of a stage that holds a batch-statistics layer: one
# row gives BatchNorm over (N, C) one value per channel (torch refuses it in training) and
# BatchNorm2d the noisy statistics of one image (docs/planner.md, docs/semantics.md).
MIN_BATCH_STAT_ROWS = 2
COARSENING_ROWS = 16  # rows at which a layer's work is weighed when layers are merged
DEFAULT_MAX_LAYERS = 48  # layers compile coarsens a model to (and the planner searches a longer graph by)


@dataclasses.dataclass(frozen=True)
class BatchStat:
    """A layer that normalizes over the rows it is given in training (BatchNorm): one row gives it
    ``values_per_row`` values per channel (1 without spatial dims, H x W for BatchNorm2d)."""

    node: str  # the fx node
    module: str  # the model's name for it and its class, as a user reads it: "bn1 (BatchNorm2d)"
    values_per_row: int

    def takes(self, rows: int) -> bool:
        """Whether torch can train it on a chunk of ``rows`` rows (more than one value per channel)."""
        return rows * self.values_per_row > 1


@dataclasses.dataclass(frozen=True)
class Layer:
    index: int
    nodes: tuple[str, ...]  # fx node names, in graph order
    costs: tuple[tuple[str, Cost], ...]  # (device kind, cost) for every kind of the cluster
    param_bytes: int  # trainable parameters owned by this layer
    buffer_bytes: int  # buffers (BatchNorm statistics, masks) owned by this layer
    saved_bytes_per_row: float  # activations kept for backward, per row, each storage in the first layer saving it
    params: tuple[str, ...] = ()  # qualified names of the parameters and buffers it owns
    batch_stats: tuple[BatchStat, ...] = ()  # its nodes that take statistics over their rows in training
    # forward FLOPs per row of its nodes (FlopCounterMode: matrix products, convolutions,
    # attention; lookups, masks and reshapes count none): whether a stage computes
    flops_per_row: float = 0.0

    def cost(self, kind: str) -> Cost:
        for k, c in self.costs:
            if k == kind:
                return c
        raise KeyError(f"layer {self.index} has no cost for device kind {kind!r}; annotate costs for it")


@dataclasses.dataclass(frozen=True)
class Cut:
    index: int
    values: tuple[str, ...]  # names of the values live across the cut, in graph order
    bytes_per_row: float  # bytes of those values per row (what a stage boundary here transfers)
    allowed: bool
    why_not: str = ""  # when not allowed: the value or parameter that forbids it
    # values of ``values`` that do not depend on the batch's data: a stage that starts here
    # recomputes them (docs/semantics.md) instead of receiving them, so they add no bytes
    recomputed: tuple[str, ...] = ()


# what a shared tensor is: a trained parameter (its copies' gradients are summed, a TIE), one that
# is not trained, or a buffer nothing writes (its copies stay equal on their own)
TIE_KINDS = ("param", "frozen", "buffer")


@dataclasses.dataclass(frozen=True)
class Tie:
    """One tensor read by several layers (a tied weight: GPT-2's embedding and head), under every
    name the model gives it; a stage holding any of ``layers`` holds a copy of it."""

    names: tuple[str, ...]  # the model's names of it, the first as ``named_parameters`` gives it
    dtype: str
    shape: tuple[int, ...]
    layers: tuple[int, ...]  # ascending, two or more
    nbytes: int
    kind: str = "param"  # one of TIE_KINDS

    def stages(self, bounds: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
        """Which of the stages with layer ranges ``bounds`` hold a copy."""
        return tuple(p for p, (lo, hi) in enumerate(bounds) if any(lo <= k < hi for k in self.layers))

    def overcount(self, lo, hi):
        """Bytes the sum over layers [lo, hi) counts beyond one copy (elementwise for index arrays)."""
        import numpy as np

        at = np.asarray(self.layers)
        held = np.searchsorted(at, hi, "left") - np.searchsorted(at, lo, "left")
        return np.maximum(held - 1, 0) * self.nbytes


@dataclasses.dataclass(frozen=True)
class LayerGraph:
    layers: tuple[Layer, ...]
    cuts: tuple[Cut, ...]  # len(layers) + 1
    blocked: tuple[str, ...] = ()  # distinct reasons why cuts inside layers were not allowed, most cuts first
    ties: tuple[Tie, ...] = ()  # tensors read by several layers (each layer's bytes count them)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.layers[0].costs) if self.layers else ()

    def param_bytes(self, lo: int, hi: int) -> int:
        """Parameters of layers [lo, hi), a tied one once (a stage holds one copy of it)."""
        return (sum(layer.param_bytes for layer in self.layers[lo:hi])
                - int(sum(t.overcount(lo, hi) for t in self.ties if t.kind != "buffer")))

    def buffer_bytes(self, lo: int, hi: int) -> int:
        """Buffers of layers [lo, hi), a shared one once."""
        return (sum(layer.buffer_bytes for layer in self.layers[lo:hi])
                - int(sum(t.overcount(lo, hi) for t in self.ties if t.kind == "buffer")))

    def saved_bytes_per_row(self, lo: int, hi: int) -> float:
        return sum(layer.saved_bytes_per_row for layer in self.layers[lo:hi])

    def batch_stats(self, lo: int, hi: int) -> tuple[BatchStat, ...]:
        """The batch-statistics layers of layers [lo, hi), in graph order."""
        return tuple(b for layer in self.layers[lo:hi] for b in layer.batch_stats)

    def min_rows(self, lo: int, hi: int) -> int:
        """The fewest rows a planner gives a device of a stage running layers [lo, hi)."""
        return MIN_BATCH_STAT_ROWS if any(layer.batch_stats for layer in self.layers[lo:hi]) else 1

    def flops_per_row(self, lo, hi):
        """Forward FLOPs per row of layers [lo, hi); elementwise for index arrays too."""
        return self._flops_prefix[hi] - self._flops_prefix[lo]

    @functools.cached_property
    def _flops_prefix(self):
        import numpy as np

        return np.concatenate([[0.0], np.cumsum([layer.flops_per_row for layer in self.layers], dtype=float)])

    def allowed_cuts(self) -> tuple[int, ...]:
        return tuple(c.index for c in self.cuts[1:-1] if c.allowed)

    def coarsening(self, max_layers: int) -> tuple[int, ...]:
        """Layer bounds (0, some allowed cuts, L) of at most ``max_layers`` layers of work: cuts are
        dropped until that many remain, the most expensive cut first (most bytes per row), as long as
        the layer it makes holds at most twice the average work (else the lightest merge). A layer's
        work is its share of the model's time at COARSENING_ROWS rows, averaged over the device
        kinds. What ``linearize(max_layers=)`` merges and what the planner searches a long graph by."""
        bounds = [0, *self.allowed_cuts(), len(self.layers)]
        if len(bounds) - 1 <= max(1, max_layers):
            return tuple(bounds)
        kinds = self.kinds
        weight = [0.0] * len(self.layers)
        for k in kinds:
            times = [layer.cost(k).fwd(COARSENING_ROWS) + layer.cost(k).bwd(COARSENING_ROWS) for layer in self.layers]
            total = sum(times)
            for i, t in enumerate(times):
                weight[i] += (t / total if total > 0 else 1.0 / len(times)) / max(1, len(kinds))
        if not kinds:
            weight = [1.0 / len(self.layers)] * len(self.layers)
        prefix = [0.0]
        for w in weight:
            prefix.append(prefix[-1] + w)
        cap = 2.0 * prefix[-1] / max_layers
        while len(bounds) - 1 > max(1, max_layers):
            best, best_key = 1, None
            for j in range(1, len(bounds) - 1):
                merged = prefix[bounds[j + 1]] - prefix[bounds[j - 1]]
                within = merged <= cap
                key = (within, self.cuts[bounds[j]].bytes_per_row if within else -merged)
                if best_key is None or key > best_key:
                    best, best_key = j, key
            del bounds[best]
        return tuple(bounds)

    def cut_only_at(self, bounds: tuple[int, ...]) -> "LayerGraph":
        """This graph with stage boundaries allowed at ``bounds`` only (the same layers, so a plan
        of it is a plan of this graph, with the same costs): a coarse search of a long graph."""
        keep = set(bounds)
        cuts = tuple(c if c.index in keep or not c.allowed or c.index in (0, len(self.layers)) else
                     dataclasses.replace(c, allowed=False, why_not="left out by coarsening")
                     for c in self.cuts)
        return dataclasses.replace(self, cuts=cuts)

    def __str__(self) -> str:
        kinds = self.kinds
        head = f"LayerGraph: {len(self.layers)} layers, {len(self.allowed_cuts())} allowed cuts"
        rows = [head, f"{'layer':>5}  {'nodes':>5}  {'params':>10}  {'cut bytes/row':>13}  first node"]
        for layer in self.layers:
            cut = self.cuts[layer.index]
            mark = "" if cut.allowed else " x"
            rows.append(f"{layer.index:>5}  {len(layer.nodes):>5}  {layer.param_bytes:>10}  "
                        f"{cut.bytes_per_row:>11.0f}{mark:2}  {layer.nodes[0] if layer.nodes else ''}")
        if kinds:
            rows.append("kinds: " + ", ".join(kinds))
        return "\n".join(rows)


# --- on disk: costs.json beside a compiled plan, what `asteroid simulate PLAN_DIR` reads -------------

COSTS_FORMAT = "asteroid-costs"
COSTS_VERSION = 1


def costs_to_json(lg: LayerGraph) -> dict[str, Any]:
    """The LayerGraph as JSON: every layer's costs per device kind, bytes, and every cut."""
    def fit(f: TimeFit) -> list[list[float]]:
        return [[r, t] for r, t in f.points]

    return {
        "format": COSTS_FORMAT, "version": COSTS_VERSION,
        "layers": [{"index": l.index, "nodes": list(l.nodes), "param_bytes": l.param_bytes,
                    "buffer_bytes": l.buffer_bytes, "saved_bytes_per_row": l.saved_bytes_per_row,
                    "params": list(l.params), "flops_per_row": l.flops_per_row,
                    "batch_stats": [{"node": b.node, "module": b.module, "values_per_row": b.values_per_row}
                                    for b in l.batch_stats],
                    "costs": {k: {"fwd": fit(c.fwd), "bwd": fit(c.bwd), "source": c.source} for k, c in l.costs}}
                   for l in lg.layers],
        "cuts": [{"index": c.index, "values": list(c.values), "bytes_per_row": c.bytes_per_row,
                  "allowed": c.allowed, "why_not": c.why_not, "recomputed": list(c.recomputed)}
                 for c in lg.cuts],
        "blocked": list(lg.blocked),
        "ties": [{"names": list(t.names), "dtype": t.dtype, "shape": list(t.shape), "layers": list(t.layers),
                  "nbytes": t.nbytes, "kind": t.kind} for t in lg.ties],
    }


def costs_from_json(data: Any, *, origin: str = "cost file") -> LayerGraph:
    """Inverse of ``costs_to_json``. A malformed document raises InputError starting with
    ``origin`` (the file, when ``read_costs`` reads one) and naming the field."""
    top = Fields(data, origin)
    if top.data.get("format") != COSTS_FORMAT:
        raise top.fail(f"not a cost file: format is {top.data.get('format')!r}, expected {COSTS_FORMAT!r}")
    if top.data.get("version") != COSTS_VERSION:
        raise top.fail(f"cost file version {top.data.get('version')} is not supported (this build reads {COSTS_VERSION})")

    def costs(layer: Fields) -> tuple[tuple[str, Cost], ...]:
        by_kind = layer.obj("costs")
        out = []
        for kind in by_kind.data:
            c = by_kind.obj(kind)
            out.append((kind, Cost(TimeFit(c.points("fwd", MAX_SECONDS)), TimeFit(c.points("bwd", MAX_SECONDS)),
                                   c.string("source", "analytic"))))
        return tuple(out)

    def batch_stats(layer: Fields) -> tuple[BatchStat, ...]:
        return tuple(BatchStat(b.string("node"), b.string("module"), b.integer("values_per_row", minimum=1))
                     for b in (layer.objs("batch_stats") if layer.has("batch_stats") else ()))

    def indexed(items: list[Fields], what: str) -> list[Fields]:
        for i, f in enumerate(items):
            if f.integer("index") != i:
                raise f.bad("index", f"{i} (the {what} are numbered 0, 1, ... in order)", f.data["index"])
        return items

    layers = tuple(Layer(l.integer("index"), l.strings("nodes"), costs(l), l.integer("param_bytes", minimum=0),
                         l.integer("buffer_bytes", minimum=0),
                         l.number("saved_bytes_per_row", minimum=0, maximum=MAX_INTEGER),
                         l.strings("params", []), batch_stats(l),
                         l.number("flops_per_row", minimum=0) if l.has("flops_per_row") else 0.0)
                   for l in indexed(top.objs("layers"), "layers"))
    if not layers:
        raise top.fail("field 'layers' must list at least one layer, got []")
    kinds = [k for k, _ in layers[0].costs]
    for layer in layers:
        if [k for k, _ in layer.costs] != kinds:
            raise top.fail(f"field 'layers[{layer.index}].costs' has device kinds {[k for k, _ in layer.costs]}, "
                           f"layer 0 has {kinds}; every layer has a cost for the same kinds")
    cuts = tuple(Cut(c.integer("index"), c.strings("values"), c.number("bytes_per_row", minimum=0),
                     c.boolean("allowed"), c.string("why_not", ""), c.strings("recomputed", []))
                 for c in indexed(top.objs("cuts"), "cuts"))
    if len(cuts) != len(layers) + 1:
        raise top.fail(f"field 'cuts' lists {len(cuts)} cuts for {len(layers)} layers; a chain of L layers has "
                       "L + 1 cuts (0: the inputs, L: the outputs)")
    ties = []
    for t in (top.objs("ties") if top.has("ties") else ()):
        held = t.integers("layers", minimum=0)
        if len(held) < 2 or list(held) != sorted(set(held)) or held[-1] >= len(layers):
            raise t.bad("layers", f"two or more ascending layer indices below {len(layers)}", list(held))
        kind = t.string("kind", "param")
        if kind not in TIE_KINDS:
            raise t.bad("kind", f"one of {', '.join(TIE_KINDS)}", kind)
        ties.append(Tie(t.strings("names"), t.string("dtype"), t.integers("shape", minimum=0), held,
                        t.integer("nbytes", minimum=0), kind))
    return LayerGraph(layers, cuts, top.strings("blocked", []), tuple(ties))


def write_costs(lg: LayerGraph, path: str | Path) -> Path:
    """``costs.json`` beside a compiled plan: what `asteroid simulate` times the program with."""
    return write_text(path, json.dumps(costs_to_json(lg)) + "\n")


def read_costs(path: str | Path) -> LayerGraph:
    """Read ``costs.json``; errors name the file and the field."""
    return costs_from_json(read_json(path, "cost file"), origin=str(path))
