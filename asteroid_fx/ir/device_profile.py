"""DeviceProfile: what one device measured about one model's LayerGraph, as values.

The cells, the fits the planner reads from them (``layer_cost``, ``stage_time``) and the graph
identity a profile is checked against; ``profile.py`` describes the measurement and holds the
JSON form (``save``/``load``), and is where the rest of the code imports all of it from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
from typing import TYPE_CHECKING, Any, Sequence

from asteroid_fx.ir.costs import Cost, TimeFit
from asteroid_fx.ir.errors import InputError

if TYPE_CHECKING:
    from asteroid_fx.ir.layer_graph import LayerGraph

DEFAULT_ROWS = (1, 2, 4, 8, 16, 32)


class ProfileError(InputError):
    """A profile that cannot be used; the message names the file, the field and the remedy."""


# ----------------------------------------------------------------------------------------------
# Values


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of one direction of one cell: the median of the repeats left after dropping
    outliers, their median absolute deviation, the fastest repeat, and the counts."""

    median: float
    mad: float
    best: float
    repeats: int  # timed repeats (warm-up excluded)
    outliers: int = 0  # repeats dropped as more than ``Method.outlier_mads`` MADs from the median

    @staticmethod
    def of(samples: Sequence[float], outlier_mads: float = 5.0) -> "Timing":
        """Robust summary of timed repeats: other processes only ever slow a run down, so repeats
        far from the median are contention, not the device, and are dropped before the median."""
        if not samples:
            raise InputError("no timed repeats")
        med = statistics.median(samples)
        mad = statistics.median(abs(x - med) for x in samples)
        width = outlier_mads * max(mad, 1e-3 * med, 1e-9)
        kept = [x for x in samples if abs(x - med) <= width]
        med = statistics.median(kept)
        mad = statistics.median(abs(x - med) for x in kept)
        # nanoseconds are below any clock's noise here, and keep the JSON short
        return Timing(median=round(med, 9), mad=round(mad, 9), best=round(min(samples), 9),
                      repeats=len(samples), outliers=len(samples) - len(kept))

    @staticmethod
    def exact(seconds: float) -> "Timing":
        """A time that was computed, not measured (calibrated profiles)."""
        return Timing(seconds, 0.0, seconds, 0, 0)


@dataclasses.dataclass(frozen=True)
class BoundaryStorage:
    """A storage that holds values at a layer's boundary (inputs it received, outputs it sent on:
    LayerGraph cut values, by fx node name) and that autograd saved for the layer's backward
    (``saved_bytes``: its bytes, a part of the cell's) or that holds several of them (views of one
    tensor, an output that is its input under another name; ``saved_bytes`` 0 when not saved).
    The layers around it may save the same tensor, ReLU its output and the convolution after it
    its input: a stage running both holds it once (``DeviceProfile.layer_saved_bytes_per_row``)."""

    values: tuple[str, ...]
    saved_bytes: int


@dataclasses.dataclass(frozen=True)
class Cell:
    """One layer (or block) run forward and backward on ``rows`` rows."""

    rows: int
    fwd: Timing
    bwd: Timing
    saved_bytes: int = 0  # activation bytes autograd kept for backward (saved-tensor hooks), each storage once
    peak_bytes: int = 0  # peak bytes allocated during forward + backward, beyond inputs and weights
    # the same layer timed inside a pass over the whole model (forward through every layer, then
    # backward through every layer), where its weights and saved activations were evicted from the
    # cache since it last ran: what it takes inside a stage too big for the cache (None: not measured)
    cold_fwd: Timing | None = None
    cold_bwd: Timing | None = None
    # the storages of the layer's inputs and outputs that it saved or that hold several of them;
    # None: not recorded (profiles measured before it was), and nothing is counted once across layers
    boundary: tuple[BoundaryStorage, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Overhead:
    """Seconds a layer pays per direction when it runs as a stage of its own and not inside one."""

    fwd: float = 0.0
    bwd: float = 0.0


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    index: int
    first: str  # first and last fx node name and node count: enough to say where two graphs differ
    last: str
    nodes: int
    param_bytes: int = 0
    buffer_bytes: int = 0
    grad_bytes: int = 0  # gradients backward left on the layer's parameters
    optimizer_bytes: int = 0  # state the optimizer (``Method.optimizer``) keeps after one step
    cells: tuple[Cell, ...] = ()  # by rows, increasing
    overhead: Overhead = Overhead()  # its call overhead (see the module docstring)

    def cell(self, rows: int) -> Cell | None:
        for c in self.cells:
            if c.rows == rows:
                return c
        return None

    @property
    def knows_boundary(self) -> bool:
        """Whether every cell lists its boundary storages (not so in older profiles, nor in one
        resumed from an older partial profile)."""
        return all(c.boundary is not None for c in self.cells)

    def saved_bytes_per_row(self, held: frozenset[str] = frozenset()) -> float:
        """Least-squares slope of saved bytes over rows (a fixed part, if any, cancels out),
        without the saved storages that hold any of the values ``held`` (which the stage holds
        already: ``DeviceProfile.layer_saved_bytes_per_row``) where ``knows_boundary``."""
        if not self.knows_boundary:
            held = frozenset()
        return _slope([(c.rows, c.saved_bytes - sum(b.saved_bytes for b in c.boundary or ()
                                                    if held.intersection(b.values)))
                       for c in self.cells])

    def holds(self, held: frozenset[str]) -> frozenset[str]:
        """The boundary values whose storage a stage holds after this layer ran, when it held
        those of ``held`` before: ``held``, what the layer saved, and what lies in a storage held
        already (an output that is a view of a held input); only ``held`` where not
        ``knows_boundary``."""
        out = set(held)
        for c in self.cells if self.knows_boundary else ():
            for b in c.boundary or ():
                if b.saved_bytes > 0 or out.intersection(b.values):
                    out.update(b.values)
        return frozenset(out)

    def peak_bytes_per_row(self) -> float:
        return _slope([(c.rows, c.peak_bytes) for c in self.cells])


@dataclasses.dataclass(frozen=True)
class Block:
    """Layers [lo, hi) timed as one stage: the reference the per-layer sum is corrected to."""

    lo: int
    hi: int
    rows: int
    fwd: Timing
    bwd: Timing


@dataclasses.dataclass(frozen=True)
class GraphKey:
    """Which LayerGraph a profile belongs to. ``fingerprint`` hashes the layers' node names,
    weights and cut sizes per row (see ``fingerprint``), so a profile of another model, another
    input shape or another ``max_layers`` does not match."""

    fingerprint: str
    layers: int
    max_layers: int | None


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    kind: str  # the catalog kind the profile stands for (cluster devices of this kind use it)
    torch_device: str  # "cpu", "cuda:0"
    name: str  # CPU model or GPU name
    threads: int  # torch intra-op threads during the measurement
    torch_version: str
    memory_bytes: int = 0  # memory a training process can use on it (0: unknown)
    cache_bytes: int = 0  # the cache one computing core keeps a stage's data in: L2 (0: unknown)


@dataclasses.dataclass(frozen=True)
class Method:
    warmup: int = 1  # untimed runs per cell before the timed ones (the first also measures memory)
    min_repeats: int = 3
    max_repeats: int = 60
    budget_s: float = 0.1  # keep repeating (up to max_repeats) until this much was timed
    rounds: int = 3  # passes over the model that share a cell's repeats (a load burst hits one)
    outlier_mads: float = 5.0
    optimizer: str = "adam"  # whose state optimizer_bytes counts
    # "wall": elapsed time (GPU work synchronised); "cpu": the measuring thread's CPU time, which
    # other processes on a shared machine cannot inflate - exact only when torch computes on that
    # one thread (CPU, 1 intra-op thread). "auto" picks "cpu" there and "wall" everywhere else.
    clock: str = "auto"


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    model: str
    graph: GraphKey
    device: DeviceInfo
    method: Method
    rows: tuple[int, ...]  # the row counts asked for, increasing
    layers: tuple[LayerProfile, ...]
    blocks: tuple[Block, ...] = ()
    overhead: Overhead = Overhead()  # typical per-layer call overhead (layers without a good estimate)
    complete: bool = True
    source: str = "measured"  # "measured" | "calibrated"
    elapsed_s: float = 0.0  # wall time the measurement took (resumed runs add up)

    @property
    def kind(self) -> str:
        return self.device.kind

    # -- what the planner reads -----------------------------------------------------------------

    def _fits(self, index: int, cold: bool) -> tuple[TimeFit, TimeFit]:
        layer = self.layers[index]
        if not layer.cells:
            raise ProfileError(f"layer {index} of this profile has no measurements; finish the profile "
                               "(run `asteroid profile` again with the same --out to resume)")
        return tuple(monotone_fit([(c.rows, _cell_seconds(layer, c, d, cold) - getattr(layer.overhead, d))
                                   for c in layer.cells]) for d in ("fwd", "bwd"))  # type: ignore[return-value]

    def layer_cost(self, index: int, *, cold: bool = True) -> Cost:
        """Forward and backward time of layer ``index`` inside a stage, as functions of rows: its
        cells without its call overhead (``stage_time`` adds the stage's once). ``cold`` (the
        default, what a LayerGraph gets): as inside a stage too big for the cache, which a
        planner's stages are; else as the layer alone, its data kept in the cache."""
        fwd, bwd = self._fits(index, cold)
        return Cost(fwd, bwd, self.source)

    def costs(self) -> tuple[Cost, ...]:
        return tuple(self.layer_cost(i) for i in range(len(self.layers)))

    def layer_saved_bytes_per_row(self, lo: int, hi: int) -> tuple[float, ...]:
        """Per layer of [lo, hi) run as one stage, the activation bytes per row it keeps for
        backward, each tensor in the first layer of the stage that saves it: a layer's saved
        storage that holds a boundary value an earlier layer of the stage saved too (ReLU keeps
        its output, the convolution after it the same tensor as its input; or under another name,
        through a layer that passes it on as a view) is not counted again. A layer whose cells do
        not say which saved storages are boundary values (an older profile) counts all it saved,
        as measured alone. With lo = 0, each layer's share of the whole model's, as
        ``annotate_costs`` attributes them (``profile_costs`` sets those)."""
        held: frozenset[str] = frozenset()
        out = []
        for la in self.layers[lo:hi]:
            out.append(la.saved_bytes_per_row(held))
            held = la.holds(held)
        return tuple(out)

    def saved_bytes_per_row(self, lo: int, hi: int) -> float:
        """Activation bytes per row layers [lo, hi) run as one stage keep for backward, each saved
        tensor once (``layer_saved_bytes_per_row``)."""
        return sum(self.layer_saved_bytes_per_row(lo, hi))

    def working_set(self, lo: int, hi: int, rows: float) -> float:
        """Bytes a stage of layers [lo, hi) touches again between its forward and its backward and
        from one micro-batch to the next: weights, gradients and saved activations."""
        return (sum(la.param_bytes + la.grad_bytes for la in self.layers[lo:hi])
                + self.saved_bytes_per_row(lo, hi) * rows)

    def cold_share(self, lo: int, hi: int, rows: float) -> float:
        """How far a stage of layers [lo, hi) on ``rows`` runs cold (1) rather than cache-warm (0).

        A layer timed alone keeps its weights and activations in the core's cache from one run to
        the next; inside a stage they are evicted by the other layers' once the stage's working set
        outgrows the cache. Measured on CPUs, the change is gradual from half the cache size to
        four times it (caches are not perfectly LRU, and part of a working set streams): the share
        grows with log(working set) between those. An unknown cache size counts as cold."""
        cache = self.device.cache_bytes
        if cache <= 0:
            return 1.0
        ws = self.working_set(lo, hi, rows)
        low, high = CACHE_WARM_UP_TO * cache, CACHE_COLD_FROM * cache
        if ws <= low:
            return 0.0
        return min(1.0, math.log(ws / low) / math.log(high / low))

    def stage_fwd_bwd(self, lo: int, hi: int, rows: float) -> tuple[float, float]:
        """Predicted forward and backward seconds of layers [lo, hi) run as one stage on ``rows``:
        the layers' times, between cache-warm and cold by ``cold_share``, plus the call overhead
        the stage pays, which is its first layer's."""
        share = self.cold_share(lo, hi, rows)
        fwd = bwd = 0.0
        for i in range(lo, hi):
            (wf, wb), (cf, cb) = self._fits(i, False), self._fits(i, True)
            fwd += (1 - share) * wf(rows) + share * cf(rows)
            bwd += (1 - share) * wb(rows) + share * cb(rows)
        first = self.layers[lo].overhead
        return fwd + first.fwd, bwd + first.bwd

    def stage_time(self, lo: int, hi: int, rows: float) -> float:
        """Predicted forward + backward seconds of layers [lo, hi) run as one stage on ``rows``."""
        return sum(self.stage_fwd_bwd(lo, hi, rows))

    def missing(self) -> list[tuple[int, int]]:
        """(layer, rows) cells not measured yet."""
        return [(layer.index, r) for layer in self.layers for r in self.rows if layer.cell(r) is None]

    # -- text -----------------------------------------------------------------------------------

    def __str__(self) -> str:
        d = self.device
        state = "complete" if self.complete else f"partial ({len(self.missing())} cells missing)"
        lines = [f"DeviceProfile ({self.source}, {state}): model {self.model!r} on {d.kind} "
                 f"({d.torch_device}, {d.name}, {d.threads} threads, torch {d.torch_version})",
                 f"  graph {self.graph.fingerprint} ({self.graph.layers} layers, max_layers "
                 f"{self.graph.max_layers}); rows {', '.join(map(str, self.rows))}; call overhead per "
                 f"stage, typically fwd {self.overhead.fwd * 1e6:.1f} us, bwd {self.overhead.bwd * 1e6:.1f} us",
                 f"  {'layer':>5}  {'params':>10}  {'saved B/row':>11}  " +
                 "  ".join(f"{'f+b ms @' + str(r):>12}" for r in self.rows) + "  first node"]
        saved = self.layer_saved_bytes_per_row(0, len(self.layers))
        for layer in self.layers:
            times = []
            for r in self.rows:
                c = layer.cell(r)
                times.append(f"{(c.fwd.median + c.bwd.median) * 1e3:>12.3f}" if c else f"{'-':>12}")
            lines.append(f"  {layer.index:>5}  {layer.param_bytes:>10}  {saved[layer.index]:>11.0f}  "
                         + "  ".join(times) + f"  {layer.first}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Fits

# the working set, in cache sizes, below which a stage runs as warm as its layers did alone, and
# above which it runs as cold as they did inside a pass over the whole model (see ``cold_share``)
CACHE_WARM_UP_TO = 0.5
CACHE_COLD_FROM = 4.0


def _cell_seconds(layer: LayerProfile, cell: Cell, direction: str, cold: bool) -> float:
    """A cell's median, warm or cold. A cell without a cold timing (a row count probed for the
    layer alone) takes its warm time scaled by the cold/warm ratio of the nearest cell that has one."""
    warm = getattr(cell, direction).median
    if not cold:
        return warm
    timing = getattr(cell, f"cold_{direction}")
    if timing is not None:
        return timing.median
    near = min((c for c in layer.cells if getattr(c, f"cold_{direction}") is not None),
               key=lambda c: (abs(c.rows - cell.rows), -c.rows), default=None)
    if near is None or getattr(near, direction).median <= 0:
        return warm
    return warm * getattr(near, f"cold_{direction}").median / getattr(near, direction).median


def _slope(points: Sequence[tuple[float, float]]) -> float:
    if not points:
        return 0.0
    if len(points) == 1:
        r, y = points[0]
        return max(0.0, y / r)
    mx = sum(r for r, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((r - mx) ** 2 for r, _ in points)
    return max(0.0, sum((r - mx) * (y - my) for r, y in points) / var)


def monotone_fit(points: Sequence[tuple[float, float]]) -> TimeFit:
    """A TimeFit through (rows, seconds) that never decreases with rows: negative times are
    clipped to zero and adjacent violators are pooled (isotonic regression), so measurement noise
    never tells the planner that more rows are cheaper."""
    pts = sorted((float(r), max(0.0, float(t))) for r, t in points)
    blocks: list[list[float]] = []  # [sum, count, first index]
    for i, (_, t) in enumerate(pts):
        blocks.append([t, 1.0, float(i)])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n, _ = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    values: list[float] = []
    for s, n, _ in blocks:
        values.extend([s / n] * int(n))
    return TimeFit(tuple((r, v) for (r, _), v in zip(pts, values)))


# ----------------------------------------------------------------------------------------------
# Graph identity


def _layer_signature(lg: "LayerGraph") -> list[dict[str, Any]]:
    return [{"first": layer.nodes[0] if layer.nodes else "", "last": layer.nodes[-1] if layer.nodes else "",
             "nodes": len(layer.nodes), "param_bytes": layer.param_bytes} for layer in lg.layers]


def fingerprint(lg: "LayerGraph", max_layers: int | None) -> str:
    """A hash of what makes two LayerGraphs the same for timing: every layer's node names and
    weights, every cut's values and bytes per row (so input shapes count), and max_layers. The
    example batch size does not enter it."""
    data = {
        "max_layers": max_layers,
        "layers": [[list(layer.nodes), list(layer.params), layer.param_bytes, layer.buffer_bytes]
                   for layer in lg.layers],
        "cuts": [[list(c.values), round(c.bytes_per_row, 3), c.allowed] for c in lg.cuts],
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:24]


def graph_key(lg: "LayerGraph", max_layers: int | None) -> GraphKey:
    return GraphKey(fingerprint(lg, max_layers), len(lg), max_layers)


def check_matches(profile: DeviceProfile, lg: "LayerGraph", max_layers: int | None, *,
                  model: str | None = None, origin: str = "profile") -> None:
    """Raise ProfileError saying how ``profile`` differs from the graph being compiled."""
    want = graph_key(lg, max_layers)
    if profile.graph.fingerprint == want.fingerprint:
        return
    redo = ("re-run `asteroid profile` for this model with the same --max-layers and input shape, "
            "or leave this profile out")
    where = f"{origin}: measured for model {profile.model!r}"
    if model and profile.model and model != profile.model:
        raise ProfileError(f"{where}, not {model!r} (graph {profile.graph.fingerprint} vs {want.fingerprint}); "
                           f"{redo}")
    if profile.graph.max_layers != max_layers:
        raise ProfileError(f"{where} with max_layers={profile.graph.max_layers}, but this graph was "
                           f"linearized with max_layers={max_layers}, so its layers differ; {redo}")
    if len(profile.layers) != len(lg):
        raise ProfileError(f"{where} with {len(profile.layers)} layers, but this graph has {len(lg)}; "
                           f"it is another graph; {redo}")
    for layer, sig in zip(profile.layers, _layer_signature(lg)):
        have = {"first": layer.first, "last": layer.last, "nodes": layer.nodes, "param_bytes": layer.param_bytes}
        if have != sig:
            diff = ", ".join(f"{k} {have[k]!r} vs {sig[k]!r}" for k in sig if have[k] != sig[k])
            raise ProfileError(f"{where}: layer {layer.index} differs from this graph's ({diff}); {redo}")
    raise ProfileError(f"{where}: graph fingerprint {profile.graph.fingerprint} does not match this graph's "
                       f"{want.fingerprint} (same layers, but different node names, weights or tensor "
                       f"sizes, e.g. another input shape); {redo}")
