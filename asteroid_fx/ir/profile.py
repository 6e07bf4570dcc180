"""DeviceProfile: what one device measured about one model's LayerGraph, and its JSON form.

The values live in ``device_profile.py``; import them, and the JSON form, from here.

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
                            "peak_bytes": ..., "cold": {"fwd": {...}, "bwd": {...}},
                            "boundary": [{"values": ["relu"], "saved_bytes": ...}, ...]}, ...]}, ...],
     "blocks": [{"lo": 0, "hi": 2, "rows": 1, "fwd": {...}, "bwd": {...}}, ...]}

A cell's ``saved_bytes`` is every storage autograd saved while the layer ran alone, its saved
inputs included; ``boundary`` lists the storages of the layer's boundary values (the inputs it
received, the outputs it sent on, by fx node name) that it saved, with their saved bytes, or that
hold several of those values (views of one tensor, an input passed on under another name; saved
bytes 0 when not saved). A boundary tensor two layers save (ReLU keeps its output, the convolution
after it the same tensor as its input) is one storage while they run in one stage, so
``DeviceProfile.layer_saved_bytes_per_row`` and ``saved_bytes_per_row`` count it once, in the
first layer that saves it. ``boundary`` is optional: a profile written before it was recorded
loads as it did and counts each layer's saved bytes as measured alone.

``load`` rejects, with the file, the field and what to do: a file that is not JSON or is cut short,
another format or version, a missing, mistyped, negative or non-finite field, cells out of order,
``boundary`` storages that name a value twice or save more than the cell's ``saved_bytes``,
a checksum that does not match the content (an edited or damaged file), a partial profile where a
complete one is needed, and a profile of another model or graph than the one being compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from asteroid_fx.ir.atomic import write_text
from asteroid_fx.ir.json_fields import read_text
from asteroid_fx.ir.device_profile import (
    CACHE_COLD_FROM,
    CACHE_WARM_UP_TO,
    DEFAULT_ROWS,
    Block,
    BoundaryStorage,
    Cell,
    DeviceInfo,
    DeviceProfile,
    GraphKey,
    LayerProfile,
    Method,
    Overhead,
    ProfileError,
    Timing,
    check_matches,
    fingerprint,
    graph_key,
    monotone_fit,
)

if TYPE_CHECKING:
    from asteroid_fx.ir.layer_graph import LayerGraph

__all__ = ["Block", "BoundaryStorage", "CACHE_COLD_FROM", "CACHE_WARM_UP_TO", "Cell", "DEFAULT_ROWS", "DeviceInfo", "DeviceProfile", "FORMAT", "GraphKey", "LayerProfile", "Method", "Overhead", "ProfileError", "Timing", "VERSION", "check_matches", "dumps", "fingerprint", "from_json", "graph_key", "load", "loads", "monotone_fit", "save", "to_json"]

FORMAT = "asteroid-profile"
VERSION = 1

# ----------------------------------------------------------------------------------------------
# JSON

_TIMING = ("median", "mad", "best", "repeats", "outliers")


def _timing_json(t: Timing) -> dict[str, Any]:
    return dataclasses.asdict(t)


def _cell_json(c: Cell) -> dict[str, Any]:
    out = {"rows": c.rows, "fwd": _timing_json(c.fwd), "bwd": _timing_json(c.bwd),
           "saved_bytes": c.saved_bytes, "peak_bytes": c.peak_bytes,
           "cold": None if c.cold_fwd is None or c.cold_bwd is None else
           {"fwd": _timing_json(c.cold_fwd), "bwd": _timing_json(c.cold_bwd)}}
    if c.boundary is not None:  # absent in profiles measured before it was recorded
        out["boundary"] = [{"values": list(b.values), "saved_bytes": b.saved_bytes} for b in c.boundary]
    return out


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
             "cells": [_cell_json(c) for c in layer.cells]}
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


MAX_SECONDS = 1e5  # a day: no layer of a model that trains takes longer for one micro-batch


def _timing(r: _Reader) -> Timing:
    r.only(_TIMING)
    t = Timing(r.number("median"), r.number("mad"), r.number("best"),
               r.number("repeats", integer=True), r.number("outliers", integer=True))
    for name in ("median", "mad", "best"):
        if getattr(t, name) > MAX_SECONDS:
            raise ProfileError(f"field {r._where(name)!r} is {getattr(t, name):g} s, more than a day for one layer "
                               "and micro-batch: no measurement gives that; re-run `asteroid profile`")
    return t


def _boundary(c: _Reader, saved_bytes: int) -> tuple[BoundaryStorage, ...]:
    """A cell's ``boundary``: distinct storages, so each value name in one of them only, whose
    saved bytes are a part of the cell's ``saved_bytes``."""
    out, seen = [], set()
    for k, raw in enumerate(c.list("boundary")):
        b = _Reader(raw, c._where(f"boundary[{k}]"))
        b.only(("values", "saved_bytes"))
        names = b.list("values")
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ProfileError(f"field {b._where('values')!r} must be a non-empty list of value names "
                               f"(non-empty strings), got {names!r}")
        again = sorted(seen.intersection(names)) or sorted({n for n in names if names.count(n) > 1})
        if again:
            raise ProfileError(f"field {b._where('values')!r} names {again[0]!r} again, but a value lies in "
                               "one storage; the file was edited or damaged: re-run `asteroid profile`")
        seen.update(names)
        out.append(BoundaryStorage(tuple(names), b.number("saved_bytes", integer=True)))
    total = sum(b.saved_bytes for b in out)
    if total > saved_bytes:
        raise ProfileError(f"field {c._where('boundary')!r} saved {total} bytes, more than the cell's saved_bytes "
                           f"({saved_bytes}), of which they are a part; the file was edited or damaged: "
                           "re-run `asteroid profile`")
    return tuple(out)


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
        try:
            want = _checksum({k: v for k, v in data.items() if k != "checksum"})
        except ValueError:  # json refuses NaN and infinity, which no profile holds
            raise ProfileError("a field holds NaN or Infinity, which no profile writes; the file was edited "
                               "or damaged: re-run `asteroid profile`") from None
        got = data["checksum"]
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
            c.only(("rows", "fwd", "bwd", "saved_bytes", "peak_bytes", "cold", "boundary"))
            cold = None if c.raw("cold") is None else c.obj("cold")
            if cold is not None:
                cold.only(("fwd", "bwd"))
            saved_bytes = c.number("saved_bytes", integer=True)
            cells.append(Cell(c.number("rows", integer=True, minimum=1), _timing(c.obj("fwd")),
                              _timing(c.obj("bwd")), saved_bytes,
                              c.number("peak_bytes", integer=True),
                              _timing(cold.obj("fwd")) if cold else None, _timing(cold.obj("bwd")) if cold else None,
                              _boundary(c, saved_bytes) if "boundary" in rc else None))
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
    for r in profile.rows:  # a model whose every layer takes no time at some row count was not measured
        total = sum(c.fwd.median + c.bwd.median for la in profile.layers for c in la.cells if c.rows == r)
        if profile.layers and any(c.rows == r for la in profile.layers for c in la.cells) and total <= 0:
            raise ProfileError(f"every layer's forward and backward time at {r} rows is 0: no measurement gives "
                               "that (the file was edited or damaged); re-run `asteroid profile`")
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
    text = read_text(path, "profile", ProfileError,
                     hint=f"measure one with `asteroid profile --model M --out {path}`")
    profile = loads(text, origin=str(path))
    if not profile.complete and not allow_partial:
        raise ProfileError(f"{path}: partial profile ({len(profile.missing())} of "
                           f"{len(profile.layers) * len(profile.rows)} cells missing; the run was interrupted); "
                           "run the same `asteroid profile` command again to finish it")
    if lg is not None:
        check_matches(profile, lg, max_layers, model=model, origin=str(path))
    return profile
