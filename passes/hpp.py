"""hpp: the Asteroid planner. LayerGraph + Cluster + global batch -> Plan.

The search (after the paper's planner, MobiCom 2024 §4, and extended where noted):

1. Micro-batching: every split of the global batch into M micro-batches of R rows (M x R = batch,
   R at least the smallest group's size) is planned, unless the caller pins one.
2. For each device ordering (memory-descending as in the paper, plus speed-descending,
   speed-ascending and a link-locality chain — beyond the paper), a dynamic program over
   (first layer, first device, stages left) gives, for every stage count S, the cut points and the
   contiguous device groups that minimize the pipeline's bottleneck: max over stages of
   M x (the group's step time) + its ring all-reduce, and M x its boundary transfer. A stage's
   step time assumes the group splits rows for equal finishing times and caps each member's rows
   by its memory (weights + gradients + optimizer state + K_p x activations, K_p = micro-batches
   in flight under the schedule); a group that cannot hold the stage is infeasible. Devices at the
   end of an ordering may be left out. The DP is vectorized over (first cut, last cut) pairs.
3. Every DP answer is made exact: the rows of each group by ``CostTable.best_rows`` (optimal
   min-max integer split within memory), scored by the closed-form iteration time (fill and drain
   plus (M - 1) x the steady step plus the slowest all-reduce).
4. Local search on the best few (beyond the paper): move a cut to a neighbouring allowed cut, move
   a device to another group or out of the plan, swap two devices of different groups; keep a move
   when the closed form improves.
5. The best few distinct candidates are simulated (``sim.predict`` of the program they lower to)
   and the fastest simulated one is the plan: its prediction is the simulator's.

Guarantees: the plan is sound (every layer in one stage, cuts allowed, rows add up, one stage per
device) and every device's predicted peak memory fits its budget; a cluster that cannot hold the
model raises NoPlanError with the smallest memory that would do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

from asteroid_fx.cluster import Cluster
from asteroid_fx.estimate import ADAM_STATE_FACTOR, CostTable, in_flight
from asteroid_fx.layer_graph import LayerGraph
from asteroid_fx.plan import NoPlanError, Plan, StagePlan
from asteroid_fx.sim import predict

INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A plan before simulation: stages with exact rows and the closed-form iteration time."""

    stages: tuple[StagePlan, ...]
    microbatches: int
    rows: int
    estimate_s: float

    @property
    def key(self) -> tuple:
        return (self.microbatches, tuple((st.layers, st.devices, st.rows) for st in self.stages))


def microbatch_choices(batch: int, microbatches: int | None, microbatch_rows: int | None,
                       max_microbatches: int = 64) -> list[tuple[int, int]]:
    """(M, R) pairs to plan: the pinned one, or every divisor split of the batch."""
    if microbatches is not None and microbatch_rows is not None:
        return [(microbatches, microbatch_rows)]
    if microbatches is not None:
        if batch % microbatches:
            raise ValueError(f"a batch of {batch} rows does not split into {microbatches} micro-batches")
        return [(microbatches, batch // microbatches)]
    if microbatch_rows is not None:
        if batch % microbatch_rows:
            raise ValueError(f"a batch of {batch} rows does not split into micro-batches of {microbatch_rows}")
        return [(batch // microbatch_rows, microbatch_rows)]
    return [(batch // r, r) for r in range(1, batch + 1) if batch % r == 0 and batch // r <= max_microbatches]


# ---------------------------------------------------------------------------------------------
# device orderings


def _speed(table: CostTable, device: str) -> float:
    t = table.stage_time(device, 0, len(table.lg), table.max_rows)
    return 1.0 / t if t > 0 else 1e12


def orderings(table: CostTable, devices: Sequence[str]) -> list[tuple[str, ...]]:
    """The device orders the DP runs on: groups are contiguous runs of one of them."""
    speed = {d: _speed(table, d) for d in devices}
    mem = table.budget
    out = [
        tuple(sorted(devices, key=lambda d: (-mem[d], -speed[d], d))),  # the paper's order
        tuple(sorted(devices, key=lambda d: (-speed[d], -mem[d], d))),
        tuple(sorted(devices, key=lambda d: (speed[d], -mem[d], d))),
        _locality_chain(table.cluster, devices, speed),
    ]
    return list(dict.fromkeys(out))


def _locality_chain(cluster: Cluster, devices: Sequence[str], speed: dict[str, float]) -> tuple[str, ...]:
    """Start at the fastest device and always go on to the unvisited device with the best link:
    neighbours in the order (same group, adjacent stages) then talk over fast links."""
    left = sorted(devices, key=lambda d: -speed[d])
    chain = [left.pop(0)]
    while left:
        nxt = max(left, key=lambda d: (cluster.link(chain[-1], d)[0], speed[d]))
        left.remove(nxt)
        chain.append(nxt)
    return tuple(chain)


# ---------------------------------------------------------------------------------------------
# the dynamic program


class _GroupCosts:
    """Cost matrices over (first boundary a, last boundary b) for a contiguous group of an
    ordering: the group's step time with a balanced, memory-capped row split, its all-reduce,
    and the transfer across boundary b."""

    def __init__(self, table: CostTable, pos: np.ndarray, rows: int, microbatches: int):
        self.t, self.pos, self.R, self.M = table, pos, rows, microbatches
        n = len(pos)
        self.a, self.b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        self.valid = self.b > self.a
        lo, hi = pos[self.a], pos[self.b]
        self.static = ((table.params[hi] - table.params[lo]) * (2.0 + table.opt_state_factor)
                       + table.buffers[hi] - table.buffers[lo])
        self.act = table.saved[hi] - table.saved[lo] + table.cut_bytes[lo] + table.cut_bytes[hi]
        self.grad_bytes = table.params[hi] - table.params[lo] + table.buffers[hi] - table.buffers[lo]
        self.times = {k: table.time[k][:, pos] for k in table.kinds}  # (R + 1, n)
        self.full = {k: self._at(k, np.full(self.a.shape, float(rows))) for k in table.kinds}
        self.cache: dict[tuple, np.ndarray] = {}

    def _at(self, kind: str, rows: np.ndarray) -> np.ndarray:
        """Stage time of every (a, b) for fractional ``rows`` (linear between integer rows)."""
        T = self.times[kind]
        r = np.clip(rows, 0.0, float(self.R))
        r0 = np.floor(r).astype(int)
        r1 = np.minimum(r0 + 1, self.R)
        frac = r - r0
        t0 = T[r0, self.b] - T[r0, self.a]
        t1 = T[r1, self.b] - T[r1, self.a]
        return t0 + frac * (t1 - t0)

    def step(self, group: tuple[str, ...], k_in_flight: int) -> np.ndarray:
        """The group's step time per (a, b); inf where it cannot hold the stage."""
        key = (tuple(self.t.kind_of[d] for d in group), tuple(self.t.budget[d] for d in group), k_in_flight)
        if key in self.cache:
            return self.cache[key]
        kinds = [self.t.kind_of[d] for d in group]
        R = float(self.R)
        with np.errstate(divide="ignore", invalid="ignore"):
            caps = [np.floor((self.t.budget[d] - self.static) / np.maximum(k_in_flight * self.act, 1e-9))
                    for d in group]
            caps = [np.where(self.static > self.t.budget[d], -1.0, np.minimum(c, R)) for c, d in zip(caps, group)]
            speed = [1.0 / np.maximum(self.full[k], 1e-12) for k in kinds]
            rows = self._split(speed, caps, R)
            for _ in range(2):  # re-weight by the speed at the rows each member now has
                times = [self._at(k, r) for k, r in zip(kinds, rows)]
                speed = [np.where(t > 0, r / np.maximum(t, 1e-12), 1e12) for r, t in zip(rows, times)]
                rows = self._split(speed, caps, R)
            times = [self._at(k, r) for k, r in zip(kinds, rows)]
            out = np.max(np.stack(times), axis=0)
            ok = np.all(np.stack([c >= 1.0 for c in caps]), axis=0) & (np.sum(np.stack(caps), axis=0) >= R)
            ok &= R >= len(group)
        out = np.where(ok & self.valid, out, INF)
        self.cache[key] = out
        return out

    @staticmethod
    def _split(speed, caps, R):
        """Rows in proportion to speed, each at least one and at most its cap; what the capped
        members cannot take goes to the others in proportion to their speed (twice)."""
        g = len(speed)
        total = sum(speed)
        rows = [np.clip(R * s / total, 1.0, np.maximum(c, 1.0)) for s, c in zip(speed, caps)]
        for _ in range(2):
            left = R - sum(rows)
            free = [(r < c - 1e-9) for r, c in zip(rows, caps)]
            free_speed = sum(np.where(f, s, 0.0) for f, s in zip(free, speed))
            free_speed = np.where(free_speed > 0, free_speed, 1.0)
            rows = [np.clip(r + np.where(f, left * s / free_speed, 0.0), 1.0, np.maximum(c, 1.0))
                    for r, f, s, c in zip(rows, free, speed, caps)]
        del g
        return rows

    def allreduce(self, group: tuple[str, ...]) -> np.ndarray:
        g = len(group)
        if g < 2:
            return np.zeros_like(self.grad_bytes)
        ring = list(group) + [group[0]]
        bw = min(self.t.cluster.link(x, y)[0] for x, y in zip(ring, ring[1:]))
        lat = max(self.t.cluster.link(x, y)[1] for x, y in zip(ring, ring[1:]))
        return 2.0 * (g - 1) / g * self.grad_bytes / bw + 2.0 * (g - 1) * lat

    def transfer(self, group: tuple[str, ...], others: Sequence[str]) -> np.ndarray:
        """Per boundary b: one micro-batch's activations leaving the group (its members send their
        rows in parallel over their slowest link to the rest)."""
        if not others:
            return np.zeros(len(self.pos))
        bw = min(self.t.cluster.link(x, y)[0] for x in group for y in others)
        lat = max(self.t.cluster.link(x, y)[1] for x in group for y in others)
        out = lat + self.t.cut_bytes[self.pos] * self.R / (len(group) * bw)
        out[-1] = 0.0
        return out


def dp_plans(table: CostTable, order: Sequence[str], microbatches: int, schedule: str,
             max_stages: int | None = None, boundaries: Sequence[int] | None = None
             ) -> dict[int, tuple[list[int], list[tuple[str, ...]]]]:
    """For every stage count S, the bounds and groups that minimize the bottleneck on ``order``
    (groups are contiguous runs of it, devices at its end may be left out)."""
    lg, R, M = table.lg, table.max_rows, microbatches
    pos = np.asarray(boundaries if boundaries is not None else [0, *lg.allowed_cuts(), len(lg)])
    n, D = len(pos), len(order)
    S_max = min(D, n - 1, max_stages or D)
    gc = _GroupCosts(table, pos, R, M)
    # per contiguous group [j, j2): steady cost per (a, b), without the memory term (added per K)
    base, comm_b = {}, {}
    for j in range(D):
        for j2 in range(j + 1, D + 1):
            grp = tuple(order[j:j2])
            rest = [d for d in order if d not in grp]
            base[j, j2] = gc.allreduce(grp)
            comm_b[j, j2] = M * gc.transfer(grp, rest)
    best = np.full((n, D + 1), INF)
    best[n - 1, :] = 0.0  # all layers placed; the devices left over stay out
    choice: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    results: dict[int, tuple[list[int], list[tuple[str, ...]]]] = {}
    layers = []  # best[s] for s = 0..S_max
    layers.append(best)
    for s in range(1, S_max + 1):
        k = M if schedule == "gpipe" else min(s, M)
        prev = layers[-1]
        cur = np.full((n, D + 1), INF)
        arg_b = np.zeros((n, D + 1), dtype=int)
        arg_j = np.zeros((n, D + 1), dtype=int)
        for j in range(D):
            for j2 in range(j + 1, D + 1):
                grp = tuple(order[j:j2])
                cost = np.maximum(M * gc.step(grp, k) + base[j, j2], comm_b[j, j2][None, :])
                cand = np.maximum(cost, prev[None, :, j2])
                bi = np.argmin(cand, axis=1)
                val = cand[np.arange(n), bi]
                better = val < cur[:, j]
                cur[:, j] = np.where(better, val, cur[:, j])
                arg_b[:, j] = np.where(better, bi, arg_b[:, j])
                arg_j[:, j] = np.where(better, j2, arg_j[:, j])
        layers.append(cur)
        choice[s] = (arg_b, arg_j)
    for S in range(1, S_max + 1):
        if not math.isfinite(layers[S][0, 0]):
            continue
        bounds, groups, a, j = [int(pos[0])], [], 0, 0
        for s in range(S, 0, -1):
            arg_b, arg_j = choice[s]
            b, j2 = int(arg_b[a, j]), int(arg_j[a, j])
            bounds.append(int(pos[b]))
            groups.append(tuple(order[j:j2]))
            a, j = b, j2
        results[S] = (bounds, groups)
    return results


# ---------------------------------------------------------------------------------------------
# exact candidates, local search, simulation


def exact(table: CostTable, bounds: Sequence[int], groups: Sequence[Sequence[str]], microbatches: int,
          schedule: str) -> Candidate | None:
    stages = table.stages_for(bounds, groups, table.max_rows, microbatches, schedule)
    if stages is None:
        return None
    return Candidate(stages, microbatches, table.max_rows, table.iteration_s(stages, microbatches, schedule))


def _neighbours(c: Candidate, allowed: Sequence[int], devices: Sequence[str]) -> Iterable[tuple[list[int], list[list[str]]]]:
    bounds = [c.stages[0].layers[0]] + [st.layers[1] for st in c.stages]
    groups = [list(st.devices) for st in c.stages]
    allowed_set = sorted(allowed)
    # move a cut to the neighbouring allowed cut on either side
    for i in range(1, len(bounds) - 1):
        k = allowed_set.index(bounds[i]) if bounds[i] in allowed_set else None
        if k is None:
            continue
        for k2 in (k - 1, k + 1):
            if 0 <= k2 < len(allowed_set) and bounds[i - 1] < allowed_set[k2] < bounds[i + 1]:
                nb = list(bounds)
                nb[i] = allowed_set[k2]
                yield nb, groups
    used = {d for g in groups for d in g}
    # move a device to another group, or out (when its group keeps a member)
    for gi, g in enumerate(groups):
        for d in g:
            for gj in range(len(groups)):
                if gj != gi and len(g) > 1:
                    ng = [list(x) for x in groups]
                    ng[gi].remove(d)
                    ng[gj].append(d)
                    yield bounds, ng
            if len(g) > 1:
                ng = [list(x) for x in groups]
                ng[gi].remove(d)
                yield bounds, ng
    # bring a left-out device into a group
    for d in devices:
        if d not in used:
            for gj in range(len(groups)):
                ng = [list(x) for x in groups]
                ng[gj].append(d)
                yield bounds, ng
    # swap two devices of different groups
    for gi in range(len(groups)):
        for gj in range(gi + 1, len(groups)):
            for x in groups[gi]:
                for y in groups[gj]:
                    ng = [list(g) for g in groups]
                    ng[gi][ng[gi].index(x)] = y
                    ng[gj][ng[gj].index(y)] = x
                    yield bounds, ng


def local_search(table: CostTable, c: Candidate, schedule: str, max_rounds: int = 20) -> Candidate:
    """Hill-climb on the closed form with the moves of ``_neighbours`` (first improvement)."""
    allowed = list(table.lg.allowed_cuts())
    devices = table.cluster.names
    for _ in range(max_rounds):
        improved = False
        for bounds, groups in _neighbours(c, allowed, devices):
            n = exact(table, bounds, groups, c.microbatches, schedule)
            if n is not None and n.estimate_s < c.estimate_s * (1 - 1e-9):
                c, improved = n, True
                break
        if not improved:
            break
    return c


def search(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
           microbatch_rows: int | None = None, schedule: str = "1f1b", stages: int | None = None,
           opt_state_factor: float = ADAM_STATE_FACTOR, orders: str = "all", local: bool = True,
           simulate_top: int = 4) -> list[Candidate]:
    """All candidates the planner scores, best closed form first (before simulation)."""
    found: dict[tuple, Candidate] = {}
    for M, R in microbatch_choices(batch, microbatches, microbatch_rows):
        table = CostTable(lg, cluster, R, opt_state_factor)
        ords = orderings(table, cluster.names)
        if orders == "memory":
            ords = ords[:1]
        for order in ords:
            for S, (bounds, groups) in dp_plans(table, order, M, schedule, max_stages=stages).items():
                if stages is not None and S != stages:
                    continue
                c = exact(table, bounds, groups, M, schedule)
                if c is not None:
                    found.setdefault(c.key, c)
        if local:
            ranked = sorted((c for c in found.values() if c.rows == R), key=lambda c: c.estimate_s)
            for c in ranked[:3]:
                better = local_search(table, c, schedule)
                if stages is None or len(better.stages) == stages:
                    found.setdefault(better.key, better)
    return sorted(found.values(), key=lambda c: c.estimate_s)


def plan(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
         microbatch_rows: int | None = None, schedule: str = "1f1b", stages: int | None = None,
         opt_state_factor: float = ADAM_STATE_FACTOR, orders: str = "all", local: bool = True,
         simulate_top: int = 4, name: str = "asteroid") -> Plan:
    """The Asteroid planner; see the module docstring."""
    cands = search(lg, cluster, batch=batch, microbatches=microbatches, microbatch_rows=microbatch_rows,
                   schedule=schedule, stages=stages, opt_state_factor=opt_state_factor, orders=orders,
                   local=local)
    if not cands:
        raise NoPlanError(no_plan_message(lg, cluster, batch, microbatches, microbatch_rows, schedule,
                                          opt_state_factor))
    return best_simulated(cands[:simulate_top], lg, cluster, schedule, opt_state_factor, name)


def best_simulated(cands: Sequence[Candidate], lg: LayerGraph, cluster: Cluster, schedule: str,
                   opt_state_factor: float, name: str) -> Plan:
    """The fastest of ``cands`` by simulation, with its prediction and explanations."""
    best = None
    for c in cands:
        p = finish(c, lg, cluster, schedule, opt_state_factor, name)
        if best is None or p.prediction.iteration_s < best.prediction.iteration_s:
            best = p
    return best


def finish(c: Candidate, lg: LayerGraph, cluster: Cluster, schedule: str, opt_state_factor: float,
           name: str) -> Plan:
    """A Plan for the candidate: the simulator's prediction, devices left out and what binds."""
    plan = Plan(c.stages, c.microbatches, c.rows, schedule, name)
    used = {d for st in c.stages for d in st.devices}
    left_out = [(d.name, left_out_reason(lg, cluster, d.name, c, opt_state_factor))
                for d in cluster.devices if d.name not in used]
    pred = predict(plan, lg, cluster, opt_state_factor, left_out)
    table = CostTable(lg, cluster, c.rows, opt_state_factor)
    notes = {}
    for p, st in enumerate(c.stages):
        k = in_flight(schedule, p, len(c.stages), c.microbatches)
        for d, r in zip(st.devices, st.rows):
            cap = table.row_cap(d, st.layers[0], st.layers[1], k)
            if r == cap and len(st.devices) > 1:
                notes[d] = f"memory caps its rows at {cap}"
    uses = tuple(dataclasses.replace(u, note=notes.get(u.device, u.note)) for u in pred.devices)
    binding = pred.binding
    if notes:
        binding += "; memory caps the rows of " + ", ".join(notes)
    return dataclasses.replace(plan, prediction=dataclasses.replace(pred, devices=uses, binding=binding))


def left_out_reason(lg: LayerGraph, cluster: Cluster, device: str, c: Candidate, opt_state_factor: float) -> str:
    table = CostTable(lg, cluster, c.rows, opt_state_factor)
    for p, st in enumerate(c.stages):
        k = in_flight("1f1b", p, len(c.stages), c.microbatches)
        if table.row_cap(device, st.layers[0], st.layers[1], k) >= 1:
            return "adding it to any stage does not make the iteration faster (too slow or too poor a link)"
    return "too little memory for any stage of this plan"


def no_plan_message(lg: LayerGraph, cluster: Cluster, batch: int, microbatches: int | None,
                    microbatch_rows: int | None, schedule: str, opt_state_factor: float) -> str:
    """Why nothing fits, and the smallest per-device memory that would let some plan fit: the
    largest layer's static memory with one row in flight, or, over all devices together, the
    model's memory split evenly."""
    M, R = microbatch_choices(batch, microbatches, microbatch_rows)[-1] if batch else (1, 1)
    table = CostTable(lg, cluster, max(R, 1), opt_state_factor)
    L, D = len(lg), len(cluster.devices)
    # with one row per device and D stages, the heaviest of the best D-way split bounds the need
    need_one = max(table.memory(i, i + 1, 1, in_flight(schedule, 0, D, M)) for i in range(L))
    whole = table.memory(0, L, 1, in_flight(schedule, 0, 1, M))
    biggest = max(d.memory_bytes for d in cluster.devices)
    return (f"no plan fits this cluster: the model needs {_bytes(whole)} on one device (weights, gradients, "
            f"optimizer state and one row of activations); split over all {D} devices each would need at least "
            f"{_bytes(max(need_one, whole // D))}, and the largest device has {_bytes(biggest)}. "
            "Give devices at least that much memory, add devices, use an optimizer with less state "
            "(opt_state_factor), or a smaller model")


def _bytes(n: float) -> str:
    n = int(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


__all__ = ["NoPlanError", "Candidate", "plan", "search", "dp_plans", "exact", "local_search",
           "microbatch_choices", "orderings"]
