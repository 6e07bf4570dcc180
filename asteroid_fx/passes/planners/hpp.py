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
5. The best few distinct candidates (trading twin devices, same kind, memory and links, makes no
   new one) are simulated (``sim.predict`` of the program they lower to) and the fastest
   simulated one is kept.
6. Polish (beyond the paper, polish.py): single moves of that plan (a cut, a device, two devices
   trading places, the micro-batch count, rows between members, the warm-up depth) are
   simulated, best closed form first, and the first faster one is kept, while one is and a
   budget of simulations lasts. The result is the plan: its prediction is the simulator's.
7. The search never loses to itself (beyond the paper). On clusters of up to
   ``EVERY_MICROBATCHING_UP_TO`` devices an unpinned micro-batching is also planned with each
   micro-batching pinned (steps 2-6 each, as a caller who pins it gets it); the fastest is
   polished once more, free to change it. A graph with more allowed cuts than compile's
   coarsening (``DEFAULT_MAX_LAYERS``) is also planned with cuts only where that coarsening keeps
   them (``LayerGraph.coarsening``: the very graph ``linearize(max_layers=48)`` makes, with the
   same layers, so its plan is a plan of this graph) and polished on the fine layers; beyond that
   many devices, this coarse search and its polish replace the search on every cut. So no
   coarsening, and on up to that many devices no pinned micro-batching, simulates faster than
   the plan.

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
import math
from typing import Sequence

import numpy as np

from asteroid_fx.cost.estimate import ADAM_STATE_FACTOR, CostTable, in_flight
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import DEFAULT_MAX_LAYERS, LayerGraph
from asteroid_fx.ir.plan import NoPlanError, Plan
from asteroid_fx.passes.planners.candidates import Candidate, exact, microbatch_choices, orderings
from asteroid_fx.passes.planners.dp import DP_BOUNDARIES, dp_boundaries, dp_plans
from asteroid_fx.passes.planners.group_costs import GroupCosts
from asteroid_fx.passes.planners.local_search import local_search, polish_cuts
from asteroid_fx.passes.planners.polish import Pins, polish
from asteroid_fx.passes.planners.polish import budget as polish_budget
from asteroid_fx.passes.planners.predict import predict
from asteroid_fx.passes.planners.stage_count import check_stages

INF = float("inf")
FULL_SEARCH_MICROBATCHINGS = 3  # micro-batchings that get every order (one fewer beyond 8 devices)
LOCAL_SEARCH_STARTS = 3
POLISHED = 16  # best DP answers whose cuts are polished on the closed form before local search
DEEPENED = 8  # best plans also tried with a deeper 1F1B warm-up ("1f1b+N", N in DEPTHS)
DEPTHS = (1, 2, 4)
SIMULATE_TOP = 8  # best closed forms simulated (half beyond 16 devices), twins traded counted once
EVERY_MICROBATCHING_UP_TO = 8  # devices: an unpinned plan is also searched with each micro-batching pinned


def _dp_candidates(table: CostTable, costs: GroupCosts, orders, M: int, schedule: str, stages: int | None,
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
           deepen: bool = True, recovery: bool = False, budgets: dict[str, int] | None = None) -> list[Candidate]:
    """All candidates the planner scores, best closed form first (before simulation); every
    stage of every candidate computes (stage_count.py). With ``recovery`` every candidate fits
    every device's budget with recovery's state copies. ``budgets`` replaces the devices' memory
    (``no_plan_message`` asks what memory would do)."""
    found: dict[tuple, Candidate] = {}
    choices = microbatch_choices(batch, microbatches, microbatch_rows)
    tables = {R: CostTable(lg, cluster, R, opt_state_factor, recovery, budgets) for _, R in choices}
    costs = {}
    # first every micro-batching with the paper's order and the speed order, then the full search
    # (every order, local search) on the micro-batchings that did best
    first = 1 if orders == "memory" else 2  # the paper's order (and speed order, to rank micro-batchings)
    for M, R in choices:
        limit = DP_BOUNDARIES if len(cluster.devices) <= 8 else 32
        costs[R] = GroupCosts(tables[R], np.asarray(dp_boundaries(tables[R], limit)), R, M)
        _dp_candidates(tables[R], costs[R], orderings(tables[R], cluster.names)[:first], M, schedule, stages, found)
    if stages is not None and not found:
        # a pinned count near the most the model allows may need cuts the DP's even spread of
        # boundaries left out: place them among every allowed cut instead
        every = np.asarray([0, *lg.allowed_cuts(), len(lg)])
        for M, R in choices:
            if len(costs[R].pos) < len(every):
                costs[R] = GroupCosts(tables[R], every, R, M)
                _dp_candidates(tables[R], costs[R], orderings(tables[R], cluster.names)[:first], M, schedule, stages,
                               found)
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
         simulate_top: int | None = None, name: str = "asteroid", deepen: bool = True, recovery: bool = False) -> Plan:
    """The Asteroid planner; see the module docstring. ``recovery``: the plan runs with pipeline
    replay, and every device's memory holds recovery's state copies. A pinned ``stages`` the
    model or the cluster does not allow raises InputError with the most stages and why."""
    if stages is not None:
        check_stages(lg, cluster, stages)
    kw = dict(schedule=schedule, stages=stages, opt_state_factor=opt_state_factor, orders=orders, local=local,
              simulate_top=simulate_top, name=name, deepen=deepen, recovery=recovery)
    pinned = microbatches is not None or microbatch_rows is not None
    full = local and orders != "memory"  # the paper's search stays the paper's
    small = len(cluster.devices) <= EVERY_MICROBATCHING_UP_TO
    # a graph longer than compile's coarsening is also searched by it (step 7)
    long = full and len(lg.allowed_cuts()) + 1 > DEFAULT_MAX_LAYERS
    best = None
    if small or not long:
        best = _planned(lg, cluster, batch, microbatches, microbatch_rows, **kw)
        if full and small and not pinned:
            # the search never loses to itself: each micro-batching searched on its own (as a
            # caller who pins it gets it) is a candidate too, and the winner is polished once
            # more, free to change the micro-batching
            each = [_planned(lg, cluster, batch, M, None, **kw) for M, _ in microbatch_choices(batch, None, None)]
            winner = min((t for t in (best, *each) if t is not None), key=lambda t: t[1], default=None)
            if winner is not None and winner is not best:
                best = _polished(winner, lg, cluster, batch, False, **kw)
    if long:
        # nor to its coarsening: the graph with cuts only where linearize(max_layers=48) keeps
        # them (the same layers, so its plan is a plan of this graph), then polished here
        view = lg.cut_only_at(lg.coarsening(DEFAULT_MAX_LAYERS))
        try:
            p = plan(view, cluster, batch=batch, microbatches=microbatches, microbatch_rows=microbatch_rows, **kw)
        except InputError:
            p = None
        if p is not None:
            c = Candidate(p.stages, p.microbatches, p.microbatch_rows, 0.0, p.schedule)
            c_s = _polished((c, _simulated_s(c, lg, cluster, opt_state_factor, name, recovery)), lg, cluster, batch,
                            pinned, **kw)
            if best is None or c_s[1] < best[1]:
                best = c_s
    if best is None:
        raise NoPlanError(no_plan_message(lg, cluster, batch, microbatches, microbatch_rows, schedule,
                                          opt_state_factor, recovery, stages))
    return finish(best[0], lg, cluster, opt_state_factor, name, recovery)


def _planned(lg: LayerGraph, cluster: Cluster, batch: int, microbatches: int | None, microbatch_rows: int | None,
             *, schedule: str, stages: int | None, opt_state_factor: float, orders: str, local: bool,
             simulate_top: int | None, name: str, deepen: bool, recovery: bool) -> tuple[Candidate, float] | None:
    """Steps 1-6 for one setting of the pins: the polished plan and its simulated seconds, or
    None when nothing fits."""
    cands = search(lg, cluster, batch=batch, microbatches=microbatches, microbatch_rows=microbatch_rows,
                   schedule=schedule, stages=stages, opt_state_factor=opt_state_factor, orders=orders,
                   local=local, deepen=deepen, recovery=recovery)
    if not cands:
        return None
    if simulate_top is None:  # the closed form misranks near-ties: small clusters simulate more of them
        simulate_top = SIMULATE_TOP if len(cluster.devices) <= 16 else SIMULATE_TOP // 2
    best = fastest(to_simulate(distinct(cands, cluster), simulate_top), lg, cluster, opt_state_factor, name, recovery)
    if local and orders != "memory":
        pinned = microbatches is not None or microbatch_rows is not None
        best = _polished(best, lg, cluster, batch, pinned, schedule=schedule, stages=stages,
                         opt_state_factor=opt_state_factor, name=name, deepen=deepen, recovery=recovery)
    return best


def _polished(start: tuple[Candidate, float], lg: LayerGraph, cluster: Cluster, batch: int, pinned: bool, *,
              schedule: str, stages: int | None, opt_state_factor: float, name: str, deepen: bool, recovery: bool,
              **_: object) -> tuple[Candidate, float]:
    """Step 6 from ``start`` (a candidate and its simulated seconds); ``pinned``: the
    micro-batching stays."""
    tables: dict[int, CostTable] = {}

    def table_for(R: int) -> CostTable:
        if R not in tables:
            tables[R] = CostTable(lg, cluster, R, opt_state_factor, recovery)
        return tables[R]

    pins = Pins(batch, pinned, stages, deepen and schedule == "1f1b")
    return polish(*start, lambda c: _simulated_s(c, lg, cluster, opt_state_factor, name, recovery), table_for,
                  cluster.names, pins, polish_budget(len(cluster.devices)), twins(cluster))


def twins(cluster: Cluster) -> dict[str, str]:
    """Each device's class: the first device it can trade places with in any plan without changing
    anything (same kind and memory, the same links to every other device and to each other). On
    clusters of up to 16 devices; beyond, every device is its own."""
    names = cluster.names
    if len(names) > 16:
        return {d: d for d in names}
    bw, lat = cluster.bandwidth, cluster.latency
    out: dict[str, str] = {}
    for i, a in enumerate(names):
        da = cluster.devices[i]
        for j in range(i):
            db = cluster.devices[j]
            if (db.kind, db.memory_bytes) != (da.kind, da.memory_bytes) or out[names[j]] != names[j]:
                continue
            others = [x for x in range(len(names)) if x not in (i, j)]
            if (bw[i][j] == bw[j][i] and lat[i][j] == lat[j][i]
                    and all(bw[i][x] == bw[j][x] and bw[x][i] == bw[x][j] and lat[i][x] == lat[j][x]
                            and lat[x][i] == lat[x][j] for x in others)):
                out[a] = names[j]
                break
        out.setdefault(a, a)
    return out


def distinct(cands: Sequence[Candidate], cluster: Cluster) -> list[Candidate]:
    """``cands`` without those that differ from a better one only by trading twin devices
    (``twins``): the simulator would score them the same, and they would take its places."""
    cls = twins(cluster)
    seen, out = set(), []
    for c in cands:
        key = (c.microbatches, c.schedule, tuple((st.layers, tuple(cls[d] for d in st.devices), st.rows)
                                                  for st in c.stages))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


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


def _simulated_s(c: Candidate, lg: LayerGraph, cluster: Cluster, opt_state_factor: float, name: str,
                 recovery: bool) -> float:
    return predict(Plan(c.stages, c.microbatches, c.rows, c.schedule, name, recovery=recovery), lg, cluster,
                   opt_state_factor).iteration_s


def fastest(cands: Sequence[Candidate], lg: LayerGraph, cluster: Cluster, opt_state_factor: float,
            name: str, recovery: bool = False) -> tuple[Candidate, float]:
    """The fastest of ``cands`` by simulation, and its simulated iteration seconds."""
    best, best_s = None, INF
    for c in cands:
        t = _simulated_s(c, lg, cluster, opt_state_factor, name, recovery)
        if t < best_s:
            best, best_s = c, t
    return best, best_s


def best_simulated(cands: Sequence[Candidate], lg: LayerGraph, cluster: Cluster, opt_state_factor: float,
                   name: str, recovery: bool = False) -> Plan:
    """The fastest of ``cands`` by simulation, with its prediction and explanations."""
    return finish(fastest(cands, lg, cluster, opt_state_factor, name, recovery)[0], lg, cluster, opt_state_factor,
                  name, recovery)


def finish(c: Candidate, lg: LayerGraph, cluster: Cluster, opt_state_factor: float, name: str,
           recovery: bool = False) -> Plan:
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
    shareable = [st for st in c.stages if c.rows >= table.min_rows(*st.layers) * (len(st.devices) + 1)]
    if not shareable:
        return ("no stage has rows to spare for it (a device of a stage takes at least one row of every "
                "micro-batch, two where the stage holds BatchNorm: docs/planner.md)")
    for p, st in enumerate(c.stages):
        k = in_flight(schedule, p, len(c.stages), c.microbatches)
        if st in shareable and table.row_cap(device, st.layers[0], st.layers[1], k) >= 1:
            return "adding it to any stage does not make the iteration faster (too slow or too poor a link)"
    return "too little memory for any stage of this plan"


def no_plan_message(lg: LayerGraph, cluster: Cluster, batch: int, microbatches: int | None,
                    microbatch_rows: int | None, schedule: str, opt_state_factor: float,
                    recovery: bool = False, stages: int | None = None) -> str:
    """Why nothing fits, with the smallest memory that would do: found by bisection on a budget
    given to every device of the cluster (the planner's own search, with ``stages`` when pinned,
    decides whether it fits). The budgets are what-ifs, beyond what a device kind may physically
    have, so they go to the search as budgets, not as a Cluster (which refuses them)."""
    def fits(budget: int) -> bool:
        budgets = {d.name: max(d.memory_bytes, budget) for d in cluster.devices}
        return bool(search(lg, cluster, batch=batch, microbatches=microbatches, microbatch_rows=microbatch_rows,
                           schedule=schedule, stages=stages, opt_state_factor=opt_state_factor, recovery=recovery,
                           budgets=budgets))

    L = len(lg)
    M, R = microbatch_choices(batch, microbatches, microbatch_rows)[-1]
    table = CostTable(lg, cluster, R, opt_state_factor, recovery)
    # enough for any device of any plan: every layer, as many micro-batches in flight as the first
    # of ``stages`` holds (and two copies of every stage's state, as a backup holder, under recovery)
    k = stages or 1
    hi = max(table.memory(0, L, R, in_flight(schedule, 0, k, M))
             + (2 * table.state_bytes(0, L) if recovery and k > 1 else 0), 1)
    lo = max(d.memory_bytes for d in cluster.devices)
    biggest = lo
    pinned = f" in {stages} stage{'' if stages == 1 else 's'}" if stages is not None else ""
    if fits(lo):  # nothing to add memory to (e.g. too few rows for the groups): say so plainly
        return (f"no plan fits this cluster{pinned} with a batch of {batch}" + (f" in {microbatches} micro-batches"
                if microbatches else "") + "; use a larger batch or fewer micro-batches"
                + (", or fewer stages" if stages is not None and stages > 1 else ""))
    hi = int(max(hi, lo))
    if not fits(hi):  # more memory does not help (a pinned count with too few rows for its groups)
        return (f"no plan{pinned} fits this cluster with a batch of {batch}, whatever its memory: every stage "
                "needs a device and a row of each micro-batch; use a larger batch, fewer micro-batches"
                + (" or fewer stages" if stages is not None and stages > 1 else ""))
    # to 1/10000 (or a KiB): the figure is printed rounded up to a MiB, and giving every device
    # that much must plan while 1% less must not
    for _ in range(40):
        if hi - lo <= max(hi // 10000, 1024):
            break
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    copies = (", recovery's copies of stage state (its rollback point, and two of each backup it holds)"
              if recovery else "")
    return (f"no plan{pinned} fits this cluster: its largest device has {_bytes(biggest)}, and with all "
            f"{len(cluster.devices)} devices each would need at least {_bytes_up(hi)} (weights, gradients, "
            f"optimizer state{copies} and activations of its share). Give the devices that much memory, add "
            "devices, use an optimizer with less state (opt_state_factor) or a smaller batch"
            + (", or train without recovery" if recovery else ""))


def _bytes_up(n: float) -> str:
    """``n`` bytes rounded up to a hundredth of a MiB (a KiB below one): a figure to give a
    device, so never below what it stands for."""
    n = int(math.ceil(n))
    if n >= 2**20:
        mib = math.ceil(n * 100 / 2**20) / 100
        return f"{mib:.2f} MiB" + (f" ({mib / 1024:.2f} GiB)" if mib >= 1024 else "")
    return f"{-(-n // 2**10)} KiB"


def _bytes(n: float) -> str:
    n = int(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


__all__ = ["DP_BOUNDARIES", "Candidate", "GroupCosts", "NoPlanError", "dp_boundaries", "dp_plans", "exact",
           "local_search", "microbatch_choices", "orderings", "plan", "polish_cuts", "search"]
