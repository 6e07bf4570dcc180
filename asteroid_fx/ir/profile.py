"""DeviceProfile: what one device measured about one model's LayerGraph, and its JSON form.

A profile holds, per layer of the LayerGraph and per row count it ran, the forward and backward
time (a robust median over repeats, with its spread) and the activation bytes autograd saved and
the peak memory of that run; per layer the parameter, gradient, optimizer-state and buffer bytes;
and each layer's call overhead: a layer timed alone is a stage of its own and pays what every stage
pays once (the module call, autograd's start, accumulating its inputs' gradients); inside a stage
of several layers only the first one pays it. It is measured by timing adjacent layers as one
block beside the single layers (see ``passes/measure.fit_overhead``).

A layer timed alone keeps its weights and activations in the cache from one run to the next;
inside a stage whose working set outgrows the cache it does not. So where a layer's own data would
fit the cache, its cells also hold its time with the cache flushed before each direction ("cold").
A cell may sit at a row count that was not asked for: one below a requested count where the
layer's time bends down (a kernel that switches there), so the fit does not draw a line from the
slow regime into the fast one.

From those cells a profile gives the planner's value types: ``Cost`` per layer (``TimeFit`` points,
monotone in rows, cold, with the layer's call overhead taken out) and ``stage_time``, which mixes
warm and cold by the stage's working set (``cold_share``) and adds back the overhead of the
stage's first layer.

On disk (JSON, ``save``/``load``)::

    {"format": "asteroid-profile", "version": 1, "checksum": "sha256:...", "complete": true,
     "source": "measured", "model": "resnet50",
     "graph": {"fingerprint": "sha256:...", "layers": 48, "max_layers": 48},
     "device": {"kind": "host-cpu", "torch_device": "cpu", "name": "...", "threads": 1,
                "cache_bytes": 1048576, ...},
     "method": {"warmup": 1, "min_repeats": 3, ...}, "rows": [1, 2, 4],
     "overhead": {"fwd": 1.8e-05, "bwd": 2.1e-05},
     "layers": [{"index": 0, "first": "conv2d", "last": "relu", "nodes": 3, "param_bytes": ...,
                 "overhead": {"fwd": 2e-06, "bwd": 1.2e-05},
                 "cells": [{"rows": 1, "fwd": {"median": ..., "mad": ..., "best": ...,
                            "repeats": 9, "outliers": 0}, "bwd": {...}, "saved_bytes": ...,
                            "peak_bytes": ..., "cold": {"fwd": {...}, "bwd": {...}}}, ...]}, ...],
     "blocks": [{"lo": 0, "hi": 2, "rows": 1, "fwd": {...}, "bwd": {...}}, ...]}

``load`` rejects, with the file, the field and what to do: a file that is not JSON or is cut short,
another format or version, a missing, mistyped, negative or non-finite field, cells out of order,
a checksum that does not match the content (an edited or damaged file), a partial profile where a
complete one is needed, and a profile of another model or graph than the one being compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from asteroid_fx.ir.atomic import write_text
from asteroid_fx.ir.costs import Cost, TimeFit

if TYPE_CHECKING:
    from asteroid_fx.ir.layer_graph import LayerGraph

FORMAT = "asteroid-profile"
VERSION = 1
DEFAULT_ROWS = (1, 2, 4, 8, 16, 32)


class ProfileError(ValueError):
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
            raise ValueError("no timed repeats")
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
class Cell:
    """One layer (or block) run forward and backward on ``rows`` rows."""

    rows: int
    fwd: Timing
    bwd: Timing
    saved_bytes: int = 0  # activation bytes autograd kept for backward (saved-tensor hooks)
    peak_bytes: int = 0  # peak bytes allocated during forward + backward, beyond inputs and weights
    # the same layer timed inside a pass over the whole model (forward through every layer, then
    # backward through every layer), where its weights and saved activations were evicted from the
    # cache since it last ran: what it takes inside a stage too big for the cache (None: not measured)
    cold_fwd: Timing | None = None
    cold_bwd: Timing | None = None


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

    def saved_bytes_per_row(self) -> float:
        """Least-squares slope of saved bytes over rows (a fixed part, if any, cancels out)."""
        return _slope([(c.rows, c.saved_bytes) for c in self.cells])

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

    def working_set(self, lo: int, hi: int, rows: float) -> float:
        """Bytes a stage of layers [lo, hi) touches again between its forward and its backward and
        from one micro-batch to the next: weights, gradients and saved activations."""
        return sum(la.param_bytes + la.grad_bytes + la.saved_bytes_per_row() * rows for la in self.layers[lo:hi])

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
        for layer in self.layers:
            times = []
            for r in self.rows:
                c = layer.cell(r)
                times.append(f"{(c.fwd.median + c.bwd.median) * 1e3:>12.3f}" if c else f"{'-':>12}")
            lines.append(f"  {layer.index:>5}  {layer.param_bytes:>10}  {layer.saved_bytes_per_row():>11.0f}  "
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


# ----------------------------------------------------------------------------------------------
# JSON

_TIMING = ("median", "mad", "best", "repeats", "outliers")


def _timing_json(t: Timing) -> dict[str, Any]:
    return dataclasses.asdict(t)


def to_json(p: DeviceProfile) -> dict[str, Any]:
    """The canonical JSON object, checksum included."""
    body = {
        "format": FORMAT,
        "version": VERSION,
        "complete": p.complete,
        "source": p.source,
        "model": p.model,
        "graph": dataclasses.asdict(p.graph),
        "device": dataclasses.asdict(p.device),
        "method": dataclasses.asdict(p.method),
        "rows": list(p.rows),
        "elapsed_s": p.elapsed_s,
        "overhead": dataclasses.asdict(p.overhead),
        "layers": [
            {"index": layer.index, "first": layer.first, "last": layer.last, "nodes": layer.nodes,
             "param_bytes": layer.param_bytes, "buffer_bytes": layer.buffer_bytes,
             "grad_bytes": layer.grad_bytes, "optimizer_bytes": layer.optimizer_bytes,
             "overhead": dataclasses.asdict(layer.overhead),
             "cells": [{"rows": c.rows, "fwd": _timing_json(c.fwd), "bwd": _timing_json(c.bwd),
                        "saved_bytes": c.saved_bytes, "peak_bytes": c.peak_bytes,
                        "cold": None if c.cold_fwd is None or c.cold_bwd is None else
                        {"fwd": _timing_json(c.cold_fwd), "bwd": _timing_json(c.cold_bwd)}}
                       for c in layer.cells]}
            for layer in p.layers
        ],
        "blocks": [{"lo": b.lo, "hi": b.hi, "rows": b.rows, "fwd": _timing_json(b.fwd), "bwd": _timing_json(b.bwd)}
                   for b in p.blocks],
    }
    return {"format": FORMAT, "version": VERSION, "checksum": _checksum(body), **body}


def _checksum(body: Mapping[str, Any]) -> str:
    data = {k: v for k, v in body.items() if k != "checksum"}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def dumps(p: DeviceProfile) -> str:
    """The canonical text: indented JSON with one line per cell and per block."""
    data = to_json(p)

    def one(x: Any) -> str:
        return json.dumps(x, allow_nan=False)

    lines = ["{"]
    for n, (key, value) in enumerate(data.items()):
        comma = "," if n < len(data) - 1 else ""
        if key == "layers":
            lines.append(' "layers": [')
            for m, layer in enumerate(value):
                head = one({k: v for k, v in layer.items() if k != "cells"})
                cells = ",\n".join("   " + one(c) for c in layer["cells"])
                lines.append(f"  {head[:-1]}, \"cells\": [\n{cells}\n  ]}}" + ("," if m < len(value) - 1 else ""))
            lines.append(" ]" + comma)
        elif key == "blocks":
            body = ",\n".join("  " + one(b) for b in value)
            lines.append(f' "blocks": [\n{body}\n ]{comma}')
        else:
            lines.append(f" {one(key)}: {one(value)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class _Reader:
    """Typed access to a JSON object with errors that carry the field's path."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, Mapping):
            raise ProfileError(f"{path or 'the profile'} must be a JSON object, got {type(data).__name__}")
        self.data, self.path = data, path

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str) -> Any:
        if key not in self.data:
            raise ProfileError(f"missing field {self._where(key)!r}")
        return self.data[key]

    def number(self, key: str, *, integer: bool = False, minimum: float = 0.0) -> Any:
        v = self.raw(key)
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not math.isfinite(v) or v < minimum:
            want = "an integer" if integer else "a finite number"
            raise ProfileError(f"field {self._where(key)!r} must be {want} >= {minimum:g}, got {v!r}")
        return int(v) if integer else float(v)

    def optional_int(self, key: str) -> int | None:
        return None if self.raw(key) is None else self.number(key, integer=True, minimum=1)

    def string(self, key: str) -> str:
        v = self.raw(key)
        if not isinstance(v, str):
            raise ProfileError(f"field {self._where(key)!r} must be a string, got {v!r}")
        return v

    def boolean(self, key: str) -> bool:
        v = self.raw(key)
        if not isinstance(v, bool):
            raise ProfileError(f"field {self._where(key)!r} must be true or false, got {v!r}")
        return v

    def list(self, key: str) -> list[Any]:
        v = self.raw(key)
        if not isinstance(v, list):
            raise ProfileError(f"field {self._where(key)!r} must be a list, got {type(v).__name__}")
        return v

    def obj(self, key: str) -> "_Reader":
        return _Reader(self.raw(key), self._where(key))

    def only(self, allowed: Sequence[str]) -> None:
        extra = sorted(set(self.data) - set(allowed))
        if extra:
            raise ProfileError(f"unknown field(s) {', '.join(repr(self._where(k)) for k in extra)}; "
                               f"allowed: {', '.join(allowed)}")


def _timing(r: _Reader) -> Timing:
    r.only(_TIMING)
    return Timing(r.number("median"), r.number("mad"), r.number("best"),
                  r.number("repeats", integer=True), r.number("outliers", integer=True))


def _increasing(rows: list[int], what: str) -> None:
    if any(b <= a for a, b in zip(rows, rows[1:])):
        raise ProfileError(f"{what} must be strictly increasing, got {rows}")


def from_json(data: Any, *, origin: str = "profile JSON") -> DeviceProfile:
    """Inverse of ``to_json``, validating every field; errors start with ``origin``."""
    try:
        return _from_json(data)
    except ProfileError as e:
        raise ProfileError(f"{origin}: {e}") from None


def _from_json(data: Any) -> DeviceProfile:
    top = _Reader(data, "")
    if data.get("format") != FORMAT:
        raise ProfileError(f"field 'format' must be {FORMAT!r}, got {data.get('format')!r}; is this a "
                           "profile written by `asteroid profile`?")
    if data.get("version") != VERSION:
        raise ProfileError(f"profile version {data.get('version')!r} is not supported (this asteroid_fx "
                           f"reads version {VERSION}); re-run `asteroid profile` to measure it again")
    top.only(("format", "version", "checksum", "complete", "source", "model", "graph", "device", "method",
              "rows", "elapsed_s", "overhead", "layers", "blocks"))
    if "checksum" in data:
        got, want = data["checksum"], _checksum({k: v for k, v in data.items() if k != "checksum"})
        if got != want:
            raise ProfileError("checksum mismatch: the content was changed after it was written (edited "
                               "by hand or damaged); re-run `asteroid profile`, or delete the 'checksum' "
                               "field to accept a deliberate edit")
    source = top.string("source")
    if source not in ("measured", "calibrated"):
        raise ProfileError(f"field 'source' must be 'measured' or 'calibrated', got {source!r}")

    g = top.obj("graph")
    g.only(("fingerprint", "layers", "max_layers"))
    graph = GraphKey(g.string("fingerprint"), g.number("layers", integer=True, minimum=1), g.optional_int("max_layers"))
    d = top.obj("device")
    d.only(("kind", "torch_device", "name", "threads", "torch_version", "memory_bytes", "cache_bytes"))
    device = DeviceInfo(d.string("kind"), d.string("torch_device"), d.string("name"),
                        d.number("threads", integer=True), d.string("torch_version"),
                        d.number("memory_bytes", integer=True), d.number("cache_bytes", integer=True))
    m = top.obj("method")
    m.only([f.name for f in dataclasses.fields(Method)])
    method = Method(m.number("warmup", integer=True), m.number("min_repeats", integer=True),
                    m.number("max_repeats", integer=True), m.number("budget_s"), m.number("rounds", integer=True),
                    m.number("outlier_mads"), m.string("optimizer"), m.string("clock"))
    if method.clock not in ("wall", "cpu"):
        raise ProfileError(f"field 'method.clock' must be 'wall' or 'cpu', got {method.clock!r}")
    rows = top.list("rows")
    if not rows or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rows):
        raise ProfileError(f"field 'rows' must be a non-empty list of positive integers, got {rows!r}")
    _increasing(rows, "field 'rows'")
    o = top.obj("overhead")
    o.only(("fwd", "bwd"))
    overhead = Overhead(o.number("fwd"), o.number("bwd"))

    layers = []
    raw_layers = top.list("layers")
    if len(raw_layers) != graph.layers:
        raise ProfileError(f"the profile lists {len(raw_layers)} layers but graph.layers is {graph.layers}: "
                           "the file is incomplete or was edited")
    for i, raw in enumerate(raw_layers):
        r = _Reader(raw, f"layers[{i}]")
        r.only(("index", "first", "last", "nodes", "param_bytes", "buffer_bytes", "grad_bytes",
                "optimizer_bytes", "overhead", "cells"))
        if r.number("index", integer=True) != i:
            raise ProfileError(f"layers[{i}].index is {raw['index']!r}; layers must be listed in order from 0")
        cells = []
        for j, rc in enumerate(r.list("cells")):
            c = _Reader(rc, f"layers[{i}].cells[{j}]")
            c.only(("rows", "fwd", "bwd", "saved_bytes", "peak_bytes", "cold"))
            cold = None if c.raw("cold") is None else c.obj("cold")
            if cold is not None:
                cold.only(("fwd", "bwd"))
            cells.append(Cell(c.number("rows", integer=True, minimum=1), _timing(c.obj("fwd")),
                              _timing(c.obj("bwd")), c.number("saved_bytes", integer=True),
                              c.number("peak_bytes", integer=True),
                              _timing(cold.obj("fwd")) if cold else None, _timing(cold.obj("bwd")) if cold else None))
        _increasing([c.rows for c in cells], f"layers[{i}].cells rows")
        lo = r.obj("overhead")
        lo.only(("fwd", "bwd"))
        layers.append(LayerProfile(i, r.string("first"), r.string("last"), r.number("nodes", integer=True),
                                   r.number("param_bytes", integer=True), r.number("buffer_bytes", integer=True),
                                   r.number("grad_bytes", integer=True), r.number("optimizer_bytes", integer=True),
                                   tuple(cells), Overhead(lo.number("fwd"), lo.number("bwd"))))
    blocks = []
    for j, rb in enumerate(top.list("blocks")):
        b = _Reader(rb, f"blocks[{j}]")
        b.only(("lo", "hi", "rows", "fwd", "bwd"))
        lo, hi = b.number("lo", integer=True), b.number("hi", integer=True)
        if not lo < hi <= graph.layers:
            raise ProfileError(f"blocks[{j}] spans layers {lo}:{hi}, outside 0:{graph.layers}")
        blocks.append(Block(lo, hi, b.number("rows", integer=True, minimum=1), _timing(b.obj("fwd")),
                            _timing(b.obj("bwd"))))
    profile = DeviceProfile(model=top.string("model"), graph=graph, device=device, method=method,
                            rows=tuple(rows), layers=tuple(layers), blocks=tuple(blocks), overhead=overhead,
                            complete=top.boolean("complete"), source=source, elapsed_s=top.number("elapsed_s"))
    if profile.complete and profile.missing():
        layer, r = profile.missing()[0]
        raise ProfileError(f"marked complete but layer {layer} has no measurement at {r} rows "
                           f"({len(profile.missing())} cells missing); the file was edited or damaged")
    return profile


def loads(text: str, *, origin: str = "profile") -> DeviceProfile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if not text.strip():
            raise ProfileError(f"{origin}: the file is empty; re-run `asteroid profile`") from None
        if e.pos >= len(text.rstrip()) or (text.lstrip().startswith("{") and not text.rstrip().endswith("}")):
            raise ProfileError(f"{origin}: truncated: the JSON ends before the profile does ({len(text)} bytes, "
                               f"{e.msg.lower()} at line {e.lineno}; the file was cut short, e.g. by a full disk or "
                               "a copy that stopped); re-run `asteroid profile` to measure it again") from None
        raise ProfileError(f"{origin}: corrupt: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; "
                           "re-run `asteroid profile`") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{origin}: expected a JSON object, got {type(data).__name__}; is this a profile?")
    return from_json(data, origin=origin)


def save(p: DeviceProfile, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp file + rename): readers, and a resumed run, see the old file or the
    new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, dumps(p))
    return path


def load(path: str | os.PathLike[str], *, lg: "LayerGraph | None" = None, max_layers: int | None = None,
         model: str | None = None, allow_partial: bool = False) -> DeviceProfile:
    """Read and validate a profile; with ``lg`` also check it belongs to that graph."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile; measure one with `asteroid profile --model M --out {path}`") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: corrupt: not UTF-8 text; re-run `asteroid profile`") from None
    profile = loads(text, origin=str(path))
    if not profile.complete and not allow_partial:
        raise ProfileError(f"{path}: partial profile ({len(profile.missing())} of "
                           f"{len(profile.layers) * len(profile.rows)} cells missing; the run was interrupted); "
                           "run the same `asteroid profile` command again to finish it")
    if lg is not None:
        check_matches(profile, lg, max_layers, model=model, origin=str(path))
    return profile
