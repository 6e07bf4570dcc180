"""Cost values shared by the analytic model (cost/roofline.py) and measured profiles.

A ``TimeFit`` is a time as a function of the rows a device processes: piecewise linear through
sample points, extrapolated linearly past the last one. Analytic costs sample a roofline at
``ROW_GRID``; measured profiles sample real timings at the row counts they ran. Both become the same
value type, so the planner never asks where a number came from.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import NamedTuple, Sequence

ROW_GRID: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class TimeFit(NamedTuple):
    points: tuple[tuple[float, float], ...]  # (rows, seconds), rows strictly increasing

    def __call__(self, rows: float) -> float:
        if rows <= 0:
            return 0.0
        pts = self.points
        if len(pts) == 1:
            r0, t0 = pts[0]
            return t0 * rows / r0
        i = bisect.bisect_left([p[0] for p in pts], rows)
        i = min(max(i, 1), len(pts) - 1)
        (r0, t0), (r1, t1) = pts[i - 1], pts[i]
        if rows < r0:  # below the first sample: scale down towards zero rows, never negative
            return t0 * rows / r0
        return max(0.0, t0 + (t1 - t0) * (rows - r0) / (r1 - r0))

    def __add__(self, other: "TimeFit") -> "TimeFit":  # type: ignore[override]
        xs = sorted({r for r, _ in self.points} | {r for r, _ in other.points})
        return TimeFit(tuple((r, self(r) + other(r)) for r in xs))

    def scaled(self, factor: float) -> "TimeFit":
        return TimeFit(tuple((r, t * factor) for r, t in self.points))

    @staticmethod
    def zero() -> "TimeFit":
        return TimeFit(((1.0, 0.0),))

    @staticmethod
    def sample(fn, rows: Sequence[int] = ROW_GRID) -> "TimeFit":
        return TimeFit(tuple((float(r), float(fn(r))) for r in rows))


def total(fits: Sequence[TimeFit]) -> TimeFit:
    out = TimeFit.zero()
    for f in fits:
        out = out + f
    return out


@dataclasses.dataclass(frozen=True)
class NodeStats:
    """What one fx node costs, independent of any device (from FlopCounterMode and tensor sizes)."""

    flops_per_row: float  # forward FLOPs that scale with the rows
    flops_fixed: float  # forward FLOPs that do not (rare: ops on parameters only)
    bytes_per_row: float  # bytes read + written per row (activations)
    param_bytes: int  # bytes of the parameters and buffers the node reads
    out_bytes_per_row: float  # bytes of the node's output per row
    # activation bytes autograd keeps for backward, per row: the storages its saved-tensor hooks
    # see this node save that no earlier node saved, weights left out (passes/annotate_costs.py)
    saved_bytes_per_row: float


@dataclasses.dataclass(frozen=True)
class Cost:
    """Time of one node (or layer) on one device kind."""

    fwd: TimeFit
    bwd: TimeFit
    source: str = "analytic"  # "analytic" | "measured" | "calibrated"
