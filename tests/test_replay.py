"""passes/replay: backups, the rewrite for the survivors of a failure, and the local backend running it.

The central check is exhaustive: for every device and every failure position k (the device ran its
first k actions of the second iteration, the others what precedes that point in the execution
order), the survivors' run (interrupted iteration, replay, the redone iteration, one more) ends
with the same weights, optimizer-driven, and the same losses as the failure-free run. The same
holds for every pair of devices failing at the same moment, or replay refuses exactly when a stage's
state is lost with them (a seeded sample of positions here, every position under ``slow``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random

import pytest
import torch

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.cost.stage import step_s
from asteroid_fx.ir.program import Action, Op, Program, StageInfo, StageSlot, TensorSpec
from asteroid_fx.ir.program_text import format_program, parse_program, program_from_json, program_to_json
from asteroid_fx.sim import simulate
from asteroid_fx.ir.verify import VerifyError, execution_order, verify
from asteroid_fx.passes import replay as replay_pass
from asteroid_fx.passes.lower_comm import lower_comm
from asteroid_fx.passes.replay import (Failure, ReplayError, add_backups, backup_holders, replay, split_rows,
                                       split_stages)
from tests.test_local import _named_cluster

# (groups, rows of a 6-row micro-batch): single-member stages, and a group of three with uneven rows
# between two single-member stages (its members back up nothing but hold the next stage's backup).
# With two failures: in 1-3-1 the first and last stages both merge into the group, in 4x1 stages 1
# and 3 both merge into stage 2, and a stage that dies with its holder is lost.
LAYOUTS = {
    "2x1": ([["d0"], ["d1"]], [[6], [6]]),
    "1-3-1": ([["d0"], ["d1", "d2", "d3"], ["d4"]], [[6], [2, 3, 1], [6]]),
    "2-1-2": ([["d0", "d1"], ["d2"], ["d3", "d4"]], [[4, 2], [6], [1, 5]]),
    "4x1": ([["d0"], ["d1"], ["d2"], ["d3"]], [[6], [6], [6], [6]]),
}
ROWS = 6
# the small mlp has three stages that compute, so four stages need their bounds pinned by hand
LAYERS = {"4x1": [0, 3, 4, 5, 6]}


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


@functools.cache
def _compiled(layout: str, schedule: str, microbatches: int):
    entry = models.get("mlp")
    torch.manual_seed(0)
    model = entry.build(small=True).double()  # float64: the check is about meaning, not rounding
    groups, rows = LAYOUTS[layout]
    example = tuple(t.double() for t in entry.example(microbatches * ROWS, True))
    compiled = asteroid.compile(model, _named_cluster(), example=example, loss=entry.loss,
                                microbatches=microbatches, schedule_kind=schedule, groups=groups, rows=rows,
                                layers=LAYERS.get(layout))
    fault_tolerant = dataclasses.replace(compiled, program=add_backups(compiled.program))
    torch.manual_seed(1)
    batches = [(tuple(t.double() for t in entry.example(microbatches * ROWS, True)),
                entry.labels(microbatches * ROWS, True)) for _ in range(3)]
    reference = fault_tolerant.runner(optimizer=adam)
    losses = [reference.step(*b) for b in batches[:2]]
    after_two = reference.state_dict()
    losses.append(reference.step(*batches[2]))
    return fault_tolerant, batches, losses, after_two, reference.state_dict()


def _relative(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


def _every_layout(test):
    """Runs ``test`` for every layout, micro-batch count, row split and schedule: slow."""
    for mark in (pytest.mark.parametrize("by_speed", [False, True]), pytest.mark.parametrize("microbatches", [2, 3, 4]),
                 pytest.mark.parametrize("layout", sorted(LAYOUTS)),
                 pytest.mark.parametrize("schedule", ["1f1b", "gpipe"]), pytest.mark.slow):
        test = mark(test)
    return test


def _sweep(layout: str, schedule: str, microbatches: int, by_speed: bool) -> int:
    compiled, batches, losses, after_two, after_three = _compiled(layout, schedule, microbatches)
    program = compiled.program
    lg, cluster = (compiled.layer_graph, compiled.cluster) if by_speed else (None, None)
    rewrites: dict[str, object] = {}  # the rewrite does not depend on the position (rollback)
    runs = 0
    for device, acts in program.actions:
        for k in range(len(acts) + 1):
            runner = compiled.runner(optimizer=adam)
            assert runner.step(*batches[0]) == pytest.approx(losses[0], rel=1e-12)
            failure = Failure.at(program, device, k, iteration=1)
            runner.step(*batches[1], stop=dict(failure.progress))
            rewrite = replay(program, failure, lg, cluster)
            if device not in rewrites:
                rewrites[device] = (rewrite, split_stages(rewrite.after, compiled.captured, compiled.layer_graph))
            assert rewrite.after == rewrites[device][0].after and rewrite.recovery == rewrites[device][0].recovery
            runner.replay(rewrite, rewrites[device][1])
            redone = runner.step(*batches[1])
            where = f"{device} failed after {k} of {len(acts)} actions"
            assert redone == pytest.approx(losses[1], rel=1e-6), where
            assert _relative(runner.state_dict(), after_two) <= 1e-6, where
            assert runner.step(*batches[2]) == pytest.approx(losses[2], rel=1e-6), where  # 'after' trains on
            assert _relative(runner.state_dict(), after_three) <= 1e-6, where
            runs += 1
    return runs


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("layout, microbatches, by_speed", [
    ("2x1", 2, True), ("2x1", 3, False), ("1-3-1", 2, False), ("1-3-1", 3, True), ("2-1-2", 2, False),
    ("2-1-2", 4, True),
])
def test_every_failure_position_gives_the_failure_free_update(layout, microbatches, by_speed, schedule):
    assert _sweep(layout, schedule, microbatches, by_speed) > 20


def test_the_sweeps_take_layers_over_in_a_group():
    """The merge into a group, where members other than the holder receive the lost layers, is
    shown on 1-3-1 without speeds, d0 and d4 failing at once (both stages' backups are on d1,
    which is therefore not lent, so both merge into d1 d2 d3); d0 alone borrows d1 instead."""
    program = _compiled("1-3-1", "1f1b", 2)[0].program
    prologue = dict(replay(program, Failure("d0", 1, also=("d4",))).prologue)
    assert prologue["d1"] == (Action(Op.ROLLBACK, 0), Action(Op.BACKUP, 0, peer="d2"), Action(Op.BACKUP, 0, peer="d3"))
    assert prologue["d2"] == (Action(Op.RESTORE, 0, peer="d1"), Action(Op.ROLLBACK, 0))
    alone = replay(program, Failure("d0", 1))
    assert alone.after.stages[0].devices == ("d1",) and dict(alone.prologue)["d1"] == (Action(Op.ROLLBACK, 0),)


@_every_layout
def test_every_failure_position_all_layouts(layout, microbatches, by_speed, schedule):
    assert _sweep(layout, schedule, microbatches, by_speed) > 20


def _state_lost(program: Program, failed: set[str]) -> bool:
    """Whether some stage's state dies with ``failed``: every device of the stage failed and no
    survivor RESTOREs a copy of it (or nobody survives at all)."""
    survivors = [d for d in program.devices if d not in failed]
    restored = {a.stage for d in survivors for a in program.of(d) if a.op == Op.RESTORE}
    return not survivors or any(set(st.devices) <= failed and st.index not in restored for st in program.stages)


def _pair_sweep(layout: str, schedule: str, microbatches: int, by_speed: bool,
                per_pair: int | None) -> tuple[int, list[tuple[str, str]]]:
    """Every pair of devices fails at the same moment in the second iteration, at every position of
    either device (``per_pair`` of them, drawn with a fixed seed, when given): the survivors' run
    equals the failure-free one, or replay raises exactly when a stage's state is lost. Returns the
    runs and the pairs that lose a stage."""
    compiled, batches, losses, after_two, after_three = _compiled(layout, schedule, microbatches)
    program = compiled.program
    lg, cluster = (compiled.layer_graph, compiled.cluster) if by_speed else (None, None)
    rng = random.Random(f"{layout} {schedule} {microbatches} {by_speed}")
    runs, lost = 0, []
    for x, y in itertools.combinations(program.devices, 2):
        if _state_lost(program, {x, y}):
            with pytest.raises(ReplayError, match="no survivor holds stage|no device survives"):
                replay(program, Failure(x, 1, also=(y,)), lg, cluster)
            lost.append((x, y))
            continue
        first = replay(program, Failure(x, 1, also=(y,)), lg, cluster)
        stages = split_stages(first.after, compiled.captured, compiled.layer_graph)
        positions = [(a, k, b) for a, b in [(x, y), (y, x)] for k in range(len(program.of(a)) + 1)]
        for device, k, other in positions if per_pair is None else rng.sample(positions, per_pair):
            runner = compiled.runner(optimizer=adam)
            runner.step(*batches[0])
            failure = Failure.at(program, device, k, iteration=1, also=(other,))
            runner.step(*batches[1], stop=dict(failure.progress))
            rewrite = replay(program, failure, lg, cluster)
            # the rewrite depends neither on the position nor on which device is named first
            assert rewrite.after == first.after and rewrite.recovery == first.recovery
            runner.replay(rewrite, stages)
            where = f"{device} failed after {k} of {len(program.of(device))} actions, and {other} with it"
            assert runner.step(*batches[1]) == pytest.approx(losses[1], rel=1e-6), where
            assert _relative(runner.state_dict(), after_two) <= 1e-6, where
            assert runner.step(*batches[2]) == pytest.approx(losses[2], rel=1e-6), where
            assert _relative(runner.state_dict(), after_three) <= 1e-6, where
            runs += 1
    return runs, lost


# the pairs whose failure loses a stage: it dies with the device holding its backup (or nobody survives)
LOST_WITH = {"2x1": [("d0", "d1")], "1-3-1": [("d0", "d1"), ("d1", "d4")], "2-1-2": [("d2", "d3")],
             "4x1": [("d0", "d1"), ("d1", "d2"), ("d2", "d3")]}


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("layout, microbatches, by_speed", [
    ("2x1", 2, False), ("1-3-1", 2, False), ("1-3-1", 3, True), ("2-1-2", 2, True), ("2-1-2", 3, False),
    ("4x1", 2, True), ("4x1", 3, False),
])
def test_two_failures_at_once_give_the_failure_free_update_or_say_the_state_is_lost(layout, microbatches, by_speed,
                                                                                      schedule):
    runs, lost = _pair_sweep(layout, schedule, microbatches, by_speed, per_pair=2)
    devices = sum(map(len, LAYOUTS[layout][0]))
    assert lost == LOST_WITH[layout]
    assert runs == 2 * (devices * (devices - 1) // 2 - len(lost))


@_every_layout
def test_two_failures_at_every_position_all_layouts(layout, microbatches, by_speed, schedule):
    runs, lost = _pair_sweep(layout, schedule, microbatches, by_speed, per_pair=None)
    assert lost == LOST_WITH[layout] and (runs > 20 or layout == "2x1")


def test_default_holders_put_stages_that_merge_from_both_sides_on_one_device():
    """Only the stage before the last can receive lost stages from both sides; default_holders
    places both backups on its first device, which then holds all three stages."""
    program = _compiled("4x1", "1f1b", 2)[0].program
    assert backup_holders(program) == {0: "d1", 1: "d2", 2: "d3", 3: "d2"}
    rewrite = replay(program, Failure("d1", 1, also=("d3",)))
    assert [st.layers for st in rewrite.after.stages] == [program.stages[0].layers, (program.stages[1].layers[0], 6)]
    assert rewrite.after.stages[1].devices == ("d2",)


# ---------------------------------------------------------------------------------------------
# the rewrite itself

SPEC = (TensorSpec("float32", (8,)),)


def _two_stages() -> Program:
    """Stage 0 on a alone, stage 1 on the group b c; one micro-batch of 4 rows, with backups."""
    table = (StageInfo(0, (0, 2), (StageSlot("a", 0, 4),)),
             StageInfo(1, (2, 3), (StageSlot("b", 0, 1), StageSlot("c", 1, 4))))
    compute = tuple((s.device, (Action(Op.F, st.index, 0, (s.lo, s.hi)), Action(Op.B, st.index, 0, (s.lo, s.hi))))
                    for st in table for s in st.slots)
    return add_backups(lower_comm(Program("gpipe", 1, 4, table, compute), [(SPEC, SPEC)]))


# c fails: b runs all rows of stage 1; backups are placed again on the new table
RESPLIT_AFTER = """\
stage 0 layers 0:2 a[0:4]
stage 1 layers 2:3 b[0:1:4]

device a
  F s0 mb0 r0:4
  SEND act s0 mb0 r0:1 -> b : f32(8)
  SEND act s0 mb0 r1:4 -> b : f32(8)
  RECV grad s0 mb0 r0:1 <- b : f32(8)
  RECV grad s0 mb0 r1:4 <- b : f32(8)
  B s0 mb0 r0:4
  STEP s0
  BACKUP s0 -> b
  RESTORE s1 <- b
device b
  RECV act s0 mb0 r0:1 <- a : f32(8)
  F s1 mb0 r0:1
  RECV act s0 mb0 r1:4 <- a : f32(8)
  F s1 mb0 r1:4
  B s1 mb0 r0:1
  SEND grad s0 mb0 r0:1 -> a : f32(8)
  B s1 mb0 r1:4
  SEND grad s0 mb0 r1:4 -> a : f32(8)
  ALLREDUCE s1 [b]
  STEP s1
  BACKUP s1 -> a
  RESTORE s0 <- a
"""


def _three_stages(holders: dict[int, str] | None = None) -> Program:
    """Stage 0 on a, stage 1 on the group b c, stage 2 on d; one micro-batch of 4 rows, with backups
    (by default s0 and s2 on b, s1 on d)."""
    table = (StageInfo(0, (0, 1), (StageSlot("a", 0, 4),)),
             StageInfo(1, (1, 2), (StageSlot("b", 0, 1), StageSlot("c", 1, 4))),
             StageInfo(2, (2, 3), (StageSlot("d", 0, 4),)))
    compute = tuple((s.device, (Action(Op.F, st.index, 0, (s.lo, s.hi)), Action(Op.B, st.index, 0, (s.lo, s.hi))))
                    for st in table for s in st.slots)
    return add_backups(lower_comm(Program("gpipe", 1, 4, table, compute), [(SPEC, SPEC)] * 2), holders)


def _case(golden, name: str, program: Program):
    """The golden case file ``name``, whose "before" section is ``program`` printed (add_backups'
    output) and parses back to it: the input its other sections were made from."""
    file = golden(name)
    file.check(format_program(program), "before")
    assert parse_program(file.section("before")) == program
    return file


def test_two_failures_print_both_and_merge_from_both_sides(golden):
    program = _three_stages()
    assert backup_holders(program) == {0: "b", 1: "d", 2: "b"}
    failure = Failure.at(program, "d", 4, iteration=1, also=("a",))
    assert failure.devices == ("d", "a") and dict(failure.progress)["a"] == 3
    # d and a fail together: stages 0 and 2 both merge into stage 1, whose b holds both backups; c
    # gets the merged stage from b
    _case(golden, "replay/three_stages.txt", program).check(str(replay(program, failure)), "d and a die")


def test_two_failures_merge_a_stage_and_resplit_another():
    program = _three_stages()
    rewrite = replay(program, Failure("a", 1, (("a", 3), ("c", 2)), also=("c",)))
    assert str(rewrite.failure) == "a and c failed at the same moment in iteration 1, after 3 and 2 of their actions"
    assert rewrite.changes == (
        "stage 1 lost c; b takes over its rows as chunks of its own",
        "stage 0 lost its only device a; its layers 0:1 move to stage 1 (b holds the backup), now layers 0:2 on b[0:1:4]",
        "stage 0's layers run over the chunks r0:1 r1:4, not its own r0:4: batch-statistics layers (BatchNorm) among "
        "them would not give the failure-free update, others differ by rounding only",
        "backups: s0 -> d, s1 -> b")
    assert [(d, [a.op for a in acts]) for d, acts in rewrite.prologue] == [("b", [Op.ROLLBACK]), ("d", [Op.ROLLBACK])]
    # c's progress unknown: no counts printed
    assert str(Failure("a", 1, (("a", 3),), also=("c",))) == "a and c failed at the same moment in iteration 1"
    assert str(Failure("a", 2, also=["c", "d"])) == "a, c and d failed at the same moment in iteration 2"


def test_a_whole_group_lost_merges_into_its_holders_stage():
    program = _three_stages()
    rewrite = replay(program, Failure("b", 1, also=("c",)))
    assert rewrite.changes[0] == ("stage 1 lost all its devices (b and c); its layers 1:2 move to stage 2 (d holds "
                                  "the backup), now layers 1:3 on d[0:4]")


def test_a_chain_of_lost_stages_merges_into_the_stage_next_to_them_once_merged():
    """Stages 1 and 2 back up on stage 3: stage 2 merges into it, and then stage 1 is next to it too."""
    table = tuple(StageInfo(i, (i, i + 1), (StageSlot(d, 0, 4),)) for i, d in enumerate("abcd"))
    compute = tuple((st.devices[0], (Action(Op.F, st.index, 0, (0, 4)), Action(Op.B, st.index, 0, (0, 4))))
                    for st in table)
    bare = lower_comm(Program("gpipe", 1, 4, table, compute), [(SPEC, SPEC)] * 3)
    program = add_backups(bare, {0: "b", 1: "d", 2: "d", 3: "c"})
    rewrite = replay(program, Failure("b", 1, also=("c",)))
    assert [(st.layers, st.devices) for st in rewrite.after.stages] == [((0, 1), ("a",)), ((1, 4), ("d",))]
    with pytest.raises(ReplayError, match=r"stage 1 lost its only device b; its backup is on d \(stage 3\), which is "
                                          "not next to stage 1, so"):
        replay(program, Failure("b", 1))  # alone, stage 1 cannot reach stage 3
    crossed = add_backups(bare, {0: "b", 1: "d", 2: "a", 3: "c"})
    with pytest.raises(ReplayError, match="not next to stage 1, even after the other lost stages merged"):
        replay(crossed, Failure("b", 1, also=("c",)))


def test_two_failures_that_lose_a_stage_say_what_to_do():
    program = _three_stages()
    with pytest.raises(ReplayError, match=r"stage 0 lost its only device a and, at the same moment, b, which held its "
                                          r"backup: no survivor holds stage 0's state.*restart from a checkpoint.*"
                                          r"add_backups\(holders=...\).*give stage 0 a second device"):
        replay(program, Failure("a", 1, also=("b",)))
    with pytest.raises(ReplayError, match="no device survives: a, b, c and d were all the devices of the program"):
        replay(program, Failure("a", also=("b", "c", "d")))
    with pytest.raises(ReplayError, match=r"device 'z' is not in the program"):
        replay(program, Failure("a", also=("z",)))
    with pytest.raises(ReplayError, match="a device is named twice among the failed"):
        Failure("a", also=("b", "a"))
    split = _three_stages({0: "b", 1: "d", 2: "c"})  # the two backups of stage 1's neighbours on two devices
    # stage 1 lends b (stage 0's holder) to stage 0; c, left alone, takes stage 2 over by a merge
    lent = replay(split, Failure("a", also=("d",)))
    assert [st.devices for st in lent.after.stages] == [("b",), ("c",)]
    assert lent.after.stages[1].layers == (split.stages[1].layers[0], split.stages[2].layers[1])
    # without the lend (its device over memory) both would merge into stage 1 from two holders
    holds = replay_pass._held_stages(split, ["b", "c"])
    with pytest.raises(ReplayError, match=r"stages 0 and 2 merge into stage 1, but no surviving device of stage 1 "
                                          r"holds all of them \(stage 0's backup is on b; stage 2's backup is on c\)"):
        replay_pass._stage_table(split, ("a", "d"), holds, {}, None, None)


def test_add_backups_places_a_ring_of_neighbours(golden):
    program = _two_stages()
    _case(golden, "replay/two_stages.txt", program)
    assert backup_holders(program) == {0: "b", 1: "a"}
    with pytest.raises(ReplayError, match="already has backups"):
        add_backups(program)


def test_rewrite_prints_before_and_after(golden):
    # a fails: its layers merge into the stage of b, which holds their backup; c gets them from b
    program = _two_stages()
    rewrite = replay(program, Failure.at(program, "a", 3, iteration=1))
    _case(golden, "replay/two_stages.txt", program).check(str(rewrite), "a dies")
    assert "-device a\n" in rewrite.diff()


def test_a_group_member_dying_re_splits_its_rows(golden):
    """Before and Expected: c, a member of stage 1's group, dies; b takes all of stage 1's rows,
    the stages stay, and the backups are placed again on the new table."""
    file = golden("replay/two_stages.txt")
    program = parse_program(file.section("before"))
    rewrite = replay(program, Failure.at(program, "c", 3, iteration=1))
    verify(rewrite.after)
    verify(rewrite.recovery)
    file.check(str(rewrite), "c dies")


def test_resplit_keeps_the_stages():
    program = _two_stages()
    rewrite = replay(program, Failure("c", iteration=4))
    assert format_program(rewrite.after).split("\n", 4)[4] == RESPLIT_AFTER
    assert [a.op for _, acts in rewrite.prologue for a in acts] == [Op.ROLLBACK, Op.ROLLBACK]
    assert rewrite.changes[0] == "stage 1 lost c; b takes over its rows as chunks of its own: b[0:1:4]"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("by_speed", [False, True])
def test_rewrites_verify_round_trip_and_simulate(layout, by_speed):
    compiled = _compiled(layout, "1f1b", 2)[0]
    lg, cluster = compiled.layer_graph, compiled.cluster
    for device in compiled.program.devices:
        rewrite = replay(compiled.program, Failure(device, 1), *((lg, cluster) if by_speed else ()))
        for p in (rewrite.after, rewrite.recovery):
            verify(p)
            assert parse_program(format_program(p)) == p
            assert program_from_json(program_to_json(p)) == p
            assert simulate(p, lg, cluster).iteration_s > 0
        assert device not in rewrite.after.devices
        assert set(rewrite.after.devices) <= set(compiled.program.devices)


def test_backups_are_simulated_and_held_by_the_neighbour():
    compiled, batches, *_ = _compiled("2x1", "1f1b", 2)
    sim = simulate(compiled.program, compiled.layer_graph, compiled.cluster, opt_state_factor=2.0)
    sent = {t.label: t.nbytes for t in sim.transfers if t.label.startswith("BACKUP")}
    lg = compiled.layer_graph
    assert sent == {f"BACKUP s{p} -> {h}": 3 * lg.param_bytes(*compiled.program.stages[p].layers)
                    for p, h in [(0, "d1"), (1, "d0")]}  # weights + Adam's two moments
    runner = compiled.runner(optimizer=adam)
    runner.step(*batches[0])
    held = runner.copies["d1"][1]  # d1 holds stage 0's state for iteration 1, optimizer state included
    stage0 = compiled.stages[0].module
    for name, p in runner.replicas[("d0", 0)].named_parameters():
        assert torch.equal(held.params[name], p.detach())
        assert name in held.optim
    assert set(held.params) >= {n for n, _ in stage0.named_parameters()}


def test_speed_split_gives_fast_devices_more_rows():
    compiled = _compiled("1-3-1", "1f1b", 2)[0]
    lg, cluster = compiled.layer_graph, compiled.cluster
    slots = split_rows(["d1", "d2", "d3"], 60, (2, 4), lg=lg, cluster=cluster)
    times = {s.device: step_s(lg, cluster.device(s.device).kind, (2, 4), s.hi - s.lo) for s in slots}
    assert sum(s.hi - s.lo for s in slots) == 60
    one_more = {d: step_s(lg, cluster.device(d).kind, (2, 4), dict((s.device, s.hi - s.lo) for s in slots).get(d, 0) + 1)
                for d in ["d1", "d2", "d3"]}
    assert max(times.values()) <= min(one_more.values()) + 1e-12  # no row could move to finish sooner
    assert split_rows(["x", "y"], 7, (0, 1), current={"x": 2, "y": 1}) == (StageSlot("x", 0, 5), StageSlot("y", 5, 7))


def test_failure_at_is_a_prefix_of_the_execution_order():
    program = _two_stages()
    order = execution_order(program)
    for device, acts in program.actions:
        for k in range(len(acts) + 1):
            done = dict(Failure.at(program, device, k).progress)
            assert done[device] == k
            n = sum(done.values())
            assert sorted(order[:n]) == sorted((d, i) for d, c in done.items() for i in range(c))
    with pytest.raises(ReplayError, match="a failure position is 0..9, not 10"):
        Failure.at(program, "a", 10)


def test_errors_name_the_problem():
    program = _two_stages()
    with pytest.raises(ReplayError, match=r"device 'z' is not in the program \(devices: a, b, c\)"):
        replay(program, Failure("z"))
    bare = dataclasses.replace(program, actions=tuple(
        (d, tuple(a for a in acts if a.op not in (Op.BACKUP, Op.RESTORE))) for d, acts in program.actions))
    with pytest.raises(ReplayError, match="stage 0 lost its only device a and no device holds a backup of it"):
        replay(bare, Failure("a"))
    last = replay(bare, Failure("c")).after  # b alone runs stage 1 now
    merged = replay(program, Failure("a")).after  # b and c run the one stage
    lone = replay(merged, Failure("c")).after
    with pytest.raises(ReplayError, match="no device survives: b was the only device"):
        replay(lone, Failure("b"))
    with pytest.raises(ReplayError, match="add_backups"):
        replay(last, Failure("b"))


def test_backups_on_a_far_stage_cannot_take_the_layers():
    program = _compiled("1-3-1", "1f1b", 2)[0].program
    bare = dataclasses.replace(program, actions=tuple(
        (d, tuple(a for a in acts if a.op not in (Op.BACKUP, Op.RESTORE))) for d, acts in program.actions))
    far = add_backups(bare, {0: "d4", 1: "d0", 2: "d0"})
    with pytest.raises(ReplayError, match=r"its backup is on d0 \(stage 0\), which is not next to stage 2"):
        replay(far, Failure("d4"))


def test_verify_rejects_a_late_rollback():
    program = _two_stages()
    late = dataclasses.replace(program, actions=tuple(
        (d, acts + (Action(Op.ROLLBACK, program.stage_of(d).index),)) for d, acts in program.actions))
    with pytest.raises(VerifyError, match="comes after compute .* a ROLLBACK starts a recovery program"):
        verify(late)
