"""Tied weights across stages: a weight read by several stages (the zoo GPT with its head tied to
its token embedding, as GPT-2 has it) is held by each of them, and the program's TIE sums the
copies' gradients so that training equals eager training (docs/semantics.md, "Tied weights")."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import pytest
import torch

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.ir import catalog
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.errors import VerifyError
from asteroid_fx.ir.layer_graph import costs_from_json, costs_to_json
from asteroid_fx.ir.program import Op
from asteroid_fx.ir.program_text import format_program, parse_program, program_from_json, program_to_json
from asteroid_fx.ir.verify import verify
from tests.eager import assert_same_state, eager_train
from tests.ranks import spawn_ranks

MICROBATCHES, ROWS = 2, 4
BATCH = MICROBATCHES * ROWS
TIED = ("tok_emb.weight", "lm_head.weight")


def _cluster() -> Cluster:
    return Cluster.uniform([Device(n, "jetson-xavier-nx", 4 * catalog.GiB) for n in "abcd"],
                           bandwidth="1Gbps", latency="0.5ms")


def _compile(**kw):
    entry = models.get("gpt")
    torch.manual_seed(0)
    model = entry.build(small=True, tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    compiled = asteroid.compile(model, _cluster(), example=entry.example(BATCH, True), loss=entry.loss,
                                microbatches=MICROBATCHES, **kw)
    return entry, model, compiled


@pytest.fixture(scope="module")
def three():
    """Three stages, one device each: the embedding on a, the head on c."""
    return _compile(groups=[["a"], ["b"], ["c"]], rows=[[ROWS], [ROWS], [ROWS]])


@pytest.fixture(scope="module")
def grouped():
    """Three stages, the first on a group of two (a tie and an all-reduce together)."""
    return _compile(groups=[["a", "b"], ["c"], ["d"]], rows=[[3, 1], [ROWS], [ROWS]])


def _batches(entry, n=3):
    torch.manual_seed(1)
    return [(entry.example(BATCH, True), entry.labels(BATCH, True)) for _ in range(n)]


def _holders(compiled):
    return [st.index for st in compiled.stages if set(TIED) & set(st.owned)]


def test_the_tie_no_longer_blocks_cuts(three):
    _, _, compiled = three
    lg = compiled.layer_graph
    assert len(lg) > 3
    assert not any("lm_head.weight" in why or "tok_emb.weight" in why for why in lg.blocked)
    (tie,) = [t for t in lg.ties if t.kind == "param"]
    assert set(tie.names) == set(TIED) and tie.layers[0] == 0 and tie.layers[-1] == len(lg) - 1
    assert costs_from_json(json.loads(json.dumps(costs_to_json(lg)))) == lg


def test_every_stage_that_reads_it_holds_it_under_every_name(three):
    _, _, compiled = three
    assert _holders(compiled) == [0, 2]
    for p in (0, 2):
        params = dict(compiled.stages[p].module.named_parameters(remove_duplicate=False))
        assert params["tok_emb.weight"] is params["lm_head.weight"]


def test_the_program_ties_the_holders(three):
    _, _, compiled = three
    program = compiled.program
    ties = {d: [a for a in acts if a.op == Op.TIE] for d, acts in program.actions}
    assert {d: len(t) for d, t in ties.items()} == {"a": 1, "b": 0, "c": 1}
    for d in ("a", "c"):
        (tie,) = ties[d]
        assert tie.group == ("a", "c") and tie.params == ("tok_emb.weight",)
        assert tie.specs[0].shape == tuple(compiled.stages[0].module.get_parameter("tok_emb.weight").shape)
        acts = program.of(d)
        assert acts.index(tie) == len(acts) - 2 and acts[-1].op == Op.STEP  # after the last B, before STEP
    text = format_program(program)
    assert "TIE s0 [a c] {tok_emb.weight} : f32(" in text
    assert parse_program(text) == program
    assert program_from_json(json.loads(json.dumps(program_to_json(program)))) == program


@pytest.mark.parametrize("case", ["three", "grouped"])
def test_training_equals_eager_with_adam(case, request):
    entry, model, compiled = request.getfixturevalue(case)
    make_opt = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    batches = _batches(entry)
    runner, losses = compiled.run(iter(batches), 3, optimizer=make_opt)
    ref, ref_losses = eager_train(model, batches, entry.loss, make_opt, microbatches=MICROBATCHES, rows=ROWS)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())  # both names of the tie included
    # every copy of the tie, on every device of every holder stage, took the same steps
    copies = [r.get_parameter("tok_emb.weight") for (d, s), r in runner.replicas.items()
              if s in _holders(compiled)]
    assert len(copies) == (2 if case == "three" else 3)
    for c in copies[1:]:
        torch.testing.assert_close(c, copies[0], rtol=0, atol=0)
    torch.testing.assert_close(copies[0], ref.tok_emb.weight, rtol=1e-5, atol=1e-6)
    assert not torch.equal(copies[0], model.tok_emb.weight)  # it did train


def test_the_grouped_program_ties_after_the_allreduce(grouped):
    _, _, compiled = grouped
    ops_a = [a.op for a in compiled.program.of("a")]
    assert ops_a[-3:] == [Op.ALLREDUCE, Op.TIE, Op.STEP]
    (tie,) = [a for a in compiled.program.of("d") if a.op == Op.TIE]
    assert tie.group == ("a", "b", "d")


def _without(program, device, op=Op.TIE):
    return program.__class__(program.schedule, program.microbatches, program.microbatch_rows, program.stages,
                             tuple((d, tuple(a for a in acts if not (d == device and a.op == op)))
                                   for d, acts in program.actions))


def test_verify_rejects_a_tie_missing_on_a_holder(three):
    _, _, compiled = three
    broken = _without(compiled.program, "c")
    with pytest.raises(VerifyError, match=r"device a, line \d+: TIE s0 \[a c\].*has no matching TIE on c"):
        verify(broken)


def test_verify_rejects_a_tie_after_the_step_or_over_part_of_a_stage(grouped):
    _, _, compiled = grouped
    p = compiled.program
    acts = list(p.of("d"))
    acts[-2], acts[-1] = acts[-1], acts[-2]  # STEP before TIE
    moved = p.__class__(p.schedule, p.microbatches, p.microbatch_rows, p.stages,
                        tuple((d, tuple(acts) if d == "d" else a) for d, a in p.actions))
    with pytest.raises(VerifyError, match="runs before TIE"):
        verify(moved)
    part = p.__class__(p.schedule, p.microbatches, p.microbatch_rows, p.stages,
                       tuple((d, tuple(a._replace(group=("a", "d")) if a.op == Op.TIE else a for a in acts))
                             for d, acts in p.actions if True))
    with pytest.raises(VerifyError, match=r"every device of those stages, \[a b d\]"):
        verify(part)


def test_saved_weights_load_strict_into_the_original_model(three, tmp_path):
    entry, model, compiled = three
    runner, _ = compiled.run(iter(_batches(entry, 1)), 1, optimizer="adam")
    folder = compiled.save(tmp_path / "out")
    saved = {}
    for st in compiled.stages:
        saved.update(torch.load(folder / f"stage_{st.index}.pt", weights_only=True))
    fresh = entry.build(small=True, tie_weights=True)
    fresh.load_state_dict(saved, strict=True)
    trained = runner.state_dict()
    assert set(TIED) <= trained.keys()
    fresh.load_state_dict(trained, strict=True)
    assert fresh.lm_head.weight is fresh.tok_emb.weight
    torch.testing.assert_close(fresh.tok_emb.weight, trained["lm_head.weight"])


def test_the_simulator_and_the_planner_count_the_tie(three):
    from asteroid_fx.cost.estimate import CostTable
    from asteroid_fx.cost.stage import static_memory, ties_s

    _, _, compiled = three
    lg, plan = compiled.layer_graph, compiled.plan
    (tie,) = [t for t in lg.ties if t.kind == "param"]
    # one copy per holder stage: the whole model in one stage counts it once, two stages twice
    whole = lg.param_bytes(0, len(lg))
    assert whole == sum(p.numel() * 4 for p in compiled.captured.module.parameters())
    parts = sum(lg.param_bytes(*st.layers) for st in plan.stages)
    assert parts == whole + tie.nbytes
    table = CostTable(lg, compiled.cluster, ROWS)
    for st in plan.stages:
        assert table.static_bytes(*st.layers) == pytest.approx(static_memory(lg, st.layers))
    assert ties_s(lg, compiled.cluster, plan.stages) > 0
    sim = compiled.simulate()
    spans = [s for s in sim.spans if s.what == "allreduce" and s.label.startswith("TIE")]
    assert {s.device for s in spans} == {"a", "c"}


def _replayed(entry, compiled, dead, k, batches):
    """Iteration 1 cut off by ``dead`` failing after ``k`` actions, redone by replay's rewrite, then
    iteration 2: the runner and its losses of iterations 1 and 2."""
    from asteroid_fx.passes.replay import Failure, replay, split_stages

    failure = Failure.at(compiled.program, dead, k, iteration=1)
    rewrite = replay(compiled.program, failure, compiled.layer_graph, compiled.cluster)
    runner = compiled.runner(optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    runner.step(*batches[0])
    runner.step(*batches[1], stop=dict(failure.progress))
    runner.replay(rewrite, split_stages(rewrite.after, compiled.captured, compiled.layer_graph))
    return rewrite, runner, [runner.step(*b) for b in batches[1:]]


def _relative(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).norm() / max(want[k].norm(), 1e-30)) for k in want)


@functools.cache
def _with_backups(case: str):
    from asteroid_fx.passes.replay import add_backups

    kw = {"three": {"groups": [["a"], ["b"], ["c"]], "rows": [[ROWS], [ROWS], [ROWS]]},
          "two": {"groups": [["a"], ["b"]], "rows": [[ROWS], [ROWS]]}}[case]
    entry, _, compiled = _compile(**kw)
    compiled = dataclasses.replace(compiled, program=add_backups(compiled.program))
    batches = _batches(entry)
    ref = compiled.runner(optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    losses = [ref.step(*b) for b in batches]
    return entry, compiled, batches, losses, ref.state_dict()


@pytest.mark.parametrize("dead, holders", [("a", ("b", "c")), ("b", ("a", "c")), ("c", ("a", "b"))])
def test_replay_ties_the_new_holders_and_trains_to_the_failure_free_weights(dead, holders):
    entry, compiled, batches, losses, want = _with_backups("three")
    k = len(compiled.program.of(dead)) // 2
    rewrite, runner, got = _replayed(entry, compiled, dead, k, batches)
    ties = {d: [a for a in acts if a.op == Op.TIE] for d, acts in rewrite.after.actions}
    for d, acts in rewrite.after.actions:  # the holders tie after their last B, before STEP
        if d in holders:
            (tie,) = ties[d]
            assert tie.group == holders and tie.params == ("tok_emb.weight",)
            assert acts.index(tie) < [a.op for a in acts].index(Op.STEP)
        else:
            assert not ties[d]
    if dead != "b":
        assert any(c.startswith("tie tok_emb.weight: held by") for c in rewrite.changes)
    assert got == pytest.approx(losses[1:], rel=1e-6)
    assert _relative(runner.state_dict(), want) <= 1e-6
    copies = [r.get_parameter("tok_emb.weight") for (d, _), r in runner.replicas.items() if d in holders]
    assert len(copies) == 2 and torch.equal(copies[0], copies[1])


def test_a_tie_whose_holder_stages_merge_has_no_tie_and_trains_on():
    entry, compiled, batches, losses, want = _with_backups("two")
    rewrite, runner, got = _replayed(entry, compiled, "b", 3, batches)
    assert len(rewrite.after.stages) == 1
    assert not any(a.op == Op.TIE for _, acts in rewrite.after.actions for a in acts)
    assert any("now holds it alone" in c for c in rewrite.changes)
    # one stage sums the two uses' gradients in its backward: the same sum, rounded otherwise
    assert got == pytest.approx(losses[1:], rel=1e-6)
    assert _relative(runner.state_dict(), want) <= 1e-6
    state = runner.state_dict()
    assert torch.equal(state["tok_emb.weight"], state["lm_head.weight"])


# --- torch_dist: one gloo process per device trains like the local backend -----------------------


def _dist_worker(rank: int, world: int, port: int, devices: list[str], kw: dict, out: str) -> None:
    import torch.distributed as dist

    from asteroid_fx.backends.torch_dist import DistWorker

    torch.set_num_threads(1)
    entry, _, compiled = _compile(**kw)
    device = devices[rank]
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=__import__("datetime").timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    names = [n.name for n in compiled.captured.module.graph.nodes if n.op == "placeholder"]
    worker = DistWorker(compiled.program, compiled.stages, device, loss=entry.loss,
                        unflatten=compiled.captured.unflatten_outputs, input_names=names, optimizer="adam", lr=1e-2)
    losses = [worker.step(inputs, labels) for inputs, labels in _batches(entry)]
    torch.save({"losses": losses, "state": worker.state_dict()}, os.path.join(out, f"{device}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("case", ["three", "grouped"])
def test_torch_dist_trains_like_the_local_backend(case, request, tmp_path):

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    entry, _, compiled = request.getfixturevalue(case)
    kw = ({"groups": [["a"], ["b"], ["c"]], "rows": [[ROWS], [ROWS], [ROWS]]} if case == "three"
          else {"groups": [["a", "b"], ["c"], ["d"]], "rows": [[3, 1], [ROWS], [ROWS]]})
    devices = list(compiled.program.devices)
    spawn_ranks(_dist_worker, devices, kw, str(tmp_path))
    runner, losses = compiled.run(iter(_batches(entry)), 3, optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    results = {d: torch.load(tmp_path / f"{d}.pt", weights_only=True) for d in devices}
    last = compiled.program.stages[-1].devices
    got_losses = [sum(x) for x in zip(*(results[d]["losses"] for d in last))]
    assert got_losses == pytest.approx(losses, rel=1e-6)
    want = runner.state_dict()
    got = {}
    for d in devices:
        for k, v in results[d]["state"].items():
            got.setdefault(k, v)
    assert got.keys() >= want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    # every holder's copy is the same
    for d in devices:
        if "tok_emb.weight" in results[d]["state"]:
            torch.testing.assert_close(results[d]["state"]["tok_emb.weight"], want["tok_emb.weight"],
                                       rtol=1e-6, atol=1e-7)


class _SharedNorm(torch.nn.Module):
    """One BatchNorm applied twice: its running statistics are written in place by both uses."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.norm = torch.nn.BatchNorm1d(8)

    def forward(self, x):
        return self.b(self.norm(self.a(self.norm(x))))


def test_a_buffer_written_in_place_still_cannot_be_shared():
    from asteroid_fx.passes.annotate_costs import annotate_costs
    from asteroid_fx.passes.capture import capture
    from asteroid_fx.passes.linearize import linearize

    torch.manual_seed(0)
    captured = annotate_costs(capture(_SharedNorm(), (torch.randn(8, 8),)), ["jetson-nano"])
    lg = linearize(captured)
    assert any({"batch_norm", "batch_norm_1"} <= set(layer.nodes) for layer in lg.layers)
    assert any("norm.running_mean" in why and "used on both sides" in why for why in lg.blocked)


# --- a transformers model: GPT2LMHeadModel ties its head to its token embedding by default -------


def test_gpt2_lm_head_model_is_cut_across_its_tie_and_trains_like_eager():
    transformers = pytest.importorskip("transformers")
    import torch.nn.functional as F

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = transformers.GPT2Config(use_cache=False, n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight

    def loss(out, labels):
        return F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())

    compiled = asteroid.compile(model, _cluster(), example=(torch.randint(0, 64, (BATCH, 8)),), loss=loss,
                                microbatches=MICROBATCHES, groups=[["a"], ["b"], ["c"]],
                                rows=[[ROWS], [ROWS], [ROWS]])
    lg = compiled.layer_graph
    assert not any("wte.weight" in why or "lm_head.weight" in why for why in lg.blocked)  # values may still block
    ties = [a for _, acts in compiled.program.actions for a in acts if a.op == Op.TIE]
    assert [a.group for a in ties] == [("a", "c")] * 2 and ties[0].params == ("transformer.wte.weight",)
    torch.manual_seed(1)
    batches = [((torch.randint(0, 64, (BATCH, 8)),), torch.randint(0, 64, (BATCH, 8))) for _ in range(3)]
    make_opt = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    runner, losses = compiled.run(iter(batches), 3, optimizer=make_opt)
    ref, ref_losses = eager_train(model, batches, loss, make_opt, microbatches=MICROBATCHES, rows=ROWS)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    got, want = runner.state_dict(), ref.state_dict()
    # c_attn's bias holds the key bias, whose gradient is zero up to rounding (softmax cancels it):
    # Adam normalizes that rounding noise into steps of lr, so it is left out of the comparison
    d = cfg.n_embd
    for k in [k for k in want if k.endswith("attn.c_attn.bias")]:
        got[k], want[k] = torch.cat([got[k][:d], got[k][2 * d:]]), torch.cat([want[k][:d], want[k][2 * d:]])
    assert_same_state(got, want)
    assert torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])


@pytest.mark.parametrize("groups, rows", [
    ([["b", "a"], ["c"]], [[1, 3], [ROWS]]),       # the embedding's stage grows a group, the head stays on c
    ([["c"], ["a", "b"]], [[ROWS], [2, 2]]),       # the holders trade places
])
def test_training_that_switches_plans_with_a_tie_equals_training_that_never_did(three, groups, rows):
    from asteroid_fx.passes.replan import switch
    from asteroid_fx.passes.replay import split_stages

    entry, _, compiled = three
    _, _, other = _compile(groups=groups, rows=rows)
    sw = switch(compiled.program, other.program, reason="test")
    batches = _batches(entry, 4)
    reference = compiled.runner(optimizer="adam", lr=1e-2)
    want_losses = [reference.step(*b) for b in batches]
    runner = compiled.runner(optimizer="adam", lr=1e-2)
    got = [runner.step(*b) for b in batches[:2]]
    runner.switch(sw, split_stages(sw.after, compiled.captured, compiled.layer_graph))
    got += [runner.step(*b) for b in batches[2:]]
    assert got == pytest.approx(want_losses, rel=1e-5)
    state, want = runner.state_dict(), reference.state_dict()
    assert_same_state({k: v for k, v in state.items() if k in want}, want)
    assert torch.equal(state["lm_head.weight"], state["tok_emb.weight"])
