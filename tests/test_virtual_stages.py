"""Virtual stages: a device holding several (never adjacent) stages of a Plan and a Program.

The IR says which stages each device holds and rejects a device twice in one stage or in two
adjacent ones; verify checks every stage a device holds as it checks a device's one stage; the
interleaved 1F1B schedule (and GPipe) orders a device's stages; the local backend trains such a
program to eager training's weights; the simulator queues a device's stages on one device and adds
up their memory; torch_dist refuses them with a clear error."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from asteroid_fx import models
from asteroid_fx.backends.base import BackendError
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.errors import InputError, SeveralStagesError, VerifyError
from asteroid_fx.ir.program import Op, Program, StageInfo, StageSlot, TensorSpec
from asteroid_fx.ir.program_text import (
    format_program,
    parse_action,
    parse_program,
    program_from_json,
    program_to_json,
)
from asteroid_fx.ir.verify import verify
from asteroid_fx.passes.lower import lower_plan, stage_cut_specs
from asteroid_fx.passes.schedule import device_orders, schedule
from asteroid_fx.passes.split import split
from tests import zoo
from tests.eager import assert_same_state, eager_train
from tests.plans import check_roundtrip_and_verify, layer_per_stage

SPECS = ((TensorSpec("float32", (8,)),), (TensorSpec("float32", (8,)),))


def _lowered(groups, rows, microbatches, kind) -> Program:
    plan = layer_per_stage(groups, rows, microbatches, kind)
    return lower_plan(plan, [SPECS] * (len(groups) - 1))


# ------------------------------------------------------------------------------------------------
# the IR


def test_plan_holds_virtual_stages_but_no_cut_inside_a_device():
    plan = layer_per_stage([["a"], ["b"], ["a"], ["b"]], [[4]] * 4, 2, "interleaved")
    assert plan.stages_of("a") == (0, 2) and plan.stages_of("b") == (1, 3) and plan.stages_of("z") == ()
    with pytest.raises(SeveralStagesError, match="device a holds stages 0 and 2; use stages_of"):
        plan.stage_of("a")
    assert layer_per_stage([["a"], ["b"]], [[4], [4]], 1, "1f1b").stage_of("b") == 1  # one stage: as before
    with pytest.raises(InputError, match="holds stages 1 and 2, which are adjacent: a cut inside one device is no "
                                         "cut; merge stages 1 and 2 into one stage"):
        layer_per_stage([["a"], ["b"], ["b"]], [[4]] * 3, 1, "gpipe")
    with pytest.raises(InputError, match="device 'a' has two slots"):
        layer_per_stage([["a", "a"]], [[2, 2]], 1, "gpipe")
    # the first device of a stage holds the backup of the stage before it (the last: of the one after)
    assert plan.backups_held("a") == (1, 3) and plan.backups_held("b") == (0, 2)


def test_program_answers_per_stage():
    program = _lowered([["a"], ["b", "c"], ["a"]], [[4], [1, 3], [4]], 1, "gpipe")
    assert program.virtual_stages and not _lowered([["a"], ["b"]], [[4], [4]], 1, "gpipe").virtual_stages
    assert [st.index for st in program.stages_of("a")] == [0, 2] and program.stages_of("z") == ()
    assert program.slot_of("a", 2) == StageSlot("a", 0, 4) and program.slot_of("c") == StageSlot("c", 1, 4)
    with pytest.raises(SeveralStagesError, match="device a holds stages 0 and 2; use stages_of"):
        program.stage_of("a")
    with pytest.raises(SeveralStagesError):
        program.slot_of("a")
    with pytest.raises(KeyError):
        program.slot_of("a", 1)


# A hand-written program: a holds stages 0 and 2, b stage 1; gradients flow back down through both
# cuts, each of a's stages steps after its own last backward.
HAND_WRITTEN = """\
asteroid-program v1
schedule gpipe
microbatches 1
microbatch_rows 4
stage 0 layers 0:1 a[0:4]
stage 1 layers 1:2 b[0:4]
stage 2 layers 2:3 a[0:4]

device a
  F s0 mb0 r0:4
  SEND act s0 mb0 r0:4 -> b : f32(8)
  RECV act s1 mb0 r0:4 <- b : f32(8)
  F s2 mb0 r0:4
  B s2 mb0 r0:4
  SEND grad s1 mb0 r0:4 -> b : f32(8)
  STEP s2
  RECV grad s0 mb0 r0:4 <- b : f32(8)
  B s0 mb0 r0:4
  STEP s0
device b
  RECV act s0 mb0 r0:4 <- a : f32(8)
  F s1 mb0 r0:4
  SEND act s1 mb0 r0:4 -> a : f32(8)
  RECV grad s1 mb0 r0:4 <- a : f32(8)
  B s1 mb0 r0:4
  SEND grad s0 mb0 r0:4 -> a : f32(8)
  STEP s1
"""


def test_hand_written_program_round_trips_and_verifies():
    program = parse_program(HAND_WRITTEN)
    check_roundtrip_and_verify(program)
    assert program_from_json(json.loads(json.dumps(program_to_json(program)))) == program
    assert program == _lowered([["a"], ["b"], ["a"]], [[4]] * 3, 1, "gpipe")  # what the lowering writes
    assert parse_program(format_program(program)) == program


def _edit(program: Program, device: str, old: str, new: str | None) -> Program:
    acts = list(program.of(device))
    i = acts.index(parse_action(old))
    acts[i:i + 1] = [] if new is None else [parse_action(new)]
    return dataclasses.replace(program, actions=tuple((d, tuple(acts) if d == device else a)
                                                      for d, a in program.actions))


def _problems(program: Program) -> str:
    with pytest.raises(VerifyError) as e:
        verify(program)
    return str(e.value)


@pytest.mark.parametrize("device, old, new, fragment", [
    ("a", "F s2 mb0 r0:4", "F s1 mb0 r0:4",
     "names stage 1, but this device runs stages 0, 2, so it must name one of stages 0, 2"),
    ("a", "STEP s2", None, "never runs STEP s2"),
    ("a", "B s0 mb0 r0:4", None, "never runs B s0 mb0"),
    ("a", "RECV grad s0 mb0 r0:4 <- b : f32(8)", None, "needs the gradients of rows 0:4 of mb0"),
    ("b", "SEND act s1 mb0 r0:4 -> a : f32(8)", "SEND act s1 mb0 r0:4 -> b : f32(8)", "peer b is this device"),
])
def test_verify_checks_each_stage_of_a_device(device, old, new, fragment):
    assert fragment in _problems(_edit(parse_program(HAND_WRITTEN), device, old, new))


def test_verify_rejects_a_device_in_adjacent_stages_and_twice_in_a_stage():
    p = parse_program(HAND_WRITTEN)
    adjacent = dataclasses.replace(p, stages=(p.stages[0], StageInfo(1, (1, 2), (StageSlot("a", 0, 4),)), p.stages[2]))
    assert "of which 0 and 1 are adjacent: a cut inside one device is no cut; merge stages 0 and 1" in _problems(adjacent)
    twice = dataclasses.replace(p, stages=(StageInfo(0, (0, 1), (StageSlot("a", 0, 2), StageSlot("a", 2, 4))),
                                           *p.stages[1:]))
    assert "device a has two slots" in _problems(twice)


def test_rows_are_checked_against_the_slot_of_the_stage_named():
    # a runs rows 0:2 of stage 0 and all of stage 2: an F of stage 2 on stage 0's rows is wrong
    program = _lowered([["a", "c"], ["b"], ["a"]], [[2, 2], [4], [4]], 1, "gpipe")
    verify(program)
    assert "runs rows 0:2 but this device's slot is [0:4]" in _problems(_edit(program, "a", "F s2 mb0 r0:4",
                                                                               "F s2 mb0 r0:2"))


# ------------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("kind", ["interleaved", "gpipe"])
@pytest.mark.parametrize("groups, chunks", [(1, 1), (2, 1), (2, 2), (2, 3), (3, 2), (4, 2)])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("pairs", [False, True])
def test_looped_placements_verify(kind, groups, chunks, microbatches, pairs):
    """Every group r of D holds stages r, r + D, ...; with ``pairs`` each group is two devices
    splitting the rows (so every stage all-reduces). The lowered program verifies (no deadlock) and
    every device computes each of its stages' micro-batches once."""
    S = groups * chunks
    names = [[f"d{s % groups}a", f"d{s % groups}b"] if pairs else [f"d{s % groups}"] for s in range(S)]
    rows = [[1, 3] if pairs else [4] for _ in range(S)]
    program = _lowered(names, rows, microbatches, kind)
    check_roundtrip_and_verify(program)
    for d in program.devices:
        held = [st.index for st in program.stages_of(d)]
        assert len(held) == chunks
        computes = [(a.op, a.stage, a.mb) for a in program.of(d) if a.op in (Op.F, Op.B)]
        assert sorted(computes) == sorted((op, s, m) for op in (Op.F, Op.B) for s in held for m in range(microbatches))
        assert [a.stage for a in program.of(d) if a.op == Op.STEP] == sorted(held, reverse=True)


def test_interleaved_order_follows_megatron():
    """Two devices, two chunks each, four micro-batches (Narayanan et al. 2021, figure 4's shape):
    rounds of two micro-batches through chunk 0 then chunk 1; the last device starts its backwards
    after (v - 1) D = 2 warm-up forwards, the first after 2 (D - 1) = 2 more (Megatron-LM's count)."""
    plan = layer_per_stage([["a"], ["b"], ["a"], ["b"]], [[4]] * 4, 4, "interleaved")
    text = {d: " ".join(f"{op}{s}.{m}" for op, s, m in order)
            for d, order in device_orders("interleaved", schedule(plan).stages, 4).items()}
    assert text["a"] == "F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 B2.2 B2.3 B0.2 B0.3"
    assert text["b"] == "F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3"


@pytest.mark.parametrize("microbatches", [1, 3, 6])
def test_interleaved_with_one_stage_per_device_is_1f1b(microbatches):
    groups = [["a"], ["b", "c"], ["d"]]
    rows = [[4], [1, 3], [4]]
    one = schedule(layer_per_stage(groups, rows, microbatches, "1f1b"))
    inter = schedule(layer_per_stage(groups, rows, microbatches, "interleaved"))
    assert inter.actions == one.actions


def test_schedules_that_cannot_order_virtual_stages_say_so():
    with pytest.raises(InputError, match="device a holds stages 0, 2; use 'interleaved'"):
        schedule(layer_per_stage([["a"], ["b"], ["a"]], [[4]] * 3, 2, "1f1b"))
    # a V-shaped placement (a: 0 and 2, b: 1) runs under gpipe, not under the looped interleaving
    check_roundtrip_and_verify(_lowered([["a"], ["b"], ["a"]], [[4]] * 3, 3, "gpipe"))
    with pytest.raises(InputError, match="needs a looped placement"):
        schedule(layer_per_stage([["a"], ["b"], ["a"]], [[4]] * 3, 2, "interleaved"))


# ------------------------------------------------------------------------------------------------
# the local backend, the simulator, torch_dist

MICROBATCHES, ROWS = 4, 4
BATCH = MICROBATCHES * ROWS


def _cluster() -> Cluster:
    return Cluster.uniform([Device(n, "jetson-xavier-nx") for n in "abcd"], bandwidth=125e6, latency=1e-3)


@pytest.fixture(scope="module")
def four_stages():
    """The mlp compiled in four stages on a, b, c, d (one each). The small mlp has three stages
    that compute, so the planner refuses four; bounds pinned by hand are the caller's."""
    compiled = zoo.compiled("mlp", _cluster(), batch=BATCH, microbatches=MICROBATCHES, layers=[0, 1, 2, 3, 6])
    assert len(compiled.plan.stages) == 4
    return compiled


def _placed(compiled, devices, rows, kind: str = "interleaved"):
    """``compiled`` with its four stages on ``devices`` (several stages per device), lowered under ``kind``."""
    stages = tuple(dataclasses.replace(st, devices=tuple(g), rows=tuple(r))
                   for st, g, r in zip(compiled.plan.stages, devices, rows))
    plan = dataclasses.replace(compiled.plan, stages=stages, schedule=kind, prediction=None)
    modules = split(compiled.captured, compiled.layer_graph, plan)
    program = lower_plan(plan, stage_cut_specs(modules))
    verify(program)
    return dataclasses.replace(compiled, plan=plan, stages=tuple(modules), program=program)


LOOPED = ([["a"], ["b"], ["a"], ["b"]], [[4]] * 4)
LOOPED_GROUPS = ([["a", "c"], ["b"], ["a", "c"], ["b"]], [[3, 1], [4], [1, 3], [4]])


@pytest.mark.parametrize("kind", ["interleaved", "gpipe"])
@pytest.mark.parametrize("layout", [LOOPED, LOOPED_GROUPS], ids=["2dev", "groups"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_local_backend_trains_virtual_stages_like_eager(four_stages, layout, kind, opt):
    compiled = _placed(four_stages, *layout, kind)
    assert compiled.program.virtual_stages
    make_opt = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05), "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}[opt]
    entry = models.get("mlp")
    torch.manual_seed(0)
    model = entry.build(small=True)
    torch.manual_seed(1)
    batches = [(entry.example(BATCH, True), entry.labels(BATCH, True)) for _ in range(3)]
    runner, losses = compiled.run(iter(batches), 3, optimizer=make_opt)
    ref, ref_losses = eager_train(model, batches, entry.loss, make_opt, microbatches=MICROBATCHES, rows=ROWS)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())
    assert set(runner.replicas) == {(d, st.index) for st in compiled.program.stages for d in st.devices}


def test_simulator_queues_a_devices_stages_and_adds_their_memory(four_stages):
    compiled = _placed(four_stages, *LOOPED)
    sim = compiled.simulate()
    assert sim.iteration_s > 0
    one = four_stages.simulate()  # the same stages, one per device of the same kind
    for d, others in (("a", ("a", "c")), ("b", ("b", "d"))):
        r = sim.device(d)
        assert r.stages == compiled.plan.stages_of(d) and r.stage_label in ("0,2", "1,3")
        assert r.compute_s == pytest.approx(sum(one.device(o).compute_s for o in others))
        assert r.memory.weights == sum(one.device(o).memory.weights for o in others)
        static = [one.device(o).memory.points[0][1] for o in others]
        assert r.memory.points[0][1] == pytest.approx(sum(static), abs=2)
        computes = sorted((s.start, s.end) for s in sim.spans if s.device == d and s.what == "compute")
        assert all(e <= s2 + 1e-12 for (_, e), (s2, _) in itertools.pairwise(computes))  # one at a time
    assert "0,2" in sim.summary()


def test_torch_dist_refuses_virtual_stages(four_stages):
    from asteroid_fx.backends.torch_dist.worker import DistWorker

    compiled = _placed(four_stages, *LOOPED)
    with pytest.raises(BackendError, match="virtual stages.*local backend only for now"):
        DistWorker(compiled.program, compiled.stages, "a", loss=compiled.loss, unflatten=lambda x: x,
                   input_names=("x",))
