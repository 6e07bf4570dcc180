"""Local search of the Asteroid planner (hpp.py, beyond the paper): hill-climbing on the closed
form over moves of cuts and devices from a candidate the DP found."""

from __future__ import annotations

from typing import Iterable, Sequence

from asteroid_fx.cost.estimate import CostTable
from asteroid_fx.passes.planners.candidates import Candidate, exact
from asteroid_fx.passes.planners.dp import best_cuts
from asteroid_fx.passes.planners.group_costs import GroupCosts

LOCAL_SEARCH_EVALS = 250  # plans scored per local search: a bound, so planning time stays bounded


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


def local_search(table: CostTable, c: Candidate, schedule: str, costs: GroupCosts | None = None,
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
