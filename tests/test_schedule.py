"""schedule and lower_comm: GPipe and 1F1B orders per device (and the in-flight micro-batches the
planner's memory model assumes), SEND/RECV pairs that match, and for every generated program an
exact text and JSON round trip and a clean verify. A golden file pins the printed IR of a small
hybrid program; regenerate it with ASTEROID_UPDATE_GOLDEN=1 after an intended change."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asteroid_fx as asteroid
from asteroid_fx.ir import catalog
from asteroid_fx import models
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.cost.estimate import in_flight
from asteroid_fx.ir.plan import Plan, StagePlan
from asteroid_fx.ir.program import Op, Program, TensorSpec
from asteroid_fx.ir.program_text import format_program, parse_program, program_from_json, program_to_json
from asteroid_fx.ir.verify import verify
from asteroid_fx.passes.lower_comm import lower_comm
from asteroid_fx.passes.partition import balanced
from asteroid_fx.passes.schedule import schedule
from asteroid_fx.passes.split import split

GOLDEN = Path(__file__).parent / "golden"
SCHEDULES = ("gpipe", "1f1b", "1f1b+1", "1f1b+3")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: intra-op threads only add contention (badly so on a loaded runner)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _plan(groups, rows, microbatches: int, kind: str) -> Plan:
    """A hand-made plan, one layer per stage: schedule and lower_comm read nothing else."""
    stages = tuple(StagePlan((p, p + 1), tuple(g), tuple(r)) for p, (g, r) in enumerate(zip(groups, rows)))
    return Plan(stages, microbatches, sum(rows[0]), kind, "test")


def _chain(n_stages: int, microbatches: int, kind: str, rows: int = 4) -> Plan:
    return _plan([[f"d{p}"] for p in range(n_stages)], [[rows]] * n_stages, microbatches, kind)


def _peak_in_flight(actions) -> int:
    """The most micro-batches forwarded and not yet backwarded along one device's list."""
    live = peak = 0
    for a in actions:
        live += {Op.F: 1, Op.B: -1}.get(a.op, 0)
        peak = max(peak, live)
    return peak


def _check_roundtrip_and_verify(program: Program) -> None:
    assert parse_program(format_program(program)) == program
    assert program_from_json(program_to_json(program)) == program
    verify(program)


# ------------------------------------------------------------------------------------------------
# compute orders


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("n_stages", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4, 6])
def test_orders_and_in_flight(kind, n_stages, microbatches):
    program = schedule(_chain(n_stages, microbatches, kind))
    assert program.schedule == kind and len(program.stages) == n_stages
    for p in range(n_stages):
        acts = program.of(f"d{p}")
        assert all(a.stage == p and a.rows == (0, 4) and a.op in (Op.F, Op.B) for a in acts)
        forwards = [a.mb for a in acts if a.op == Op.F]
        backwards = [a.mb for a in acts if a.op == Op.B]
        assert forwards == backwards == list(range(microbatches))
        for m in range(microbatches):
            assert acts.index(acts[0]._replace(op=Op.F, mb=m)) < acts.index(acts[0]._replace(op=Op.B, mb=m))
        depth = {"gpipe": None, "1f1b": 0, "1f1b+1": 1, "1f1b+3": 3}[kind]
        expected = microbatches if depth is None else min((n_stages - p - 1) * (1 + depth) + 1, microbatches)
        assert _peak_in_flight(acts) == expected == in_flight(kind, p, n_stages, microbatches)


def _ops(program: Program, device: str) -> str:
    return " ".join(f"{a.op}{a.mb}" for a in program.of(device))


def test_one_f_one_b_order():
    program = schedule(_chain(3, 4, "1f1b"))
    assert _ops(program, "d0") == "F0 F1 F2 B0 F3 B1 B2 B3"
    assert _ops(program, "d1") == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert _ops(program, "d2") == "F0 B0 F1 B1 F2 B2 F3 B3"


def test_gpipe_order():
    program = schedule(_chain(2, 3, "gpipe"))
    assert _ops(program, "d0") == _ops(program, "d1") == "F0 F1 F2 B0 B1 B2"


def test_every_group_member_runs_the_stage_order_on_its_rows():
    program = schedule(_plan([["a", "b"], ["c"]], [[3, 1], [4]], 2, "1f1b"))
    assert _ops(program, "a") == _ops(program, "b") == "F0 F1 B0 B1"
    assert {a.rows for a in program.of("a")} == {(0, 3)}
    assert {a.rows for a in program.of("b")} == {(3, 4)}


# ------------------------------------------------------------------------------------------------
# lower_comm


SPEC_A, SPEC_B = TensorSpec("float32", (8,)), TensorSpec("int64", (2, 3))


def _composition(draw, total: int, parts: int) -> list[int]:
    """``parts`` positive integers adding up to ``total`` (uneven on purpose)."""
    if parts == 1:
        return [total]
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1, unique=True)))
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:])]


@st.composite
def hybrid_plans(draw) -> Plan:
    n_stages = draw(st.integers(1, 4))
    rows = draw(st.integers(n_stages, 12))
    names = iter(f"dev{i}" for i in range(100))
    groups, row_split = [], []
    for _ in range(n_stages):
        size = draw(st.integers(1, min(3, rows)))
        groups.append([next(names) for _ in range(size)])
        row_split.append(_composition(draw, rows, size))
    return _plan(groups, row_split, draw(st.integers(1, 5)), draw(st.sampled_from(SCHEDULES)))


def _messages(program: Program, op: Op) -> Counter:
    """(sender, receiver, payload, stage, mb, rows, specs) of every SEND or RECV."""
    out: Counter = Counter()
    for device, acts in program.actions:
        for a in acts:
            if a.op == op:
                ends = (device, a.peer) if op == Op.SEND else (a.peer, device)
                out[(*ends, a.payload, a.stage, a.mb, a.rows, a.specs)] += 1
    return out


@settings(max_examples=150, deadline=None)
@given(plan=hybrid_plans(), grads=st.lists(st.booleans(), min_size=3, max_size=3))
def test_lower_comm_pairs_every_send_with_a_receive(plan, grads):
    S = len(plan.stages)
    cut_specs = [((SPEC_A, SPEC_B), (SPEC_A,) if grads[p] else ()) for p in range(S - 1)]
    program = lower_comm(schedule(plan), cut_specs)
    sends, recvs = _messages(program, Op.SEND), _messages(program, Op.RECV)
    assert sends == recvs
    assert all(n == 1 for n in sends.values())
    for (src, dst, payload, stage, mb, rows, specs) in sends:
        lower, upper = (src, dst) if payload == "act" else (dst, src)
        assert plan.stage_of(lower) == stage and plan.stage_of(upper) == stage + 1
        assert specs == cut_specs[stage][0 if payload == "act" else 1]
        # exactly the rows the two slots share
        (_, alo, ahi), = [s for s in plan.stages[stage].slots if s[0] == lower]
        (_, blo, bhi), = [s for s in plan.stages[stage + 1].slots if s[0] == upper]
        assert rows == (max(alo, blo), min(ahi, bhi)) and rows[0] < rows[1]
    # every cut moves every row of every micro-batch forward, and back when it carries gradients
    for p in range(S - 1):
        for m in range(plan.microbatches):
            for payload in ("act", "grad"):
                pieces = sorted(k[5] for k in sends if k[2] == payload and k[3] == p and k[4] == m)
                if payload == "grad" and not grads[p]:
                    assert pieces == []
                    continue
                assert pieces[0][0] == 0 and pieces[-1][1] == plan.microbatch_rows
                assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    for st_plan in plan.stages:
        for d in st_plan.devices:
            ops = [a.op for a in program.of(d)]
            assert ops.count(Op.STEP) == 1 and ops[-1] == Op.STEP
            assert ops.count(Op.ALLREDUCE) == (1 if len(st_plan.devices) > 1 else 0)
    _check_roundtrip_and_verify(program)


# ------------------------------------------------------------------------------------------------
# compiled programs


def _four_devices() -> Cluster:
    kinds = ("jetson-tx2", "jetson-nano", "jetson-xavier-nx", "jetson-orin-nano")
    return Cluster.uniform([Device(n, k) for n, k in zip("abcd", kinds)], bandwidth=125e6, latency=1e-3)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_compiled_programs_round_trip_and_verify(name, n_stages, kind):
    entry = models.get(name)
    torch.manual_seed(0)
    compiled = asteroid.compile(entry.build(small=True), _four_devices(), example=entry.example(8, True),
                                loss=entry.loss, microbatches=2, schedule_kind=kind, stages=n_stages)
    program = compiled.program
    assert len(program.stages) == n_stages and program.schedule == kind
    _check_roundtrip_and_verify(program)
    # the transfers carry what split says crosses each cut
    for p, stage in enumerate(compiled.stages[:-1]):
        acts = [a for _, a_list in program.actions for a in a_list if a.op == Op.SEND and a.stage == p]
        assert {a.specs for a in acts if a.payload == "act"} == {stage.output_specs}


@pytest.fixture(scope="module")
def mlp():
    entry = models.get("mlp")
    torch.manual_seed(0)
    compiled = asteroid.compile(entry.build(small=True), catalog.preset("edge-6-300m"),
                                example=entry.example(8, True), loss=entry.loss, microbatches=2)
    return compiled


def _lower(compiled, plan: Plan) -> Program:
    """What compile does after partition, for a plan made here."""
    stages = split(compiled.captured, compiled.layer_graph, plan)
    cut_specs = [(s.output_specs, tuple(spec for spec, g in zip(s.output_specs, s.output_grads) if g))
                 for s in stages[:-1]]
    return lower_comm(schedule(plan), cut_specs)


@st.composite
def mlp_layouts(draw, names: tuple[str, ...], allowed: tuple[int, ...], n_layers: int):
    n_stages = draw(st.integers(1, min(len(names), len(allowed) + 1, 4)))
    devices = draw(st.permutations(names))[: draw(st.integers(n_stages, len(names)))]
    sizes = _composition(draw, len(devices), n_stages)
    starts = [sum(sizes[:p]) for p in range(n_stages)]
    groups = [list(devices[a:a + n]) for a, n in zip(starts, sizes)]
    rows_per_mb = draw(st.integers(max(sizes), 16))
    rows = [_composition(draw, rows_per_mb, len(g)) for g in groups]
    layers = [0, *sorted(draw(st.lists(st.sampled_from(allowed), min_size=n_stages - 1, max_size=n_stages - 1,
                                       unique=True))), n_layers]
    return groups, rows, layers, rows_per_mb, draw(st.integers(1, 4)), draw(st.sampled_from(SCHEDULES))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_hybrid_plans_round_trip_and_verify(mlp, data):
    lg, cluster = mlp.layer_graph, mlp.cluster
    groups, rows, layers, rows_per_mb, microbatches, kind = data.draw(
        mlp_layouts(cluster.names, lg.allowed_cuts(), len(lg)))
    plan = balanced(lg, cluster, microbatches=microbatches, microbatch_rows=rows_per_mb, schedule=kind,
                    groups=groups, rows=rows, layers=layers)
    assert [list(s.rows) for s in plan.stages] == rows and [list(s.devices) for s in plan.stages] == groups
    _check_roundtrip_and_verify(_lower(mlp, plan))


# ------------------------------------------------------------------------------------------------
# golden


def _golden_cluster() -> Cluster:
    """Explicit devices with stable names and budgets: the text must not depend on the machine."""
    return Cluster.uniform([Device("a", "jetson-nano", 2 * catalog.GiB), Device("b", "jetson-tx2", 4 * catalog.GiB),
                            Device("c", "jetson-xavier-nx", 4 * catalog.GiB)], bandwidth="1Gbps", latency="0.5ms")


def test_golden_mlp_2stage_3dev_1f1b():
    entry = models.get("mlp")
    torch.manual_seed(0)
    compiled = asteroid.compile(entry.build(small=True), _golden_cluster(), example=entry.example(8, True),
                                loss=entry.loss, microbatches=2, schedule_kind="1f1b",
                                groups=[["a", "b"], ["c"]], rows=[[3, 1], [4]], layers=[0, 3, 6])
    text = format_program(compiled.program)
    path = GOLDEN / "mlp_2stage_3dev_1f1b.txt"
    if os.environ.get("ASTEROID_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; create it with ASTEROID_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (
        f"the printed program differs from {path}; if the change is intended, regenerate it with "
        "ASTEROID_UPDATE_GOLDEN=1 and review the diff")
    assert parse_program(path.read_text()) == compiled.program


# ------------------------------------------------------------------------------------------------
# deeper 1F1B warm-up


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_deeper_warmup_runs_ahead_and_holds_what_the_planner_counts(depth):
    from asteroid_fx.cost.estimate import in_flight
    from asteroid_fx.passes.schedule import order_of

    S, M = 4, 12
    name = "1f1b" if depth == 0 else f"1f1b+{depth}"
    for p in range(S):
        steps = order_of(name)(p, S, M)
        assert [m for op, m in steps if op == Op.F] == list(range(M))
        assert [m for op, m in steps if op == Op.B] == list(range(M))
        live, most = 0, 0
        for op, _ in steps:
            live += 1 if op == Op.F else -1
            most = max(most, live)
        assert most == in_flight(name, p, S, M) == min((S - p - 1) * (1 + depth) + 1, M)


def test_unknown_schedule_names_are_refused():
    from asteroid_fx.ir.plan import warmup_depth

    with pytest.raises(ValueError, match="1f1b\\+N"):
        warmup_depth("1f1b-2")


def test_a_deeper_warmup_trains_exactly_like_plain_1f1b():
    entry = models.get("mlp")
    results = []
    for kind in ("1f1b", "1f1b+2"):
        torch.manual_seed(0)
        model = entry.build(small=True)
        compiled = asteroid.compile(model, _golden_cluster(), example=entry.example(8, True), loss=entry.loss,
                                    microbatches=4, schedule_kind=kind, groups=[["a"], ["b"], ["c"]],
                                    rows=[[2], [2], [2]], layers=[0, 2, 4, 6])
        verify(compiled.program)
        torch.manual_seed(1)
        batches = [(entry.example(8, True), entry.labels(8, True)) for _ in range(2)]
        runner, losses = compiled.run(iter(batches), 2, optimizer="adam", lr=1e-2)
        results.append((losses, runner))
    (plain, _), (deep, _) = results
    assert deep == pytest.approx(plain, rel=1e-6)
