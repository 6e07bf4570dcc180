"""Clipping by the global gradient norm: ``compile(clip_grad_norm=...)`` puts a NORM on every device
before its STEP, and training through the program equals eager training with
``torch.nn.utils.clip_grad_norm_`` before ``optimizer.step()`` (docs/semantics.md, "Gradient
clipping"), for a group, a tied weight and virtual stages; the IR's forms and verify, the
simulator, replay and re-planning carry it. torch_dist against the local backend is in
tests/test_torch_dist.py."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.cost.stage import norm_s
from asteroid_fx.ir.errors import InputError, VerifyError
from asteroid_fx.ir.program import Op, Program, max_norm_of, tied_elsewhere
from asteroid_fx.ir.program_text import format_program, parse_action, program_from_json, program_to_json
from asteroid_fx.ir.verify import verify
from asteroid_fx.passes.lower import lower_plan, stage_cut_specs
from asteroid_fx.passes.replan import ReplanError, replan, switch
from asteroid_fx.passes.replay import Failure, add_backups, replay, split_stages
from asteroid_fx.passes.split import split
from tests import zoo
from tests.eager import assert_same_state, eager_train
from tests.plans import check_roundtrip_and_verify
from tests.test_local import _named_cluster

MICROBATCHES, ROWS = 2, 4
BATCH = MICROBATCHES * ROWS
MAX_NORM = 0.05  # well below the zoo MLP's gradient norm: every iteration clips
GROUPED = {"groups": [["a", "b"], ["c"]], "rows": [[3, 1], [ROWS]]}  # a group of two, then one device


def sgd(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def _mlp(clip: float | None = MAX_NORM, **kw):
    entry = models.get("mlp")
    torch.manual_seed(0)
    model = entry.build(small=True)
    compiled = asteroid.compile(model, zoo.three_devices(), example=entry.example(BATCH, True), loss=entry.loss,
                                microbatches=MICROBATCHES, clip_grad_norm=clip, **{**GROUPED, **kw})
    return entry, model, compiled


@pytest.fixture(scope="module")
def mlp():
    return _mlp()


def _batches(entry, n=3):
    torch.manual_seed(1)
    return [(entry.example(BATCH, True), entry.labels(BATCH, True)) for _ in range(n)]


def _grad_norm(model, entry, batch) -> float:
    """The eager gradient norm of one batch: what clipping compares with ``max_norm``."""
    inputs, labels = batch
    model = __import__("copy").deepcopy(model)
    entry.loss(model(*inputs), labels).backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


def _relative(got: dict, want: dict) -> float:
    return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


# --- the program -------------------------------------------------------------------------------------


def test_every_device_runs_one_norm_before_its_step(mlp):
    _, _, compiled = mlp
    program = compiled.program
    for device, acts in program.actions:
        norms = [a for a in acts if a.op == Op.NORM]
        assert norms == [parse_action(f"NORM s{program.stage_of(device).index} [a b c] max_norm=0.05")]
        assert acts[-2:] == (norms[0], parse_action(f"STEP s{program.stage_of(device).index}"))
    assert [a.op for a in program.of("a")][-3:] == [Op.ALLREDUCE, Op.NORM, Op.STEP]
    assert "NORM s1 [a b c] max_norm=0.05\n  STEP s1" in format_program(program)
    check_roundtrip_and_verify(program)
    assert program_from_json(json.loads(json.dumps(program_to_json(program)))) == program
    assert max_norm_of(program) == MAX_NORM


def test_no_clipping_lowers_the_program_as_before():
    _, _, plain = _mlp(None)
    assert max_norm_of(plain.program) is None
    assert not any(a.op == Op.NORM for _, acts in plain.program.actions for a in acts)
    _, _, clipped = _mlp()
    without = dataclasses.replace(clipped.program, actions=tuple((d, tuple(a for a in acts if a.op != Op.NORM))
                                                                 for d, acts in clipped.program.actions))
    assert without == plain.program


def test_the_text_reads_max_norm_as_a_float_and_names_a_bad_one():
    from asteroid_fx.ir.program_text import ProgramParseError

    assert parse_action("NORM s0 [a b] max_norm=1").max_norm == 1.0
    assert parse_action("NORM s0 [a b] max_norm=2.5e-05").max_norm == 2.5e-05
    with pytest.raises(ProgramParseError, match=r"expected max_norm=<a number>, e.g. max_norm=1.0, found 'max_norm=x'"):
        parse_action("NORM s0 [a b] max_norm=x")


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "1.0", True])
def test_a_clip_that_is_not_a_positive_number_is_refused(bad):
    with pytest.raises(InputError, match="clip_grad_norm=.*positive finite number"):
        _mlp(bad)


# --- training equals eager clip_grad_norm_ --------------------------------------------------------


def test_training_equals_eager_clip_grad_norm(mlp):
    entry, model, compiled = mlp
    batches = _batches(entry)
    assert _grad_norm(model, entry, batches[0]) > 10 * MAX_NORM  # it clips
    runner, losses = compiled.run(iter(batches), 3, optimizer=sgd)
    ref, ref_losses = eager_train(model, batches, entry.loss, sgd, microbatches=MICROBATCHES, rows=ROWS,
                                  clip_grad_norm=MAX_NORM)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())
    unclipped, _ = eager_train(model, batches, entry.loss, sgd, microbatches=MICROBATCHES, rows=ROWS)
    assert _relative(runner.state_dict(), unclipped.state_dict()) > 1e-2  # the clipping mattered
    # the group's replicas stayed one
    for (a, b) in zip(runner.replicas[("a", 0)].parameters(), runner.replicas[("b", 0)].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_norm_above_the_gradients_changes_nothing():
    entry, model, compiled = _mlp(1e6)
    batches = _batches(entry, 2)
    runner, _ = compiled.run(iter(batches), 2, optimizer=sgd)
    ref, _ = eager_train(model, batches, entry.loss, sgd, microbatches=MICROBATCHES, rows=ROWS)
    assert_same_state(runner.state_dict(), ref.state_dict())


TIED = ("tok_emb.weight", "lm_head.weight")


@functools.cache
def _gpt(layout: str):
    from tests.test_ties import _cluster

    groups = {"three": [["a"], ["b"], ["c"]], "grouped": [["a", "b"], ["c"], ["d"]]}[layout]
    rows = {"three": [[ROWS], [ROWS], [ROWS]], "grouped": [[3, 1], [ROWS], [ROWS]]}[layout]
    entry = models.get("gpt")
    torch.manual_seed(0)
    model = entry.build(small=True, tie_weights=True)
    compiled = asteroid.compile(model, _cluster(), example=entry.example(BATCH, True), loss=entry.loss,
                                microbatches=MICROBATCHES, groups=groups, rows=rows, clip_grad_norm=0.5)
    return entry, model, compiled


@pytest.mark.parametrize("layout", ["three", "grouped"])
def test_a_tied_weight_counts_once_and_training_equals_eager(layout):
    entry, model, compiled = _gpt(layout)
    program = compiled.program
    assert tied_elsewhere(program) == {2: frozenset({"tok_emb.weight"})}  # the head's copy is left out
    for device, acts in program.actions:
        ops = [a.op for a in acts]
        if Op.TIE in ops:
            assert ops[-3:] == [Op.TIE, Op.NORM, Op.STEP]
    batches = _batches(entry)
    assert _grad_norm(model, entry, batches[0]) > 2 * 0.5
    make_opt = lambda ps: torch.optim.SGD(ps, lr=0.5)  # noqa: E731
    runner, losses = compiled.run(iter(batches), 3, optimizer=make_opt)
    ref, ref_losses = eager_train(model, batches, entry.loss, make_opt, microbatches=MICROBATCHES, rows=ROWS,
                                  clip_grad_norm=0.5)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())
    copies = [r.get_parameter("tok_emb.weight") for (d, s), r in runner.replicas.items() if s in (0, 2)]
    for c in copies[1:]:
        torch.testing.assert_close(c, copies[0], rtol=0, atol=0)


def test_virtual_stages_step_after_the_norm_and_train_like_eager():
    from tests.test_virtual_stages import LOOPED_GROUPS, _cluster

    entry = models.get("mlp")
    compiled = zoo.compiled("mlp", _cluster(), batch=BATCH, microbatches=MICROBATCHES, layers=[0, 1, 2, 3, 6])
    groups, rows = LOOPED_GROUPS
    stages = tuple(dataclasses.replace(st, devices=tuple(g), rows=tuple(r))
                   for st, g, r in zip(compiled.plan.stages, groups, rows))
    plan = dataclasses.replace(compiled.plan, stages=stages, schedule="interleaved", prediction=None)
    modules = split(compiled.captured, compiled.layer_graph, plan)
    program = lower_plan(plan, stage_cut_specs(modules), clip_grad_norm=MAX_NORM)
    check_roundtrip_and_verify(program)
    acts = program.of("a")  # stages 0 and 2: one NORM, then both STEPs
    assert [a.op for a in acts[-3:]] == [Op.NORM, Op.STEP, Op.STEP] and {a.stage for a in acts[-2:]} == {0, 2}
    assert acts[-3].stage == 0 and sum(a.op == Op.STEP for a in acts) == 2
    compiled = dataclasses.replace(compiled, plan=plan, stages=tuple(modules), program=program)
    torch.manual_seed(0)
    model = entry.build(small=True)
    batches = _batches(entry)
    runner, losses = compiled.run(iter(batches), 3, optimizer=sgd)
    ref, ref_losses = eager_train(model, batches, entry.loss, sgd, microbatches=MICROBATCHES, rows=ROWS,
                                  clip_grad_norm=MAX_NORM)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())


# --- verify ---------------------------------------------------------------------------------------


def _edit(program: Program, device: str, edit) -> Program:
    return dataclasses.replace(program, actions=tuple((d, tuple(edit(list(acts))) if d == device else acts)
                                                      for d, acts in program.actions))


def _drop_norm(acts):
    return [a for a in acts if a.op != Op.NORM]


def _norm_after_step(acts):
    acts[-2], acts[-1] = acts[-1], acts[-2]
    return acts


def _other_norm(acts):
    return [a._replace(max_norm=1.0) if a.op == Op.NORM else a for a in acts]


def _part_of_the_devices(acts):
    return [a._replace(group=("a", "c")) if a.op == Op.NORM else a for a in acts]


def _twice(acts):
    return acts[:-1] + [acts[-2], acts[-1]]


def _before_the_allreduce(acts):
    i = next(i for i, a in enumerate(acts) if a.op == Op.ALLREDUCE)
    return acts[:i] + [acts[-2], acts[i], acts[-1]]


@pytest.mark.parametrize("device, edit, message", [
    ("c", _drop_norm, r"device c \(line \d+\): never runs NORM.*add 'NORM s1 \[a b c\] max_norm=0.05'"),
    ("b", _norm_after_step, r"device b, line \d+: STEP s0: runs before NORM \(line \d+\); the optimizer must step "
                            "on the clipped gradients"),
    ("c", _other_norm, r"max_norm 1.0 differs from a's \(0.05\)"),
    ("b", _part_of_the_devices, r"the group must be every device of the program in program order, \[a b c\]"),
    ("c", _twice, r"a second NORM"),
    ("a", _before_the_allreduce, r"NORM s0 \[a b c\] max_norm=0.05: runs before ALLREDUCE"),
])
def test_verify_refuses_a_misplaced_or_missing_norm(mlp, device, edit, message):
    _, _, compiled = mlp
    with pytest.raises(VerifyError, match=message):
        verify(_edit(compiled.program, device, edit))


def test_verify_refuses_a_norm_that_names_another_stage_or_no_positive_norm(mlp):
    _, _, compiled = mlp
    zero = _edit(compiled.program, "a", lambda acts: [a._replace(max_norm=0.0) if a.op == Op.NORM else a
                                                      for a in acts])
    with pytest.raises(VerifyError, match="max_norm 0.0 is not a positive finite number"):
        verify(zero)
    with pytest.raises(VerifyError, match="NORM needs a max_norm"):
        verify(_edit(compiled.program, "a", lambda acts: [a._replace(max_norm=None) if a.op == Op.NORM else a
                                                          for a in acts]))


# --- the simulator ----------------------------------------------------------------------------------


def test_the_simulator_prices_the_norm_as_a_ring_of_one_float(mlp):
    _, _, compiled = mlp
    _, _, plain = _mlp(None)
    clipped, unclipped = compiled.simulate(), plain.simulate()
    spans = [s for s in clipped.spans if s.what == "allreduce" and s.label.startswith("NORM")]
    assert {s.device for s in spans} == {"a", "b", "c"}
    expected = norm_s(compiled.cluster, compiled.program.devices)
    assert expected == pytest.approx(2 * 2 * 0.5e-3, rel=1e-3)  # 2 (n - 1) latencies of 0.5 ms; 8 bytes are nothing
    assert all(s.end - s.start == pytest.approx(expected) for s in spans)
    # every device waits for the last one's backward, then the ring
    assert clipped.iteration_s == pytest.approx(unclipped.iteration_s + expected, rel=1e-9)


# --- replay and re-planning keep the clipping ------------------------------------------------------


def _double_mlp(groups, rows, clip: float | None = MAX_NORM, microbatches: int = 2):
    """The mlp in float64 (the checks are about meaning, not rounding) on a batch of 12 rows."""
    entry = models.get("mlp")
    torch.manual_seed(0)
    model = entry.build(small=True).double()
    example = tuple(t.double() for t in entry.example(12, True))
    return asteroid.compile(model, _named_cluster(), example=example, loss=entry.loss, microbatches=microbatches,
                            groups=groups, rows=rows, clip_grad_norm=clip)


@functools.cache
def _fault_tolerant():
    compiled = _double_mlp([["d0", "d1"], ["d2"], ["d3"]], [[4, 2], [6], [6]])
    compiled = dataclasses.replace(compiled, program=add_backups(compiled.program))
    entry = models.get("mlp")
    torch.manual_seed(1)
    batches = [(tuple(t.double() for t in entry.example(12, True)), entry.labels(12, True)) for _ in range(3)]
    reference = compiled.runner(optimizer=sgd)
    losses = [reference.step(*b) for b in batches[:2]]
    after_two = reference.state_dict()
    losses.append(reference.step(*batches[2]))
    return compiled, batches, losses, after_two, reference.state_dict()


@pytest.mark.parametrize("device", ["d1", "d2"])
def test_a_failure_at_any_position_gives_the_clipped_failure_free_update(device):
    """d1 leaves stage 0's group (its rows re-split), d2 takes stage 1 away (it merges into d3,
    which holds its backup): the redone iteration and the next clip over the survivors."""
    compiled, batches, losses, after_two, after_three = _fault_tolerant()
    program = compiled.program
    rewrite = replay(program, Failure(device, 1), compiled.layer_graph, compiled.cluster)
    for p in (rewrite.after, rewrite.recovery):
        survivors = tuple(d for d in program.devices if d != device)
        assert {a.group for _, acts in p.actions for a in acts if a.op == Op.NORM} == {survivors}
        assert sum(a.op == Op.NORM for _, acts in p.actions for a in acts) == len(survivors)
        assert max_norm_of(p) == MAX_NORM
    stages = split_stages(rewrite.after, compiled.captured, compiled.layer_graph)
    positions = range(0, len(program.of(device)) + 1, 3)
    for k in positions:
        runner = compiled.runner(optimizer=sgd)
        runner.step(*batches[0])
        failure = Failure.at(program, device, k, iteration=1)
        runner.step(*batches[1], stop=dict(failure.progress))
        runner.replay(replay(program, failure, compiled.layer_graph, compiled.cluster), stages)
        assert runner.step(*batches[1]) == pytest.approx(losses[1], rel=1e-9), k
        assert _relative(runner.state_dict(), after_two) < 1e-9, k
        assert runner.step(*batches[2]) == pytest.approx(losses[2], rel=1e-9), k
        assert _relative(runner.state_dict(), after_three) < 1e-9, k


def test_replan_clips_like_the_compiled_program_and_a_switch_keeps_it():
    compiled = _double_mlp([["d0"], ["d1", "d2"]], [[6], [2, 4]])
    _, program = replan(compiled, ["d0", "d2"])
    assert max_norm_of(program) == MAX_NORM
    assert {a.group for _, acts in program.actions for a in acts if a.op == Op.NORM} == {program.devices}
    other = _double_mlp([["d2"]], [[12]], microbatches=1)
    entry = models.get("mlp")
    torch.manual_seed(1)
    batches = [(tuple(t.double() for t in entry.example(12, True)), entry.labels(12, True)) for _ in range(4)]
    reference = compiled.runner(optimizer=sgd)
    losses = [reference.step(*b) for b in batches]
    runner = compiled.runner(optimizer=sgd)
    got = [runner.step(*b) for b in batches[:2]]
    sw = switch(compiled.program, other.program)
    runner.switch(sw, split_stages(sw.after, compiled.captured, compiled.layer_graph))
    got += [runner.step(*b) for b in batches[2:]]
    assert got == pytest.approx(losses, rel=1e-10)
    assert _relative(runner.state_dict(), reference.state_dict()) < 1e-10
    unclipped = _double_mlp([["d2"]], [[12]], clip=None, microbatches=1)
    with pytest.raises(ReplanError, match="no clipping, the running one clipping at max_norm 0.05"):
        switch(compiled.program, unclipped.program)
