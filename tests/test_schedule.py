"""schedule: GPipe and 1F1B orders per device (and the in-flight micro-batches the planner's memory
model assumes), every group member running its stage's order on its own rows, and deeper 1F1B
warm-ups that run ahead yet train exactly like plain 1F1B. lower_comm, which adds the messages,
has its own tests (test_lower_comm.py), and so has the compiled program (test_compiler.py)."""

from __future__ import annotations

import pytest
import torch

from asteroid_fx import models
from asteroid_fx.cost.estimate import in_flight
from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.program import Op, Program
from asteroid_fx.ir.verify import verify
from asteroid_fx.passes.schedule import schedule
from tests import zoo
from tests.plans import layer_per_stage

SCHEDULES = ("gpipe", "1f1b", "1f1b+1", "1f1b+3")


def _chain(n_stages: int, microbatches: int, kind: str, rows: int = 4) -> Plan:
    return layer_per_stage([[f"d{p}"] for p in range(n_stages)], [[rows]] * n_stages, microbatches, kind)


def _peak_in_flight(actions) -> int:
    """The most micro-batches forwarded and not yet backwarded along one device's list."""
    live = peak = 0
    for a in actions:
        live += {Op.F: 1, Op.B: -1}.get(a.op, 0)
        peak = max(peak, live)
    return peak


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
    program = schedule(layer_per_stage([["a", "b"], ["c"]], [[3, 1], [4]], 2, "1f1b"))
    assert _ops(program, "a") == _ops(program, "b") == "F0 F1 B0 B1"
    assert {a.rows for a in program.of("a")} == {(0, 3)}
    assert {a.rows for a in program.of("b")} == {(3, 4)}


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
        compiled = zoo.compiled("mlp", zoo.three_devices(), microbatches=4, schedule_kind=kind,
                                groups=[["a"], ["b"], ["c"]], rows=[[2], [2], [2]], layers=[0, 2, 4, 6])
        verify(compiled.program)
        torch.manual_seed(1)
        batches = [(entry.example(8, True), entry.labels(8, True)) for _ in range(2)]
        runner, losses = compiled.run(iter(batches), 2, optimizer="adam", lr=1e-2)
        results.append((losses, runner))
    (plain, _), (deep, _) = results
    assert deep == pytest.approx(plain, rel=1e-6)
