"""What a simulation reports: per-device times and memory, the spans and messages of the
iteration, its critical path and what binds it (the engine that produces them is engine.py)."""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from asteroid_fx.cost.stage import within
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.plan import DeviceUse, Prediction
from asteroid_fx.ir.program import Program


# ---------------------------------------------------------------------------------------------
# results


class Span(NamedTuple):
    """What a device did from ``start`` to ``end``: "compute" (F/B), "wait" (blocked in RECV,
    RESTORE or for its group), "allreduce" (the ring itself)."""

    device: str
    index: int  # the action's index in the device's list
    start: float
    end: float
    what: str
    label: str  # the action's short text
    cause: int = -1  # a wait for a message: its index in Simulation.transfers


class PathStep(NamedTuple):
    """One piece of the critical path: "compute" on a device, a message on a "link" ("a -> b",
    from posting to arrival), an "allreduce" of a stage, or a "wait" the path could not follow."""

    what: str
    where: str
    start: float
    end: float


class Transfer(NamedTuple):
    """One message on the network: posted, on the wire from ``started`` (after the messages
    posted before it on its pair) to its last byte (``drained``), arrived after the latency. An
    ALLREDUCE is one Transfer per edge of its ring."""

    src: str
    dst: str
    label: str
    nbytes: float
    posted: float
    started: float
    drained: float
    arrived: float


class MemoryTimeline(NamedTuple):
    weights: int
    gradients: int
    optimizer: int
    buffers: int
    points: tuple[tuple[float, int], ...]  # (time, total bytes) from t=0, at every change
    peak_bytes: int
    budget_bytes: int
    copies: int = 0  # recovery's state copies: the rollback point and the backups held (in every point)


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    device: str
    stage: int  # the first stage it holds
    kind: str
    compute_s: float  # F and B
    wait_s: float  # blocked in RECV / RESTORE, or for the group of an ALLREDUCE
    allreduce_s: float  # inside the ALLREDUCE ring
    finish_s: float  # end of the device's last action
    busy: float  # compute_s / iteration time
    memory: MemoryTimeline  # of every stage it holds together
    stages: tuple[int, ...] = ()  # every stage it holds (several: virtual stages); () reads as (stage,)

    @property
    def stage_label(self) -> str:
        """Its stages as a table cell: "2", or "0,2" for a device holding stages 0 and 2."""
        return ",".join(str(s) for s in (self.stages or (self.stage,)))

    @property
    def bubble(self) -> float:
        """The fraction of the iteration the device does not compute."""
        return 1.0 - self.busy


@dataclasses.dataclass(frozen=True)
class Simulation:
    """One simulated iteration of ``program``; times in seconds from its start."""

    program: Program
    cluster: Cluster
    shared_medium: bool
    iteration_s: float
    devices: tuple[DeviceReport, ...]  # in program order
    spans: tuple[Span, ...]  # by start time
    transfers: tuple[Transfer, ...]  # in the order they drained

    @property
    def batch(self) -> int:
        return self.program.microbatches * self.program.microbatch_rows

    @property
    def throughput(self) -> float:
        """Samples per second."""
        return self.batch / self.iteration_s if self.iteration_s > 0 else math.inf

    def device(self, name: str) -> DeviceReport:
        for r in self.devices:
            if r.device == name:
                return r
        raise InputError(f"device {name!r} is not in this simulation (devices: {', '.join(r.device for r in self.devices)})")

    def link_busy_s(self) -> dict[tuple[str, str], float]:
        """(device, "out" | "in") -> seconds its channel carried at least one transfer."""
        intervals: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        for t in self.transfers:
            if t.drained > t.started:
                intervals[(t.src, "out")].append((t.started, t.drained))
                intervals[(t.dst, "in")].append((t.started, t.drained))
        return {k: _union_length(v) for k, v in intervals.items()}

    def critical_path(self) -> tuple[PathStep, ...]:
        """The chain of work that ends last, in time order: walked back from the device that
        finishes last, through its computes, to the message a wait waited for and on at its sender
        (queueing behind the pair's earlier messages and latency count as the link's), and from an
        ALLREDUCE to the member that reached it last. Its steps tile [0, iteration time]."""
        spans: dict[str, list[Span]] = defaultdict(list)
        for sp in self.spans:
            spans[sp.device].append(sp)
        for items in spans.values():
            items.sort(key=lambda sp: (sp.start, sp.index, sp.end))
        ends = {d: [sp.end for sp in items] for d, items in spans.items()}

        def last_ending(device: str, t: float) -> int:
            """Position of the device's last span ending at or before ``t`` (-1: none)."""
            return bisect.bisect_right(ends.get(device, []), t + 1e-12 * (1.0 + t)) - 1

        path: list[PathStep] = []
        if not spans:
            return ()
        device = max(spans, key=lambda d: spans[d][-1].end)
        k = len(spans[device]) - 1
        # the walk goes back in time, so it never meets a span twice; where times are so large that
        # the tolerance of ``last_ending`` spans several of them (a hostile latency of 1e18 s), it
        # could go round in a cycle: it stops there instead
        seen: set[tuple[str, int]] = set()
        while k >= 0 and (device, k) not in seen:
            seen.add((device, k))
            sp = spans[device][k]
            if sp.what == "compute":
                path.append(PathStep("compute", device, sp.start, sp.end))
                k -= 1
            elif sp.what == "wait" and sp.cause >= 0:
                t = self.transfers[sp.cause]
                path.append(PathStep("link", f"{t.src} -> {t.dst}", t.posted, t.arrived))
                device = t.src
                k = last_ending(device, t.posted)
            elif sp.what == "allreduce":
                path.append(PathStep("allreduce", f"stage {self.program.of(device)[sp.index].stage}", sp.start, sp.end))
                group = self.program.of(device)[sp.index].group or (device,)
                # the member that came last waited for nobody: its span before the ring ends at its start
                late = [m for m in group if m in spans and not any(
                    x.what == "wait" and x.end == sp.start and x.cause < 0 for x in spans[m])]
                device = late[0] if late else device
                k = last_ending(device, sp.start)
                if spans[device] and k >= 0 and spans[device][k].what == "allreduce":
                    k -= 1
            else:
                path.append(PathStep("wait", device, sp.start, sp.end))
                k -= 1
        return tuple(reversed(path))

    def binding(self) -> str:
        """What sets the iteration time, in words: memory over budget if any, else what takes the
        biggest part of the critical path (compute, communication or an all-reduce) and where most."""
        if not self.devices or self.iteration_s <= 0:
            return "nothing (an empty iteration)"
        over = [r.device for r in self.devices if not within(r.memory.peak_bytes, r.memory.budget_bytes)]
        if over:
            return "memory of " + ", ".join(over) + " (over budget)"
        totals: dict[str, float] = defaultdict(float)
        parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for step in self.critical_path():
            totals[step.what] += step.end - step.start
            parts[step.what][step.where] += step.end - step.start
        if not totals:
            return "nothing (an empty iteration)"
        what = max(totals, key=lambda w: totals[w])
        where, most = max(parts[what].items(), key=lambda kv: kv[1])
        share = f"{totals[what] / self.iteration_s:.0%} of the critical path"
        if what == "compute":
            return f"compute ({share}; most: {where} of stage {self.device(where).stage_label}, {most / self.iteration_s:.0%})"
        if what == "link":
            medium = ", one shared medium" if self.shared_medium else ""
            return f"communication ({share}{medium}; most: {where}, {most / self.iteration_s:.0%})"
        if what == "allreduce":
            return f"all-reduce ({share}; most: {where}, {most / self.iteration_s:.0%})"
        return f"waiting ({share})"

    def critical_path_summary(self) -> str:
        """How the critical path splits between compute, links and all-reduces."""
        totals: dict[str, float] = defaultdict(float)
        parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for step in self.critical_path():
            totals[step.what] += step.end - step.start
            parts[step.what][step.where] += step.end - step.start
        out = []
        for what in ("compute", "link", "allreduce", "wait"):
            if totals.get(what, 0.0) <= 0:
                continue
            top = sorted(parts[what].items(), key=lambda kv: -kv[1])[:3]
            detail = ", ".join(f"{w} {x / self.iteration_s:.0%}" for w, x in top)
            out.append(f"{what} {totals[what] / self.iteration_s:.0%} ({detail})")
        return "; ".join(out)

    def prediction(self, left_out: Sequence[tuple[str, str]] = ()) -> Prediction:
        """The simulated iteration as the planner reports it (``Plan.prediction``)."""
        uses = [DeviceUse(r.device, r.stage, r.memory.peak_bytes, r.memory.budget_bytes, r.compute_s,
                          "" if within(r.memory.peak_bytes, r.memory.budget_bytes) else "over budget")
                for r in self.devices]
        uses += [DeviceUse(d, None, 0, self.cluster.device(d).memory_bytes, 0.0, why) for d, why in left_out]
        return Prediction(self.iteration_s, self.throughput, tuple(uses), self.binding())

    def summary(self) -> str:
        p = self.program
        medium = ", one shared medium" if self.shared_medium else ""
        lines = [f"simulated {p.schedule}: {len(p.stages)} stages, {p.microbatches} micro-batches x "
                 f"{p.microbatch_rows} rows on {len(self.devices)} devices{medium}",
                 f"  iteration {self.iteration_s * 1e3:.2f} ms, {self.throughput:.1f} samples/s; bound by {self.binding()}",
                 f"  critical path: {self.critical_path_summary()}",
                 f"  {'device':<16} {'stage':>5} {'compute':>10} {'busy':>5} {'bubble':>6} {'wait':>10} "
                 f"{'allreduce':>10} {'peak memory':>21}"]
        for r in self.devices:
            mem = f"{_mib(r.memory.peak_bytes)} / {_mib(r.memory.budget_bytes)}"
            lines.append(f"  {r.device:<16} {r.stage_label:>5} {r.compute_s * 1e3:>8.2f}ms {r.busy:>5.0%} {r.bubble:>6.0%} "
                         f"{r.wait_s * 1e3:>8.2f}ms {r.allreduce_s * 1e3:>8.2f}ms {mem:>21}")
        copies = [f"{r.device} {_mib(r.memory.copies)}" for r in self.devices if r.memory.copies]
        if copies:
            lines.append("  peak memory includes recovery's state copies (rollback point, backups held): "
                         + ", ".join(copies))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    # exports live in trace.py; these are the short ways to reach them
    def trace(self, path: str | Path | None = None) -> dict[str, Any]:
        """The Chrome/Perfetto trace (a dict); written as JSON to ``path`` when given."""
        from asteroid_fx.sim.trace import chrome_trace, write_trace

        return write_trace(self, path) if path is not None else chrome_trace(self)

    def gantt(self, path: str | Path) -> Path:
        """A Gantt chart, PNG or SVG by the file's suffix (needs matplotlib: the ``plot`` extra)."""
        from asteroid_fx.sim.trace import gantt

        return gantt(self, path)

    def grid(self) -> str:
        """Steps x devices, each row the compute that starts at one instant."""
        from asteroid_fx.sim.trace import format_timed_grid

        return format_timed_grid(self)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _mib(n: float) -> str:
    return f"{n / 2**30:.2f}GiB" if n >= 2**30 else f"{n / 2**20:.1f}MiB"
