"""passes/replan: a change of plan between two iterations (after a failure, when a device joins),
checked on the local backend: training that switches plans ends with the weights and losses of
training that never switched."""

from __future__ import annotations

import functools

import pytest
import torch

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.ir.program import Op
from asteroid_fx.ir.program_text import parse_program
from asteroid_fx.ir.verify import verify
from asteroid_fx.passes.replan import ReplanError, replan, switch
from asteroid_fx.passes.replay import add_backups, split_stages
from tests.test_local import _named_cluster

ROWS = 6


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


@functools.cache
def _setup(microbatches: int = 2):
    entry = models.get("mlp")
    torch.manual_seed(0)
    model = entry.build(small=True).double()
    example = tuple(t.double() for t in entry.example(microbatches * ROWS, True))
    compiled = asteroid.compile(model, _named_cluster(), example=example, loss=entry.loss, microbatches=microbatches,
                                groups=[["d0"], ["d1", "d2"]], rows=[[6], [2, 4]])
    torch.manual_seed(1)
    batches = [(tuple(t.double() for t in entry.example(microbatches * ROWS, True)),
                entry.labels(microbatches * ROWS, True)) for _ in range(4)]
    reference = compiled.runner(optimizer=adam)
    losses = [reference.step(*b) for b in batches]
    return compiled, batches, losses, reference.state_dict()


def _pinned(compiled, groups, rows, layers=None, microbatches=2):
    """A program of ``groups``/``rows`` on the same model (another plan of the same layer graph)."""
    entry = models.get("mlp")
    torch.manual_seed(0)
    model = entry.build(small=True).double()
    example = tuple(t.double() for t in entry.example(2 * ROWS, True))
    return asteroid.compile(model, compiled.cluster, example=example, loss=entry.loss, microbatches=microbatches,
                            groups=groups, rows=rows, layers=layers).program


def _relative(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


@pytest.mark.parametrize("groups, rows, layers, microbatches", [
    ([["d2"]], [[12]], None, 1),                                  # everything onto one device of the group
    ([["d0", "d1"], ["d2"]], [[3, 3], [6]], None, 2),             # the group moves to the first stage
    ([["d3"], ["d0"], ["d1"]], [[6], [6], [6]], None, 2),         # a device joins, three stages
    ([["d1", "d3", "d0"]], [[1, 3, 2]], None, 2),                 # data parallel with a newcomer
])
def test_training_that_switches_plans_equals_training_that_never_did(groups, rows, layers, microbatches):
    compiled, *_ = _setup()
    _check_switch(switch(compiled.program, _pinned(compiled, groups, rows, layers, microbatches), reason="test"))


def _check_switch(sw) -> None:
    """Two iterations before ``sw``, two after: the losses and weights of never switching."""
    compiled, batches, losses, want = _setup()
    runner = compiled.runner(optimizer=adam)
    got = [runner.step(*b) for b in batches[:2]]
    runner.switch(sw, split_stages(sw.after, compiled.captured, compiled.layer_graph))
    got += [runner.step(*b) for b in batches[2:]]
    assert got == pytest.approx(losses, rel=1e-10)
    assert _relative(runner.state_dict(), want) < 1e-10


def test_a_switch_moves_only_what_a_device_lacks_and_prints_as_ir():
    compiled, *_ = _setup()
    after = _pinned(compiled, [["d3"], ["d0"], ["d1"]], [[6], [6], [6]])
    sw = switch(compiled.program, after, reason="d3 joins")
    assert sw.joining == ("d3",) and sw.leaving == ("d2",)
    sends = {(d, a.stage, a.peer) for d, acts in sw.handover for a in acts if a.op == Op.BACKUP}
    restores = {(a.peer, a.stage, d) for d, acts in sw.handover for a in acts if a.op == Op.RESTORE}
    assert sends == restores
    receivers = {d for _, _, d in sends}
    # d1 stays on (part of) its old stage's layers only if its new stage lies inside them
    new_layers = {d: set(range(*after.stage_of(d).layers)) for d in after.devices}
    for d in after.devices:
        held = set(range(*compiled.program.stage_of(d).layers)) if d in compiled.program.devices else set()
        assert (d in receivers) == (not new_layers[d] <= held)
    for _, acts in sw.handover:  # sends before receives on every device: no deadlock
        ops = [a.op for a in acts]
        assert ops == sorted(ops, key=lambda op: op != Op.BACKUP)
    text = str(sw)
    assert "switch: d3 joins" in text and "joining: d3" in text and "left out: d2" in text
    assert "BACKUP" in text and "RESTORE" in text and "--- after" in text


def test_a_group_spreads_its_sends_over_its_members():
    compiled, *_ = _setup()
    after = _pinned(compiled, [["d3", "d4"]], [[3, 3]])  # two newcomers each need stage 1 (a group of d1, d2)
    sw = switch(compiled.program, after)
    senders = sorted(d for d, acts in sw.handover for a in acts if a.op == Op.BACKUP and a.stage == 1)
    assert senders == ["d1", "d2"]


def test_replan_runs_the_planner_on_a_subset_without_recompiling():
    compiled, *_ = _setup()
    plan, program = replan(compiled, ["d0", "d2"])
    assert set(program.devices) <= {"d0", "d2"}
    assert plan.microbatches * plan.microbatch_rows == 2 * ROWS
    with pytest.raises(ReplanError, match="not in the cluster"):
        replan(compiled, ["d0", "nope"])


def test_switch_keeps_backups_working_after_it():
    compiled, *_ = _setup()
    sw = switch(add_backups(compiled.program), add_backups(_pinned(compiled, [["d2"], ["d0"]], [[6], [6]])))
    assert all(a.op in (Op.BACKUP, Op.RESTORE) for _, acts in sw.handover for a in acts)
    _check_switch(sw)


@pytest.mark.parametrize("k", [0, 3, 7])
def test_a_failure_in_the_first_iteration_after_a_switch_is_recovered_from_the_handover(k):
    # after the switch d1 runs stage 0 alone and backs it up on d3, a newcomer that never ran those
    # layers: the hand-over also gives d3 its copy, so d1 dying in the very first iteration of the
    # new plan (before any backup of it) merges stage 0 into d3 with the exact state
    from asteroid_fx.passes.replay import Failure, backup_holders, replay

    compiled, batches, losses, want = _setup()
    after = add_backups(_pinned(compiled, [["d1"], ["d3"]], [[6], [6]]))
    assert backup_holders(after)[0] == "d3"
    sw = switch(add_backups(compiled.program), after)
    assert any(a.op == Op.RESTORE for a in sw.of("d3"))
    runner = compiled.runner(optimizer=adam)
    got = [runner.step(*b) for b in batches[:2]]
    runner.switch(sw, split_stages(after, compiled.captured, compiled.layer_graph))
    failure = Failure.at(after, "d1", min(k, len(after.of("d1"))), iteration=2)
    runner.step(*batches[2], stop=dict(failure.progress))
    rewrite = replay(after, failure, compiled.layer_graph, compiled.cluster)
    assert rewrite.after.devices == ("d3",)
    runner.replay(rewrite, split_stages(rewrite.after, compiled.captured, compiled.layer_graph))
    got += [runner.step(*b) for b in batches[2:]]
    assert got == pytest.approx(losses, rel=1e-10)
    assert _relative(runner.state_dict(), want) < 1e-10


def test_golden_switch_to_one_stage_fewer(golden):
    """Before and Expected: a leaves, and its stage merges into the group b c; a sends its stage to
    both, since each needs all of layers 0:2 (tests/golden/replan/one_stage_fewer.txt)."""
    file = golden("replan/one_stage_fewer.txt")
    before, after = parse_program(file.section("before")), parse_program(file.section("after"))
    verify(before)
    verify(after)
    assert len(after.stages) == len(before.stages) - 1
    file.check(str(switch(before, after, reason="a leaves: one stage fewer")))
