"""The planner's closed-form cost model of a plan: per-device memory and the iteration time.

Memory of device d in stage p (the paper's Mem_p = MOD + OPT + K_p * ACT):
  weights + gradients + optimizer state (``opt_state_factor`` x weights: 2 for Adam, 1 for SGD
  with momentum, 0 for plain SGD) + buffers + K_p x (activations kept for backward + the stage's
  input and output slices) for its rows, with K_p the micro-batches in flight under the schedule.
Iteration time: the pipeline's fill and drain plus (M - 1) times its slowest stage, plus the
slowest group all-reduce (a ring bounded by the group's slowest link) of the gradients and
buffers. This closed form is for searching many candidates quickly; a plan's reported prediction
is the simulation of the program it lowers to (``sim.predict``), which overlaps communication with
compute as the backends do, and may differ from this by tens of percent.
"""

from __future__ import annotations

from typing import Sequence

from asteroid_fx.cluster import Cluster
from asteroid_fx.layer_graph import LayerGraph
from asteroid_fx.plan import DeviceUse, Plan, Prediction, StagePlan

ADAM_STATE_FACTOR = 2.0


def in_flight(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at its peak."""
    if schedule == "gpipe":
        return microbatches
    return min(stages - stage, microbatches)


def static_memory(lg: LayerGraph, layers: tuple[int, int], opt_state_factor: float = ADAM_STATE_FACTOR) -> float:
    """Bytes a device of the stage holds all iteration: weights, gradients, optimizer state, buffers."""
    lo, hi = layers
    return lg.param_bytes(lo, hi) * (2.0 + opt_state_factor) + lg.buffer_bytes(lo, hi)


def activation_memory(lg: LayerGraph, layers: tuple[int, int], rows: int) -> float:
    """Bytes one micro-batch in flight holds on a device with ``rows`` rows: the activations kept
    for backward plus the stage's input and output slices."""
    lo, hi = layers
    return (lg.saved_bytes_per_row(lo, hi) + lg.cuts[lo].bytes_per_row + lg.cuts[hi].bytes_per_row) * rows


def device_memory(lg: LayerGraph, layers: tuple[int, int], rows: int, k_in_flight: int,
                  opt_state_factor: float = ADAM_STATE_FACTOR) -> int:
    return int(static_memory(lg, layers, opt_state_factor) + k_in_flight * activation_memory(lg, layers, rows))


def ring_allreduce_s(cluster: Cluster, group: Sequence[str], nbytes: float) -> float:
    g = len(group)
    if g < 2 or nbytes <= 0:
        return 0.0
    ring = list(group) + [group[0]]
    bw = min(cluster.link(a, b)[0] for a, b in zip(ring, ring[1:]))
    lat = max(cluster.link(a, b)[1] for a, b in zip(ring, ring[1:]))
    return 2.0 * (g - 1) / g * nbytes / bw + 2.0 * (g - 1) * lat


def transfer_s(cluster: Cluster, lg: LayerGraph, cut: int, src: StagePlan, dst: StagePlan) -> float:
    """Seconds to move one micro-batch across ``cut`` (all row slices travel in parallel)."""
    worst = 0.0
    per_row = lg.cuts[cut].bytes_per_row
    for a, alo, ahi in src.slots:
        for b, blo, bhi in dst.slots:
            overlap = min(ahi, bhi) - max(alo, blo)
            if overlap > 0:
                bw, lat = cluster.link(a, b)
                worst = max(worst, lat + per_row * overlap / bw)
    return worst


def predict(plan: Plan, lg: LayerGraph, cluster: Cluster, opt_state_factor: float = ADAM_STATE_FACTOR,
            left_out: Sequence[tuple[str, str]] = ()) -> Prediction:
    """The plan's iteration time, throughput, and every device's memory and compute."""
    S, M = len(plan.stages), plan.microbatches
    step, uses, binding = [], [], ""
    for p, st in enumerate(plan.stages):
        lo, hi = st.layers
        times = []
        for d, r in zip(st.devices, st.rows):
            kind = cluster.device(d).kind
            t = lg.stage_time(kind, lo, hi, r)
            times.append(t)
            mem = device_memory(lg, st.layers, r, in_flight(plan.schedule, p, S, M), opt_state_factor)
            budget = cluster.device(d).memory_bytes
            uses.append(DeviceUse(d, p, mem, budget, t * M, "over budget" if mem > budget else ""))
        step.append(max(times))
    comm = [transfer_s(cluster, lg, plan.stages[p].layers[1], plan.stages[p], plan.stages[p + 1]) * 2
            for p in range(S - 1)]
    allreduce = [ring_allreduce_s(cluster, st.devices, lg.param_bytes(*st.layers) + lg.buffer_bytes(*st.layers))
                 for st in plan.stages]
    slowest = max(range(S), key=lambda p: step[p])
    worst_comm = max(range(S - 1), key=lambda p: comm[p]) if S > 1 else None
    steady = step[slowest]
    if worst_comm is not None and comm[worst_comm] > steady:
        steady = comm[worst_comm]
        binding = f"the link between stages {worst_comm} and {worst_comm + 1}"
    else:
        binding = f"stage {slowest} (compute of {plan.stages[slowest].devices[step_argmax(plan, lg, cluster, slowest)]})"
    t = sum(step) + sum(comm) + (M - 1) * steady + max(allreduce)
    if max(allreduce) > 0.5 * t:
        binding += f"; all-reduce of stage {max(range(S), key=lambda p: allreduce[p])} is half the iteration"
    uses += [DeviceUse(d, None, 0, cluster.device(d).memory_bytes, 0.0, why) for d, why in left_out]
    over = [u for u in uses if u.memory_bytes > u.budget_bytes]
    if over:
        binding = "memory of " + ", ".join(u.device for u in over) + " (over budget)"
    return Prediction(t, plan.batch / t, tuple(uses), binding)


def step_argmax(plan: Plan, lg: LayerGraph, cluster: Cluster, p: int) -> int:
    st = plan.stages[p]
    times = [lg.stage_time(cluster.device(d).kind, st.layers[0], st.layers[1], r) for d, r in zip(st.devices, st.rows)]
    return max(range(len(times)), key=lambda i: times[i])
