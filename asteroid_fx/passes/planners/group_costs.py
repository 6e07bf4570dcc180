"""The DP's cost matrices of a device group (hpp.py, dp.py): the stage model (cost/stage.py) over
every (first boundary, last boundary) pair at once, with each member's time made linear in rows."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from asteroid_fx.cost import stage
from asteroid_fx.cost.estimate import CostTable
from asteroid_fx.passes.planners.stage_count import computes

INF = float("inf")
# a share within this fraction of its cap is at the cap: the equal-finish share is computed in
# floats, and an exactly fitting member (share 2 of cap 2) may come out a few ulps above it
CAP_RTOL = 1e-9


class GroupCosts:
    """Cost matrices over (first boundary a, last boundary b) for a group of devices: its step
    time with an equal-finish, memory-capped row split, its all-reduce, and the transfer across
    boundary b. A group is infeasible for (a, b) when a member cannot get the stage's least rows
    (``CostTable.min_rows``: more than one where a layer takes batch statistics).

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
        lo, hi = pos[a], pos[b]
        # a stage is a nonempty run of layers that computes (stage_count.py): no sham stages
        self.valid = (b > a) & computes(table.lg, lo, hi)
        # rollback points included under recovery; the backups a first member holds depend on the
        # neighbouring stages (``holds_backups``, ``holds_last``; ``exact`` checks the candidate)
        self.static = table.static_bytes(lo, hi)
        self.state = table.state_bytes(lo, hi)
        self.recovery = table.recovery
        self.act = np.maximum(table.activation_bytes_per_row(lo, hi), 1e-9)
        self.least = table.min_rows(lo, hi)  # rows every member gets (more with batch statistics)
        # the most members a group can have at some (a, b): each takes at least ``least`` rows
        self.widest = max(1, rows // int(self.least[self.valid].min())) if self.valid.any() else 1
        self.grad_bytes = table.allreduce_bytes(lo, hi)
        self.alpha, self.beta = {}, {}
        for k in table.kinds:
            t1 = table.kind_time(k, lo, hi, 1)
            if rows > 1:
                tR = table.kind_time(k, lo, hi, rows)
                beta = np.maximum((tR - t1) / (rows - 1), 1e-15)
            else:
                beta = np.maximum(t1, 1e-15)
            self.alpha[k] = np.maximum(t1 - beta, 0.0)
            self.beta[k] = beta
        self.cache: dict[tuple, np.ndarray] = {}
        self.members: dict[tuple[str, ...], tuple[tuple, int]] = {}  # group -> (((kind, memory), n)...), least memory
        self.bw = np.asarray(table.cluster.bandwidth, dtype=float)
        self.lat = np.asarray(table.cluster.latency, dtype=float)
        self.most_needed: dict[int, float] = {}  # K -> the most memory any valid (a, b) needs at R rows

    def step(self, group: tuple[str, ...], k_in_flight: int) -> np.ndarray:
        """The group's step time per (a, b); inf where it cannot hold the stage."""
        known = self.members.get(group)
        if known is None:
            count: dict[tuple, int] = {}
            for d in group:
                km = (self.t.kind_of[d], self.t.budget[d])
                count[km] = count.get(km, 0) + 1
            members = tuple(sorted(count.items()))  # ((kind, memory), how many) per distinct member
            known = self.members[group] = (members, min(m for (_, m), _ in members))
        members, smallest = known
        # memory cannot bind if every member holds all R rows at every (a, b)
        if k_in_flight not in self.most_needed:
            need = np.where(self.valid, self.static + k_in_flight * self.act * float(self.R), 0.0)
            self.most_needed[k_in_flight] = float(need.max())
        binds = not stage.within(self.most_needed[k_in_flight], smallest)
        key = (members, k_in_flight if binds else 0)
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = self._step(members, k_in_flight, binds)
        return hit

    def _caps(self, memory: int, k_in_flight: int) -> np.ndarray:
        """Per (a, b): the most rows a member of ``memory`` bytes holds (-1: not even the stage)."""
        key = ("cap", memory, k_in_flight)
        if key not in self.cache:
            per_row = k_in_flight * self.act
            c = np.floor(np.maximum(memory - self.static, 0.0) / per_row)
            # the quotient may land an ulp below a row that fits exactly (``CostTable.row_cap``)
            c = np.where(stage.within(np.floor(self.static + per_row * (c + 1)), memory), c + 1, c)
            self.cache[key] = np.where(stage.within(self.static, memory), c, -1.0)
        return self.cache[key]

    def _step(self, members: tuple, k_in_flight: int, binds: bool) -> np.ndarray:
        # members: ((kind, memory), n) with n identical members each; sums weigh by n, so the
        # cost of a group grows with its distinct members, not its size
        R = float(self.R)
        alpha, beta = self.alpha, self.beta
        inv = sum(n / beta[k] for (k, _), n in members)
        lead = sum(n * alpha[k] / beta[k] for (k, _), n in members)
        one_row = None
        for k in {k for (k, _), _ in members}:
            one_row = alpha[k] + beta[k] if one_row is None else np.maximum(one_row, alpha[k] + beta[k])
        tau = np.maximum((R + lead) / inv, one_row)
        size = sum(n for _, n in members)
        ok = self.valid & (R >= self.least * size)
        if binds:
            caps = [self._caps(m, k_in_flight) for (_, m), _ in members]
            for c in caps:
                ok &= c >= self.least
            ok &= sum(n * np.minimum(c, R) for c, (_, n) in zip(caps, members)) >= R
            over = [(tau - alpha[k]) / beta[k] > c + CAP_RTOL * np.abs(c) for c, ((k, _), _) in zip(caps, members)]
            if any(np.any(o) for o in over):
                kept = sum(np.where(o, n * np.maximum(c, 0.0), 0.0) for o, c, (_, n) in zip(over, caps, members))
                free_inv = sum(np.where(o, 0.0, n / beta[k]) for o, ((k, _), n) in zip(over, members))
                free_lead = sum(np.where(o, 0.0, n * alpha[k] / beta[k]) for o, ((k, _), n) in zip(over, members))
                capped_time = np.max(np.stack([np.where(o, alpha[k] + beta[k] * np.maximum(c, 0.0), 0.0)
                                               for o, c, ((k, _), _) in zip(over, caps, members)]), axis=0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    rebalanced = np.where(free_inv > 0, (R - kept + free_lead) / free_inv, INF)
                tau = np.maximum(np.maximum(tau, rebalanced), capped_time)
        return np.where(ok, tau, INF)

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
        return stage.within(2 * self.state + own[..., None, :], most[..., None, :])

    def holds_last(self, k_in_flight: int, most) -> np.ndarray:
        """Under recovery, per (a, b): whether the first device of the first of two stages, with at
        most ``most`` bytes, can hold two copies of the last stage [b, L) beside its own stage
        [a, b) with a row."""
        return stage.within(self.static + k_in_flight * self.act + 2 * self.state[:, -1][None, :], most)

    def windows(self, order: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
        """``allreduce`` and ``transfer`` of every contiguous group ``order[j:j + 1 + g]`` (g <
        ``width``) against the rest of ``order`` at once: (D, n, width, n) and (D, 1, width, n)
        matrices, zero past the order's end; the same values, without a call per group."""
        idx = [self.t.cluster.index(d) for d in order]
        D, n = len(order), len(self.pos)
        bw, lat = self.bw[np.ix_(idx, idx)], self.lat[np.ix_(idx, idx)]
        allred = np.zeros((D, n, width, n))
        link = np.zeros((D, 1, width, n))
        nbytes = self.t.cut_bytes[self.pos] * self.R
        # a ring's edges are consecutive members and the last back to the first
        hop_bw, hop_lat = bw[np.arange(D - 1), np.arange(1, D)], lat[np.arange(D - 1), np.arange(1, D)]
        # the rest of the order lies before j and from the group's end e on
        inf = np.full((D, 1), np.inf)
        left_bw = np.concatenate([inf, np.minimum.accumulate(bw, axis=1)], axis=1)  # [i, j]: min bw[i, :j]
        right_bw = np.concatenate([np.minimum.accumulate(bw[:, ::-1], axis=1)[:, ::-1], inf], axis=1)
        left_lat = np.concatenate([-inf, np.maximum.accumulate(lat, axis=1)], axis=1)
        right_lat = np.concatenate([np.maximum.accumulate(lat[:, ::-1], axis=1)[:, ::-1], -inf], axis=1)
        for j in range(D):
            G = min(width, D - j)
            if G > 1:
                size = np.arange(2, G + 1)
                ends = np.arange(j + 1, j + G)  # the last member of each group of two or more
                slowest = np.minimum(np.minimum.accumulate(hop_bw[j:j + G - 1]), bw[ends, j])
                latency = 2.0 * (size - 1) * np.maximum(np.maximum.accumulate(hop_lat[j:j + G - 1]), lat[ends, j])
                factor = 2.0 * (size - 1) / size
                allred[j, :, 1:G] = (factor[None, :, None] * self.grad_bytes[:, None, :]) / slowest[None, :, None] \
                    + latency[None, :, None]
            members = np.arange(j, j + G)[:, None]  # (i, g): member i of group g, when i <= j + g
            e = j + 1 + np.arange(G)[None, :]
            inside = members < e
            out_bw = np.where(inside, np.minimum(left_bw[members, j], right_bw[members, e]), np.inf).min(axis=0)
            out_lat = np.where(inside, np.maximum(left_lat[members, j], right_lat[members, e]), -np.inf).max(axis=0)
            alone = np.isinf(out_bw)  # nobody else in the order
            with np.errstate(invalid="ignore"):
                msg = stage.message_s(nbytes[None, :], out_bw[:, None], out_lat[:, None])
            msg[:, -1] = 0.0
            link[j, 0, :G] = np.where(alone[:, None], 0.0, msg)
        return allred, link

    def allreduce(self, group: tuple[str, ...]) -> np.ndarray:
        g = len(group)
        if g < 2:
            return np.zeros_like(self.grad_bytes)
        key = ("ar", group)
        if key not in self.cache:
            # the ring's time on idle links for every (a, b) at once; a stage with nothing to
            # reduce still pays the ring's latency here (``stage.allreduce_s`` charges none)
            self.cache[key] = stage.ring(self.t.cluster, group).seconds(self.grad_bytes)
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
            out = stage.message_s(self.t.cut_bytes[self.pos] * self.R, bw, lat)
            out[-1] = 0.0
            self.cache[key] = out
        return self.cache[key]
