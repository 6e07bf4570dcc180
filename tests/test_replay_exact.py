"""Replay keeps the failure-free meaning where the row split matters: batch statistics and
summation order.

A survivor that takes over a lost group member's rows runs them as the lost device's own chunk
(a stage's ``splits``): the same rows per F/B (so BatchNorm normalizes over the same rows), each
chunk's gradients summed over the micro-batches on their own and then with the other chunks in
row order (so float32 sums in the failure-free order). The checks: the IR of chunks (text, JSON,
verify), the rewrite that keeps them, resnet18 (BatchNorm) and the MLP on the local backend bit
for bit against the failure-free run, the same program on gloo worker processes, and the
simulator's memory of the chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.ir.errors import VerifyError
from asteroid_fx.ir.program import Action, Op, StageInfo, StageSlot, TensorSpec
from asteroid_fx.ir.program_text import format_program, parse_program, program_from_json, program_to_json
from asteroid_fx.ir.verify import verify
from asteroid_fx.passes import replay as replay_pass
from asteroid_fx.passes.lower import lower
from asteroid_fx.passes.replay import Failure, Rewrite, add_backups, replay, split_stages, take_over
from asteroid_fx.sim import simulate
from tests.ranks import spawn_ranks
from tests.test_local import _named_cluster

SPEC = (TensorSpec("float32", (8,)),)


def _chunked():
    """Stage 0 on a, run as chunks 0:2 and 2:4; stage 1 on b (chunks 0:1, 1:3) and c."""
    table = (StageInfo(0, (0, 1), (StageSlot("a", 0, 4),), (2,)),
             StageInfo(1, (1, 2), (StageSlot("b", 0, 3), StageSlot("c", 3, 4)), (1,)))
    return lower("1f1b", 2, 4, table, [(SPEC, SPEC)])


# --- the IR ------------------------------------------------------------------------------------


def test_chunks_print_in_their_slot_and_round_trip():
    p = _chunked()
    verify(p)
    text = format_program(p)
    assert "stage 0 layers 0:1 a[0:2:4]\nstage 1 layers 1:2 b[0:1:3] c[3:4]\n" in text
    assert parse_program(text) == p
    assert program_from_json(json.loads(json.dumps(program_to_json(p)))) == p
    assert p.stages[1].chunks == (("b", 0, 1), ("b", 1, 3), ("c", 3, 4))
    # every chunk its own F and B, every message inside one chunk of either end
    assert [(a.op, a.rows) for a in p.of("a") if a.op == Op.F and a.mb == 0] == [(Op.F, (0, 2)), (Op.F, (2, 4))]
    assert [a.rows for a in p.of("a") if a.op == Op.SEND and a.mb == 0] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    # a device alone in its stage sums its chunks too
    assert Action(Op.ALLREDUCE, 0, group=("a",)) in p.of("a")


def _without(p, device, keep):
    return dataclasses.replace(p, actions=tuple((d, tuple(a for a in acts if d != device or keep(a)))
                                                for d, acts in p.actions))


def test_verify_holds_chunks_to_their_rows():
    p = _chunked()
    whole = dataclasses.replace(p, stages=(dataclasses.replace(p.stages[0], splits=()), p.stages[1]))
    with pytest.raises(VerifyError, match=r"runs rows 0:2 but this device's slot is \[0:4\]"):
        verify(whole)
    outside = dataclasses.replace(p, stages=(dataclasses.replace(p.stages[0], splits=(2, 4)), p.stages[1]))
    with pytest.raises(VerifyError, match="chunk split at row 4 lies inside no slot"):
        verify(outside)
    with pytest.raises(VerifyError, match=r"runs stage 0 as 2 chunks but never sums their gradients"):
        verify(_without(p, "a", lambda a: a.op != Op.ALLREDUCE))
    with pytest.raises(VerifyError, match=r"never runs B s0 mb1 on chunk r2:4"):
        verify(_without(p, "a", lambda a: not (a.op == Op.B and a.mb == 1 and a.rows == (2, 4))))
    # a message over two chunks of its receiver: each chunk's rows travel as its own messages
    acts = dict(p.actions)
    merged_a = tuple(a for a in acts["a"] if not (a.op == Op.SEND and a.mb == 0 and a.rows == (1, 2)))
    merged_a = tuple(a._replace(rows=(0, 2)) if a.op == Op.SEND and a.mb == 0 and a.rows == (0, 1) else a
                     for a in merged_a)
    merged_b = tuple(a for a in acts["b"] if not (a.op == Op.RECV and a.mb == 0 and a.payload == "act" and a.rows == (1, 2)))
    merged_b = tuple(a._replace(rows=(0, 2)) if a.op == Op.RECV and a.mb == 0 and a.payload == "act" and a.rows == (0, 1)
                     else a for a in merged_b)
    crossing = dataclasses.replace(p, actions=(("a", merged_a), ("b", merged_b), ("c", acts["c"])))
    with pytest.raises(VerifyError, match="rows 0:2 cross the boundary at row 1 between two chunks of b"):
        verify(crossing)


def test_take_over_keeps_every_chunk_on_one_survivor():
    st = StageInfo(0, (0, 1), (StageSlot("a", 0, 3), StageSlot("b", 3, 5), StageSlot("c", 5, 9)), (7,))
    # b's rows go to the neighbour with fewer rows (a), as a chunk of its own
    assert take_over(st, ["b"], (0, 1)) == ((StageSlot("a", 0, 5), StageSlot("c", 5, 9)), (3, 7))
    # a run of lost slots goes whole to one neighbour; c's own split stays
    assert take_over(st, ["a", "b"], (0, 1)) == ((StageSlot("c", 0, 9),), (3, 5, 7))
    assert take_over(st, ["c"], (0, 1)) == ((StageSlot("a", 0, 3), StageSlot("b", 3, 9)), (5, 7))


# --- resnet18 (BatchNorm) on the local backend ---------------------------------------------------

M, R = 2, 4  # two micro-batches of 4 rows: 2 + 2 rows on the group, BatchNorm's least
GROUPS, ROWS = (("d0", "d1"), ("d2",)), ((2, 2), (4,))
# "1 + group of 2": a stage of one device before a group of two
LENDING, LENDING_ROWS = (("d0",), ("d1", "d2")), ((4,), (2, 2))


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


@functools.cache
def _resnet(dtype: torch.dtype, groups=GROUPS, rows=ROWS):
    """resnet18 (small) on ``groups`` (default: a group of two and a stage of one), with backups;
    two batches, and the failure-free losses and state after the first and after both."""
    entry = models.get("resnet18")
    torch.manual_seed(0)
    model = entry.build(small=True).to(dtype)

    def cast(ts):
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in ts)

    compiled = asteroid.compile(model, _named_cluster(), example=cast(entry.example(M * R, True)), loss=entry.loss,
                                microbatches=M, schedule_kind="1f1b", groups=[list(g) for g in groups],
                                rows=[list(r) for r in rows])
    compiled = dataclasses.replace(compiled, program=add_backups(compiled.program))
    torch.manual_seed(1)
    batches = [(cast(entry.example(M * R, True)), entry.labels(M * R, True)) for _ in range(2)]
    reference = compiled.runner(optimizer=adam)
    losses = [reference.step(*batches[0])]
    first = reference.state_dict()
    losses.append(reference.step(*batches[1]))
    return compiled, batches, losses, first, reference.state_dict()


def _relative(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k].double() - want[k].double()).norm() / max(want[k].double().norm(), 1e-30))
               for k in want)


def _recovers_the_failure_free_run(compiled, batches, failure: Failure, rewrite: Rewrite, losses, first,
                                   second) -> None:
    """The recovered run's losses, weights after the redone iteration and after the next, and its
    BatchNorm running statistics (bit for bit) are the failure-free run's."""
    got_losses, got_first, got_second = _recover(compiled, batches, failure, rewrite)
    assert got_losses == pytest.approx(losses, rel=1e-12)
    assert _relative(got_first, first) <= 1e-6
    assert _relative(got_second, second) <= 1e-6
    assert all(torch.equal(got_second[n], second[n]) for n in second if "running" in n)


def _recover(compiled, batches, failure: Failure, rewrite: Rewrite | None = None):
    """Iteration 0 cut off by ``failure``, redone by its rewrite, then iteration 1: the losses and
    the state after each."""
    runner = compiled.runner(optimizer=adam)
    runner.step(*batches[0], stop=dict(failure.progress))
    rewrite = rewrite or replay(compiled.program, failure, compiled.layer_graph, compiled.cluster)
    runner.replay(rewrite, split_stages(rewrite.after, compiled.captured, compiled.layer_graph))
    losses = [runner.step(*batches[0])]
    first = runner.state_dict()
    losses.append(runner.step(*batches[1]))
    return losses, first, runner.state_dict()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dead, k", [("d1", 7), ("d0", 3)])
def test_a_batchnorm_group_member_dying_keeps_the_failure_free_update(dtype, dead, k):
    compiled, batches, losses, first, second = _resnet(dtype)
    failure = Failure.at(compiled.program, dead, k, iteration=0)
    rewrite = replay(compiled.program, failure, compiled.layer_graph, compiled.cluster)
    alive = "d0" if dead == "d1" else "d1"
    assert rewrite.after.stages[0].slots == (StageSlot(alive, 0, 4),) and rewrite.after.stages[0].splits == (2,)
    # the same operations on the same rows in the same order: bit for bit, in float32 too
    _recovers_the_failure_free_run(compiled, batches, failure, rewrite, losses, first, second)


def test_a_batchnorm_stage_re_split_without_chunks_is_not_the_failure_free_update():
    """What the chunks buy: the same rewrite with the survivor's rows as one chunk trains another
    model (BatchNorm normalizes over 4 rows instead of 2 and 2)."""
    compiled, batches, losses, first, _ = _resnet(torch.float64)
    failure = Failure.at(compiled.program, "d1", 7, iteration=0)
    rewrite = replay(compiled.program, failure, compiled.layer_graph, compiled.cluster)
    table = tuple(dataclasses.replace(st, splits=()) for st in rewrite.after.stages)
    after = add_backups(replay_pass._program(compiled.program, table))
    recovery = dataclasses.replace(after, actions=tuple((d, (Action(Op.ROLLBACK, 0 if d == "d0" else 1), *acts))
                                                        for d, acts in after.actions))
    plain = dataclasses.replace(rewrite, after=after, recovery=recovery)
    _, got_first, _ = _recover(compiled, batches, failure, plain)
    assert _relative(got_first, first) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups, rows, dead, k, lent, group", [
    # "1 + group of 2": stage 0's only device dies, the group after it lends d1
    (LENDING, LENDING_ROWS, "d0", 3, (0, "d1"), (1, "d2")),
    # "group of 2 + 1": stage 1's only device dies, the group before it lends d0
    (GROUPS, ROWS, "d2", 5, (1, "d0"), (0, "d1")),
])
def test_a_lost_single_device_stage_borrows_a_group_member_and_keeps_the_failure_free_update(
        dtype, groups, rows, dead, k, lent, group):
    """A stage's only device dies: the neighbouring group lends the member that holds the stage's
    backup, which runs the stage on its own chunk of 4 rows as the dead device did, and the other
    member runs the lent device's rows as a chunk of its own. A merge would run the stage's
    BatchNorm layers over the group's 2 + 2 rows instead."""
    compiled, batches, losses, first, second = _resnet(dtype, groups, rows)
    failure = Failure.at(compiled.program, dead, k, iteration=0)
    rewrite = replay(compiled.program, failure, compiled.layer_graph, compiled.cluster)
    p, borrowed = lent
    q, keeper = group
    before, after = compiled.program.stages, rewrite.after.stages
    assert (after[p].layers, after[p].slots, after[p].splits) == (before[p].layers, (StageSlot(borrowed, 0, 4),), ())
    assert (after[q].layers, after[q].slots, after[q].splits) == (before[q].layers, (StageSlot(keeper, 0, 4),), (2,))
    assert any(f"{borrowed} (stage {q}, holds the backup) is lent to it" in c for c in rewrite.changes)
    # the lent device holds the stage's copy: the prologue moves nothing, every device rolls back
    assert dict(rewrite.prologue) == {borrowed: (Action(Op.ROLLBACK, p),), keeper: (Action(Op.ROLLBACK, q),)}
    _recovers_the_failure_free_run(compiled, batches, failure, rewrite, losses, first, second)


def test_a_lost_stage_merges_when_the_lent_device_would_not_fit():
    """The same failure with d1's memory budget too small for stage 0 alone: the stage merges
    into stage 1, whose chunks are not its own, and the changes say why."""
    compiled, *_ = _resnet(torch.float64, LENDING, LENDING_ROWS)
    failure = Failure.at(compiled.program, "d0", 3, iteration=0)
    lent = replay(compiled.program, failure, compiled.layer_graph, compiled.cluster)
    peak = simulate(lent.after, compiled.layer_graph, compiled.cluster, recovery=True).device("d1").memory.peak_bytes
    devices = tuple(dataclasses.replace(d, memory_bytes=peak - 1) if d.name == "d1" else d
                    for d in compiled.cluster.devices)
    small = dataclasses.replace(compiled.cluster, devices=devices)
    rewrite = replay(compiled.program, failure, compiled.layer_graph, small)
    assert len(rewrite.after.stages) == 1
    assert any("d1 would exceed its memory running it alone, so it merges" in c for c in rewrite.changes)
    assert any("not its own r0:4: its batch statistics are over other rows" in c for c in rewrite.changes)


def test_a_lost_stage_merges_when_no_neighbour_keeps_two_survivors():
    """d0 and d2 fail at once: stage 1 keeps d1 alone, nothing to lend, so stage 0 merges into
    it (d1 holds its backup) and runs over d1's chunks."""
    compiled, *_ = _resnet(torch.float64, LENDING, LENDING_ROWS)
    rewrite = replay(compiled.program, Failure.at(compiled.program, "d0", 3, also=("d2",)), compiled.layer_graph,
                     compiled.cluster)
    assert len(rewrite.after.stages) == 1 and rewrite.after.devices == ("d1",)
    assert not any("lent" in c for c in rewrite.changes)


# --- the MLP in float32 over many iterations -------------------------------------------------------


def test_an_mlp_re_split_stays_bit_identical_over_200_iterations():
    entry = models.get("mlp")
    torch.manual_seed(0)
    rows, microbatches, iterations = 6, 2, 200
    compiled = asteroid.compile(entry.build(small=True), _named_cluster(), example=entry.example(microbatches * rows, True),
                                loss=entry.loss, microbatches=microbatches, schedule_kind="1f1b",
                                groups=[["d0", "d1", "d2"], ["d3"]], rows=[[2, 3, 1], [6]])
    compiled = dataclasses.replace(compiled, program=add_backups(compiled.program))
    torch.manual_seed(1)
    batches = [(entry.example(microbatches * rows, True), entry.labels(microbatches * rows, True)) for _ in range(8)]

    def batch(i):
        return batches[i % len(batches)]

    reference = compiled.runner(optimizer=adam)
    want = [reference.step(*batch(i)) for i in range(iterations)]
    runner = compiled.runner(optimizer=adam)
    runner.step(*batch(0))
    failure = Failure.at(compiled.program, "d1", 5, iteration=1)
    runner.step(*batch(1), stop=dict(failure.progress))
    rewrite = replay(compiled.program, failure, compiled.layer_graph, compiled.cluster)
    assert len(rewrite.after.stages[0].chunks) == 3  # d1's rows stay a chunk of their own
    runner.replay(rewrite, split_stages(rewrite.after, compiled.captured, compiled.layer_graph))
    got = want[:1] + [runner.step(*batch(i)) for i in range(1, iterations)]
    assert got == want
    final, expected = runner.state_dict(), reference.state_dict()
    assert all(torch.equal(final[n], expected[n]) for n in expected)


# --- the simulator's memory ------------------------------------------------------------------------


def test_the_simulator_counts_each_chunks_gradients():
    compiled, *_ = _resnet(torch.float64)
    failure = Failure.at(compiled.program, "d1", 7, iteration=0)
    rewrite = replay(compiled.program, failure, compiled.layer_graph, compiled.cluster)
    table = tuple(dataclasses.replace(st, splits=()) for st in rewrite.after.stages)
    one_chunk = replay_pass._program(compiled.program, table)
    two, one = (simulate(p, compiled.layer_graph, compiled.cluster).device("d0").memory
                for p in (rewrite.after, add_backups(one_chunk)))
    lo, hi = rewrite.after.stages[0].layers
    lg = compiled.layer_graph
    # a second chunk: its gradient sum and its buffers, and the buffers every chunk starts from
    assert two.gradients - one.gradients == lg.param_bytes(lo, hi)
    assert two.buffers - one.buffers == 2 * lg.buffer_bytes(lo, hi)
    # the chunks' activations add up to the one chunk's, so the peak grows by the state alone
    assert two.peak_bytes - one.peak_bytes == pytest.approx(lg.param_bytes(lo, hi) + 2 * lg.buffer_bytes(lo, hi), abs=2)


# --- the same program on gloo worker processes ------------------------------------------------------


def _worker(rank: int, world: int, port: int, devices: list[str], out: str) -> None:
    import datetime

    import torch.distributed as dist

    from asteroid_fx.backends.torch_dist import DistWorker
    from asteroid_fx.backends.torch_dist.gloo import Comm as GlooComm

    torch.set_num_threads(1)
    compiled, batches, *_ = _resnet(torch.float64)
    program, stages = _survivors_program(compiled)
    device = devices[rank]
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    comm = GlooComm(store, program, device, timeout_s=60)
    names = [n.name for n in compiled.captured.module.graph.nodes if n.op == "placeholder"]
    worker = DistWorker(program, stages, device, loss=models.get("resnet18").loss,
                        unflatten=compiled.captured.unflatten_outputs, input_names=names, optimizer=adam, comm=comm)
    losses = [worker.step(*b) for b in batches]
    torch.save({"losses": losses, "state": worker.state_dict()}, f"{out}/{device}.pt")
    worker.comm.barrier()


def _survivors_program(compiled):
    """The survivors' program after d1 dies (d0 runs d1's rows as a chunk of its own), without
    backups, and its stage modules."""
    rewrite = replay(compiled.program, Failure("d1"), compiled.layer_graph, compiled.cluster)
    program = replay_pass._program(compiled.program, rewrite.after.stages)
    return program, split_stages(program, compiled.captured, compiled.layer_graph)


def test_gloo_workers_run_the_chunks_like_the_failure_free_local_run(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    compiled, batches, losses, _, second = _resnet(torch.float64)
    program, _ = _survivors_program(compiled)
    assert program.stages[0].splits == (2,) and program.devices == ("d0", "d2")
    spawn_ranks(_worker, list(program.devices), str(tmp_path))
    results = {d: torch.load(tmp_path / f"{d}.pt", weights_only=True) for d in program.devices}
    assert results["d2"]["losses"] == pytest.approx(losses, rel=1e-12)
    state = {**results["d0"]["state"], **results["d2"]["state"]}
    assert _relative({k: state[k] for k in second}, second) <= 1e-6
