"""lower_comm: row-slice SEND/RECV pairs that match between stage groups (every row of every
micro-batch crosses every cut, gradients only where the cut carries them), one ALLREDUCE per group
member and one STEP per device; random hybrid plans of a real model lower to programs that round
trip and verify; and goldens (tests/golden/lower_comm/) pin the printed IR of small cases."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asteroid_fx.ir import catalog
from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.program import Op, Program, TensorSpec
from asteroid_fx.ir.program_text import format_program, parse_program
from asteroid_fx.ir.verify import verify
from asteroid_fx.passes.lower_comm import lower_comm
from asteroid_fx.passes.partition import balanced
from asteroid_fx.passes.schedule import schedule
from asteroid_fx.passes.split import split
from tests import zoo
from tests.plans import check_roundtrip_and_verify, layer_per_stage

SCHEDULES = ("gpipe", "1f1b", "1f1b+1", "1f1b+3")


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
    return layer_per_stage(groups, row_split, draw(st.integers(1, 5)), draw(st.sampled_from(SCHEDULES)))


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
    check_roundtrip_and_verify(program)



# ------------------------------------------------------------------------------------------------
# random hybrid plans of a real model


@pytest.fixture(scope="module")
def mlp():
    return zoo.compiled("mlp", catalog.preset("edge-6-300m"), microbatches=2)


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
    check_roundtrip_and_verify(_lower(mlp, plan))


# ------------------------------------------------------------------------------------------------
# goldens: the compute-only program of a case file's "before" section, lowered, prints as its
# "expected" section (regenerate: tests/golden/README.md)


F32_8 = TensorSpec("float32", (8,))

CUT_SPECS = {
    # stage 0 on the group a b (rows 3 and 1), stage 1 on c; the cut carries f32(8) both ways
    "lower_comm/2stage_group_first.txt": [((F32_8,), (F32_8,))],
    # stage 0 on a, stage 1 on the group b c (rows 1 and 3); two tensors cross, neither needs a gradient
    "lower_comm/2stage_group_second_no_grad.txt": [((F32_8, SPEC_B), ())],
}


@pytest.mark.parametrize("case", sorted(CUT_SPECS))
def test_golden(golden, case):
    file = golden(case)
    before = parse_program(file.section("before"))
    after = lower_comm(before, CUT_SPECS[case])
    verify(after)
    file.check(format_program(after))
