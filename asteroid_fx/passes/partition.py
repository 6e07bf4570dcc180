"""partition: LayerGraph + Cluster -> Plan.

``balanced`` is the simple planner of the compile spine: devices are dealt into stage groups so
that every group has about the same aggregate speed, layers are cut so that every stage has work in
proportion to its group's speed, and each group splits the micro-batch rows in proportion to its
members' speed on that stage. It tries every stage count and keeps the fastest plan that fits in
memory. Groups, stage count and rows can be pinned by the caller (tests and hand-made plans).
Every candidate's prediction is the simulation of the program it lowers to (``sim.predict``), so
the plan's numbers are what ``sim.simulate`` says of the compiled program.

Guarantees: every layer in exactly one stage, stages only at allowed cuts, rows of each stage add up
to the micro-batch size, every device's predicted memory within its budget (else NoPlanError
naming the device and the memory that would do). With ``recovery`` that memory includes the state
copies pipeline replay keeps (estimate.py), and a plan pinned by the caller that cannot hold them
is refused with what to change.
"""

from __future__ import annotations

import math
from typing import Sequence

from asteroid_fx.cost.stage import ADAM_STATE_FACTOR, state_memory, step_s, within
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.plan import NoPlanError, Plan, StagePlan
from asteroid_fx.passes.planners.predict import predict
from asteroid_fx.passes.planners.stage_count import (blocked_note, check_layers, check_stages, computes, stage_limit,
                                                     suffix_stages)


def split_rows(total: int, weights: Sequence[float], least: int = 1) -> tuple[int, ...]:
    """``total`` rows in proportion to ``weights``, each at least ``least`` (largest remainder)."""
    n = len(weights)
    if total < n * least:
        why = (f" when each takes at least {least} rows (the stage normalizes over its rows: "
               "docs/planner.md)" if least > 1 else "")
        raise NoPlanError(f"a micro-batch of {total} rows cannot be shared by a group of {n} devices{why}; "
                          "use a larger micro-batch or smaller groups")
    spare = total - n * least
    wsum = sum(weights)
    exact = [spare * w / wsum for w in weights]
    rows = [least + math.floor(e) for e in exact]
    left = total - sum(rows)
    for i in sorted(range(n), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)[:left]:
        rows[i] += 1
    return tuple(rows)


def _speed(lg: LayerGraph, cluster: Cluster, device: str, lo: int, hi: int, rows: int) -> float:
    t = step_s(lg, cluster.device(device).kind, (lo, hi), max(rows, 1))
    return 1.0 / t if t > 0 else 1e12


def _deal_groups(speeds: dict[str, float], n_stages: int) -> list[list[str]]:
    """Longest-processing-time dealing: the fastest device goes to the group with the least speed."""
    groups: list[list[str]] = [[] for _ in range(n_stages)]
    total = [0.0] * n_stages
    for d in sorted(speeds, key=lambda d: -speeds[d]):
        g = min(range(n_stages), key=lambda i: (len(groups[i]) > 0, total[i]))
        groups[g].append(d)
        total[g] += speeds[d]
    return groups


def _cut_layers(lg: LayerGraph, shares: Sequence[float], kind_weight) -> list[int]:
    """Stage boundaries at allowed cuts so that stage p gets about shares[p] of the total work,
    every stage computing (stage_count.computes) with enough room after it for the stages left;
    the caller checked the count (stage_count.check_stages)."""
    L = len(lg)
    work = [kind_weight(i) for i in range(L)]
    prefix = [0.0]
    for w in work:
        prefix.append(prefix[-1] + w)
    after = suffix_stages(lg)
    bounds, acc = [0], 0.0
    for p, share in enumerate(shares[:-1]):
        acc += share * prefix[-1]
        remaining_stages = len(shares) - 1 - p
        candidates = [c for c in lg.allowed_cuts()
                      if c > bounds[-1] and after[c] >= remaining_stages and computes(lg, bounds[-1], c)]
        if not candidates:
            raise NoPlanError(f"the model cannot be split into {len(shares)} stages that compute"
                              + _blocked_note(lg))
        bounds.append(min(candidates, key=lambda c: abs(prefix[c] - acc)))
    bounds.append(L)
    return bounds


def balanced(lg: LayerGraph, cluster: Cluster, *, microbatches: int, microbatch_rows: int,
             schedule: str = "1f1b", stages: int | None = None,
             groups: Sequence[Sequence[str]] | None = None,
             rows: Sequence[Sequence[int]] | None = None,
             layers: Sequence[int] | None = None,
             opt_state_factor: float = ADAM_STATE_FACTOR, recovery: bool = False) -> Plan:
    """The balanced planner; see the module docstring. ``layers`` pins the stage boundaries;
    ``recovery`` plans for a run with pipeline replay (its state copies count in memory)."""
    if rows is not None and (groups is None or [len(r) for r in rows] != [len(g) for g in groups]):
        raise InputError(f"rows {[list(r) for r in rows]} must give one count per device of every group in groups "
                         f"{None if groups is None else [list(g) for g in groups]}; pin rows= together with groups=")
    # the pinned stage count (stages, groups or layers; they must agree) is an argument: check it
    # before planning, so a wrong one is named once rather than failing every candidate
    if stages is not None and groups is not None and stages != len(groups):
        raise InputError(f"stages={stages} but groups pins {len(groups)} groups: pin one of them, or make them agree")
    if layers is not None:
        check_layers(lg, layers, stages, groups)  # pinned bounds are the caller's: form, not compute
        stages = len(layers) - 1
        if groups is None and stages > len(cluster.devices):
            raise InputError(f"layer bounds {list(layers)} give {stages} stages, but the cluster has "
                             f"{len(cluster.devices)} devices (a stage needs one of its own)")
    elif groups is not None:
        check_stages(lg, cluster, len(groups))
    elif stages is not None:
        check_stages(lg, cluster, stages)
    if groups is not None:
        candidates = [[list(g) for g in groups]]
    else:
        counts = [stages] if stages else range(1, stage_limit(lg, cluster)[0] + 1)
        mid = max(1, microbatch_rows)
        speeds = {d.name: _speed(lg, cluster, d.name, 0, len(lg), mid) for d in cluster.devices}
        candidates = [_deal_groups(speeds, s) for s in counts]
    best, failures = None, []
    for grp in candidates:
        for g in grp:
            for d in g:
                cluster.device(d)  # unknown device -> the cluster's own error
        try:
            plan = _plan_for_groups(lg, cluster, grp, microbatches, microbatch_rows, schedule, rows, layers,
                                    opt_state_factor, recovery)
        except NoPlanError as e:
            failures.append(str(e))
            continue
        over = [u for u in plan.prediction.devices if not within(u.memory_bytes, u.budget_bytes)]
        if over:
            failures.append(_memory_message(over, plan, lg, opt_state_factor))
            continue
        if best is None or plan.prediction.iteration_s < best.prediction.iteration_s:
            best = plan
    if best is None:
        raise NoPlanError("no plan fits this cluster:\n  " + "\n  ".join(dict.fromkeys(failures)))
    return best


def _blocked_note(lg: LayerGraph) -> str:
    note = blocked_note(lg)
    return f"; {note}" if note else ""


def _memory_message(over, plan: Plan, lg: LayerGraph, opt_state_factor: float) -> str:
    worst = max(over, key=lambda u: u.memory_bytes - u.budget_bytes)
    if not plan.recovery:
        return (f"device {worst.device!r} needs {_bytes(worst.memory_bytes)} for its stage but has "
                f"{_bytes(worst.budget_bytes)}: a budget of at least {_bytes(worst.memory_bytes)} would do "
                "(or add devices, use smaller micro-batches, or an optimizer with less state)")
    q = plan.stage_of(worst.device)
    group = plan.stages[q].devices
    held = plan.backups_held(worst.device)
    rollback = int(state_memory(lg, plan.stages[q].layers, opt_state_factor))
    copies = int(2 * sum(state_memory(lg, plan.stages[p].layers, opt_state_factor) for p in held))
    what = f"{_bytes(rollback)} for its rollback point"
    todo = ["give it fewer rows" if len(group) > 1 else "use smaller micro-batches"]
    if held:
        what += (f" and {_bytes(copies)} for two copies of each backup it holds as the first device of stage {q} "
                 f"(stage{'s' if len(held) > 1 else ''} {' and '.join(map(str, held))})")
        todo.append(f"put another device of stage {q} first to hold the backup" if len(group) > 1 else
                    f"give stage {q} another device, first in its group, to hold the backup")
    return (f"device {worst.device!r} needs {_bytes(worst.memory_bytes)} with recovery but has "
            f"{_bytes(worst.budget_bytes)}: recovery's state copies take {what}. To fit, {', '.join(todo)}, "
            f"give it at least {_bytes(worst.memory_bytes)}, or train without recovery")


def _bytes(n: int) -> str:
    """Readable at any size: a small model's need printed in GiB would read 0.00."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n} bytes)"
    return f"{n} bytes"


def _plan_for_groups(lg, cluster, grp, microbatches, microbatch_rows, schedule, rows, layers, opt_state_factor,
                     recovery):
    if layers is not None:  # checked by check_layers
        bounds = list(layers)
    else:
        L = len(lg)
        group_speed = [sum(_speed(lg, cluster, d, 0, L, microbatch_rows) for d in g) for g in grp]
        total = sum(group_speed)
        kinds = sorted({cluster.device(d).kind for g in grp for d in g})

        def weight(i: int) -> float:
            return sum(step_s(lg, k, (i, i + 1), microbatch_rows) for k in kinds) / len(kinds)

        bounds = _cut_layers(lg, [s / total for s in group_speed], weight)
    stage_plans = []
    for p, g in enumerate(grp):
        lo, hi = bounds[p], bounds[p + 1]
        if rows is not None:
            r = tuple(rows[p])
            _check_pinned_rows(lg, p, (lo, hi), g, r)
        else:
            r = split_rows(microbatch_rows, [_speed(lg, cluster, d, lo, hi, microbatch_rows) for d in g],
                           lg.min_rows(lo, hi))
        stage_plans.append(StagePlan((lo, hi), tuple(g), r))
    plan = Plan(tuple(stage_plans), microbatches, microbatch_rows, schedule, "balanced", recovery=recovery)
    used = {d for g in grp for d in g}
    left_out = [(d.name, "not given a stage") for d in cluster.devices if d.name not in used]
    import dataclasses

    return dataclasses.replace(plan, prediction=predict(plan, lg, cluster, opt_state_factor, left_out))


def _check_pinned_rows(lg: LayerGraph, p: int, layers: tuple[int, int], devices, rows) -> None:
    """Pinned rows below what stage p's batch-statistics layers take: InputError naming them."""
    least = lg.min_rows(*layers)
    stats = lg.batch_stats(*layers)
    for d, r in zip(devices, rows):
        if r >= least:
            continue
        stat = next((b for b in stats if not b.takes(r)), stats[0])
        why = ("one value per channel, which torch refuses in training" if not stat.takes(r) else
               f"statistics over {r * stat.values_per_row} values per channel, too noisy to train on")
        plural = "s" if r != 1 else ""
        raise InputError(f"rows= gives device {d!r} {r} row{plural} of every micro-batch in stage {p}, but that stage "
                         f"holds {stat.module}, which normalizes over each device's rows: {r} row{plural} "
                         f"give{'' if plural else 's'} it {why}; give every device of stage {p} at least {least} rows "
                         "(docs/planner.md)")


def _check_microbatch_rows(lg: LayerGraph, batch: int, microbatches: int | None, microbatch_rows: int | None) -> None:
    """A micro-batch too small for the stage that holds a batch-statistics layer: InputError."""
    least = lg.min_rows(0, len(lg))
    rows = microbatch_rows or (batch // microbatches if microbatches else batch)
    if rows >= least:
        return
    what = f"micro-batches of {rows} row{'s' if rows != 1 else ''}" if microbatch_rows or microbatches else \
        f"a batch of {batch} row{'s' if batch != 1 else ''}"
    raise InputError(f"{what} cannot train {lg.batch_stats(0, len(lg))[0].module}, which normalizes over the rows "
                     f"of each device: the planners give every device of its stage at least {least} rows "
                     "(docs/planner.md); use larger micro-batches" + ("" if microbatch_rows or microbatches
                                                                       else " or a larger batch"))


# ---------------------------------------------------------------------------------------------
# every planner behind one name


def _planners() -> dict:
    from asteroid_fx.passes.planners import baselines, hpp

    return {  # "balanced" is handled apart: fixed micro-batching, takes pins
        "asteroid": hpp.plan,
        "dp": baselines.dp,
        "pp": baselines.pp,
        "pipedream": baselines.pipedream,
        "hetpipe": baselines.hetpipe,
        "metis": baselines.metis,
        "oracle": baselines.oracle,
    }


PLANNER_NAMES = ("asteroid", "balanced", "dp", "pp", "pipedream", "hetpipe", "metis", "oracle")


def partition(lg: LayerGraph, cluster: Cluster, *, planner: str = "asteroid", batch: int,
              microbatches: int | None = None, microbatch_rows: int | None = None, schedule: str = "1f1b",
              stages: int | None = None, groups: Sequence[Sequence[str]] | None = None,
              rows: Sequence[Sequence[int]] | None = None, layers: Sequence[int] | None = None,
              opt_state_factor: float = ADAM_STATE_FACTOR, recovery: bool = False) -> Plan:
    """LayerGraph + Cluster -> Plan with the named planner (see PLANNER_NAMES).

    ``microbatches`` / ``microbatch_rows`` pin the micro-batching (else the planner searches every
    split of ``batch``; "balanced" needs one pinned). Pinned groups, rows or layers give a hand-made
    plan through "balanced" (also under "asteroid", the default, so that ``compile`` takes pins);
    the baselines plan by their own rules and refuse pins (InputError). ``recovery``: the plan is for a run with
    pipeline replay, and every device's memory must also hold its rollback point and the backups
    it holds (``Plan.backups_held``)."""
    if planner not in PLANNER_NAMES:
        raise InputError(f"unknown planner {planner!r}; use one of {', '.join(PLANNER_NAMES)}")
    pinned = [name for name, value in (("groups", groups), ("rows", rows), ("layers", layers)) if value is not None]
    if pinned and planner not in ("asteroid", "balanced"):
        raise InputError(f"planner {planner!r} chooses its own stages and groups, but {' and '.join(pinned)} "
                         f"{'is' if len(pinned) == 1 else 'are'} pinned; leave {', '.join(p + '=' for p in pinned)} "
                         "out, or use planner='balanced' for a hand-made plan")
    _check_microbatch_rows(lg, batch, microbatches, microbatch_rows)
    if planner == "balanced" or pinned:
        if microbatches is None and microbatch_rows is None:
            microbatches = 4
        if microbatch_rows is None:
            if batch % microbatches:
                raise InputError(f"a batch of {batch} rows does not split into {microbatches} micro-batches; "
                                 "pin microbatches= that divides it, or microbatch_rows=")
            microbatch_rows = batch // microbatches
        elif microbatches is None:
            microbatches = batch // microbatch_rows
        return balanced(lg, cluster, microbatches=microbatches, microbatch_rows=microbatch_rows, schedule=schedule,
                        stages=stages, groups=groups, rows=rows, layers=layers, opt_state_factor=opt_state_factor,
                        recovery=recovery)
    fn = _planners()[planner]
    kwargs = dict(batch=batch, microbatches=microbatches, microbatch_rows=microbatch_rows, schedule=schedule,
                  opt_state_factor=opt_state_factor, recovery=recovery)
    if planner == "asteroid":
        kwargs["stages"] = stages
    elif stages is not None:
        raise InputError(f"planner {planner!r} chooses its own stage count; pin stages= with 'asteroid' or 'balanced'")
    return fn(lg, cluster, **kwargs)
