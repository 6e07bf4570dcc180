"""How many stages a model allows: the rule that every stage computes, and the checks of a pinned
stage count and of pinned layer bounds (hpp.py and partition.balanced call them before searching).

A stage computes when its layers' forward FLOPs per row (``Layer.flops_per_row``: matrix
products, convolutions, attention; lookups, mask building and reshapes count none) are at least
``MIN_STAGE_FLOPS_SHARE`` of the whole model's. A stage below that would hold a device and a
pipeline step for an embedding lookup, a mask or a classifier head alone: the planners never
choose one (docs/planner.md, "Stages that compute"). A graph without FLOPs (costs read from a
file that predates them, hand-made test graphs) has nothing to tell stages apart by, and every
stage counts as computing.
"""

from __future__ import annotations

from typing import Sequence

from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import LayerGraph

MIN_STAGE_FLOPS_SHARE = 0.01  # of the model's forward FLOPs per row
BLOCKED_SHOWN = 3  # reasons for forbidden cuts an error or `asteroid compile` names


def flops_floor(lg: LayerGraph) -> float:
    """The forward FLOPs per row a stage needs to count as computing (0 when the graph has none)."""
    return MIN_STAGE_FLOPS_SHARE * float(lg.flops_per_row(0, len(lg)))


def computes(lg: LayerGraph, lo, hi):
    """Whether a stage of layers [lo, hi) computes; elementwise for index arrays too."""
    floor = flops_floor(lg)
    if floor <= 0.0:
        return lg.flops_per_row(lo, hi) >= 0.0  # True, in the shape of lo and hi
    return lg.flops_per_row(lo, hi) >= floor * (1.0 - 1e-9)


def suffix_stages(lg: LayerGraph) -> dict[int, int]:
    """For 0 and every allowed cut c, the most stages layers [c, L) split into at allowed cuts,
    each computing (0 when [c, L) does not compute at all).

    From the end, each stage is closed at the latest cut that gives it enough FLOPs; a start
    between two such cuts joins the stage after it. Greedy from the fixed end is optimal for every
    start at once (an exchange argument: any split's stages, from the end, start no later)."""
    L = len(lg)
    out: dict[int, int] = {}
    closed, end = 0, L  # stages closed so far, and where the last one closed starts
    for c in reversed([0, *lg.allowed_cuts()]):
        if computes(lg, c, end):
            closed, end = closed + 1, c
        out[c] = closed
    return out


def most_stages(lg: LayerGraph) -> int:
    """The most stages the model splits into, each computing."""
    return suffix_stages(lg)[0]


def blocked_note(lg: LayerGraph, shown: int = BLOCKED_SHOWN) -> str:
    """Why other cuts are not allowed (a value that is not batch-first, a size not polynomial in the
    batch), the first ``shown`` distinct reasons (those that forbid the most cuts)."""
    if not lg.blocked:
        return ""
    more = f" (and {len(lg.blocked) - shown} more)" if len(lg.blocked) > shown else ""
    return "other cuts are not allowed: " + "; ".join(lg.blocked[:shown]) + more


def stage_limit(lg: LayerGraph, cluster: Cluster, asked: int | None = None) -> tuple[int, list[str]]:
    """The most stages a plan of ``lg`` on ``cluster`` can have, and what limits it: the allowed
    cuts, the stages that compute, the devices (every limit below ``asked``; without it, those at
    the most)."""
    cuts, by_model, devices = len(lg.allowed_cuts()), most_stages(lg), len(cluster.devices)
    most = min(by_model, devices)
    below = asked if asked is not None else most + 1
    why = []
    if by_model < below:
        if by_model == cuts + 1:
            why.append(f"the model has {cuts} allowed cut{'' if cuts == 1 else 's'}")
        else:
            why.append(f"the model has {cuts} allowed cuts, and with every stage doing at least "
                       f"{MIN_STAGE_FLOPS_SHARE:.0%} of its forward FLOPs per row (matrix products, convolutions; "
                       f"not lookups, masks or reshapes alone) they give at most {by_model} stages")
    if devices < below:
        why.append(f"the cluster has {devices} device{'' if devices == 1 else 's'} (a stage needs one of its own)")
    return most, why


def check_stages(lg: LayerGraph, cluster: Cluster, stages: int) -> None:
    """A pinned stage count the model and the cluster allow, else InputError with the most
    stages and why."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise InputError(f"stages must be a positive integer, got {stages!r}")
    most, why = stage_limit(lg, cluster, stages)
    if stages <= most:
        return
    note = blocked_note(lg) if stages > most_stages(lg) else ""
    raise InputError(f"{stages} stages asked for, but {' and '.join(why)}: at most {most} stage"
                     f"{'' if most == 1 else 's'}. Ask for {most} or fewer, or leave stages out to let the planner "
                     "choose" + (f"; {note}" if note else ""))


def allowed_note(lg: LayerGraph, shown: int = 12) -> str:
    """The allowed cuts, the first ``shown`` of them."""
    allowed = lg.allowed_cuts()
    if not allowed:
        return "it has no allowed cuts"
    return "its allowed cuts are " + ", ".join(map(str, allowed[:shown])) + (", ..." if len(allowed) > shown else "")


def check_layers(lg: LayerGraph, layers: Sequence[int], stages: int | None = None,
                 groups: Sequence[Sequence[str]] | None = None) -> None:
    """Pinned layer bounds that make a plan of ``lg``: integers from 0 to the layer count,
    increasing, every inner one at an allowed cut, one stage per pinned stage or group; else
    InputError naming what is wrong."""
    L = len(lg)
    bounds = list(layers) if not isinstance(layers, (str, bytes)) else None
    if bounds is None or any(isinstance(b, bool) or not isinstance(b, int) for b in bounds):
        raise InputError(f"layers must be a list of integer layer bounds [0, ..., {L}], got {layers!r}")
    if len(bounds) < 2:
        raise InputError(f"layer bounds {bounds} must hold at least 0 and {L} (one stage)")
    if bounds[0] != 0:
        raise InputError(f"layer bounds {bounds} must start at 0, the first layer")
    if bounds[-1] != L:
        raise InputError(f"layer bounds {bounds} must end at {L}, the number of layers of the model's layer "
                         f"graph; {allowed_note(lg)}")
    back = next((i for i in range(1, len(bounds)) if bounds[i] <= bounds[i - 1]), None)
    if back is not None:
        raise InputError(f"layer bounds {bounds} must increase, but {bounds[back]} follows {bounds[back - 1]}")
    bad = [c for c in bounds[1:-1] if not lg.cuts[c].allowed]
    if bad:
        raise InputError(f"cut {bad[0]} is not allowed: {lg.cuts[bad[0]].why_not}; {allowed_note(lg)}")
    n = len(bounds) - 1
    if groups is not None and n != len(groups):
        raise InputError(f"layer bounds {bounds} give {n} stage{'' if n == 1 else 's'}, but groups pins "
                         f"{len(groups)}: give one more bound than groups")
    if stages is not None and n != stages:
        raise InputError(f"layer bounds {bounds} give {n} stage{'' if n == 1 else 's'}, but stages={stages}: "
                         f"give {stages + 1} bounds, or leave stages out (the bounds set the count)")
