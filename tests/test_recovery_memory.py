"""Recovery's state copies in the planner's memory model (estimate.py, passes/hpp.py, baselines,
partition, sim): with recovery every device holds its rollback point and the first device of a
stage two copies of each stage it backs up (plan.backup_holder_stage). Memory by hand on a small
graph, planners that move away from devices the copies would overflow, a pinned plan refused with
what to change, the simulator and the runtime's backup placement agreeing with the planner, and
recovery=False as before."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asteroid_fx as asteroid
from asteroid_fx import cli, models
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.costs import Cost, TimeFit
from asteroid_fx.cost.estimate import CostTable, device_memory
from asteroid_fx.ir.layer_graph import Cut, Layer, LayerGraph
from asteroid_fx.passes.planners import hpp
from asteroid_fx.passes.partition import partition
from asteroid_fx.passes.replan import replan
from asteroid_fx.passes.replay import add_backups, backup_holders
from asteroid_fx.ir.plan import NoPlanError, Plan
from asteroid_fx.passes.lower import planned_program
from asteroid_fx.sim import simulate

FAST, SLOW = "laptop-i7", "jetson-nano"


def weights_chain(params, *, buffers=None, saved: float = 1.0, cut: float = 1.0) -> LayerGraph:
    """A chain of layers holding ``params[i]`` bytes of weights; a row takes 1 ms forward and 2 ms
    backward per layer on FAST, ten times that on SLOW; every cut carries ``cut`` bytes a row."""
    buffers = buffers or [0] * len(params)
    per_row = {FAST: 1e-3, SLOW: 1e-2}
    layers = tuple(Layer(i, (f"n{i}",), tuple((k, Cost(TimeFit(((1.0, t),)), TimeFit(((1.0, 2 * t),))))
                                              for k, t in sorted(per_row.items())), p, b, saved)
                   for i, (p, b) in enumerate(zip(params, buffers)))
    return LayerGraph(layers, tuple(Cut(i, ("x",), cut, True) for i in range(len(params) + 1)))


def cluster(*devices: tuple[str, str, int]) -> Cluster:
    return Cluster.uniform([Device(n, k, m) for n, k, m in devices], bandwidth=1.25e9, latency=1e-5)


def fits_with_recovery(plan: Plan, lg: LayerGraph, cl: Cluster) -> bool:
    return CostTable(lg, cl, plan.microbatch_rows, recovery=True).fits(plan.stages, plan.microbatches, plan.schedule)


def memory_of(plan: Plan) -> dict[str, int]:
    return {u.device: u.memory_bytes for u in plan.prediction.devices if u.stage is not None}


# ------------------------------------------------------------------------------------------------
# memory by hand


SMALL = weights_chain([1000, 2000, 3000, 4000], buffers=[0, 100, 0, 0], saved=10.0, cut=8.0)
ROOMY = cluster(("a", FAST, 10**9), ("b", FAST, 10**9), ("c", FAST, 10**9))
PINNED = dict(batch=8, microbatches=2, groups=[["a", "b"], ["c"]], rows=[[3, 1], [4]], layers=[0, 2, 4])
# Adam (opt_state_factor 2). Stage 0 = layers 0:2: 3000 bytes of weights, 100 of buffers; stage 1 =
# layers 2:4: 7000 and 0. A device of a stage holds weights x 4 + buffers (12100 / 28000 bytes),
# and K x (10 + 10 saved + 8 + 8 cut bytes) = K x 36 bytes a row, K = 2 micro-batches in flight in
# stage 0 and 1 in stage 1 (1F1B, 2 micro-batches). With recovery a state copy is weights x 3 +
# buffers (9100 / 21000): every device keeps one of its own stage; c (first of stage 1) holds two
# of stage 0, a (first of stage 0, stage S-2) two of stage 1 (the last).
WITHOUT = {"a": 12100 + 2 * 36 * 3, "b": 12100 + 2 * 36 * 1, "c": 28000 + 1 * 36 * 4}
WITH = {"a": 12100 + 9100 + 2 * 21000 + 2 * 36 * 3,
        "b": 12100 + 9100 + 2 * 36 * 1,
        "c": 28000 + 21000 + 2 * 9100 + 1 * 36 * 4}


def test_a_plans_memory_is_the_sum_by_hand():
    plain = partition(SMALL, ROOMY, **PINNED)
    recovering = partition(SMALL, ROOMY, **PINNED, recovery=True)
    assert memory_of(plain) == WITHOUT == {"a": 12316, "b": 12172, "c": 28144}
    assert memory_of(recovering) == WITH == {"a": 63416, "b": 21272, "c": 67344}
    # the closed form the planners search with says the same
    table = CostTable(SMALL, ROOMY, 4, recovery=True)
    assert table.device_bytes(recovering.stages, 2, "1f1b") == WITH
    assert CostTable(SMALL, ROOMY, 4).device_bytes(plain.stages, 2, "1f1b") == WITHOUT
    assert device_memory(SMALL, (0, 2), 3, 2, recovery=True, held=[(2, 4)]) == WITH["a"]
    assert device_memory(SMALL, (0, 2), 3, 2) == WITHOUT["a"]
    assert (recovering.backups_held("a"), recovering.backups_held("b"), recovering.backups_held("c")) == ((1,), (), (0,))


def test_the_simulator_counts_the_copies_where_the_backups_really_go():
    plan = partition(SMALL, ROOMY, **PINNED, recovery=True)
    program = add_backups(planned_program(plan, SMALL))
    sim = simulate(program, SMALL, ROOMY, recovery=True)
    assert {r.device: r.memory.peak_bytes for r in sim.devices} == WITH
    assert {r.device: r.memory.copies for r in sim.devices} == {"a": 9100 + 42000, "b": 9100, "c": 21000 + 18200}
    assert "recovery's state copies" in sim.summary()
    plain = simulate(program, SMALL, ROOMY)  # a run without recovery keeps no copies
    assert {r.device: r.memory.peak_bytes for r in plain.devices} == WITHOUT
    assert all(r.memory.copies == 0 for r in plain.devices)


def test_without_recovery_nothing_changes():
    plan = partition(SMALL, ROOMY, **PINNED)
    assert not plan.recovery and "recovery" not in plan.to_json() and "recovery" not in str(plan)
    table, default = CostTable(SMALL, ROOMY, 4, recovery=False), CostTable(SMALL, ROOMY, 4)
    assert table.held_bytes([0, 2, 4]) == [0.0, 0.0]
    assert [table.static_bytes(0, 2), table.static_bytes(2, 4)] == [default.static_bytes(0, 2), 28000] == [12100, 28000]
    with pytest.raises(ValueError, match="recovery=True"):
        device_memory(SMALL, (0, 2), 3, 2, held=[(2, 4)])


def test_a_plan_for_recovery_round_trips_and_says_where_the_backups_are():
    plan = partition(SMALL, ROOMY, **PINNED, recovery=True)
    assert Plan.from_json(json.loads(plan.dumps())) == plan
    assert plan.to_json()["recovery"] is True
    assert "backups, two copies each: stage 0 on c, stage 1 on a" in str(plan)


# ------------------------------------------------------------------------------------------------
# the planners choose plans that fit with the copies


P = 8_000_000  # bytes of weights, eight layers of 1 MB
EIGHT = weights_chain([P // 8] * 8)


def test_a_rollback_point_that_does_not_fit_moves_the_plan():
    # a holds the model (4 P) but not with its rollback point (7 P), alone or with anyone
    cl = cluster(("a", FAST, 5 * P), ("c", SLOW, 100 * P))
    plain = hpp.plan(EIGHT, cl, batch=8)
    assert [st.devices for st in plain.stages] == [("a",)]
    assert not fits_with_recovery(plain, EIGHT, cl)
    for planner in ("asteroid", "dp"):  # also a one-stage data-parallel plan keeps rollback points
        recovering = partition(EIGHT, cl, planner=planner, batch=8, recovery=True)
        assert [st.devices for st in recovering.stages] == [("c",)]
        assert fits_with_recovery(recovering, EIGHT, cl)
        table = CostTable(EIGHT, cl, recovering.microbatch_rows, recovery=True)
        assert memory_of(recovering) == table.device_bytes(recovering.stages, recovering.microbatches,
                                                           recovering.schedule)
        assert memory_of(recovering)["c"] >= 7 * P


def test_held_copies_that_do_not_fit_move_the_plan():
    # a and b hold half the model each, with its rollback point (3.5 P), not with the other half's
    # backup too (6.5 P): the pipeline a | b fits only without recovery; with it the slow c must
    # hold the backups, between a and b
    cl = cluster(("a", FAST, int(3.8 * P)), ("b", FAST, int(3.8 * P)), ("c", SLOW, 100 * P))
    plain = hpp.plan(EIGHT, cl, batch=8)
    assert {d for st in plain.stages for d in st.devices} == {"a", "b"}
    assert not fits_with_recovery(plain, EIGHT, cl)
    recovering = hpp.plan(EIGHT, cl, batch=8, recovery=True)
    assert fits_with_recovery(recovering, EIGHT, cl)
    assert all(u.memory_bytes <= u.budget_bytes for u in recovering.prediction.devices)
    assert [st.devices[0] for st in recovering.stages][1] == "c"  # holds stages 0 and 2
    assert recovering.backups_held("c") == (0, 2)
    # and it is not the slow device alone: the search plans the holders, it does not only refuse
    assert len(recovering.stages) == 3 and recovering.prediction.iteration_s < 0.5


def test_a_group_puts_first_the_member_that_can_hold_the_backups():
    lg = weights_chain([1_000_000, 1_000_000])
    cl = cluster(("a", FAST, 10**9), ("b", FAST, 8_000_000), ("c", SLOW, 10**9))
    # b holds stage 1 and its rollback point (7 MB), not also two copies of stage 0 (6 MB more)
    stages = CostTable(lg, cl, 4, recovery=True).stages_for([0, 1, 2], [["a"], ["b", "c"]], 4, 1, "1f1b")
    assert stages[1].devices == ("c", "b")
    assert CostTable(lg, cl, 4).stages_for([0, 1, 2], [["a"], ["b", "c"]], 4, 1, "1f1b")[1].devices == ("b", "c")


def test_nothing_fits_says_so_and_names_recovery():
    cl = cluster(("a", FAST, int(3.8 * P)), ("b", FAST, int(3.8 * P)))
    hpp.plan(EIGHT, cl, batch=8)  # fits without recovery
    with pytest.raises(NoPlanError) as e:
        hpp.plan(EIGHT, cl, batch=8, recovery=True)
    assert "recovery's copies" in str(e.value) and "train without recovery" in str(e.value)
    m = re.search(r"each would need at least ([\d.]+) MiB", str(e.value))
    need = float(m.group(1)) * 2**20
    assert 6.4 * P < need < 6.6 * P  # a | b at the middle: 3.5 P of its own and 3 P of the other's backup
    enough = cluster(("a", FAST, int(need * 1.01)), ("b", FAST, int(need * 1.01)))
    assert fits_with_recovery(hpp.plan(EIGHT, enough, batch=8, recovery=True), EIGHT, enough)


def test_a_pinned_plan_that_cannot_hold_the_copies_is_refused_with_what_to_do():
    # the pipeline a | c of SMALL with c (first and only device of stage 1) short of its backups
    cl = cluster(("a", FAST, 10**9), ("c", FAST, 50_000))
    pins = dict(batch=8, microbatches=2, groups=[["a"], ["c"]], layers=[0, 2, 4])
    partition(SMALL, cl, **pins)  # fits without recovery: 28000 + 144 bytes
    with pytest.raises(NoPlanError) as e:
        partition(SMALL, cl, **pins, recovery=True)
    message = str(e.value)
    need = 28000 + 21000 + 2 * 9100 + 1 * 36 * 4
    assert f"device 'c' needs {need / 2**10:.2f} KiB ({need} bytes) with recovery but has 48.83 KiB" in message
    assert "two copies of each backup it holds as the first device of stage 1 (stage 0)" in message
    assert "give stage 1 another device, first in its group, to hold the backup" in message
    assert "train without recovery" in message


# ------------------------------------------------------------------------------------------------
# every planner, random clusters


@st.composite
def tight_clusters(draw) -> Cluster:
    n = draw(st.integers(2, 4))
    kinds = draw(st.lists(st.sampled_from([FAST, SLOW]), min_size=n, max_size=n))
    budgets = draw(st.lists(st.sampled_from([2 * P, 4 * P, 6 * P, 8 * P, 40 * P]), min_size=n, max_size=n))
    return cluster(*((f"d{i}", k, m) for i, (k, m) in enumerate(zip(kinds, budgets))))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cl=tight_clusters(), planner=st.sampled_from(["asteroid", "dp", "pp", "pipedream", "hetpipe", "metis"]),
       schedule=st.sampled_from(["1f1b", "gpipe"]))
def test_every_planner_returns_plans_that_fit_with_the_copies_or_refuses(cl, planner, schedule):
    try:
        plan = partition(EIGHT, cl, planner=planner, batch=8, schedule=schedule, recovery=True)
    except NoPlanError as e:
        assert re.search(r"(need at least|use a larger batch)", str(e)), e
        return
    assert plan.recovery
    assert fits_with_recovery(plan, EIGHT, cl)
    # what the plan reports is the simulator's memory, copies included, and the closed form's
    table = CostTable(EIGHT, cl, plan.microbatch_rows, recovery=True)
    assert memory_of(plan) == table.device_bytes(plan.stages, plan.microbatches, plan.schedule)
    assert all(u.memory_bytes <= u.budget_bytes for u in plan.prediction.devices)


# ------------------------------------------------------------------------------------------------
# compile, the runtime's backups, re-planning and the command line


@pytest.fixture(scope="module")
def compiled():
    entry = models.get("mlp")
    torch.manual_seed(0)
    return asteroid.compile(entry.build(small=True), "edge-4-1g", example=entry.example(8, True), loss=entry.loss,
                            stages=3, recovery=True)


def test_the_backups_go_where_the_planner_counted_them(compiled):
    plan = compiled.plan
    assert plan.recovery and len(plan.stages) == 3
    held = backup_holders(add_backups(compiled.program))
    assert {d: tuple(s for s, h in sorted(held.items()) if h == d) for d in set(held.values())} == \
        {d: plan.backups_held(d) for st in plan.stages for d in st.devices if plan.backups_held(d)}
    sim = simulate(add_backups(compiled.program), compiled.layer_graph, compiled.cluster, recovery=True)
    assert {r.device: r.memory.peak_bytes for r in sim.devices} == memory_of(plan)
    as_compiled = compiled.simulate()  # counts the copies as compiled, without the BACKUP actions too
    assert [(r.memory.peak_bytes, r.memory.copies) for r in as_compiled.devices] == \
        [(r.memory.peak_bytes, r.memory.copies) for r in sim.devices]


def test_a_replan_leaves_room_for_the_copies(compiled):
    plan, _ = replan(compiled, ["nano0", "tx2-0"])
    assert plan.recovery
    assert fits_with_recovery(plan, compiled.layer_graph, compiled.cluster.subset(["nano0", "tx2-0"]))


def test_compile_recover_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["compile", "mlp:small", "--cluster", "edge-4-1g", "--batch", "8", "--stages", "2",
                     "--recover", "--out", str(out)]) == 0
    assert "recovery: every device's memory includes its rollback point" in capsys.readouterr().out
    assert Plan.from_json(json.loads((out / "plan.json").read_text())).recovery
    assert cli.main(["simulate", str(out)]) == 0  # counts the copies of a plan compiled with --recover
    assert "recovery's state copies" in capsys.readouterr().out
