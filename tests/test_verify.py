"""verify and the dry run: a valid program passes, each kind of broken copy is named precisely."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asteroid_fx.ir import ops
from asteroid_fx.ir.program import Action, Op, Program, StageInfo, StageSlot, TensorSpec
from asteroid_fx.ir.program_text import format_program_lines, parse_action, parse_program
from asteroid_fx.ir.verify import DeadlockError, VerifyError, dry_run, execution_order, format_grid, verify

CUT_SPECS = (TensorSpec("float32", (8,)),)

# --- builders -----------------------------------------------------------------------------------


def _compute_order(schedule: str, stage: int, n_stages: int, microbatches: int) -> list[tuple[Op, int]]:
    """(F|B, mb) in the order a stage runs them: GPipe all F then all B; 1F1B warms up, then alternates."""
    if schedule == "gpipe":
        return [(Op.F, mb) for mb in range(microbatches)] + [(Op.B, mb) for mb in range(microbatches)]
    warm = min(n_stages - stage - 1, microbatches)
    order = [(Op.F, mb) for mb in range(warm)]
    for mb in range(microbatches - warm):
        order += [(Op.F, warm + mb), (Op.B, mb)]
    return order + [(Op.B, mb) for mb in range(microbatches - warm, microbatches)]


def _shared(slots: Sequence[StageSlot], lo: int, hi: int) -> list[tuple[str, int, int]]:
    return [(s.device, max(lo, s.lo), min(hi, s.hi)) for s in slots if max(lo, s.lo) < min(hi, s.hi)]


def pipeline_program(
    groups: Sequence[Sequence[tuple[str, int, int]]],
    microbatches: int,
    schedule: str = "1f1b",
    grad_free_cuts: frozenset[int] = frozenset(),
) -> Program:
    """A lowered program: each stage's compute order, with the row slices every cut exchanges
    (no gradients back across the cuts in ``grad_free_cuts``, whose tensors need none)."""
    stages = tuple(StageInfo(k, (k, k + 1), tuple(StageSlot(*s) for s in g)) for k, g in enumerate(groups))
    n = len(stages)
    actions = []
    for k, st_ in enumerate(stages):
        for slot in st_.slots:
            rows = (slot.lo, slot.hi)
            below = _shared(stages[k - 1].slots, *rows) if k > 0 else []
            above = _shared(stages[k + 1].slots, *rows) if k < n - 1 else []
            grads_from_above = [] if k in grad_free_cuts else above
            grads_to_below = [] if k - 1 in grad_free_cuts else below
            acts: list[Action] = []
            for op, mb in _compute_order(schedule, k, n, microbatches):
                if op == Op.F:
                    acts += [Action(Op.RECV, k - 1, mb, (lo, hi), d, "act", CUT_SPECS) for d, lo, hi in below]
                    acts.append(Action(Op.F, k, mb, rows))
                    acts += [Action(Op.SEND, k, mb, (lo, hi), d, "act", CUT_SPECS) for d, lo, hi in above]
                else:
                    acts += [Action(Op.RECV, k, mb, (lo, hi), d, "grad", CUT_SPECS) for d, lo, hi in grads_from_above]
                    acts.append(Action(Op.B, k, mb, rows))
                    acts += [Action(Op.SEND, k - 1, mb, (lo, hi), d, "grad", CUT_SPECS) for d, lo, hi in grads_to_below]
            if len(st_.slots) > 1:
                acts.append(Action(Op.ALLREDUCE, k, group=st_.devices))
            acts.append(Action(Op.STEP, k))
            actions.append((slot.device, tuple(acts)))
    return Program(schedule, microbatches, groups[0][-1][2], stages, tuple(actions))


# Two stages: a and b split stage 0 unevenly (5 and 7 rows), c runs stage 1; two micro-batches, 1F1B.
VALID_TEXT = """\
asteroid-program v1
schedule 1f1b
microbatches 2
microbatch_rows 12
stage 0 layers 0:1 a[0:5] b[5:12]
stage 1 layers 1:2 c[0:12]

device a
  F s0 mb0 r0:5
  SEND act s0 mb0 r0:5 -> c : f32(8)
  F s0 mb1 r0:5
  SEND act s0 mb1 r0:5 -> c : f32(8)
  RECV grad s0 mb0 r0:5 <- c : f32(8)
  B s0 mb0 r0:5
  RECV grad s0 mb1 r0:5 <- c : f32(8)
  B s0 mb1 r0:5
  ALLREDUCE s0 [a b]
  STEP s0
device b
  F s0 mb0 r5:12
  SEND act s0 mb0 r5:12 -> c : f32(8)
  F s0 mb1 r5:12
  SEND act s0 mb1 r5:12 -> c : f32(8)
  RECV grad s0 mb0 r5:12 <- c : f32(8)
  B s0 mb0 r5:12
  RECV grad s0 mb1 r5:12 <- c : f32(8)
  B s0 mb1 r5:12
  ALLREDUCE s0 [a b]
  STEP s0
device c
  RECV act s0 mb0 r0:5 <- a : f32(8)
  RECV act s0 mb0 r5:12 <- b : f32(8)
  F s1 mb0 r0:12
  B s1 mb0 r0:12
  SEND grad s0 mb0 r0:5 -> a : f32(8)
  SEND grad s0 mb0 r5:12 -> b : f32(8)
  RECV act s0 mb1 r0:5 <- a : f32(8)
  RECV act s0 mb1 r5:12 <- b : f32(8)
  F s1 mb1 r0:12
  B s1 mb1 r0:12
  SEND grad s0 mb1 r0:5 -> a : f32(8)
  SEND grad s0 mb1 r5:12 -> b : f32(8)
  STEP s1
"""

GROUPS = [[("a", 0, 5), ("b", 5, 12)], [("c", 0, 12)]]


@pytest.fixture
def valid() -> Program:
    return parse_program(VALID_TEXT)


def edit(p: Program, device: str, change: Callable[[list[Action]], list[Action]]) -> Program:
    """A copy of ``p`` with ``device``'s action list changed (``p`` itself is left alone)."""
    return dataclasses.replace(p, actions=tuple((d, tuple(change(list(a))) if d == device else a) for d, a in p.actions))


def find(p: Program, device: str, text: str) -> int:
    return p.of(device).index(parse_action(text))


def line_of(p: Program, device: str, text: str) -> int:
    return format_program_lines(p)[1][(device, find(p, device, text))]


def drop(p: Program, device: str, text: str) -> Program:
    i = find(p, device, text)
    return edit(p, device, lambda acts: acts[:i] + acts[i + 1 :])


def replace(p: Program, device: str, old: str, new: str) -> Program:
    i = find(p, device, old)
    return edit(p, device, lambda acts: acts[:i] + [parse_action(new)] + acts[i + 1 :])


def verify_error(p: Program) -> str:
    with pytest.raises(VerifyError) as info:
        verify(p)
    return str(info.value)


# --- the valid program ---------------------------------------------------------------------------


def test_the_builder_writes_the_hand_written_program(valid: Program) -> None:
    assert pipeline_program(GROUPS, 2) == valid


def test_valid_program_passes_and_runs_every_action_once_in_order(valid: Program) -> None:
    verify(valid)
    order = execution_order(valid)
    assert sorted(order) == sorted((d, i) for d, acts in valid.actions for i in range(len(acts)))
    for device, acts in valid.actions:
        assert [i for d, i in order if d == device] == list(range(len(acts)))
    assert execution_order(valid) == order  # deterministic


def test_dry_run_runs_a_recv_in_the_step_of_its_send_and_allreduce_together(valid: Program) -> None:
    steps = dry_run(valid)
    assert steps[0] == [("a", 0), ("b", 0)]  # c's first RECV waits: a's SEND has not run yet
    assert steps[1] == [("a", 1), ("b", 1), ("c", 0)]  # SEND and its RECV in the same step
    assert steps[5] == [("c", 4), ("a", 4)]  # a's RECV became ready by c's SEND, so it is listed after it
    allreduce = [s for s in steps if ("a", 8) in s]
    assert allreduce and ("b", 8) in allreduce[0]


GRID = """\
step | a                     | b                     | c
-----+-----------------------+-----------------------+----------------------
   0 | F s0 mb0              | F s0 mb0              |
   1 | SEND act s0 mb0 -> c  | SEND act s0 mb0 -> c  | RECV act s0 mb0 <- a
   2 | F s0 mb1              | F s0 mb1              | RECV act s0 mb0 <- b
   3 | SEND act s0 mb1 -> c  | SEND act s0 mb1 -> c  | F s1 mb0
   4 |                       |                       | B s1 mb0
   5 | RECV grad s0 mb0 <- c |                       | SEND grad s0 mb0 -> a
   6 | B s0 mb0              | RECV grad s0 mb0 <- c | SEND grad s0 mb0 -> b
   7 |                       | B s0 mb0              | RECV act s0 mb1 <- a
   8 |                       |                       | RECV act s0 mb1 <- b
   9 |                       |                       | F s1 mb1
  10 |                       |                       | B s1 mb1
  11 | RECV grad s0 mb1 <- c |                       | SEND grad s0 mb1 -> a
  12 | B s0 mb1              | RECV grad s0 mb1 <- c | SEND grad s0 mb1 -> b
  13 |                       | B s0 mb1              | STEP s1
  14 | ALLREDUCE s0          | ALLREDUCE s0          |
  15 | STEP s0               | STEP s0               |"""


def test_grid_has_a_column_per_device_and_a_row_per_step(valid: Program) -> None:
    steps = dry_run(valid)
    assert format_grid(valid, steps) == GRID
    # marking a step that ran shows who idled in it and what they waited for
    marked = format_grid(valid, steps, mark_step=4).split("\n")[2 + 4]
    assert marked.startswith(">> 4 | (blocked: RECV grad s0 mb0 <- c) | (blocked: RECV grad s0 mb0 <- c) | B s1 mb0")


# --- broken copies -------------------------------------------------------------------------------


def test_missing_recv_names_device_line_and_missing_rows(valid: Program) -> None:
    broken = drop(valid, "c", "RECV act s0 mb1 r5:12 <- b : f32(8)")
    message = verify_error(broken)
    f_line = line_of(broken, "c", "F s1 mb1 r0:12")
    assert f"device c, line {f_line}: F s1 mb1 r0:12: needs the activations of rows 0:12 of mb1" in message
    assert "rows 5:12 were not received before it" in message
    assert "add 'RECV act s0 mb1 r5:12 <- b'" in message
    send_line = line_of(broken, "b", "SEND act s0 mb1 r5:12 -> c : f32(8)")
    assert f"device b, line {send_line}: SEND act s0 mb1 r5:12 -> c : f32(8): has no matching RECV on c" in message


def test_row_mismatch_between_send_and_recv_names_both_lines(valid: Program) -> None:
    broken = replace(valid, "c", "RECV act s0 mb0 r0:5 <- a : f32(8)", "RECV act s0 mb0 r0:4 <- a : f32(8)")
    message = verify_error(broken)
    send_line = line_of(broken, "a", "SEND act s0 mb0 r0:5 -> c : f32(8)")
    recv_line = line_of(broken, "c", "RECV act s0 mb0 r0:4 <- a : f32(8)")
    assert (
        f"device a, line {send_line}: SEND act s0 mb0 r0:5 -> c : f32(8): "
        f"rows differ from its RECV on c (line {recv_line}: RECV act s0 mb0 r0:4 <- a : f32(8))"
    ) in message
    assert "rows 4:5 were not received" in message


def test_spec_mismatch_names_both_lines(valid: Program) -> None:
    broken = replace(valid, "c", "RECV act s0 mb0 r0:5 <- a : f32(8)", "RECV act s0 mb0 r0:5 <- a : f16(8)")
    message = verify_error(broken)
    send_line = line_of(broken, "a", "SEND act s0 mb0 r0:5 -> c : f32(8)")
    recv_line = line_of(broken, "c", "RECV act s0 mb0 r0:5 <- a : f16(8)")
    assert (
        f"device c, line {recv_line}: RECV act s0 mb0 r0:5 <- a : f16(8): "
        f"specs differ from its SEND on a (line {send_line}), which sends f32(8)"
    ) in message


def test_deadlock_is_reported_with_the_grid_and_does_not_hang(valid: Program) -> None:
    # a waits for c's gradient before sending c the activations c waits for
    recv = parse_action("RECV grad s0 mb0 r0:5 <- c : f32(8)")
    broken = edit(valid, "a", lambda acts: [acts[0], recv] + [x for x in acts[1:] if x != recv])
    start = time.monotonic()
    with pytest.raises(DeadlockError) as info:
        verify(broken)
    assert time.monotonic() - start < 2
    message = str(info.value)
    recv_line = line_of(broken, "a", "RECV grad s0 mb0 r0:5 <- c : f32(8)")
    send_line = line_of(broken, "a", "SEND act s0 mb0 r0:5 -> c : f32(8)")
    assert "deadlock at step 4: no device can move, 3 blocked" in message  # b ran ahead until it too waited
    assert f"device a, line {recv_line}: RECV grad s0 mb0 r0:5 <- c : f32(8)" in message
    assert "waits for 'SEND grad s0 mb0 r0:5 -> a : f32(8)' on c" in message
    assert (
        f"waits for 'SEND act s0 mb0 r0:5 -> c : f32(8)' on a (line {send_line}), "
        f"but a is blocked at line {recv_line}"
    ) in message
    stuck = [row for row in message.split("\n") if row.startswith(">>")]
    assert len(stuck) == 1
    assert "(blocked: RECV grad s0 mb0 <- c)" in stuck[0] and "(blocked: RECV act s0 mb0 <- a)" in stuck[0]
    assert info.value.blocked == {"a": 1, "b": 4, "c": 0} and len(info.value.steps) == 4


def test_missing_allreduce_is_named(valid: Program) -> None:
    broken = drop(valid, "a", "ALLREDUCE s0 [a b]")
    message = verify_error(broken)
    assert "device a (line 8): stage 0 runs on 2 devices but a never sums their gradients" in message
    assert "add 'ALLREDUCE s0 [a b]' after its last B and before STEP" in message


def test_backward_before_forward_is_named(valid: Program) -> None:
    f, b = parse_action("F s1 mb0 r0:12"), parse_action("B s1 mb0 r0:12")
    broken = edit(valid, "c", lambda acts: [b if x == f else f if x == b else x for x in acts])
    message = verify_error(broken)
    b_line, f_line = line_of(broken, "c", "B s1 mb0 r0:12"), line_of(broken, "c", "F s1 mb0 r0:12")
    assert f"device c, line {b_line}: B s1 mb0 r0:12: runs before its forward (line {f_line})" in message


def test_backup_pairs_with_a_restore_on_its_peer(valid: Program) -> None:
    backup = edit(valid, "a", lambda acts: acts + [parse_action("BACKUP s0 -> c")])
    message = verify_error(backup)
    assert f"device a, line {line_of(backup, 'a', 'BACKUP s0 -> c')}: BACKUP s0 -> c: has no matching RESTORE on c" in message
    assert "add 'RESTORE s0 <- a' to c's actions" in message
    restored = edit(backup, "c", lambda acts: acts + [parse_action("RESTORE s0 <- a")])
    verify(restored)
    order = execution_order(restored)
    assert order.index(("a", len(restored.of("a")) - 1)) < order.index(("c", len(restored.of("c")) - 1))
    # waiting for the copy before sending what a needs to get to its BACKUP can never finish
    too_early = edit(backup, "c", lambda acts: [parse_action("RESTORE s0 <- a")] + acts)
    with pytest.raises(DeadlockError, match="waits for 'BACKUP s0 -> c' on a"):
        verify(too_early)


def test_verify_never_edits_its_input(valid: Program) -> None:
    before = VALID_TEXT
    verify(valid)
    assert str(valid) == before


@pytest.mark.parametrize(
    "device, old, new, fragment",
    [
        ("c", "STEP s1", "STEP s0", "names stage 0, but this device runs stage 1, so it must name stage 1"),
        ("a", "ALLREDUCE s0 [a b]", "ALLREDUCE s0 [b a]", "the group must be stage 0's devices in slot order, [a b]"),
        ("a", "F s0 mb0 r0:5", "F s0 mb0 r0:4", "runs rows 0:4 but this device's slot is [0:5]"),
        ("a", "F s0 mb1 r0:5", "F s0 mb0 r0:5", "runs a second time (first on line 9)"),
        ("a", "F s0 mb0 r0:5", "F s0 mb0 r0:5 @ c", "F takes no peer; remove it"),
        ("a", "B s0 mb0 r0:5", "B s0 mb5 r0:5", "micro-batch 5 does not exist"),
        ("a", "SEND act s0 mb0 r0:5 -> c : f32(8)", "SEND act s0 mb0 r0:5 -> b : f32(8)", "b runs stage 0"),
        ("c", "SEND grad s0 mb0 r0:5 -> a : f32(8)", "SEND grad s0 mb0 r0:5 -> zz : f32(8)", "peer zz is not a device"),
    ],
)
def test_field_errors_are_named(valid: Program, device: str, old: str, new: str, fragment: str) -> None:
    message = verify_error(replace(valid, device, old, new))
    assert f"device {device}, line " in message and fragment in message, message


def test_order_errors_are_named(valid: Program) -> None:
    send, f = parse_action("SEND act s0 mb0 r0:5 -> c : f32(8)"), parse_action("F s0 mb0 r0:5")
    early_send = edit(valid, "a", lambda acts: [send, f] + acts[2:])
    assert "sends before this device runs F s0 mb0, which computes it; move the SEND after it" in verify_error(early_send)
    step, allreduce = parse_action("STEP s0"), parse_action("ALLREDUCE s0 [a b]")
    early_step = edit(valid, "b", lambda acts: acts[:-2] + [step, allreduce])
    assert "STEP s0: runs before ALLREDUCE" in verify_error(early_step)
    assert "a second STEP" in verify_error(edit(valid, "c", lambda acts: acts + [parse_action("STEP s1")]))


def test_stage_table_errors_are_named(valid: Program) -> None:
    gap_stage = StageInfo(0, (0, 1), (StageSlot("a", 0, 5), StageSlot("b", 6, 12)))
    gap = dataclasses.replace(valid, stages=(gap_stage, valid.stages[1]))
    assert "stage line 5: slot b[6:12] leaves rows 5:6 to no device" in verify_error(gap)
    twice = dataclasses.replace(valid, stages=(valid.stages[0], StageInfo(1, (1, 2), (StageSlot("a", 0, 12),))))
    message = verify_error(twice)
    assert "device a has slots in stages 0, 1" in message and "device c (line 30): runs no stage" in message
    assert "stage index 3 where 1 is expected" in verify_error(
        dataclasses.replace(valid, stages=(valid.stages[0], dataclasses.replace(valid.stages[1], index=3)))
    )


# --- properties ----------------------------------------------------------------------------------


@st.composite
def pipelines(draw: st.DrawFn) -> Program:
    rows = draw(st.integers(1, 9))
    groups = []
    for k in range(draw(st.integers(1, 3))):
        cuts = sorted(draw(st.sets(st.integers(1, rows - 1), max_size=min(2, rows - 1)))) if rows > 1 else []
        bounds = [0, *cuts, rows]
        groups.append([(f"d{k}_{j}", lo, hi) for j, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])
    grad_free = frozenset(draw(st.sets(st.integers(0, len(groups) - 2)))) if len(groups) > 1 else frozenset()
    return pipeline_program(groups, draw(st.integers(1, 3)), draw(st.sampled_from(["gpipe", "1f1b"])), grad_free)


def test_a_cut_without_gradients_needs_no_gradient_messages() -> None:
    groups = [[("a", 0, 5), ("b", 5, 12)], [("c", 0, 12)], [("d", 0, 12)]]
    p = pipeline_program(groups, 2, grad_free_cuts=frozenset({0}))
    assert not [a for a in p.of("a") if a.payload == "grad"]
    verify(p)
    # but once a cut carries any gradient, every backward below it needs its rows
    one = edit(p, "c", lambda acts: acts + [parse_action("SEND grad s0 mb0 r0:5 -> a : f32(8)")])
    assert "needs the gradients of rows 0:5 of mb0" in verify_error(one)


@settings(max_examples=60, deadline=None)
@given(pipelines())
def test_built_pipelines_verify_and_dry_run_each_action_once(p: Program) -> None:
    verify(p)
    order = execution_order(p)
    assert sorted(order) == sorted((d, i) for d, acts in p.actions for i in range(len(acts)))
    # every SEND comes before its RECV, so the local backend can run the order as it is
    position = {x: n for n, x in enumerate(order)}
    for device, acts in p.actions:
        for i, a in enumerate(acts):
            if a.op == Op.RECV:
                j = p.of(a.peer).index(a._replace(op=Op.SEND, peer=device))
                assert position[(a.peer, j)] < position[(device, i)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(pipelines(), st.data())
def test_dropping_any_recv_is_caught(p: Program, data: st.DataObject) -> None:
    recvs = [(d, i) for d, acts in p.actions for i, a in enumerate(acts) if a.op == Op.RECV]
    if not recvs:
        return
    device, i = data.draw(st.sampled_from(recvs))
    with pytest.raises(VerifyError):
        verify(edit(p, device, lambda acts: acts[:i] + acts[i + 1 :]))


wild_actions = st.builds(
    Action,
    op=st.sampled_from(list(Op)),
    stage=st.integers(-1, 3),
    mb=st.none() | st.integers(-1, 3),
    rows=st.none() | st.tuples(st.integers(-1, 10), st.integers(-1, 10)),
    peer=st.none() | st.sampled_from(["d0_0", "d1_0", "d0_1", "zz"]),
    payload=st.none() | st.sampled_from(["act", "grad", "x"]),
    specs=st.sampled_from([(), CUT_SPECS]),
    group=st.sampled_from([(), ("d0_0",), ("d0_0", "d0_1")]),
)


@settings(max_examples=150, deadline=None)
@given(pipelines(), st.data())
def test_any_shuffled_or_corrupted_program_gives_a_verify_error_or_passes(p: Program, data: st.DataObject) -> None:
    device = data.draw(st.sampled_from(p.devices))
    acts = list(p.of(device))
    if data.draw(st.booleans()):
        acts = data.draw(st.permutations(acts))
    else:
        acts[data.draw(st.integers(0, len(acts) - 1))] = data.draw(wild_actions)
    broken = edit(p, device, lambda _: acts)
    try:
        verify(broken)
    except VerifyError as e:
        assert str(e)
    else:
        execution_order(broken)


# --- the per-op facts verify reads ----------------------------------------------------------------


@pytest.mark.parametrize("op", [op for op in Op if ops.info(op).moves])
def test_every_transfer_pairs_with_its_counterpart(op: Op) -> None:
    """A transfer's counterpart is a transfer of the same thing the other way, and their channels meet."""
    mine, other = ops.info(op), ops.info(ops.info(op).counterpart)
    assert other.counterpart == op and other.moves == mine.moves and other.sends != mine.sends
    assert mine.arrow == ("->" if mine.sends else "<-")
    a = Action(op, 0, 0, (0, 4), "b", "act", CUT_SPECS) if mine.moves == ops.DATA else Action(op, 0, peer="b")
    here, there = ops.channel("a", a), ops.channel("b", ops.counterpart("a", a))
    assert here.key == there.key and here.sends != there.sends


def test_ops_without_facts_get_the_default() -> None:
    assert set(ops.OPS) == set(Op)  # every op of this build states its facts
    assert ops.DEFAULT.fields is None and not ops.DEFAULT.compute and ops.DEFAULT.moves is None
    assert ops.COMPUTE_OPS == (Op.F, Op.B) and ops.SEND_OPS == {Op.SEND, Op.BACKUP}
    assert ops.PAYLOADS == ("act", "grad")
