"""cost/estimate: the planner's closed form by hand on a three-layer graph. Micro-batches in flight
per schedule, a device's memory (weights, gradients, optimizer state, buffers, activations, and
recovery's state copies), the ring all-reduce, and CostTable's prefix sums giving the same numbers
as the plain functions. The simulator is checked against the same numbers in test_sim.py."""

from __future__ import annotations

import math

import pytest

from asteroid_fx.cost import stage
from asteroid_fx.cost.estimate import (CostTable, activation_memory, device_memory, in_flight, ring_allreduce_s,
                                       state_memory, static_memory)
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.costs import Cost, TimeFit
from asteroid_fx.ir.layer_graph import Cut, Layer, LayerGraph
from asteroid_fx.ir.plan import StagePlan

KIND = "jetson-nano"
PARAMS, BUFFERS, SAVED = (100, 200, 300), (10, 0, 20), (5.0, 6.0, 7.0)
CUT_BYTES = (1.0, 2.0, 3.0, 4.0)  # per row, cut 0 being the model input


def _graph(fwd=(1e-3, 2e-3, 3e-3), bwd=(2e-3, 4e-3, 6e-3)) -> LayerGraph:
    """Layer i: PARAMS[i] bytes of weights, BUFFERS[i] of buffers, SAVED[i] bytes kept per row for
    backward, fwd[i] / bwd[i] seconds per row; cut c carries CUT_BYTES[c] bytes per row."""
    layers = tuple(Layer(i, (f"n{i}",), ((KIND, Cost(TimeFit(((1.0, f),)), TimeFit(((1.0, b),)))),), p, bu, s)
                   for i, (f, b, p, bu, s) in enumerate(zip(fwd, bwd, PARAMS, BUFFERS, SAVED)))
    return LayerGraph(layers, tuple(Cut(i, ("x",), c, True) for i, c in enumerate(CUT_BYTES)))


def _cluster(names, bandwidth: float = math.inf, latency: float = 0.0) -> Cluster:
    return Cluster.uniform([Device(n, KIND) for n in names], bandwidth=bandwidth, latency=latency)


@pytest.mark.parametrize("schedule, stage, stages, microbatches, expected", [
    ("gpipe", 1, 4, 8, 8),      # every micro-batch forwarded before the first backward
    ("1f1b", 0, 4, 8, 4),       # the first stage holds one per stage ahead of it, itself included
    ("1f1b", 3, 4, 8, 1),       # the last stage runs each backward right after its forward
    ("1f1b", 0, 4, 2, 2),       # never more than there are
    ("1f1b+1", 2, 4, 12, 3),    # a deeper warm-up: (1 + depth) per stage ahead, plus one
    ("1f1b+2", 0, 4, 12, 10),
])
def test_micro_batches_in_flight(schedule, stage, stages, microbatches, expected):
    assert in_flight(schedule, stage, stages, microbatches) == expected


def test_a_devices_memory_by_hand():
    lg = _graph()
    layers, rows = (1, 3), 3  # weights 500, buffers 20, saved 13 per row, cuts 2 and 4 per row
    assert static_memory(lg, layers) == 500 * (1 + 1 + 2) + 20  # weights, gradients, Adam's two moments
    assert static_memory(lg, layers, opt_state_factor=0.0) == 500 * 2 + 20  # plain SGD
    assert activation_memory(lg, layers, rows) == (13 + 2 + 4) * rows
    assert device_memory(lg, layers, rows, 2) == 2020 + 2 * 57
    # recovery: a rollback point (weights, optimizer state, buffers) and two copies of each held stage
    assert state_memory(lg, layers) == 500 * 3 + 20
    assert static_memory(lg, layers, recovery=True) == 2020 + 1520
    assert device_memory(lg, layers, rows, 2, recovery=True, held=[(0, 1)]) == 2020 + 1520 + 2 * 310 + 2 * 57
    with pytest.raises(ValueError, match="recovery=True"):
        static_memory(lg, layers, held=[(0, 1)])


def test_ring_allreduce_by_hand():
    bw = [[math.inf, 1e3, 1e3], [1e3, math.inf, 250.0], [1e3, 1e3, math.inf]]  # b -> c is the slow link
    lat = [[0.0, 0.01, 0.01], [0.01, 0.0, 0.02], [0.01, 0.01, 0.0]]
    cl = Cluster([Device(n, KIND) for n in "abc"], bw, lat)
    assert ring_allreduce_s(cl, ("a", "b", "c"), 900) == pytest.approx(2 * 2 / 3 * 900 / 250.0 + 2 * 2 * 0.02)
    assert ring_allreduce_s(cl, ("a",), 900) == 0.0  # nothing to reduce with
    assert ring_allreduce_s(cl, ("a", "b", "c"), 0) == 0.0


def test_the_cost_table_gives_the_functions_numbers():
    lg = _graph()
    cl = _cluster(["a", "b"], bandwidth=1e3, latency=0.01)
    for recovery in (False, True):
        table = CostTable(lg, cl, 8, recovery=recovery)
        for lo, hi in [(0, 1), (0, 3), (1, 3), (2, 3)]:
            for rows in (1, 5, 8):
                assert table.stage_time("a", lo, hi, rows) == pytest.approx(stage.step_s(lg, KIND, (lo, hi), rows))
                assert table.memory(lo, hi, rows, 2) == device_memory(lg, (lo, hi), rows, 2, recovery=recovery)
            assert table.state_bytes(lo, hi) == pytest.approx(state_memory(lg, (lo, hi)))
            assert table.allreduce_s(["a", "b"], lo, hi) == pytest.approx(
                ring_allreduce_s(cl, ["a", "b"], lg.param_bytes(lo, hi) + lg.buffer_bytes(lo, hi)))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_uniform_pipeline_without_communication(schedule):
    """Equal stages and free links: one micro-batch's trip through S stages, then M - 1 periods of
    one stage's forward and backward."""
    S, M, f, b = 3, 5, 1e-3, 2.5e-3
    lg = _graph(fwd=(f,) * S, bwd=(b,) * S)
    names = [f"d{p}" for p in range(S)]
    table = CostTable(lg, _cluster(names), 1)
    stages = [StagePlan((p, p + 1), (names[p],), (1,)) for p in range(S)]
    assert table.iteration_s(stages, M, schedule) == pytest.approx((M + S - 1) * (f + b), rel=1e-12)
