"""The stage-cost model (cost/stage.py) and the places that price a stage through it: the closed
form's tables (CostTable), the DP's group matrices (GroupCosts) and the simulator give the same
compute, all-reduce and memory numbers; and the DP takes a group whose members fit exactly."""

from __future__ import annotations

import numpy as np
import pytest

from asteroid_fx.cost import stage
from asteroid_fx.cost.estimate import CostTable
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.costs import Cost, TimeFit
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import Cut, Layer, LayerGraph
from asteroid_fx.ir.plan import Plan, StagePlan
from asteroid_fx.ir.program import Op
from asteroid_fx.passes.lower import planned_program
from asteroid_fx.passes.planners import hpp
from asteroid_fx.passes.planners.group_costs import GroupCosts
from asteroid_fx.sim import simulate

KINDS = ("jetson-nano", "laptop-i7")


def _graph(n: int = 4) -> LayerGraph:
    layers, cuts = [], [Cut(0, ("x",), 512.0, True)]
    for i in range(n):
        costs = tuple((k, Cost(TimeFit(((1.0, 1e-3 * (i + 1) * s), (16.0, 9e-3 * (i + 1) * s))),
                               TimeFit(((1.0, 2e-3 * (i + 1) * s), (16.0, 2e-2 * (i + 1) * s)))))
                      for k, s in zip(KINDS, (3.0, 1.0)))
        layers.append(Layer(i, (f"n{i}",), costs, 10_000 * (i + 1), 64 * i, 300.0))
        cuts.append(Cut(i + 1, (f"n{i}",), 256.0 * (1 + i % 2), True))
    return LayerGraph(tuple(layers), tuple(cuts))


def _cluster() -> Cluster:
    devices = [Device("a", "jetson-nano", 2**30), Device("b", "laptop-i7", 2**30), Device("c", "laptop-i7", 2**30)]
    return Cluster.uniform(devices, bandwidth=12.5e6, latency=2e-3)


def test_closed_form_tables_price_a_stage_as_the_model_does():
    lg, cl = _graph(), _cluster()
    table = CostTable(lg, cl, 8)
    for lo, hi in ((0, 1), (1, 4), (0, 4)):
        for d in cl.names:
            kind = cl.device(d).kind
            for r in (1, 3, 8):
                assert table.stage_time(d, lo, hi, r) == pytest.approx(stage.step_s(lg, kind, (lo, hi), r))
                assert stage.step_s(lg, kind, (lo, hi), r) == pytest.approx(
                    sum(la.cost(kind).fwd(r) + la.cost(kind).bwd(r) for la in lg.layers[lo:hi]))
                assert (stage.compute_s(lg, kind, Op.F, (lo, hi), r) + stage.compute_s(lg, kind, Op.B, (lo, hi), r)
                        == pytest.approx(stage.step_s(lg, kind, (lo, hi), r)))
        assert table.allreduce_s(("a", "b", "c"), lo, hi) == pytest.approx(
            stage.allreduce_s(lg, cl, ("a", "b", "c"), (lo, hi)))
        assert table.memory(lo, hi, 3, 2) == stage.device_memory(lg, (lo, hi), 3, 2)
    with pytest.raises(InputError, match="not a computation"):
        stage.compute_s(lg, "laptop-i7", Op.SEND, (0, 1), 1)


def test_the_ring_is_one_formula_for_the_closed_form_the_dp_and_an_idle_simulation():
    lg, cl = _graph(), _cluster()
    group = ("a", "b", "c")
    nbytes = stage.allreduce_bytes(lg, (0, 4))
    r = stage.ring(cl, group)
    assert r.edges == (("a", "b"), ("b", "c"), ("c", "a"))
    assert r.seconds(nbytes) == 2 * 2 / 3 * nbytes / 12.5e6 + 2 * 2 * 2e-3
    assert stage.ring_allreduce_s(cl, group[:1], nbytes) == 0.0
    costs = GroupCosts(CostTable(lg, cl, 6), np.array([0, 4]), 6, 1)
    assert costs.allreduce(group)[0, 1] == pytest.approx(r.seconds(nbytes))
    # one stage on all three devices: its ALLREDUCE runs alone on the links
    plan = Plan((StagePlan((0, 4), group, (2, 2, 2)),), 1, 6, "1f1b", "test")
    sim = simulate(planned_program(plan, lg), lg, cl)
    assert max(d.allreduce_s for d in sim.devices) == pytest.approx(r.seconds(nbytes))
    for d in sim.devices:
        kind = cl.device(d.device).kind
        assert d.compute_s == pytest.approx(stage.step_s(lg, kind, (0, 4), 2))


def _exact_fit(rows: int) -> tuple[LayerGraph, Cluster]:
    """One layer on two identical devices whose memory holds exactly half the rows each; these
    times make the DP's equal-finish share come out a few ulps above the cap of rows / 2."""
    fwd = TimeFit(((1.0, 0.004774212882981863), (float(rows), 0.007885179004226)))
    layer = Layer(0, ("n0",), (("laptop-i7", Cost(fwd, TimeFit(((1.0, 0.0), (float(rows), 0.0))))),), 1000, 0, 100.0)
    lg = LayerGraph((layer,), (Cut(0, ("x",), 0.0, True), Cut(1, ("y",), 0.0, True)))
    budget = 4000 + 100 * (rows // 2)  # weights x 4 (Adam) + one micro-batch of rows / 2 rows
    return lg, Cluster.uniform([Device("a", "laptop-i7", budget), Device("b", "laptop-i7", budget)],
                               bandwidth=1e9, latency=0.0)


def test_a_group_whose_members_fit_exactly_is_not_refused():
    lg, cl = _exact_fit(8)
    table = CostTable(lg, cl, 8)
    costs = GroupCosts(table, np.array([0, 1]), 8, 1)
    share = (costs.step(("a", "b"), 1)[0, 1] - costs.alpha["laptop-i7"][0, 1]) / costs.beta["laptop-i7"][0, 1]
    assert share == pytest.approx(4.0) and table.row_cap("a", 0, 1, 1) == 4
    assert costs.step(("a", "b"), 1)[0, 1] == pytest.approx(table.stage_time("a", 0, 1, 4))
    plan = hpp.plan(lg, cl, batch=8, microbatches=1)
    assert [(st.devices, st.rows) for st in plan.stages] in ([(("a", "b"), (4, 4))], [(("b", "a"), (4, 4))])

