"""The planner's closed form: a plan's per-device memory and iteration time from the stage model.

Each stage's numbers are those of ``cost/stage.py`` (compute, all-reduce, transfer, memory);
``CostTable`` tabulates them for micro-batches of up to R rows so that any stage's time or memory
is one subtraction, and composes them into a plan's:

Memory of device d in stage p (the paper's Mem_p = MOD + OPT + K_p * ACT): ``stage.device_memory``.
With recovery (pipeline replay, passes/replay.py) every device also keeps its rollback point, one
copy of its stage's state (weights + optimizer state + buffers, no gradients), and the first device
of a stage keeps two copies (this iteration's and the next's) of each stage whose backup it holds
(``plan.backup_holder_stage``: the previous stage; the first device of stage S - 2 also the last).
That term depends on the neighbouring stage, so ``CostTable.stages_for`` adds it per candidate plan
and lets a group put first the member that holds the copies at the least cost in time.
Iteration time (``CostTable.iteration_s``): one micro-batch's trip through the pipeline, then
M - 1 periods (the slowest stage, the busiest network interface, or a 1F1B cycle over adjacent
stages), then the slowest group all-reduce (a ring bounded by the group's slowest link), then the
ties' all-reduces over their holders (``stage.ties_s``: tied weights that several stages hold). This
closed form is for searching many candidates quickly; a plan's reported prediction is the
simulation of the program it lowers to (``sim.predict``).
"""

from __future__ import annotations

import collections

from typing import Any, Sequence

from asteroid_fx.cost.stage import (ADAM_STATE_FACTOR, activation_memory, device_memory, in_flight,
                                    ring_allreduce_s, state_memory, static_memory, step_table, ties_s, wire_s,
                                    within)
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.layer_graph import MIN_BATCH_STAT_ROWS, LayerGraph
from asteroid_fx.ir.plan import StagePlan, backup_holder_stage, warmup_depth

# ---------------------------------------------------------------------------------------------
# the same model as tables, for planners that score many candidates


class CostTable:
    """``lg``'s costs for ``cluster`` precomputed for micro-batches of up to ``max_rows`` rows:
    prefix sums over layers of forward+backward time per device kind and integer row count, of
    static memory and of activation bytes, so that any stage's time or memory is one subtraction.

    The numbers are exactly the stage model's (``stage.step_s``, ``stage.device_memory``,
    ``stage.allreduce_s``, ``stage.wire_s``; up to float summation order); planners use it to search, ``sim.predict``
    still gives a plan's reported prediction. With ``recovery`` a stage's static bytes include
    every device's rollback point, and ``held`` arguments (``held_bytes``) the backups a stage's
    first device holds. ``budgets`` (device -> bytes) replaces the cluster's memory: what-if
    questions (the smallest memory that would fit) ask it of memory no real device has."""

    def __init__(self, lg: LayerGraph, cluster: Cluster, max_rows: int,
                 opt_state_factor: float = ADAM_STATE_FACTOR, recovery: bool = False,
                 budgets: dict[str, int] | None = None):
        import numpy as np

        self.lg, self.cluster, self.max_rows = lg, cluster, max_rows
        self.opt_state_factor = opt_state_factor
        self.recovery = recovery
        rs = np.arange(max_rows + 1, dtype=float)
        self.kinds = tuple(sorted({d.kind for d in cluster.devices}))
        self.time: dict[str, Any] = {}  # kind -> (max_rows + 1, L + 1) prefix sums, row 0 all zero
        for k in self.kinds:
            self.time[k] = _time_prefix(lg, k, rs)
        prefix = lambda xs: np.concatenate([[0.0], np.cumsum(np.asarray(xs, dtype=float))])  # noqa: E731
        self.params = prefix([layer.param_bytes for layer in lg.layers])
        self.buffers = prefix([layer.buffer_bytes for layer in lg.layers])
        self.saved = prefix([layer.saved_bytes_per_row for layer in lg.layers])
        self.cut_bytes = np.asarray([c.bytes_per_row for c in lg.cuts], dtype=float)
        self.batch_stat_layers = prefix([1 if layer.batch_stats else 0 for layer in lg.layers])
        self.kind_of = {d.name: d.kind for d in cluster.devices}
        self.budget = {d.name: d.memory_bytes for d in cluster.devices}
        if budgets is not None:
            self.budget.update(budgets)
        # a search asks the same questions of many candidates (a moved cut leaves the other stages
        # as they were): answers by value, so the same candidate gets the same numbers
        self._caps: dict[tuple, int] = {}
        self._rows: dict[tuple, tuple | None] = {}
        self._allreduce: dict[tuple, float] = {}
        self._step: dict[StagePlan, float] = {}
        self._pair: dict[tuple[StagePlan, StagePlan], tuple[float, dict]] = {}  # transfer_s, NIC loads

    def stage_time(self, device: str, lo: int, hi: int, rows: int) -> float:
        return float(self.kind_time(self.kind_of[device], lo, hi, rows))

    def kind_time(self, kind: str, lo, hi, rows):
        """``stage.step_s`` of [lo, hi) on ``rows`` rows on ``kind``; elementwise for index arrays."""
        t = self.time[kind]
        return t[rows, hi] - t[rows, lo]

    def min_rows(self, lo, hi):
        """``lg.min_rows`` of [lo, hi): the fewest rows a device of the stage gets (more than one
        with a batch-statistics layer); elementwise for index arrays too."""
        import numpy as np

        return np.where(self.batch_stat_layers[hi] > self.batch_stat_layers[lo], MIN_BATCH_STAT_ROWS, 1)

    def state_bytes(self, lo: int, hi: int) -> float:
        """One copy of the stage's state (``state_memory``); elementwise for index arrays too."""
        return self.param_span(lo, hi) * (1.0 + self.opt_state_factor) + self.buffer_span(lo, hi)

    def param_span(self, lo, hi):
        """``lg.param_bytes`` of [lo, hi) (a tied weight once); elementwise for index arrays too."""
        over = sum((t.overcount(lo, hi) for t in self.lg.ties if t.kind != "buffer"), 0)
        return self.params[hi] - self.params[lo] - over

    def buffer_span(self, lo, hi):
        """``lg.buffer_bytes`` of [lo, hi); elementwise for index arrays too."""
        over = sum((t.overcount(lo, hi) for t in self.lg.ties if t.kind == "buffer"), 0)
        return self.buffers[hi] - self.buffers[lo] - over

    def static_bytes(self, lo: int, hi: int) -> float:
        """What a device of the stage holds all iteration (``static_memory``), its rollback point
        included under recovery, not the backups it holds; elementwise for index arrays too."""
        own = self.param_span(lo, hi) * (2.0 + self.opt_state_factor) + self.buffer_span(lo, hi)
        return own + self.state_bytes(lo, hi) if self.recovery else own

    def held_bytes(self, bounds: Sequence[int]) -> list[float]:
        """Per stage of the plan with stage boundaries ``bounds``, the bytes of the backups its
        first device holds: two copies of each stage it backs up (none without recovery)."""
        S = len(bounds) - 1
        held = [0.0] * S
        if self.recovery and S > 1:
            for p in range(S):
                held[backup_holder_stage(p, S)] += 2 * float(self.state_bytes(bounds[p], bounds[p + 1]))
        return held

    def act_bytes_per_row(self, lo: int, hi: int) -> float:
        return float(self.activation_bytes_per_row(lo, hi))

    def activation_bytes_per_row(self, lo, hi):
        """``stage.activation_memory`` of one row; elementwise for index arrays too."""
        return self.saved[hi] - self.saved[lo] + self.cut_bytes[lo] + self.cut_bytes[hi]

    def allreduce_bytes(self, lo, hi):
        """``stage.allreduce_bytes``; elementwise for index arrays too."""
        return self.param_span(lo, hi) + self.buffer_span(lo, hi)

    def memory(self, lo: int, hi: int, rows: int, k_in_flight: int, held: float = 0.0) -> int:
        """A device's peak in stage [lo, hi) with ``rows`` rows, holding ``held`` bytes of backups."""
        return int(self.static_bytes(lo, hi) + held + k_in_flight * self.act_bytes_per_row(lo, hi) * rows)

    def row_cap(self, device: str, lo: int, hi: int, k_in_flight: int, held: float = 0.0) -> int:
        """The most rows ``device`` can hold of stage [lo, hi) with ``k_in_flight`` micro-batches
        and ``held`` bytes of backups."""
        key = (self.budget[device], lo, hi, k_in_flight, held)  # devices of one budget share it
        cap = self._caps.get(key)
        if cap is None:
            cap = self._caps[key] = self._row_cap(device, lo, hi, k_in_flight, held)
        return cap

    def _row_cap(self, device: str, lo: int, hi: int, k_in_flight: int, held: float) -> int:
        budget = self.budget[device]
        spare = budget - self.static_bytes(lo, hi) - held
        if not within(self.memory(lo, hi, 0, k_in_flight, held), budget):
            return 0
        spare = max(spare, 0.0)
        per_row = k_in_flight * self.act_bytes_per_row(lo, hi)
        if per_row <= 0:
            return self.max_rows
        # the same integer rounding as ``memory`` so that a capped count really fits
        # (the quotient may land an ulp below a row that fits exactly: step both ways)
        r = min(self.max_rows, int(spare // per_row))
        while r > 0 and not within(self.memory(lo, hi, r, k_in_flight, held), budget):
            r -= 1
        while r < self.max_rows and within(self.memory(lo, hi, r + 1, k_in_flight, held), budget):
            r += 1
        return r

    def best_rows(self, devices: Sequence[str], lo: int, hi: int, rows: int,
                  k_in_flight: int, held: Sequence[float] = ()) -> tuple[int, ...] | None:
        """The split of ``rows`` over ``devices`` (each at least ``min_rows``, each within its memory,
        ``held[i]`` bytes of backups on ``devices[i]``, none past the end of ``held``) that
        minimizes the slowest member's time, or None when no split fits. Giving each next row to
        the device whose time grows least is optimal for a min-max of nondecreasing times."""
        import heapq

        caps = [self.row_cap(d, lo, hi, k_in_flight, held[i] if i < len(held) else 0.0)
                for i, d in enumerate(devices)]
        least = int(self.min_rows(lo, hi))
        if min(caps) < least or sum(caps) < rows or rows < least * len(devices):
            return None
        split = [least] * len(devices)
        heap = [(self.stage_time(d, lo, hi, least + 1), i) for i, d in enumerate(devices) if caps[i] > least]
        heapq.heapify(heap)
        for _ in range(rows - least * len(devices)):
            _, i = heapq.heappop(heap)
            split[i] += 1
            if split[i] < caps[i]:
                heapq.heappush(heap, (self.stage_time(devices[i], lo, hi, split[i] + 1), i))
        return tuple(split)

    def allreduce_s(self, devices: Sequence[str], lo: int, hi: int) -> float:
        key = (tuple(devices), lo, hi)
        out = self._allreduce.get(key)
        if out is None:
            out = self._allreduce[key] = ring_allreduce_s(self.cluster, devices, self.allreduce_bytes(lo, hi))
        return out

    def transfer_s(self, cut: int, src: StagePlan, dst: StagePlan) -> float:
        """Seconds to move one micro-batch across ``cut``: row slices of different pairs travel
        in parallel, but each device's network interface carries its own slices one after
        another (its outgoing channel as a sender, its incoming one as a receiver)."""
        load: dict[tuple[str, str], float] = {}
        latency = 0.0
        for a, b, overlap in _overlaps(src.slots, dst.slots):
            bw, lat = self.cluster.link(a, b)
            t = wire_s(self.cut_bytes[cut] * overlap, bw)
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
            for key, t in self._pair_costs(stages[p], stages[p + 1])[1].items():
                load[key] = load.get(key, 0.0) + t
        return max(load.values(), default=0.0)

    def _pair_costs(self, src: StagePlan, dst: StagePlan) -> tuple[float, dict]:
        """``transfer_s`` across the cut between two adjacent stages, and the seconds per micro-batch
        it puts on each network interface (``nic_load_s``), asked once per pair."""
        got = self._pair.get((src, dst))
        if got is None:
            load: dict[tuple[str, str], float] = {}
            per_row = self.cut_bytes[src.layers[1]]
            for a, b, overlap in _overlaps(src.slots, dst.slots):
                t = wire_s(per_row * overlap, self.cluster.link(a, b)[0])
                for key in ((a, "out"), (b, "in"), (b, "out"), (a, "in")):  # act a->b, grad b->a
                    load[key] = load.get(key, 0.0) + t
            got = self._pair[src, dst] = (self.transfer_s(src.layers[1], src, dst), load)
        return got

    def step_s(self, st: StagePlan) -> float:
        """A stage's step: its slowest member's time on its rows."""
        out = self._step.get(st)
        if out is None:
            out = self._step[st] = max(self.stage_time(d, st.layers[0], st.layers[1], r)
                                       for d, r in zip(st.devices, st.rows))
        return out

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
        step = [self.step_s(st) for st in stages]
        link = [self._pair_costs(stages[p], stages[p + 1])[0] for p in range(S - 1)]
        allreduce = max(self.allreduce_s(st.devices, *st.layers) for st in stages)
        period = max(step + [self.nic_load_s(stages)])
        depth = warmup_depth(schedule)
        if depth is not None:
            for p in range(S):
                steps, links = step[p], 0  # running sums: sum(step[p:q + 1]) and sum(link[p:q])
                for q in range(p + 1, S):
                    steps, links = steps + step[q], links + link[q - 1]
                    cycle = steps + 2 * links
                    period = max(period, cycle / min((q - p) * (1 + depth) + 1, M))
        return sum(step) + 2 * sum(link) + (M - 1) * period + allreduce + ties_s(self.lg, self.cluster, stages)

    def group_rows(self, devices: Sequence[str], lo: int, hi: int, rows: int, k_in_flight: int,
                   held: float = 0.0) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
        """The group's order and best rows when its first device holds ``held`` bytes of backups:
        ``devices`` as given, unless another member first makes the group's step faster (its
        share of rows shrinks less under the copies); None when no member can hold them."""
        key = (tuple(devices), lo, hi, rows, k_in_flight, held)
        if key not in self._rows:
            self._rows[key] = self._group_rows(devices, lo, hi, rows, k_in_flight, held)
        return self._rows[key]

    def _group_rows(self, devices: Sequence[str], lo: int, hi: int, rows: int, k_in_flight: int,
                    held: float) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
        if not held:
            split = self.best_rows(devices, lo, hi, rows, k_in_flight)
            return None if split is None else (tuple(devices), split)
        best = None
        for i, first in enumerate(devices):
            order = (first, *devices[:i], *devices[i + 1:])
            split = self.best_rows(order, lo, hi, rows, k_in_flight, (held,))
            if split is None:
                continue
            step = max(self.stage_time(d, lo, hi, r) for d, r in zip(order, split))
            if best is None or step < best[0]:
                best = (step, order, split)
        return None if best is None else best[1:]

    def stages_for(self, bounds: Sequence[int], groups: Sequence[Sequence[str]], rows: int,
                   microbatches: int, schedule: str) -> tuple[StagePlan, ...] | None:
        """Stages with the best rows per group (and, under recovery, the member that holds the
        backups first), or None when some group cannot hold its stage."""
        S = len(groups)
        held = self.held_bytes(bounds)
        out = []
        for p, g in enumerate(groups):
            k = in_flight(schedule, p, S, microbatches)
            found = self.group_rows(g, bounds[p], bounds[p + 1], rows, k, held[p])
            if found is None:
                return None
            out.append(StagePlan((bounds[p], bounds[p + 1]), *found))
        return tuple(out)

    def device_bytes(self, stages: Sequence[StagePlan], microbatches: int, schedule: str) -> dict[str, int]:
        """Each device's peak memory in ``stages``, the backups it holds under recovery included."""
        held = self.held_bytes([stages[0].layers[0], *(st.layers[1] for st in stages)])
        out = {}
        for p, st in enumerate(stages):
            k = in_flight(schedule, p, len(stages), microbatches)
            for i, (d, r) in enumerate(zip(st.devices, st.rows)):
                out[d] = self.memory(*st.layers, r, k, held[p] if i == 0 else 0.0)
        return out

    def fits(self, stages: Sequence[StagePlan], microbatches: int, schedule: str) -> bool:
        """Whether every device of ``stages`` holds its peak (``device_bytes``) within its budget."""
        return all(within(m, self.budget[d]) for d, m in self.device_bytes(stages, microbatches, schedule).items())



def _overlaps(src: Sequence[tuple[str, int, int]], dst: Sequence[tuple[str, int, int]]):
    """(a, b, rows) for every pair of slots of ``src`` and ``dst`` (consecutive row ranges) that
    share rows, in the order of a nested loop over both: one walk along the rows, not every pair."""
    i = j = 0
    while i < len(src) and j < len(dst):
        a, alo, ahi = src[i]
        b, blo, bhi = dst[j]
        overlap = min(ahi, bhi) - max(alo, blo)
        if overlap > 0:
            yield a, b, overlap
        if ahi <= bhi:
            i += 1
        else:
            j += 1


# the stage model's pieces that callers have long imported from here
__all__ = ["ADAM_STATE_FACTOR", "CostTable", "activation_memory", "device_memory", "in_flight", "ring_allreduce_s",
           "state_memory", "static_memory"]


# (id of a graph's layers, kind, rows) -> (those layers, prefix table): a planner builds tables for
# the same layers many times (every micro-batching searched alone, a long graph's coarse view,
# which shares its layers), and evaluating every layer's fits is most of a table's cost
_TIME_PREFIX: "collections.OrderedDict[tuple, tuple[Any, Any]]" = collections.OrderedDict()
_TIME_PREFIX_SIZE = 64


def _time_prefix(lg: LayerGraph, kind: str, rs: Any) -> Any:
    """Read-only (len(rs), L + 1) prefix sums over layers of ``step_table``, column 0 zero."""
    import numpy as np

    key = (id(lg.layers), kind, len(rs))
    hit = _TIME_PREFIX.get(key)
    if hit is not None and hit[0] is lg.layers:
        _TIME_PREFIX.move_to_end(key)
        return hit[1]
    table = np.concatenate([np.zeros((len(rs), 1)), np.cumsum(step_table(lg, kind, rs), axis=1)], axis=1)
    table.flags.writeable = False
    _TIME_PREFIX[key] = (lg.layers, table)
    while len(_TIME_PREFIX) > _TIME_PREFIX_SIZE:
        _TIME_PREFIX.popitem(last=False)
    return table
