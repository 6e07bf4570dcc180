"""Baseline planners in the Asteroid planner's cost model, for side-by-side comparison.

Each takes what ``hpp.plan`` takes and returns a Plan whose prediction is the simulator's. Each
chooses its structure (stages, groups, rows) by its own policy and assumptions for every
micro-batching of the global batch; every baseline then gets the same help as the Asteroid planner
(its candidates are scored by the true heterogeneous closed form and the best few simulated), so
the comparison measures the policy, not the evaluation.

  dp         data parallel only: one stage on every device that can hold the whole model, rows
             split evenly (what DistributedDataParallel does).
  pp         a straight pipeline over all devices in cluster order, the same number of layers per
             stage (what a torch.distributed.pipelining user writes with an even split).
  pipedream  PipeDream's planner (Narayanan et al., SOSP 2019): a dynamic program over layers and
             replicated stages that assumes every device is the same (here: the cluster's median
             device, its memory and its slowest link), stages mapped to devices in cluster order,
             rows split evenly over a stage's replicas.
  hetpipe    HetPipe-style (Park et al., USENIX ATC 2020): devices dealt into V virtual workers of
             similar total speed; each virtual worker is a pipeline whose stage p runs on its p-th
             device; the virtual workers are data parallel (every stage's group holds one device
             of each, rows split evenly between them); layers cut in proportion to the speed of
             each stage's devices. Every V is tried.
  metis      Metis-style (Um et al., USENIX ATC 2024): stage groups of one device kind each (a
             kind's devices may form several equal groups), every order of the kinds, layers cut in
             proportion to each group's compute, rows in proportion to speed (even inside a
             homogeneous group), memory checked.
  oracle     exhaustive: every set of cuts and every assignment of devices (or none) to ordered
             groups, rows split optimally; for small instances only (a guard refuses large ones).

Differences from the original systems, for honesty: all run 1F1B or GPipe as asked (PipeDream's
asynchronous weight stashing, HetPipe's wave synchronous parameter server are not modelled: all
plans train synchronously with the same semantics); each is given the same micro-batch search.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.cost.estimate import ADAM_STATE_FACTOR, CostTable
from asteroid_fx.cost.stage import within
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.passes.planners.candidates import Candidate, microbatch_choices
from asteroid_fx.passes.planners.dp import dp_plans
from asteroid_fx.passes.planners.hpp import best_simulated, no_plan_message
from asteroid_fx.ir.plan import NoPlanError, Plan, StagePlan


def _even(total: int, n: int) -> tuple[int, ...]:
    return tuple(total // n + (1 if i < total % n else 0) for i in range(n))


def _candidate(table: CostTable, stages: Sequence[StagePlan], M: int, schedule: str) -> Candidate | None:
    """The baseline's stages as a candidate, or None when a device cannot hold its share (under
    recovery with the state copies: a baseline keeps its own order, so its first device holds) or
    gets fewer rows than its stage takes (``CostTable.min_rows``)."""
    if (not stages or any(min(st.rows) < table.min_rows(*st.layers) for st in stages)
            or not table.fits(stages, M, schedule)):
        return None
    stages = tuple(stages)
    return Candidate(stages, M, table.max_rows, table.iteration_s(stages, M, schedule), schedule)


def _cut_by_work(lg: LayerGraph, shares: Sequence[float], work: Sequence[float]) -> list[int] | None:
    """Bounds at allowed cuts so that stage p gets about shares[p] of ``work`` (greedy on prefix)."""
    allowed = list(lg.allowed_cuts())
    S = len(shares)
    if S - 1 > len(allowed):
        return None
    prefix = [0.0]
    for w in work:
        prefix.append(prefix[-1] + w)
    total, acc, bounds = prefix[-1], 0.0, [0]
    sshare = sum(shares)
    for p in range(S - 1):
        acc += shares[p] / sshare * total
        left = S - 1 - p
        options = [c for c in allowed if c > bounds[-1]]
        options = options[: len(options) - left + 1]
        if not options:
            return None
        bounds.append(min(options, key=lambda c: abs(prefix[c] - acc)))
    bounds.append(len(lg))
    return bounds


def _run(name: str, propose: Callable[[CostTable, int, int, str], list[Candidate]], lg: LayerGraph,
         cluster: Cluster, batch: int, microbatches: int | None, microbatch_rows: int | None, schedule: str,
         opt_state_factor: float, recovery: bool, simulate_top: int = 4) -> Plan:
    cands: dict[tuple, Candidate] = {}
    for M, R in microbatch_choices(batch, microbatches, microbatch_rows):
        table = CostTable(lg, cluster, R, opt_state_factor, recovery)
        for c in propose(table, M, R, schedule):
            if c is not None:
                cands.setdefault(c.key, c)
    if not cands:
        raise NoPlanError(f"planner {name!r}: " + no_plan_message(lg, cluster, batch, microbatches, microbatch_rows,
                                                                  schedule, opt_state_factor, recovery))
    ranked = sorted(cands.values(), key=lambda c: c.estimate_s)
    return best_simulated(ranked[:simulate_top], lg, cluster, opt_state_factor, name, recovery)


# ---------------------------------------------------------------------------------------------


def dp(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
       microbatch_rows: int | None = None, schedule: str = "1f1b",
       opt_state_factor: float = ADAM_STATE_FACTOR, recovery: bool = False) -> Plan:
    def propose(table, M, R, schedule):
        L = len(table.lg)
        holders = [d for d in table.cluster.names if table.row_cap(d, 0, L, 1) >= 1]
        out = []
        # DDP splits evenly; a device that cannot hold its even share sits out
        while holders and R >= len(holders):
            rows = _even(R, len(holders))
            over = [d for d, r in zip(holders, rows) if not within(table.memory(0, L, r, 1), table.budget[d])]
            if not over:
                out.append(_candidate(table, [StagePlan((0, L), tuple(holders), rows)], M, schedule))
                break
            holders = [d for d in holders if d not in over]
        return out

    return _run("dp", propose, lg, cluster, batch, microbatches, microbatch_rows, schedule, opt_state_factor, recovery)


def pp(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
       microbatch_rows: int | None = None, schedule: str = "1f1b",
       opt_state_factor: float = ADAM_STATE_FACTOR, recovery: bool = False) -> Plan:
    def propose(table, M, R, schedule):
        names = table.cluster.names
        S = min(len(names), len(table.lg.allowed_cuts()) + 1)
        bounds = _cut_by_work(table.lg, [1.0] * S, [1.0] * len(table.lg))
        if bounds is None:
            return []
        stages = [StagePlan((bounds[p], bounds[p + 1]), (names[p],), (R,)) for p in range(S)]
        return [_candidate(table, stages, M, schedule)]

    return _run("pp", propose, lg, cluster, batch, microbatches, microbatch_rows, schedule, opt_state_factor, recovery)


def _median_device(cluster: Cluster, table: CostTable) -> Device:
    speed = {d.name: table.stage_time(d.name, 0, len(table.lg), table.max_rows) for d in cluster.devices}
    ranked = sorted(cluster.devices, key=lambda d: speed[d.name])
    return ranked[(len(ranked) - 1) // 2]


def pipedream(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
              microbatch_rows: int | None = None, schedule: str = "1f1b",
              opt_state_factor: float = ADAM_STATE_FACTOR, recovery: bool = False) -> Plan:
    def propose(table, M, R, schedule):
        med = _median_device(table.cluster, table)
        bw = min(table.cluster.link(a, b)[0] for a in table.cluster.names for b in table.cluster.names if a != b) \
            if len(table.cluster) > 1 else 1e12
        lat = max(table.cluster.link(a, b)[1] for a in table.cluster.names for b in table.cluster.names if a != b) \
            if len(table.cluster) > 1 else 0.0
        homo = Cluster.uniform([Device(f"h{i}", med.kind, med.memory_bytes) for i in range(len(table.cluster))],
                               bandwidth=bw, latency=lat)
        htable = CostTable(table.lg, homo, R, table.opt_state_factor, table.recovery)
        out = []
        names = table.cluster.names
        for S, (bounds, groups) in dp_plans(htable, homo.names, M, schedule).items():
            it = iter(names)
            stages = []
            for p, g in enumerate(groups):
                devs = tuple(next(it) for _ in g)
                if R < len(devs):
                    stages = []
                    break
                stages.append(StagePlan((bounds[p], bounds[p + 1]), devs, _even(R, len(devs))))
            if stages:
                out.append(_candidate(table, stages, M, schedule))
        return out

    return _run("pipedream", propose, lg, cluster, batch, microbatches, microbatch_rows, schedule, opt_state_factor,
                recovery)


def hetpipe(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
            microbatch_rows: int | None = None, schedule: str = "1f1b",
            opt_state_factor: float = ADAM_STATE_FACTOR, recovery: bool = False) -> Plan:
    def propose(table, M, R, schedule):
        names = table.cluster.names
        L = len(table.lg)
        speed = {d: 1.0 / max(table.stage_time(d, 0, L, R), 1e-12) for d in names}
        out = []
        for V in range(1, len(names) + 1):
            S = len(names) // V
            if S < 1 or S - 1 > len(table.lg.allowed_cuts()) or R < V:
                continue
            # deal the fastest devices round-robin so the virtual workers have similar speed
            ranked = sorted(names, key=lambda d: -speed[d])[: V * S]
            workers = [[] for _ in range(V)]
            for i, d in enumerate(ranked):
                w = i % V if (i // V) % 2 == 0 else V - 1 - i % V
                workers[w].append(d)
            # inside a virtual worker, the device with the most memory takes the first stage
            for w in workers:
                w.sort(key=lambda d: -table.budget[d])
            groups = [tuple(w[p] for w in workers) for p in range(S)]
            shares = [sum(speed[d] for d in g) for g in groups]
            kind0 = table.kind_of[groups[0][0]]
            work = [float(table.time[kind0][R, i + 1] - table.time[kind0][R, i]) for i in range(L)]
            bounds = _cut_by_work(table.lg, shares, work)
            if bounds is None:
                continue
            stages = [StagePlan((bounds[p], bounds[p + 1]), g, _even(R, V)) for p, g in enumerate(groups)]
            out.append(_candidate(table, stages, M, schedule))
        return out

    return _run("hetpipe", propose, lg, cluster, batch, microbatches, microbatch_rows, schedule, opt_state_factor,
                recovery)


def _proportional(total: int, weights: Sequence[float]) -> tuple[int, ...]:
    n = len(weights)
    spare = total - n
    w = sum(weights)
    exact = [spare * x / w for x in weights]
    rows = [1 + math.floor(e) for e in exact]
    for i in sorted(range(n), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)[: total - sum(rows)]:
        rows[i] += 1
    return tuple(rows)


def metis(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
          microbatch_rows: int | None = None, schedule: str = "1f1b",
          opt_state_factor: float = ADAM_STATE_FACTOR, max_orders: int = 720, recovery: bool = False) -> Plan:
    def propose(table, M, R, schedule):
        names = table.cluster.names
        L = len(table.lg)
        speed = {d: 1.0 / max(table.stage_time(d, 0, L, R), 1e-12) for d in names}
        by_kind: dict[str, list[str]] = {}
        for d in names:
            by_kind.setdefault(table.kind_of[d], []).append(d)
        kinds = sorted(by_kind)
        splits = [[n_groups for n_groups in range(1, len(by_kind[k]) + 1) if len(by_kind[k]) % n_groups == 0]
                  for k in kinds]
        out = []
        for order in itertools.islice(itertools.permutations(kinds), max_orders):
            for counts in itertools.product(*[splits[kinds.index(k)] for k in order]):
                groups = []
                for k, n_groups in zip(order, counts):
                    devs = by_kind[k]
                    size = len(devs) // n_groups
                    groups += [tuple(devs[i * size:(i + 1) * size]) for i in range(n_groups)]
                S = len(groups)
                if S - 1 > len(table.lg.allowed_cuts()) or any(R < len(g) for g in groups):
                    continue
                shares = [sum(speed[d] for d in g) for g in groups]
                kind0 = kinds[0]
                work = [float(table.time[kind0][R, i + 1] - table.time[kind0][R, i]) for i in range(L)]
                bounds = _cut_by_work(table.lg, shares, work)
                if bounds is None:
                    continue
                stages = [StagePlan((bounds[p], bounds[p + 1]), g, _proportional(R, [speed[d] for d in g]))
                          for p, g in enumerate(groups)]
                out.append(_candidate(table, stages, M, schedule))
        return out

    return _run("metis", propose, lg, cluster, batch, microbatches, microbatch_rows, schedule, opt_state_factor,
                recovery)


ORACLE_LIMIT = 2_000_000  # (cut sets x device assignments) beyond which the oracle refuses


def _ordered_partitions(items: Sequence[str], k: int):
    """Every way to put all of ``items`` into ``k`` non-empty ordered groups (order inside a
    group follows ``items``)."""
    n = len(items)
    for labels in itertools.product(range(k), repeat=n):
        if len(set(labels)) == k:
            yield [tuple(items[i] for i in range(n) if labels[i] == g) for g in range(k)]


def oracle_size(lg: LayerGraph, cluster: Cluster) -> int:
    A, D = len(lg.allowed_cuts()), len(cluster.devices)
    total = 0
    for S in range(1, min(D, A + 1) + 1):
        placements = sum(math.comb(D, u) * sum((-1) ** i * math.comb(S, i) * (S - i) ** u for i in range(S + 1))
                         for u in range(S, D + 1))
        total += math.comb(A, S - 1) * placements
    return total


def oracle(lg: LayerGraph, cluster: Cluster, *, batch: int, microbatches: int | None = None,
           microbatch_rows: int | None = None, schedule: str = "1f1b",
           opt_state_factor: float = ADAM_STATE_FACTOR, simulate_top: int = 16, recovery: bool = False) -> Plan:
    size = oracle_size(lg, cluster)
    if size > ORACLE_LIMIT:
        raise InputError(f"the oracle would score {size} plans ({len(lg.allowed_cuts())} allowed cuts, "
                         f"{len(cluster.devices)} devices), more than {ORACLE_LIMIT}; coarsen the graph "
                         "(max_layers) or use fewer devices")

    def propose(table, M, R, schedule):
        names = table.cluster.names
        allowed = list(table.lg.allowed_cuts())
        L = len(table.lg)
        best: list[Candidate] = []
        for S in range(1, min(len(names), len(allowed) + 1) + 1):
            for cuts in itertools.combinations(allowed, S - 1):
                bounds = [0, *cuts, L]
                for u in range(S, len(names) + 1):
                    for used in itertools.combinations(names, u):
                        for groups in _ordered_partitions(used, S):
                            if any(R < len(g) for g in groups):
                                continue
                            stages = table.stages_for(bounds, groups, R, M, schedule)
                            if stages is not None:
                                best.append(Candidate(stages, M, R, table.iteration_s(stages, M, schedule), schedule))
                if len(best) > 4 * simulate_top:
                    best = sorted(best, key=lambda c: c.estimate_s)[: 2 * simulate_top]
        return sorted(best, key=lambda c: c.estimate_s)[:simulate_top]

    return _run("oracle", propose, lg, cluster, batch, microbatches, microbatch_rows, schedule, opt_state_factor,
                recovery, simulate_top=simulate_top)

