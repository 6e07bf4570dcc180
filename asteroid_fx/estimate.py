"""The planner's closed-form cost model of a plan: per-device memory and the iteration time.

Memory of device d in stage p (the paper's Mem_p = MOD + OPT + K_p * ACT):
  weights + gradients + optimizer state (``opt_state_factor`` x weights: 2 for Adam, 1 for SGD
  with momentum, 0 for plain SGD) + buffers + K_p x (activations kept for backward + the stage's
  input and output slices) for its rows, with K_p the micro-batches in flight under the schedule.
Iteration time (``CostTable.iteration_s``): one micro-batch's trip through the pipeline, then
M - 1 periods (the slowest stage, the busiest network interface, or a 1F1B cycle over adjacent
stages), then the slowest group all-reduce (a ring bounded by the group's slowest link). This
closed form is for searching many candidates quickly; a plan's reported prediction is the
simulation of the program it lowers to (``sim.predict``).
"""

from __future__ import annotations

from typing import Any, Sequence

from asteroid_fx.cluster import Cluster
from asteroid_fx.layer_graph import LayerGraph
from asteroid_fx.plan import StagePlan, warmup_depth

ADAM_STATE_FACTOR = 2.0


def in_flight(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at its peak."""
    depth = warmup_depth(schedule)
    if depth is None:
        return microbatches
    return min((stages - stage - 1) * (1 + depth) + 1, microbatches)


def static_memory(lg: LayerGraph, layers: tuple[int, int], opt_state_factor: float = ADAM_STATE_FACTOR) -> float:
    """Bytes a device of the stage holds all iteration: weights, gradients, optimizer state, buffers."""
    lo, hi = layers
    return lg.param_bytes(lo, hi) * (2.0 + opt_state_factor) + lg.buffer_bytes(lo, hi)


def activation_memory(lg: LayerGraph, layers: tuple[int, int], rows: int) -> float:
    """Bytes one micro-batch in flight holds on a device with ``rows`` rows: the activations kept
    for backward plus the stage's input and output slices."""
    lo, hi = layers
    return (lg.saved_bytes_per_row(lo, hi) + lg.cuts[lo].bytes_per_row + lg.cuts[hi].bytes_per_row) * rows


def device_memory(lg: LayerGraph, layers: tuple[int, int], rows: int, k_in_flight: int,
                  opt_state_factor: float = ADAM_STATE_FACTOR) -> int:
    return int(static_memory(lg, layers, opt_state_factor) + k_in_flight * activation_memory(lg, layers, rows))


def ring_allreduce_s(cluster: Cluster, group: Sequence[str], nbytes: float) -> float:
    g = len(group)
    if g < 2 or nbytes <= 0:
        return 0.0
    ring = list(group) + [group[0]]
    bw = min(cluster.link(a, b)[0] for a, b in zip(ring, ring[1:]))
    lat = max(cluster.link(a, b)[1] for a, b in zip(ring, ring[1:]))
    return 2.0 * (g - 1) / g * nbytes / bw + 2.0 * (g - 1) * lat


# ---------------------------------------------------------------------------------------------
# the same model as tables, for planners that score many candidates


class CostTable:
    """``lg``'s costs for ``cluster`` precomputed for micro-batches of up to ``max_rows`` rows:
    prefix sums over layers of forward+backward time per device kind and integer row count, of
    static memory and of activation bytes, so that any stage's time or memory is one subtraction.

    The numbers are exactly those of ``LayerGraph.stage_time``, ``device_memory`` and
    ``ring_allreduce_s`` (up to float summation order); planners use it to search, ``sim.predict``
    still gives a plan's reported prediction."""

    def __init__(self, lg: LayerGraph, cluster: Cluster, max_rows: int,
                 opt_state_factor: float = ADAM_STATE_FACTOR):
        import numpy as np

        self.lg, self.cluster, self.max_rows = lg, cluster, max_rows
        self.opt_state_factor = opt_state_factor
        L = len(lg)
        rs = np.arange(max_rows + 1, dtype=float)
        self.kinds = tuple(sorted({d.kind for d in cluster.devices}))
        self.time: dict[str, Any] = {}  # kind -> (max_rows + 1, L + 1) prefix sums, row 0 all zero
        for k in self.kinds:
            per_layer = np.zeros((max_rows + 1, L))
            for i, layer in enumerate(lg.layers):
                c = layer.cost(k)
                per_layer[:, i] = _fit_at(c.fwd, rs) + _fit_at(c.bwd, rs)
            self.time[k] = np.concatenate([np.zeros((max_rows + 1, 1)), np.cumsum(per_layer, axis=1)], axis=1)
        prefix = lambda xs: np.concatenate([[0.0], np.cumsum(np.asarray(xs, dtype=float))])  # noqa: E731
        self.params = prefix([layer.param_bytes for layer in lg.layers])
        self.buffers = prefix([layer.buffer_bytes for layer in lg.layers])
        self.saved = prefix([layer.saved_bytes_per_row for layer in lg.layers])
        self.cut_bytes = np.asarray([c.bytes_per_row for c in lg.cuts], dtype=float)
        self.kind_of = {d.name: d.kind for d in cluster.devices}
        self.budget = {d.name: d.memory_bytes for d in cluster.devices}

    def stage_time(self, device: str, lo: int, hi: int, rows: int) -> float:
        t = self.time[self.kind_of[device]]
        return float(t[rows, hi] - t[rows, lo])

    def static_bytes(self, lo: int, hi: int) -> float:
        return ((self.params[hi] - self.params[lo]) * (2.0 + self.opt_state_factor)
                + self.buffers[hi] - self.buffers[lo])

    def act_bytes_per_row(self, lo: int, hi: int) -> float:
        return float(self.saved[hi] - self.saved[lo] + self.cut_bytes[lo] + self.cut_bytes[hi])

    def memory(self, lo: int, hi: int, rows: int, k_in_flight: int) -> int:
        return int(self.static_bytes(lo, hi) + k_in_flight * self.act_bytes_per_row(lo, hi) * rows)

    def row_cap(self, device: str, lo: int, hi: int, k_in_flight: int) -> int:
        """The most rows ``device`` can hold of stage [lo, hi) with ``k_in_flight`` micro-batches."""
        spare = self.budget[device] - self.static_bytes(lo, hi)
        if spare < 0:
            return 0
        per_row = k_in_flight * self.act_bytes_per_row(lo, hi)
        if per_row <= 0:
            return self.max_rows
        # the same integer rounding as ``memory`` so that a capped count really fits
        r = min(self.max_rows, int(spare // per_row))
        while r > 0 and self.memory(lo, hi, r, k_in_flight) > self.budget[device]:
            r -= 1
        return r

    def best_rows(self, devices: Sequence[str], lo: int, hi: int, rows: int,
                  k_in_flight: int) -> tuple[int, ...] | None:
        """The split of ``rows`` over ``devices`` (each at least one row, each within its memory)
        that minimizes the slowest member's time, or None when no split fits. Giving each next row
        to the device whose time grows least is optimal for a min-max of nondecreasing times."""
        import heapq

        caps = [self.row_cap(d, lo, hi, k_in_flight) for d in devices]
        if min(caps) < 1 or sum(caps) < rows or rows < len(devices):
            return None
        split = [1] * len(devices)
        heap = [(self.stage_time(d, lo, hi, 2), i) for i, d in enumerate(devices) if caps[i] > 1]
        heapq.heapify(heap)
        for _ in range(rows - len(devices)):
            _, i = heapq.heappop(heap)
            split[i] += 1
            if split[i] < caps[i]:
                heapq.heappush(heap, (self.stage_time(devices[i], lo, hi, split[i] + 1), i))
        return tuple(split)

    def allreduce_s(self, devices: Sequence[str], lo: int, hi: int) -> float:
        return ring_allreduce_s(self.cluster, devices, self.params[hi] - self.params[lo]
                                + self.buffers[hi] - self.buffers[lo])

    def transfer_s(self, cut: int, src: StagePlan, dst: StagePlan) -> float:
        """Seconds to move one micro-batch across ``cut``: row slices of different pairs travel
        in parallel, but each device's network interface carries its own slices one after
        another (its outgoing channel as a sender, its incoming one as a receiver)."""
        load: dict[tuple[str, str], float] = {}
        latency = 0.0
        for a, alo, ahi in src.slots:
            for b, blo, bhi in dst.slots:
                overlap = min(ahi, bhi) - max(alo, blo)
                if overlap > 0:
                    bw, lat = self.cluster.link(a, b)
                    t = self.cut_bytes[cut] * overlap / bw
                    load[a, "out"] = load.get((a, "out"), 0.0) + t
                    load[b, "in"] = load.get((b, "in"), 0.0) + t
                    latency = max(latency, lat)
        return latency + max(load.values(), default=0.0)

    def nic_load_s(self, stages: Sequence[StagePlan]) -> float:
        """The busiest network interface's seconds per micro-batch: a device's outgoing channel
        carries its activations to the next stage and its gradients to the previous one, its
        incoming channel the reverse, each message at its pair's bandwidth (the simulator's NIC)."""
        load: dict[tuple[str, str], float] = {}
        for p in range(len(stages) - 1):
            per_row = self.cut_bytes[stages[p].layers[1]]
            for a, alo, ahi in stages[p].slots:
                for b, blo, bhi in stages[p + 1].slots:
                    overlap = min(ahi, bhi) - max(alo, blo)
                    if overlap > 0:
                        t = per_row * overlap / self.cluster.link(a, b)[0]
                        for key in ((a, "out"), (b, "in"), (b, "out"), (a, "in")):  # act a->b, grad b->a
                            load[key] = load.get(key, 0.0) + t
        return max(load.values(), default=0.0)

    def iteration_s(self, stages: Sequence[StagePlan], microbatches: int, schedule: str) -> float:
        """The iteration time: one micro-batch's round trip through the pipeline (fill and
        drain), then M - 1 periods, then the slowest all-reduce. The period is the slowest
        stage's step, or the busiest network interface, or, under 1F1B, a cycle over stages p..q:
        stage p alternates one forward and one backward and holds 1 + N micro-batches more than
        stage p + 1 ("1f1b+N"; N = 0 for plain 1F1B), so between its forward of a micro-batch and
        its backward of the one (q - p)(1 + N) later lie the steps of stages p..q and the links
        between them both ways, which (q - p)(1 + N) + 1 periods must cover (what makes plain
        1F1B slow on slow links, and a deeper warm-up faster there)."""
        S, M = len(stages), microbatches
        step = [max(self.stage_time(d, st.layers[0], st.layers[1], r) for d, r in zip(st.devices, st.rows))
                for st in stages]
        link = [self.transfer_s(stages[p].layers[1], stages[p], stages[p + 1]) for p in range(S - 1)]
        allreduce = max(self.allreduce_s(st.devices, *st.layers) for st in stages)
        period = max(step + [self.nic_load_s(stages)])
        depth = warmup_depth(schedule)
        if depth is not None:
            for p in range(S):
                for q in range(p + 1, S):
                    cycle = sum(step[p:q + 1]) + 2 * sum(link[p:q])
                    period = max(period, cycle / min((q - p) * (1 + depth) + 1, M))
        return sum(step) + 2 * sum(link) + (M - 1) * period + allreduce

    def stages_for(self, bounds: Sequence[int], groups: Sequence[Sequence[str]], rows: int,
                   microbatches: int, schedule: str) -> tuple[StagePlan, ...] | None:
        """Stages with the best rows per group, or None when some group cannot hold its stage."""
        S = len(groups)
        out = []
        for p, g in enumerate(groups):
            k = in_flight(schedule, p, S, microbatches)
            split = self.best_rows(g, bounds[p], bounds[p + 1], rows, k)
            if split is None:
                return None
            out.append(StagePlan((bounds[p], bounds[p + 1]), tuple(g), split))
        return tuple(out)


def _fit_at(fit, rows):
    """A TimeFit evaluated at an array of row counts, with TimeFit's own rules at the ends."""
    import numpy as np

    pts = fit.points
    xs = np.array([p[0] for p in pts], dtype=float)
    ys = np.array([p[1] for p in pts], dtype=float)
    out = np.empty_like(rows)
    if len(pts) == 1:
        out[:] = ys[0] * rows / xs[0]
    else:
        out[:] = np.interp(rows, xs, ys)
        below = rows < xs[0]
        out[below] = ys[0] * rows[below] / xs[0]
        above = rows > xs[-1]
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        out[above] = np.maximum(0.0, ys[-1] + slope * (rows[above] - xs[-1]))
    out[rows <= 0] = 0.0
    return out
