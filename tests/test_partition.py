"""partition.balanced: every layer in one stage, stages only at allowed cuts, rows that add up,
one stage per device, every device within its memory budget, pins honoured, and a NoPlanError that
names the device and the memory that would do. Properties are checked over random clusters."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asteroid_fx.ir import catalog

from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.cost.estimate import ADAM_STATE_FACTOR, device_memory, in_flight
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.errors import InputError
from asteroid_fx.passes.partition import NoPlanError, balanced, partition, split_rows
from asteroid_fx.ir.plan import Plan
from asteroid_fx.passes.planners.stage_count import computes, most_stages
from tests import zoo

KINDS = tuple(catalog.KINDS)  # static kinds only: host-cpu would be measured on this machine


@pytest.fixture(scope="module")
def graphs() -> dict[str, LayerGraph]:
    return {"mlp": zoo.layer_graph("mlp", KINDS), "gpt": zoo.layer_graph("gpt", KINDS)}


@pytest.fixture(scope="module")
def mlp(graphs) -> LayerGraph:
    return graphs["mlp"]


def _uniform(devices) -> Cluster:
    return Cluster.uniform(devices, bandwidth=125e6, latency=1e-3)


def _forbid(lg: LayerGraph, cuts: set[int]) -> LayerGraph:
    """The same graph with some interior cuts marked not allowed (what a tied weight would do)."""
    marked = tuple(dataclasses.replace(c, allowed=False, why_not=f"test forbids cut {c.index}")
                   if c.index in cuts else c for c in lg.cuts)
    return dataclasses.replace(lg, cuts=marked)


def _one_device_bound(lg: LayerGraph, rows: int, microbatches: int, schedule: str) -> int:
    """The memory of the whole model on one device with all the rows: any budget this large fits
    the one-stage plan."""
    return device_memory(lg, (0, len(lg)), rows, in_flight(schedule, 0, 1, microbatches), ADAM_STATE_FACTOR)


def check_plan(plan: Plan, lg: LayerGraph, cluster: Cluster, microbatches: int, rows: int, schedule: str) -> None:
    assert (plan.microbatches, plan.microbatch_rows, plan.schedule) == (microbatches, rows, schedule)
    # every layer in exactly one stage, in order
    covered = [i for sp in plan.stages for i in range(*sp.layers)]
    assert covered == list(range(len(lg)))
    # boundaries only at allowed cuts
    for sp in plan.stages[1:]:
        assert lg.cuts[sp.layers[0]].allowed, sp.layers
    # rows >= 1 each, one count per device, adding up to the micro-batch
    for sp in plan.stages:
        assert len(sp.rows) == len(sp.devices) >= 1
        assert min(sp.rows) >= 1 and sum(sp.rows) == rows
    # a device runs at most one stage, and only devices of the cluster
    placed = [d for sp in plan.stages for d in sp.devices]
    assert len(placed) == len(set(placed))
    assert set(placed) <= set(cluster.names)
    # predicted memory: the planner's model, and within every budget
    uses = {u.device: u for u in plan.prediction.devices}
    assert set(uses) == set(cluster.names)
    for p, sp in enumerate(plan.stages):
        for d, r in zip(sp.devices, sp.rows):
            expect = device_memory(lg, sp.layers, r, in_flight(schedule, p, len(plan.stages), microbatches),
                                   ADAM_STATE_FACTOR)
            assert uses[d].stage == p and uses[d].memory_bytes == expect
    for u in plan.prediction.devices:
        assert u.budget_bytes == cluster.device(u.device).memory_bytes
        assert u.memory_bytes <= u.budget_bytes, u
    assert plan.prediction.iteration_s > 0 and plan.prediction.throughput > 0


budgets = st.one_of(st.none(), st.floats(14.0, 26.0).map(lambda e: int(2 ** e)))  # None: all of it


@st.composite
def clusters(draw) -> Cluster:
    n = draw(st.integers(1, 6))
    devices = [Device(f"d{i}", draw(st.sampled_from(KINDS)), draw(budgets)) for i in range(n)]
    bandwidth = draw(st.sampled_from([12.5e6, 125e6, 1.25e9]))
    return Cluster.uniform(devices, bandwidth=bandwidth, latency=1e-3)


@pytest.mark.parametrize("model", ["mlp", "gpt"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cluster=clusters(), microbatches=st.integers(1, 8), rows=st.integers(1, 48),
       schedule=st.sampled_from(["1f1b", "gpipe"]), forbidden=st.sets(st.integers(1, 60), max_size=10))
def test_balanced_plans_are_sound(graphs, model, cluster, microbatches, rows, schedule, forbidden):
    lg = _forbid(graphs[model], forbidden)
    try:
        plan = balanced(lg, cluster, microbatches=microbatches, microbatch_rows=rows, schedule=schedule)
    except NoPlanError as e:
        # a plan may be missing only when the one-stage plan does not fit either
        bound = _one_device_bound(lg, rows, microbatches, schedule)
        generous = rows >= len(cluster) and all(d.memory_bytes >= bound for d in cluster.devices)
        assert not generous, f"no plan although every device holds the whole model: {e}"
        assert any(repr(d) in str(e) for d in cluster.names) or "rows cannot be shared" in str(e), str(e)
        event("no plan")
        return
    event(f"{len(plan.stages)} stages")
    check_plan(plan, lg, cluster, microbatches, rows, schedule)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cluster=clusters(), stages=st.integers(1, 6), rows=st.integers(6, 24))
def test_a_pinned_stage_count_is_honoured(mlp, cluster, stages, rows):
    most = min(len(cluster), most_stages(mlp))
    try:
        plan = balanced(mlp, cluster, microbatches=4, microbatch_rows=rows, stages=stages)
    except InputError as e:  # an argument error, before planning: the most stages and why
        assert stages > most, e
        assert f"{stages} stages asked for" in str(e) and f"at most {most} stage" in str(e), e
        return
    except NoPlanError:
        assert stages <= most
        return
    assert len(plan.stages) == stages
    assert all(computes(mlp, *st.layers) for st in plan.stages)
    check_plan(plan, mlp, cluster, 4, rows, "1f1b")


def test_explicit_groups_rows_and_layers_are_honoured(mlp):
    cluster = _uniform([Device("a", "jetson-nano"), Device("b", "jetson-tx2"), Device("c", "jetson-xavier-nx"),
                        Device("spare", "raspberry-pi-5")])
    L = len(mlp)
    plan = balanced(mlp, cluster, microbatches=2, microbatch_rows=4, groups=[["c"], ["a", "b"]],
                    rows=[[4], [1, 3]], layers=[0, 2, L])
    assert [(st.layers, st.devices, st.rows) for st in plan.stages] == [
        ((0, 2), ("c",), (4,)), ((2, L), ("a", "b"), (1, 3))]
    left = [u for u in plan.prediction.devices if u.stage is None]
    assert [u.device for u in left] == ["spare"] and left[0].memory_bytes == 0
    check_plan(plan, mlp, cluster, 2, 4, "1f1b")

    # groups alone: rows follow speed and add up
    plan = balanced(mlp, cluster, microbatches=2, microbatch_rows=9, groups=[["a", "b", "c"]])
    assert plan.stages[0].devices == ("a", "b", "c") and sum(plan.stages[0].rows) == 9
    # layers alone: the stage count follows them
    plan = balanced(mlp, cluster, microbatches=2, microbatch_rows=8, layers=[0, 1, 4, L])
    assert [st.layers for st in plan.stages] == [(0, 1), (1, 4), (4, L)]
    check_plan(plan, mlp, cluster, 2, 8, "1f1b")


@pytest.mark.parametrize("planner", ["metis", "dp", "pp", "pipedream", "hetpipe", "oracle"])
def test_a_baseline_refuses_pins_it_would_not_honour(mlp, planner):
    cluster = _uniform([Device("a", "jetson-tx2"), Device("b", "jetson-tx2"), Device("c", "jetson-nano")])
    with pytest.raises(InputError, match=rf"planner '{planner}' chooses its own stages and groups, but groups is pinned"):
        partition(mlp, cluster, planner=planner, batch=8, groups=[["a", "b"], ["c"]])
    with pytest.raises(InputError, match="groups and rows and layers are pinned"):
        partition(mlp, cluster, planner=planner, batch=8, groups=[["a", "b"], ["c"]], rows=[[3, 1], [4]],
                  layers=[0, 2, len(mlp)])


def test_the_default_planner_and_balanced_take_pins(mlp):
    cluster = _uniform([Device("a", "jetson-tx2"), Device("b", "jetson-tx2"), Device("c", "jetson-nano")])
    for planner in ("asteroid", "balanced"):
        plan = partition(mlp, cluster, planner=planner, batch=8, groups=[["a", "b"], ["c"]])
        assert [st.devices for st in plan.stages] == [("a", "b"), ("c",)]


def test_rows_are_pinned_with_their_groups(mlp):
    cluster = _uniform([Device("a", "jetson-tx2"), Device("b", "jetson-tx2"), Device("c", "jetson-nano")])
    with pytest.raises(ValueError, match="pin rows= together with groups="):
        balanced(mlp, cluster, microbatches=2, microbatch_rows=4, rows=[[3, 1], [4]], stages=2)
    with pytest.raises(ValueError, match=r"one count per device of every group in groups \[\['a', 'b'\], \['c'\]\]"):
        balanced(mlp, cluster, microbatches=2, microbatch_rows=4, groups=[["a", "b"], ["c"]], rows=[[3, 1]])


def test_pinned_layers_at_a_forbidden_cut_are_refused(mlp):
    lg = _forbid(mlp, {2})
    cluster = _uniform([Device("a", "jetson-tx2"), Device("b", "jetson-tx2")])
    with pytest.raises(InputError, match="cut 2 is not allowed: test forbids cut 2; its allowed cuts are 1, 3,"):
        balanced(lg, cluster, microbatches=2, microbatch_rows=4, groups=[["a"], ["b"]], layers=[0, 2, len(lg)])
    with pytest.raises(InputError, match=rf"layer bounds \[0, {len(mlp)}\] give 1 stage, but groups pins 2"):
        balanced(mlp, cluster, microbatches=2, microbatch_rows=4, groups=[["a"], ["b"]], layers=[0, len(mlp)])


@pytest.mark.parametrize("layers, problem", [
    ([0, 24], "must end at {L}, the number of layers"),
    ([1, "L"], "must start at 0, the first layer"),
    ([0, 3, 2, "L"], "must increase, but 2 follows 3"),
    ([0, 2, 2, "L"], "must increase, but 2 follows 2"),
    ([0], "must hold at least 0 and {L}"),
    ([0, 1.5, "L"], "must be a list of integer layer bounds"),
    ([0, 1, 2, "L"], r"give 3 stages, but stages=2: give 3 bounds"),
])
def test_wrong_layer_bounds_are_an_argument_error_named_once(mlp, layers, problem):
    """Bounds wrong for the model are refused before planning, with what is wrong, not as "no plan
    fits this cluster" once per stage count."""
    L = len(mlp)
    layers = [L if b == "L" else b for b in layers]
    cluster = _uniform([Device("a", "jetson-tx2"), Device("b", "jetson-tx2"), Device("c", "jetson-nano")])
    stages = 2 if "stages=2" in problem else None
    with pytest.raises(InputError) as e:
        partition(mlp, cluster, batch=8, layers=layers, stages=stages)
    message = str(e.value)
    assert re.search(problem.format(L=L), message), message
    assert "no plan fits" not in message and message.count("layer bounds") <= 1, message


def test_pinned_layers_set_the_stage_count(mlp):
    cluster = _uniform([Device("a", "jetson-tx2"), Device("b", "jetson-tx2"), Device("c", "jetson-nano")])
    plan = partition(mlp, cluster, batch=8, layers=[0, 2, len(mlp)])
    assert [st.layers for st in plan.stages] == [(0, 2), (2, len(mlp))]
    with pytest.raises(InputError, match="give 4 stages, but the cluster has 3 devices"):
        partition(mlp, cluster, batch=8, layers=[0, 1, 2, 3, len(mlp)])
    with pytest.raises(InputError, match="stages=3 but groups pins 2 groups"):
        partition(mlp, cluster, batch=8, stages=3, groups=[["a"], ["b"]])


def test_too_few_allowed_cuts_for_the_stages(mlp):
    lg = _forbid(mlp, set(range(1, len(mlp))))
    cluster = _uniform([Device("a", "jetson-tx2"), Device("b", "jetson-tx2")])
    with pytest.raises(InputError, match="2 stages asked for, but the model has 0 allowed cuts: at most 1 stage"):
        balanced(lg, cluster, microbatches=2, microbatch_rows=4, stages=2)
    with pytest.raises(InputError, match="the model has 0 allowed cuts: at most 1 stage"):
        balanced(lg, cluster, microbatches=2, microbatch_rows=4, groups=[["a"], ["b"]])
    plan = balanced(lg, cluster, microbatches=2, microbatch_rows=4)
    assert len(plan.stages) == 1


NEED = re.compile(r"device '(\S+)' needs .*?\((\d+) bytes\) for its stage but has .*?: "
                  r"a budget of at least .*?\((\d+) bytes\) would do")


def test_no_memory_names_the_device_and_the_memory_that_would_do(mlp):
    def plan_with(budget: int) -> Plan:
        cluster = _uniform([Device("tiny", "jetson-nano", memory_bytes=budget)])
        return balanced(mlp, cluster, microbatches=2, microbatch_rows=4)

    with pytest.raises(NoPlanError) as info:
        plan_with(1000)
    message = str(info.value)
    m = NEED.search(message)
    assert m, message
    assert "has 1000 bytes" in message
    device, need, would_do = m.group(1), int(m.group(2)), int(m.group(3))
    assert device == "tiny" and need == would_do == _one_device_bound(mlp, 4, 2, "1f1b")
    assert "KiB" in message  # a small model's memory is not printed as 0.00 GiB
    # exactly that budget does, one byte less does not
    assert plan_with(need).stages[0].devices == ("tiny",)
    with pytest.raises(NoPlanError):
        plan_with(need - 1)


def test_no_memory_among_others_names_the_small_device(mlp):
    cluster = _uniform([Device("big", "jetson-tx2"), Device("tiny", "jetson-nano", memory_bytes=1000)])
    with pytest.raises(NoPlanError) as info:
        balanced(mlp, cluster, microbatches=2, microbatch_rows=4)
    assert all(m.group(1) == "tiny" for m in NEED.finditer(str(info.value)))
    assert NEED.search(str(info.value))


# ------------------------------------------------------------------------------------------------
# split_rows


def test_split_rows_examples():
    assert split_rows(10, [1, 1]) == (5, 5)
    assert split_rows(10, [3, 1]) == (7, 3)  # 1 each, then the 8 spare rows 6:2
    assert split_rows(3, [100, 1, 1]) == (1, 1, 1)  # at least one row each, whatever the speeds
    assert split_rows(7, [1.0]) == (7,)
    assert split_rows(5, [1, 1, 1]) in {(2, 2, 1), (2, 1, 2), (1, 2, 2)}


def test_split_rows_needs_a_row_per_device():
    with pytest.raises(NoPlanError, match="micro-batch of 2 rows cannot be shared by a group of 3 devices"):
        split_rows(2, [1, 1, 1])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8).flatmap(
    lambda w: st.tuples(st.integers(len(w), 500), st.just(w))))
def test_split_rows_properties(case):
    total, weights = case
    rows = split_rows(total, weights)
    assert len(rows) == len(weights) and sum(rows) == total and min(rows) >= 1
    spare, wsum = total - len(weights), sum(weights)
    for r, w in zip(rows, weights):  # largest remainder: within one row of the exact share
        assert abs((r - 1) - spare * w / wsum) < 1 + 1e-9
