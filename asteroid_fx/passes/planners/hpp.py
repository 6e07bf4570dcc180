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

With ``recovery`` every device's memory also holds recovery's state copies (estimate.py): its
rollback point in every stage's static bytes, and the backups a stage's first device holds, which
depend on the neighbouring stage, checked by the DP and ``best_cuts`` against the next stage they
chose and exactly by ``exact`` (which may put another member first to hold them).

Guarantees: the plan is sound (every layer in one stage, cuts allowed, rows add up, one stage per
device) and every device's predicted peak memory fits its budget (recovery's copies included when
asked for); a cluster that cannot hold the model raises NoPlanError with the smallest memory that
would do.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from typing import Iterable, Sequence

import numpy as np

from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.cost.estimate import ADAM_STATE_FACTOR, CostTable, in_flight
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.plan import NoPlanError, Plan, StagePlan, warmup_depth
from asteroid_fx.passes.planners.predict import predict

INF = float("inf")
RANDOM_ORDERS = 6  # for clusters of up to 8 devices; 2 beyond
ALL_ORDERS_UP_TO = 5  # devices; 5! = 120 orders
DP_BOUNDARIES = 48  # the DP places cuts among at most this many (32 beyond 8 devices); local
                    # search refines them
FULL_SEARCH_MICROBATCHINGS = 3  # micro-batchings that get every order (one fewer beyond 8 devices)
LOCAL_SEARCH_STARTS = 3
POLISHED = 16  # best DP answers whose cuts are polished on the closed form before local search
DEEPENED = 8  # best plans also tried with a deeper 1F1B warm-up ("1f1b+N", N in DEPTHS)
DEPTHS = (1, 2, 4)
LOCAL_SEARCH_EVALS = 250  # plans scored per local search: a bound, so planning time stays bounded


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A plan before simulation: stages with exact rows and the closed-form iteration time."""

    stages: tuple[StagePlan, ...]
    microbatches: int
    rows: int
    estimate_s: float
    schedule: str = "1f1b"

    @property
    def key(self) -> tuple:
        return (self.microbatches, self.schedule, tuple((st.layers, st.devices, st.rows) for st in self.stages))


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
    # small clusters: every order (groups are contiguous runs of an order, so this reaches every
    # grouping); larger ones: a few seeded random orders widen the DP's reach
    if len(devices) <= ALL_ORDERS_UP_TO:
        out += [tuple(p) for p in itertools.permutations(sorted(devices))]
        return list(dict.fromkeys(out))
    rng = random.Random(len(devices))
    for _ in range(RANDOM_ORDERS if len(devices) <= 8 else 2):
        shuffled = list(devices)
        rng.shuffle(shuffled)
        out.append(tuple(shuffled))
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
    """Cost matrices over (first boundary a, last boundary b) for a group of devices: its step
    time with an equal-finish, memory-capped row split, its all-reduce, and the transfer across
    boundary b.

    For speed each device's stage time is taken as linear in its rows, t = alpha + beta x rows
    (through its times at 1 and R rows): members finish together at
    tau = (R + sum alpha/beta) / sum 1/beta, no sooner than one row takes on any member; a member
    whose share exceeds what its memory holds keeps its cap and the others share the rest. Matrices
    depend only on the multiset of (kind, memory) in the group, so they are cached across groups
    and orderings."""

    def __init__(self, table: CostTable, pos: np.ndarray, rows: int, microbatches: int):
        self.t, self.pos, self.R, self.M = table, pos, rows, microbatches
        n = len(pos)
        a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        self.valid = b > a
        lo, hi = pos[a], pos[b]
        # rollback points included under recovery; the backups a first member holds depend on the
        # neighbouring stages (``holds_backups``, ``holds_last``; ``exact`` checks the candidate)
        self.static = table.static_bytes(lo, hi)
        self.state = table.state_bytes(lo, hi)
        self.recovery = table.recovery
        self.act = np.maximum(table.saved[hi] - table.saved[lo] + table.cut_bytes[lo] + table.cut_bytes[hi], 1e-9)
        self.grad_bytes = table.params[hi] - table.params[lo] + table.buffers[hi] - table.buffers[lo]
        self.alpha, self.beta = {}, {}
        for k in table.kinds:
            T = table.time[k][:, pos]
            t1 = T[1, b] - T[1, a]
            if rows > 1:
                tR = T[rows, b] - T[rows, a]
                beta = np.maximum((tR - t1) / (rows - 1), 1e-15)
            else:
                beta = np.maximum(t1, 1e-15)
            self.alpha[k] = np.maximum(t1 - beta, 0.0)
            self.beta[k] = beta
        self.cache: dict[tuple, np.ndarray] = {}
        self.members: dict[tuple[str, ...], tuple[tuple, int]] = {}  # group -> ((kind, memory)...), least memory
        self.bw = np.asarray(table.cluster.bandwidth, dtype=float)
        self.lat = np.asarray(table.cluster.latency, dtype=float)
        self.most_needed: dict[int, float] = {}  # K -> the most memory any valid (a, b) needs at R rows

    def step(self, group: tuple[str, ...], k_in_flight: int) -> np.ndarray:
        """The group's step time per (a, b); inf where it cannot hold the stage."""
        known = self.members.get(group)
        if known is None:
            members = tuple(sorted((self.t.kind_of[d], self.t.budget[d]) for d in group))
            known = self.members[group] = (members, min(m for _, m in members))
        members, smallest = known
        R = float(self.R)
        # memory cannot bind if every member holds all R rows at every (a, b)
        if k_in_flight not in self.most_needed:
            need = np.where(self.valid, self.static + k_in_flight * self.act * R, 0.0)
            self.most_needed[k_in_flight] = float(need.max())
        binds = self.most_needed[k_in_flight] > smallest
        key = (members, k_in_flight if binds else 0)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        inv = sum(1.0 / self.beta[k] for k, _ in members)
        lead = sum(self.alpha[k] / self.beta[k] for k, _ in members)
        one_row = self.alpha[members[0][0]] + self.beta[members[0][0]]
        for k in {k for k, _ in members[1:]}:
            one_row = np.maximum(one_row, self.alpha[k] + self.beta[k])
        tau = np.maximum((R + lead) / inv, one_row)
        ok = self.valid & (R >= len(members))
        if binds:
            caps = [np.where(self.static > m, -1.0, np.floor((m - self.static) / (k_in_flight * self.act)))
                    for _, m in members]
            ok &= np.all(np.stack([c >= 1.0 for c in caps]), axis=0)
            ok &= np.sum(np.stack([np.minimum(c, R) for c in caps]), axis=0) >= R
            share = [(tau - self.alpha[k]) / self.beta[k] for k, _ in members]
            over = [sh > c for sh, c in zip(share, caps)]
            if any(np.any(o) for o in over):
                kept = sum(np.where(o, np.maximum(c, 0.0), 0.0) for o, c in zip(over, caps))
                free_inv = sum(np.where(o, 0.0, 1.0 / self.beta[k]) for o, (k, _) in zip(over, members))
                free_lead = sum(np.where(o, 0.0, self.alpha[k] / self.beta[k]) for o, (k, _) in zip(over, members))
                capped_time = np.max(np.stack([np.where(o, self.alpha[k] + self.beta[k] * np.maximum(c, 0.0), 0.0)
                                               for o, c, (k, _) in zip(over, caps, members)]), axis=0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    rebalanced = np.where(free_inv > 0, (R - kept + free_lead) / free_inv, INF)
                tau = np.maximum(np.maximum(tau, rebalanced), capped_time)
        out = np.where(ok, tau, INF)
        self.cache[key] = out
        return out

    def holds_backups(self, k_next: int, next_end, next_most, also_last: bool) -> np.ndarray:
        """Under recovery, per (a, b): whether the first device of the next stage, which runs
        [b, next_end[b]) and has at most ``next_most[b]`` bytes (its group's largest budget), can
        hold two copies of this stage [a, b) (its backup), and of the last stage [next_end[b], L)
        when ``also_last``, with a row of its own. Leading dimensions of ``next_end`` and
        ``next_most`` broadcast."""
        b = np.arange(len(self.pos))
        own = self.static[b, next_end] + k_next * self.act[b, next_end]
        if also_last:
            own = own + 2 * self.state[next_end, -1]
        most = np.broadcast_to(next_most, own.shape)
        return 2 * self.state + own[..., None, :] <= most[..., None, :]

    def holds_last(self, k_in_flight: int, most) -> np.ndarray:
        """Under recovery, per (a, b): whether the first device of the first of two stages, with at
        most ``most`` bytes, can hold two copies of the last stage [b, L) beside its own stage
        [a, b) with a row."""
        return self.static + k_in_flight * self.act + 2 * self.state[:, -1][None, :] <= most

    def allreduce(self, group: tuple[str, ...]) -> np.ndarray:
        g = len(group)
        if g < 2:
            return np.zeros_like(self.grad_bytes)
        key = ("ar", group)
        if key not in self.cache:
            ring = list(group) + [group[0]]
            bw = min(self.t.cluster.link(x, y)[0] for x, y in zip(ring, ring[1:]))
            lat = max(self.t.cluster.link(x, y)[1] for x, y in zip(ring, ring[1:]))
            self.cache[key] = 2.0 * (g - 1) / g * self.grad_bytes / bw + 2.0 * (g - 1) * lat
        return self.cache[key]

    def transfer(self, group: tuple[str, ...], others: Sequence[str]) -> np.ndarray:
        """Per boundary b: one micro-batch's activations leaving the group over its slowest link
        to the rest, as if one interface carried them all (the next group is not known yet)."""
        if not others:
            return np.zeros(len(self.pos))
        key = ("tr", frozenset(group), frozenset(others))
        if key not in self.cache:
            idx = self.t.cluster.index
            gi, oi = [idx(d) for d in group], [idx(d) for d in others]
            bw = float(self.bw[np.ix_(gi, oi)].min())
            lat = float(self.lat[np.ix_(gi, oi)].max())
            # the next group may be one device whose interface takes every row: no parallelism
            out = lat + self.t.cut_bytes[self.pos] * self.R / bw
            out[-1] = 0.0
            self.cache[key] = out
        return self.cache[key]




def dp_boundaries(table: CostTable, limit: int = DP_BOUNDARIES) -> list[int]:
    """0, L and at most ``limit - 2`` allowed cuts between, spread evenly over the work (the mean
    over the cluster's kinds): a long graph is searched coarsely, then cuts move locally."""
    lg = table.lg
    allowed = list(lg.allowed_cuts())
    if len(allowed) + 2 <= limit:
        return [0, *allowed, len(lg)]
    work = sum(table.time[k][table.max_rows] for k in table.kinds)  # prefix over layers
    total = work[-1] if work[-1] > 0 else 1.0
    picked = set()
    for q in range(1, limit - 1):
        target = total * q / (limit - 1)
        picked.add(min(allowed, key=lambda c: abs(work[c] - target)))
    return [0, *sorted(picked), len(lg)]


def dp_plans(table: CostTable, order: Sequence[str], microbatches: int, schedule: str,
             max_stages: int | None = None, boundaries: Sequence[int] | None = None,
             costs: "_GroupCosts | None" = None) -> dict[int, tuple[list[int], list[tuple[str, ...]]]]:
    """For every stage count S, the bounds and groups that minimize the bottleneck on ``order``
    (groups are contiguous runs of it, devices at its end may be left out). Cuts are placed among
    ``boundaries`` (default: every allowed cut); ``costs`` shares cached matrices between calls."""
    lg, R, M = table.lg, table.max_rows, microbatches
    if costs is not None:
        pos = costs.pos
    else:
        pos = np.asarray(boundaries if boundaries is not None else [0, *lg.allowed_cuts(), len(lg)])
    n, D = len(pos), len(order)
    S_max = min(D, n - 1, max_stages or D)
    gc = costs if costs is not None else _GroupCosts(table, pos, R, M)
    depth = warmup_depth(schedule)
    # per contiguous group [j, j2): steady cost per (a, b), without the memory term (added per K)
    # per first device j: the all-reduce and outgoing transfer of every group [j, j2), stacked
    # over j2 so that one numpy expression covers them all
    allred, link = {}, {}
    # under recovery a stage's first device holds its neighbours' backups: the largest budget of
    # every contiguous group [j, j2) bounds what its first device (the member exact picks) holds
    most = np.full((D + 1, D + 1), -INF)
    for j in range(D):
        most[j, j + 1:] = np.maximum.accumulate([table.budget[d] for d in order[j:]])
    for j in range(D):
        grps = [tuple(order[j:j2]) for j2 in range(j + 1, D + 1)]
        allred[j] = np.stack([gc.allreduce(g) for g in grps])  # (D - j, n, n)
        link[j] = np.stack([gc.transfer(g, [d for d in order if d not in g]) for g in grps])[:, None, :]
    # The value of a state is the closed form's shape, (M - 1) x the largest per-micro-batch
    # stage time + their sum + the largest all-reduce; the DP keeps, per state, the transition
    # that scores best with what the rest of the pipeline already holds (exact for the
    # bottleneck, greedy for the sum).
    mx = np.full((n, D + 1), INF)
    sm = np.full((n, D + 1), INF)
    ar = np.full((n, D + 1), INF)
    mx[n - 1, :] = sm[n - 1, :] = ar[n - 1, :] = 0.0  # all layers placed; devices left over stay out
    choice: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    results: dict[int, tuple[list[int], list[tuple[str, ...]]]] = {}
    layers = [mx]
    rows_n = np.arange(n)
    steps: dict[tuple[int, int], np.ndarray] = {}
    for s in range(1, S_max + 1):
        k = in_flight(schedule, 0, s, M)  # the first of s stages left holds the most
        pmx, psm, par = mx, sm, ar
        best = np.full((n, D + 1), INF)
        mx, sm, ar = np.full((n, D + 1), INF), np.full((n, D + 1), INF), np.full((n, D + 1), INF)
        arg_b = np.zeros((n, D + 1), dtype=int)
        arg_j = np.zeros((n, D + 1), dtype=int)
        for j in range(D):
            if (j, k) not in steps:
                st = np.stack([gc.step(tuple(order[j:j2]), k) for j2 in range(j + 1, D + 1)])
                # under 1F1B a stage's step and its outgoing transfer bound a period together
                # (the cycle of two adjacent stages is at most the larger step + the transfer)
                steps[j, k] = st + link[j] / (1 + depth) if depth is not None else np.maximum(st, link[j])
            x = steps[j, k]  # (D - j, n, n): group [j, j2), first boundary a, last boundary b
            if gc.recovery and s > 1:
                # the next stage (the one the DP chose for state (b, j2)) holds this stage's
                # backup, and the last stage's too when it is the second to last
                nxt_b, nxt_j = choice[s - 1]
                firsts = np.arange(j + 1, D + 1)[:, None]
                ok = gc.holds_backups(in_flight(schedule, 0, s - 1, M), nxt_b[:, j + 1:].T,
                                      most[firsts, nxt_j[:, j + 1:].T], s - 1 == 2)
                x = np.where(ok, x, INF)
            if gc.recovery and s == 2:
                # in a plan of two stages the first stage's first device holds the last one's backup
                first = np.arange(n)[None, :, None] == 0
                x = np.where(first & ~gc.holds_last(k, most[j, j + 1:, None, None]), INF, x)
            cmx = np.maximum(x, pmx[:, j + 1:].T[:, None, :])
            csm = x + psm[:, j + 1:].T[:, None, :]
            car = np.maximum(allred[j], par[:, j + 1:].T[:, None, :])
            score = csm + car + ((M - 1) * cmx if M > 1 else 0.0)
            flat = score.transpose(1, 0, 2).reshape(n, -1)  # a -> (j2, b)
            pick = np.argmin(flat, axis=1)
            g, b = np.divmod(pick, n)
            best[:, j] = flat[rows_n, pick]
            mx[:, j] = cmx[g, rows_n, b]
            sm[:, j] = csm[g, rows_n, b]
            ar[:, j] = car[g, rows_n, b]
            arg_b[:, j] = b
            arg_j[:, j] = j + 1 + g
        layers.append(best)
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
    return Candidate(stages, microbatches, table.max_rows, table.iteration_s(stages, microbatches, schedule),
                     schedule)


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
    # split a stage in two at its middle allowed cut, the new stage run by a device taken from
    # its group or from those left out (the cuts are then re-placed for the new groups)
    spare = [d for d in devices if d not in used]
    for gi, g in enumerate(groups):
        lo, hi = bounds[gi], bounds[gi + 1]
        inside = [a for a in allowed_set if lo < a < hi]
        if not inside:
            continue
        mid = inside[len(inside) // 2]
        donors = ([(d, True) for d in g] if len(g) > 1 else []) + [(d, False) for d in spare]
        for d, from_group in donors:
            for before in (True, False):
                ng = [list(x) for x in groups]
                if from_group:
                    ng[gi].remove(d)
                ng.insert(gi if before else gi + 1, [d])
                yield [*bounds[:gi + 1], mid, *bounds[gi + 1:]], ng
    # merge two adjacent stages into one run by both groups
    for gi in range(len(groups) - 1):
        ng = [list(x) for x in groups]
        ng[gi] = ng[gi] + ng.pop(gi + 1)
        yield [*bounds[:gi + 1], *bounds[gi + 2:]], ng
    # swap two devices of different groups
    for gi in range(len(groups)):
        for gj in range(gi + 1, len(groups)):
            for x in groups[gi]:
                for y in groups[gj]:
                    ng = [list(g) for g in groups]
                    ng[gi][ng[gi].index(x)] = y
                    ng[gj][ng[gj].index(y)] = x
                    yield bounds, ng


def best_cuts(costs: _GroupCosts, groups: Sequence[Sequence[str]], schedule: str) -> list[int] | None:
    """For a fixed sequence of groups, the cuts (among ``costs.pos``) that minimize the DP's
    bottleneck: a DP over (stage, first boundary), vectorized over the last boundary."""
    n, S, M = len(costs.pos), len(groups), costs.M
    names = costs.t.cluster.names
    most = [max(costs.t.budget[d] for d in g) for g in groups]  # what a group's first device may hold
    mx, sm, ar = np.full(n, INF), np.full(n, INF), np.full(n, INF)
    mx[n - 1] = sm[n - 1] = ar[n - 1] = 0.0
    choice = []
    rows_n = np.arange(n)
    for p in range(S - 1, -1, -1):
        grp = tuple(groups[p])
        k = in_flight(schedule, p, S, M)
        step = costs.step(grp, k)
        rest = [d for d in names if d not in grp]
        link = costs.transfer(grp, rest)[None, :]
        depth = warmup_depth(schedule)
        x = step + link / (1 + depth) if depth is not None else np.maximum(step, link)
        if costs.recovery and p + 1 < S:  # the next stage's first device holds this stage's backup
            x = np.where(costs.holds_backups(in_flight(schedule, p + 1, S, M), choice[-1], most[p + 1],
                                             p + 1 == S - 2), x, INF)
        if costs.recovery and S == 2 and p == 0:  # and the first stage's the last stage's
            x = np.where(costs.holds_last(k, most[0]), x, INF)
        cmx = np.maximum(x, mx[None, :])
        csm = x + sm[None, :]
        car = np.maximum(costs.allreduce(grp), ar[None, :])
        score = csm + car + ((M - 1) * cmx if M > 1 else 0.0)
        b = np.argmin(score, axis=1)
        val = score[rows_n, b]
        mx, sm, ar = cmx[rows_n, b], csm[rows_n, b], car[rows_n, b]
        choice.append(b)
    if not math.isfinite(val[0]):
        return None
    bounds, a = [int(costs.pos[0])], 0
    for b in reversed(choice):
        a = int(b[a])
        bounds.append(int(costs.pos[a]))
    return bounds


def polish_cuts(table: CostTable, c: Candidate, schedule: str, max_passes: int = 8) -> Candidate:
    """Coordinate descent on the cuts alone: move each cut to a neighbouring allowed cut while
    the closed form improves (the DP placed them by its own, coarser score)."""
    allowed = sorted(table.lg.allowed_cuts())
    groups = [list(st.devices) for st in c.stages]
    for _ in range(max_passes):
        improved = False
        bounds = [c.stages[0].layers[0]] + [st.layers[1] for st in c.stages]
        for i in range(1, len(bounds) - 1):
            if bounds[i] not in allowed:
                continue
            k = allowed.index(bounds[i])
            for k2 in (k - 1, k + 1):
                if 0 <= k2 < len(allowed) and bounds[i - 1] < allowed[k2] < bounds[i + 1]:
                    nb = list(bounds)
                    nb[i] = allowed[k2]
                    n = exact(table, nb, groups, c.microbatches, schedule)
                    if n is not None and n.estimate_s < c.estimate_s * (1 - 1e-9):
                        c, improved = n, True
                        bounds = nb
        if not improved:
            break
    return c


def local_search(table: CostTable, c: Candidate, schedule: str, costs: _GroupCosts | None = None,
                 max_rounds: int = 60, max_evals: int = LOCAL_SEARCH_EVALS) -> Candidate:
    """Hill-climb on the closed form with the moves of ``_neighbours`` (first improvement); a
    move that changes the groups is also tried with the cuts re-optimized for them."""
    allowed = list(table.lg.allowed_cuts())
    devices = table.cluster.names
    seen: set = set()
    for _ in range(max_rounds):
        improved = False
        for bounds, groups in _neighbours(c, allowed, devices):
            tries = [bounds]
            if len(groups) > len(costs.pos if costs is not None else ()) - 1 >= 0:
                continue
            if costs is not None and groups != [list(st.devices) for st in c.stages]:
                recut = best_cuts(costs, groups, schedule)
                if recut is not None and recut != bounds:
                    tries.append(recut)
            for b in tries:
                key = (tuple(b), tuple(map(tuple, groups)))
                if key in seen:
                    continue
                seen.add(key)
                if len(seen) > max_evals:
                    return c
                n = exact(table, b, groups, c.microbatches, schedule)
                if n is not None and b is not bounds and n.estimate_s < 1.05 * c.estimate_s:
                    n = polish_cuts(table, n, schedule, max_passes=2)  # re-placed cuts, close: finish them
                if n is not None and n.estimate_s < c.estimate_s * (1 - 1e-9):
                    c, improved = n, True
                    break
            if improved:
                break
        if not improved:
            break
    return c




def _dp_candidates(table: CostTable, costs: _GroupCosts, orders, M: int, schedule: str, stages: int | None,
                   found: dict) -> None:
    for order in orders:
        for S, (bounds, groups) in dp_plans(table, order, M, schedule, max_stages=stages, costs=costs).items():
            if stages is not None and S != stages:
                continue
            c = exact(table, bounds, groups, M, schedule)
            if c is not None:
                found.setdefault(c.key, c)


def search(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
           microbatch_rows: int | None = None, schedule: str = "1f1b", stages: int | None = None,
           opt_state_factor: float = ADAM_STATE_FACTOR, orders: str = "all", local: bool = True,
           deepen: bool = True, recovery: bool = False) -> list[Candidate]:
    """All candidates the planner scores, best closed form first (before simulation). With
    ``recovery`` every candidate fits every device's budget with recovery's state copies."""
    found: dict[tuple, Candidate] = {}
    choices = microbatch_choices(batch, microbatches, microbatch_rows)
    tables = {R: CostTable(lg, cluster, R, opt_state_factor, recovery) for _, R in choices}
    costs = {}
    # first every micro-batching with the paper's order and the speed order, then the full search
    # (every order, local search) on the micro-batchings that did best
    for M, R in choices:
        limit = DP_BOUNDARIES if len(cluster.devices) <= 8 else 32
        costs[R] = _GroupCosts(tables[R], np.asarray(dp_boundaries(tables[R], limit)), R, M)
        first = 1 if orders == "memory" else 2  # the paper's order (and speed order, to rank micro-batchings)
        _dp_candidates(tables[R], costs[R], orderings(tables[R], cluster.names)[:first], M, schedule, stages, found)
    if orders == "memory":  # the paper's search: one order, plain schedules
        return sorted(found.values(), key=lambda c: c.estimate_s)
    ranked = sorted(found.values(), key=lambda c: c.estimate_s)
    full = FULL_SEARCH_MICROBATCHINGS if len(cluster.devices) <= 8 else FULL_SEARCH_MICROBATCHINGS - 1
    promising = list(dict.fromkeys((c.microbatches, c.rows) for c in ranked))[:full]
    for M, R in promising:
        _dp_candidates(tables[R], costs[R], orderings(tables[R], cluster.names)[2:], M, schedule, stages, found)
    if local:
        ranked = sorted(found.values(), key=lambda c: c.estimate_s)
        for c in ranked[:POLISHED]:
            better = polish_cuts(tables[c.rows], c, schedule)
            found.setdefault(better.key, better)
        ranked = sorted(found.values(), key=lambda c: c.estimate_s)
        starts = list(ranked[:LOCAL_SEARCH_STARTS])
        if len(cluster.devices) <= 8:  # small clusters: also the best of every micro-batching
            for M, R in choices:
                best_of = next((c for c in ranked if c.microbatches == M), None)
                if best_of is not None and best_of not in starts:
                    starts.append(best_of)
        for c in starts:
            better = local_search(tables[c.rows], c, schedule, costs[c.rows])
            if stages is None or len(better.stages) == stages:
                found.setdefault(better.key, better)
    if schedule == "1f1b" and deepen:
        # beyond the paper: the same stages with a deeper 1F1B warm-up, where memory allows; it
        # hides slow links (estimate.CostTable.iteration_s) at the price of activations in flight
        for c in sorted(found.values(), key=lambda c: c.estimate_s)[:DEEPENED]:
            if len(c.stages) < 2:
                continue
            bounds = [c.stages[0].layers[0]] + [st.layers[1] for st in c.stages]
            for depth in DEPTHS:
                deeper = exact(tables[c.rows], bounds, [st.devices for st in c.stages], c.microbatches,
                               f"1f1b+{depth}")
                if deeper is not None:
                    found.setdefault(deeper.key, deeper)
    return sorted(found.values(), key=lambda c: c.estimate_s)


def plan(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
         microbatch_rows: int | None = None, schedule: str = "1f1b", stages: int | None = None,
         opt_state_factor: float = ADAM_STATE_FACTOR, orders: str = "all", local: bool = True,
         simulate_top: int = 4, name: str = "asteroid", deepen: bool = True, recovery: bool = False) -> Plan:
    """The Asteroid planner; see the module docstring. ``recovery``: the plan runs with pipeline
    replay, and every device's memory holds recovery's state copies."""
    cands = search(lg, cluster, batch=batch, microbatches=microbatches, microbatch_rows=microbatch_rows,
                   schedule=schedule, stages=stages, opt_state_factor=opt_state_factor, orders=orders,
                   local=local, deepen=deepen, recovery=recovery)
    if not cands:
        raise NoPlanError(no_plan_message(lg, cluster, batch, microbatches, microbatch_rows, schedule,
                                          opt_state_factor, recovery))
    return best_simulated(to_simulate(cands, simulate_top), lg, cluster, schedule, opt_state_factor, name, recovery)


def to_simulate(cands: Sequence[Candidate], top: int, most: int = 10) -> list[Candidate]:
    """Which candidates the simulator settles between: the ``top`` best by the closed form, the
    best of every schedule, then the best of every stage count, micro-batching and schedule
    not yet in (the closed form is a model of the simulator and can misrank plans of different
    shapes; it is optimistic about deeper warm-ups), at most ``most``."""
    chosen = list(cands[:top])
    for sched in dict.fromkeys(c.schedule for c in cands):
        for c in [c for c in cands if c.schedule == sched][:1]:
            if c not in chosen:
                chosen.append(c)
    seen_shapes = {(len(c.stages), c.microbatches, c.schedule) for c in chosen}
    for c in cands[top:]:
        if len(chosen) >= most:
            break
        shape = (len(c.stages), c.microbatches, c.schedule)
        if shape not in seen_shapes and c.estimate_s <= 1.25 * cands[0].estimate_s:
            chosen.append(c)
            seen_shapes.add(shape)
    return chosen


def best_simulated(cands: Sequence[Candidate], lg: LayerGraph, cluster: Cluster, schedule: str,
                   opt_state_factor: float, name: str, recovery: bool = False) -> Plan:
    """The fastest of ``cands`` by simulation, with its prediction and explanations."""
    best, best_s = None, INF
    for c in cands:
        t = predict(Plan(c.stages, c.microbatches, c.rows, c.schedule, name, recovery=recovery), lg, cluster,
                    opt_state_factor).iteration_s
        if t < best_s:
            best, best_s = c, t
    return finish(best, lg, cluster, schedule, opt_state_factor, name, recovery)


def finish(c: Candidate, lg: LayerGraph, cluster: Cluster, schedule: str, opt_state_factor: float,
           name: str, recovery: bool = False) -> Plan:
    """A Plan for the candidate: the simulator's prediction (recovery's state copies in every
    device's memory under ``recovery``), devices left out and what binds."""
    schedule = c.schedule
    plan = Plan(c.stages, c.microbatches, c.rows, schedule, name, recovery=recovery)
    used = {d for st in c.stages for d in st.devices}
    table = CostTable(lg, cluster, c.rows, opt_state_factor, recovery)
    left_out = [(d.name, left_out_reason(table, d.name, c, schedule)) for d in cluster.devices if d.name not in used]
    pred = predict(plan, lg, cluster, opt_state_factor, left_out)
    held = table.held_bytes([c.stages[0].layers[0], *(st.layers[1] for st in c.stages)])
    notes = {}
    for p, st in enumerate(c.stages):
        k = in_flight(schedule, p, len(c.stages), c.microbatches)
        for i, (d, r) in enumerate(zip(st.devices, st.rows)):
            cap = table.row_cap(d, st.layers[0], st.layers[1], k, held[p] if i == 0 else 0.0)
            if r == cap and len(st.devices) > 1:
                notes[d] = f"memory caps its rows at {cap}"
    uses = tuple(dataclasses.replace(u, note=notes.get(u.device, u.note)) for u in pred.devices)
    binding = pred.binding
    if notes:
        binding += "; memory caps the rows of " + ", ".join(notes)
    return dataclasses.replace(plan, prediction=dataclasses.replace(pred, devices=uses, binding=binding))


def left_out_reason(table: CostTable, device: str, c: Candidate, schedule: str) -> str:
    for p, st in enumerate(c.stages):
        k = in_flight(schedule, p, len(c.stages), c.microbatches)
        if table.row_cap(device, st.layers[0], st.layers[1], k) >= 1:
            return "adding it to any stage does not make the iteration faster (too slow or too poor a link)"
    return "too little memory for any stage of this plan"


def no_plan_message(lg: LayerGraph, cluster: Cluster, batch: int, microbatches: int | None,
                    microbatch_rows: int | None, schedule: str, opt_state_factor: float,
                    recovery: bool = False) -> str:
    """Why nothing fits, with the smallest memory that would do: found by bisection on a budget
    given to every device of the cluster (the planner's own search decides whether it fits)."""
    import dataclasses as dc

    def fits(budget: int) -> bool:
        bigger = Cluster([dc.replace(d, memory_bytes=max(d.memory_bytes, budget)) for d in cluster.devices],
                         cluster.bandwidth, cluster.latency, name=cluster.name)
        return bool(search(lg, bigger, batch=batch, microbatches=microbatches, microbatch_rows=microbatch_rows,
                           schedule=schedule, opt_state_factor=opt_state_factor, recovery=recovery))

    L = len(lg)
    M, R = microbatch_choices(batch, microbatches, microbatch_rows)[-1]
    table = CostTable(lg, cluster, R, opt_state_factor, recovery)
    hi = max(table.memory(0, L, R, in_flight(schedule, 0, 1, M)), 1)  # one device holds everything
    lo = max(d.memory_bytes for d in cluster.devices)
    biggest = lo
    if fits(lo):  # nothing to add memory to (e.g. too few rows for the groups): say so plainly
        return (f"no plan fits this cluster with a batch of {batch}" + (f" in {microbatches} micro-batches"
                if microbatches else "") + "; use a larger batch or fewer micro-batches")
    for _ in range(24):
        if hi - lo <= max(hi // 200, 1024):
            break
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    copies = (", recovery's copies of stage state (its rollback point, and two of each backup it holds)"
              if recovery else "")
    return (f"no plan fits this cluster: its largest device has {_bytes(biggest)}, and with all "
            f"{len(cluster.devices)} devices each would need at least {_bytes(hi)} (weights, gradients, "
            f"optimizer state{copies} and activations of its share). Give the devices that much memory, add "
            "devices, use an optimizer with less state (opt_state_factor) or a smaller batch"
            + (", or train without recovery" if recovery else ""))


def _bytes(n: float) -> str:
    n = int(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


__all__ = ["NoPlanError", "Candidate", "plan", "search", "dp_plans", "exact", "local_search",
           "microbatch_choices", "orderings"]
