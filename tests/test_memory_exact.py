"""Memory budgets at their edge: a cluster whose memory exactly fits a plan plans (float rounding
in the planner's row caps refused it), and the "smallest memory that would do" of a no-plan
message is the real minimum."""

from __future__ import annotations

import re

import pytest

from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.plan import NoPlanError
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.passes.partition import partition
from asteroid_fx.passes.planners import hpp
from tests.test_planner import _layer_graph  # the zoo model's layer graph at its small config


@pytest.fixture(scope="module")
def bert() -> LayerGraph:
    return _layer_graph("bert", 12)


def _exactly(cluster: Cluster, plan) -> Cluster:
    """``cluster`` with each device's memory set to exactly what ``plan`` predicts it needs."""
    need = {u.device: u.memory_bytes for u in plan.prediction.devices}
    return Cluster.uniform([Device(d.name, d.kind, max(need[d.name], 1)) for d in cluster.devices],
                           bandwidth=37.5e6, latency=2e-3)


# a fractional optimizer state makes every byte count a float sum: the row cap's quotient then
# lands an ulp below the rows that fit exactly (36 of these were refused)
@pytest.mark.parametrize("planner", ["asteroid", "metis", "dp"])
@pytest.mark.parametrize("rows", [7, 10, 24])
def test_a_cluster_whose_memory_exactly_fits_a_plan_plans(bert, planner, rows):
    roomy = Cluster.from_kinds(("jetson-nano", "jetson-tx2"), 37.5e6, 2e-3)
    kw = dict(planner=planner, batch=rows, microbatches=1, opt_state_factor=1.7)
    first = partition(bert, roomy, **kw)
    tight = _exactly(roomy, first)
    again = partition(bert, tight, **kw)  # raised NoPlanError
    assert again.prediction.throughput == pytest.approx(first.prediction.throughput, rel=1e-6)
    for u in again.prediction.devices:
        assert u.memory_bytes <= u.budget_bytes and not u.note.startswith("over")


def test_exact_fit_on_four_devices_with_several_microbatches(bert):
    roomy = Cluster.from_kinds(("jetson-nano", "jetson-tx2", "jetson-orin-nano", "raspberry-pi-5"), 37.5e6, 2e-3)
    first = partition(bert, roomy, planner="asteroid", batch=64, microbatches=4, opt_state_factor=1.7)
    again = partition(bert, _exactly(roomy, first), planner="asteroid", batch=64, microbatches=4,
                      opt_state_factor=1.7)
    assert again.prediction.throughput >= first.prediction.throughput * (1 - 1e-6)


def _figure(message: str) -> int:
    m = re.search(r"each would need at least ([\d.]+) (MiB|KiB)", message)
    assert m, message
    return int(float(m.group(1)) * {"MiB": 2**20, "KiB": 2**10}[m.group(2)])


def _same(kind: str, n: int, memory: int) -> Cluster:
    return Cluster.uniform([Device(f"d{i}", kind, memory) for i in range(n)], bandwidth=125e6, latency=1e-3)


@pytest.mark.parametrize("stages", [None, 2])
@pytest.mark.parametrize("model", ["bert", "resnet18"])
def test_the_memory_that_would_do_is_the_real_minimum(bert, model, stages):
    lg = bert if model == "bert" else _layer_graph("resnet18", 10)
    with pytest.raises(NoPlanError) as e:
        hpp.plan(lg, _same("raspberry-pi-5", 3, 2**14), batch=12, stages=stages)
    need = _figure(str(e.value))
    hpp.plan(lg, _same("raspberry-pi-5", 3, need), batch=12, stages=stages)  # exactly that much plans
    with pytest.raises(NoPlanError):
        hpp.plan(lg, _same("raspberry-pi-5", 3, int(need * 0.99)), batch=12, stages=stages)  # 1% less does not
