"""The dynamic program of the Asteroid planner (hpp.py): cuts and contiguous device groups that
minimize the pipeline's bottleneck on one device order, and the cuts alone for fixed groups."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from asteroid_fx.cost.estimate import CostTable, in_flight
from asteroid_fx.ir.plan import warmup_depth
from asteroid_fx.passes.planners.group_costs import GroupCosts

INF = float("inf")
DP_BOUNDARIES = 48  # the DP places cuts among at most this many (32 beyond 8 devices); local
                    # search refines them
BLOCK_ELEMENTS = 1 << 21  # per numpy temporary of the DP (16 MiB of floats)


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
             costs: "GroupCosts | None" = None) -> dict[int, tuple[list[int], list[tuple[str, ...]]]]:
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
    gc = costs if costs is not None else GroupCosts(table, pos, R, M)
    depth = warmup_depth(schedule)
    # a group of g members needs g x (its stage's least rows) rows of a micro-batch: larger groups
    # are infeasible at every (a, b), so the DP looks at groups [j, j2) with j2 - j <= widest only
    # (exact, and what keeps its cost linear in devices at a fixed micro-batch size)
    widest = gc.widest
    W = min(widest, D)
    # group [j, j2) sits at (j, g) with j2 = j + 1 + g; past the order's end (j2 > D) a pad whose
    # step is inf (cheaper than ragged rows: every first device j is one numpy expression).
    # Matrices are (first device j, first boundary a, group g, last boundary b), so that the pick
    # over (g, b) for every (j, a) is a reshape, not a copy
    ends = np.minimum(np.arange(D)[:, None] + 1 + np.arange(W)[None, :], D)  # (D, W)
    # per group: the all-reduce and the outgoing transfer, (D, n, W, n) and (D, 1, W, n)
    allred, link = gc.windows(order, W)
    # under recovery a stage's first device holds its neighbours' backups: the largest budget of
    # every contiguous group [j, j2) bounds what its first device (the member exact picks) holds
    most = np.full((D + 1, D + 1), -INF)
    for j in range(D):
        most[j, j + 1:] = np.maximum.accumulate([table.budget[d] for d in order[j:]])
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
    steps: dict[int, np.ndarray] = {}
    # first devices in blocks, so that a block's (block, n, W, n) temporaries stay small
    block = max(1, BLOCK_ELEMENTS // (W * n * n))
    for s in range(1, S_max + 1):
        k = in_flight(schedule, 0, s, M)  # the first of s stages left holds the most
        if k not in steps:
            st = np.full((D, n, W, n), INF)
            for j in range(D):
                for g in range(min(W, D - j)):
                    st[j, :, g] = gc.step(tuple(order[j:j + 1 + g]), k)
            # under 1F1B a stage's step and its outgoing transfer bound a period together
            # (the cycle of two adjacent stages is at most the larger step + the transfer)
            steps[k] = st + link / (1 + depth) if depth is not None else np.maximum(st, link)
        pmx, psm, par = mx, sm, ar
        best = np.full((n, D + 1), INF)
        mx, sm, ar = np.full((n, D + 1), INF), np.full((n, D + 1), INF), np.full((n, D + 1), INF)
        arg_b = np.zeros((n, D + 1), dtype=int)
        arg_j = np.zeros((n, D + 1), dtype=int)
        # s stages left need s devices and s runs of boundaries: only first devices j <= D - s,
        # first boundaries a < n - s and last boundaries b <= n - s can be on a finite path (the
        # rest is inf, and leaving it out changes no pick)
        A, Bn = n - s, n - s + 1
        for j0 in range(0, D - s + 1, block):
            js = slice(j0, min(D - s + 1, j0 + block))
            e = ends[js]  # (B, W): j2 of every group of the block
            x = steps[k][js, :A, :, :Bn]  # (B, A, W, Bn): group [j, j2), first boundary a, last boundary b
            if gc.recovery and s > 1:
                # the next stage (the one the DP chose for state (b, j2)) holds this stage's
                # backup, and the last stage's too when it is the second to last
                nxt_b, nxt_j = choice[s - 1]
                nb, nj = nxt_b[:, e].transpose(1, 2, 0), nxt_j[:, e].transpose(1, 2, 0)  # (B, W, n)
                ok = gc.holds_backups(in_flight(schedule, 0, s - 1, M), nb, most[e[:, :, None], nj], s - 1 == 2)
                x = np.where(ok.transpose(0, 2, 1, 3)[:, :A, :, :Bn], x, INF)
            if gc.recovery and s == 2:
                # in a plan of two stages the first stage's first device holds the last one's backup
                first = np.arange(n)[None, :, None, None] == 0
                firsts = np.arange(D)[js, None]
                holds = gc.holds_last(k, most[firsts, e][:, :, None, None]).transpose(0, 2, 1, 3)
                x = np.where((first & ~holds)[:, :A, :, :Bn], INF, x)
            later = lambda v: v[:Bn, e].transpose(1, 2, 0)[:, None]  # noqa: E731  (B, 1, W, Bn) at (b, j2)
            lmx, lsm, lar = later(pmx), later(psm), later(par)
            red = allred[js, :A, :, :Bn]
            # score = (x + sum later) + max(all-reduce, later) + (M - 1) x max(x, max later), in
            # three temporaries of the block's size; the picked entries' parts are recomputed
            score = np.add(x, lsm)
            tmp = np.maximum(red, lar)
            score += tmp
            if M > 1:
                np.maximum(x, lmx, out=tmp)
                tmp *= M - 1
                score += tmp
            B = score.shape[0]
            flat = score.reshape(B, A, -1)  # (j, a) -> (g, b)
            pick = np.argmin(flat, axis=2)  # (B, A)
            g, b = np.divmod(pick, Bn)
            jj, aa = np.arange(B)[:, None], np.arange(A)[None, :]
            xs = x[jj, aa, g, b]
            at = (jj, 0, g, b)
            best[:A, js] = flat[jj, aa, pick].T
            mx[:A, js] = np.maximum(xs, lmx[at]).T
            sm[:A, js] = (xs + lsm[at]).T
            ar[:A, js] = np.maximum(red[jj, aa, g, b], lar[at]).T
            arg_b[:A, js] = b.T
            arg_j[:A, js] = (np.arange(D)[js, None] + 1 + g).T
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


def best_cuts(costs: GroupCosts, groups: Sequence[Sequence[str]], schedule: str) -> list[int] | None:
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
