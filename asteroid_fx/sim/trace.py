"""trace: a Simulation as people look at it — a Chrome/Perfetto trace, a Gantt chart, a text grid.

These are instruments outside the simulator: each reads a ``sim.Simulation`` and writes a picture
of it, and none changes it.

  chrome_trace    the Chrome trace event format (JSON, times in microseconds): one process per
                  device with a "compute" track (F, B, waits, ALLREDUCE; args.critical marks the
                  computes on the critical path), a "link out" and a "link in" track (the two
                  directions of its full-duplex link; a slice per span of time with the same
                  transfers in flight, named by them), and a "memory" counter. Opens in
                  https://ui.perfetto.dev and chrome://tracing.
  gantt           the same timeline as a PNG or SVG picture (matplotlib, the ``plot`` extra).
  format_timed_grid  steps x devices, as torch.distributed.pipelining prints a schedule: a row for
                  every instant at which some device starts a compute action, cells like ``1F3``
                  (stage 1, forward, micro-batch 3), ``0B2``, ``0AR`` (ALLREDUCE).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asteroid_fx.ir.atomic import write_text
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program import Op

if TYPE_CHECKING:
    from asteroid_fx.sim import Simulation

_US = 1e6  # the trace format counts microseconds

# thread ids of a device's tracks
_COMPUTE, _LINK_OUT, _LINK_IN = 1, 2, 3
_TRACKS = ((_COMPUTE, "compute"), (_LINK_OUT, "link out"), (_LINK_IN, "link in"))


def link_segments(sim: "Simulation") -> dict[tuple[str, str], list[tuple[float, float, tuple[str, ...], float]]]:
    """(device, "out" | "in") -> [(start, end, labels of the transfers in flight, their bytes)]: the
    times the channel was in use, cut wherever the set of transfers on it changes."""
    edges: dict[tuple[str, str], list[tuple[float, int, int]]] = defaultdict(list)
    for k, t in enumerate(sim.transfers):
        if t.drained > t.started:
            for key in ((t.src, "out"), (t.dst, "in")):
                edges[key] += [(t.started, 1, k), (t.drained, -1, k)]
    out: dict[tuple[str, str], list[tuple[float, float, tuple[str, ...], float]]] = {}
    for key, events in edges.items():
        events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
        live: dict[int, None] = {}
        segments = []
        last = None
        for time, sign, k in events:
            if live and last is not None and time > last:
                ts = [sim.transfers[j] for j in live]
                segments.append((last, time, tuple(_transfer_label(t, key[1]) for t in ts),
                                 sum(t.nbytes for t in ts)))
            if sign > 0:
                live[k] = None
            else:
                live.pop(k, None)
            last = time
        out[key] = segments
    return out


def _transfer_label(t, way: str) -> str:
    return f"{t.label} -> {t.dst}" if way == "out" else f"{t.label} <- {t.src}"


def chrome_trace(sim: "Simulation") -> dict[str, Any]:
    """The trace as a dict in the Chrome trace event format (see the module docstring)."""
    events: list[dict[str, Any]] = []
    pid = {r.device: i + 1 for i, r in enumerate(sim.devices)}
    for r in sim.devices:
        p = pid[r.device]
        events.append({"name": "process_name", "ph": "M", "pid": p, "tid": 0,
                       "args": {"name": f"{r.device} (stage {r.stage_label}, {r.kind})"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": p, "tid": 0, "args": {"sort_index": p}})
        for tid, name in _TRACKS:
            events.append({"name": "thread_name", "ph": "M", "pid": p, "tid": tid, "args": {"name": name}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": p, "tid": tid, "args": {"sort_index": tid}})
    critical = {(step.where, step.start, step.end) for step in sim.critical_path() if step.what == "compute"}
    for s in sim.spans:
        events.append({"name": s.label if s.what != "wait" else f"wait: {s.label}", "cat": s.what, "ph": "X",
                       "ts": s.start * _US, "dur": (s.end - s.start) * _US, "pid": pid[s.device], "tid": _COMPUTE,
                       "args": {"action": s.index, "critical": (s.device, s.start, s.end) in critical}})
    for (device, way), segments in sorted(link_segments(sim).items()):
        for start, end, labels, nbytes in segments:
            name = labels[0] if len(labels) == 1 else f"{len(labels)} transfers"
            events.append({"name": name, "cat": "link", "ph": "X", "ts": start * _US, "dur": (end - start) * _US,
                           "pid": pid[device], "tid": _LINK_OUT if way == "out" else _LINK_IN,
                           "args": {"transfers": list(labels), "bytes": nbytes}})
    for r in sim.devices:
        for t, nbytes in r.memory.points:
            events.append({"name": "memory", "ph": "C", "ts": t * _US, "pid": pid[r.device], "tid": 0,
                           "args": {"MiB": nbytes / 2**20}})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"schedule": sim.program.schedule, "iteration_ms": sim.iteration_s * 1e3,
                      "throughput_samples_per_s": sim.throughput if sim.iteration_s > 0 else None,
                      "shared_medium": sim.shared_medium, "bound_by": sim.binding()},
    }


def write_trace(sim: "Simulation", path: str | os.PathLike) -> dict[str, Any]:
    """Write ``chrome_trace(sim)`` to ``path`` (atomically) and return it."""
    trace = chrome_trace(sim)
    _write_atomic(Path(path), json.dumps(trace, allow_nan=False) + "\n")  # strict JSON: no Infinity
    return trace


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


# ---------------------------------------------------------------------------------------------
# Gantt chart

_COLORS = {"F": "#4c72b0", "B": "#55a868", "allreduce": "#c44e52", "wait": "#d9d9d9",
           "out": "#dd8452", "in": "#8172b3"}
_PICTURE_FORMATS = (".png", ".svg", ".pdf")


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the Gantt chart needs matplotlib, which is not installed: "
                          "pip install 'asteroid-fx[plot]' (or pip install matplotlib). "
                          "The Perfetto trace (Simulation.trace, --trace) needs nothing extra.") from None
    return Figure


def gantt(sim: "Simulation", path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw ``sim`` as a Gantt chart into ``path`` (.png, .svg or .pdf by its suffix): a row per
    device with its compute (F blue, B green, ALLREDUCE red, waits grey) and under it two thin
    rows for its link (out, in). Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in _PICTURE_FORMATS:
        raise InputError(f"cannot tell the picture format of {str(path)!r}: use a name ending in "
                         f"{', '.join(_PICTURE_FORMATS)}")
    Figure = _figure_class()
    from matplotlib.patches import Patch

    devices = [r.device for r in sim.devices]
    n = len(devices)
    total_ms = max(sim.iteration_s * 1e3, 1e-9)
    fig = Figure(figsize=(12, 0.75 * n + 1.6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    row = {d: n - 1 - i for i, d in enumerate(devices)}  # the first device on top
    ops = {r.device: dict(enumerate(sim.program.of(r.device))) for r in sim.devices}
    by_color: dict[tuple[str, float, float], list[tuple[float, float]]] = defaultdict(list)
    labels = []
    for s in sim.spans:
        y = row[s.device]
        width = (s.end - s.start) * 1e3
        if s.what == "compute":
            a = ops[s.device][s.index]
            key = "F" if a.op == Op.F else "B"
            by_color[(key, y + 0.12, 0.5)].append((s.start * 1e3, width))
            if width > total_ms / 90:
                labels.append((s.start * 1e3 + width / 2, y + 0.37, str(a.mb)))
        else:
            by_color[(s.what, y + 0.12, 0.5)].append((s.start * 1e3, width))
    for (device, way), segments in link_segments(sim).items():
        y = row[device] - (0.06 if way == "out" else 0.22)
        for start, end, _, _ in segments:
            by_color[(way, y, 0.13)].append((start * 1e3, (end - start) * 1e3))
    for (key, y, h), bars in by_color.items():
        ax.broken_barh(bars, (y, h), facecolors=_COLORS[key], edgecolors="white" if key in "FB" else "none",
                       linewidth=0.4)
    for x, y, text in labels:
        ax.text(x, y, text, ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks([row[d] + 0.2 for d in devices])
    ax.set_yticklabels([f"{r.device}\nstage {r.stage_label}" for r in sim.devices], fontsize=8)
    ax.set_ylim(-0.35, n)
    ax.set_xlim(0, total_ms * 1.01)
    ax.set_xlabel("time (ms)")
    p = sim.program
    ax.set_title(title or (f"{p.schedule}: {len(p.stages)} stages, {p.microbatches} micro-batches, "
                           f"{n} devices - {sim.iteration_s * 1e3:.1f} ms/iteration, "
                           f"{sim.throughput:.0f} samples/s (simulated)"), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    drawn = {key for key, _, _ in by_color}
    names = {"F": "forward (micro-batch)", "B": "backward", "allreduce": "all-reduce", "wait": "waiting",
             "out": "link out", "in": "link in"}
    legend = [Patch(color=_COLORS[k], label=text) for k, text in names.items() if k in drawn]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (0.75 * n + 1.6) - 0.08),
              ncol=max(1, len(legend)), fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None} if path.suffix.lower() == ".png" else None)
    return path


# ---------------------------------------------------------------------------------------------
# text grid

_GRID_TOKEN = {Op.F: "F", Op.B: "B", Op.ALLREDUCE: "AR"}


def format_timed_grid(sim: "Simulation") -> str:
    """Rows are the instants at which some device starts a compute action or an ALLREDUCE, columns
    the devices; ``1F3`` is stage 1's forward of micro-batch 3."""
    devices = [r.device for r in sim.devices]
    col = {d: i for i, d in enumerate(devices)}
    starts: dict[float, list[str]] = {}
    for s in sim.spans:
        if s.what not in ("compute", "allreduce"):
            continue
        a = sim.program.of(s.device)[s.index]
        t = round(s.start, 12)
        cells = starts.setdefault(t, [""] * len(devices))
        cells[col[s.device]] = f"{a.stage}{_GRID_TOKEN.get(a.op, a.op.value)}{'' if a.mb is None else a.mb}"
    header = ["step", "t (ms)", *devices]
    rows = [[str(k), f"{t * 1e3:.3f}", *cells] for k, (t, cells) in enumerate(sorted(starts.items()))]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def render(r: list[str]) -> str:
        return " | ".join([r[0].rjust(widths[0]), r[1].rjust(widths[1]),
                           *(x.ljust(w) for x, w in zip(r[2:], widths[2:]))]).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(r) for r in rows)])
