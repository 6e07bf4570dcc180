"""split: one fx submodule per stage. Every parameter and buffer lives in exactly the stage whose
layers use it (the captured module's own tensors, not copies); a stage takes the tensors live across
its first cut and returns those live across its last; chained eagerly on the full batch the stages
compute what the captured module computes. A tied weight stays in one stage and trains like eager."""

from __future__ import annotations

import pytest
import torch

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.passes.partition import balanced
from asteroid_fx.passes.split import split, tensor_spec
from tests import zoo
from tests.eager import assert_same_state, eager_train

NAMES = ("a", "b", "c", "d")


def _cluster() -> Cluster:
    kinds = ("jetson-tx2", "jetson-nano", "jetson-xavier-nx", "jetson-orin-nano")
    return Cluster.uniform([Device(n, k) for n, k in zip(NAMES, kinds)], bandwidth=125e6, latency=1e-3)


def _compile(name: str, **kw):
    return zoo.compiled(name, _cluster(), microbatches=2, **kw)


def _inside_block_cut(lg) -> int:
    """A cut of the layer graph inside a residual block: two values (skip and branch) cross it."""
    return next(c.index for c in lg.cuts[1:-1] if len(c.values) == 2)


@pytest.fixture(scope="module")
def resnet():
    """ResNet-18 split in three, the first boundary inside a residual block."""
    compiled = _compile("resnet18")
    lg = compiled.layer_graph
    inside = _inside_block_cut(lg)
    bounds = [0, inside, (inside + len(lg)) // 2, len(lg)]
    plan = balanced(lg, compiled.cluster, microbatches=2, microbatch_rows=4, groups=[["a"], ["b", "c"], ["d"]],
                    layers=bounds)
    return compiled, split(compiled.captured, lg, plan)


@pytest.fixture(scope="module")
def gpt():
    compiled = _compile("gpt", stages=4)
    assert len(compiled.stages) == 4
    return compiled, compiled.stages


CASES = ["resnet", "gpt"]


@pytest.fixture(params=CASES)
def case(request):
    return request.getfixturevalue(request.param)


def test_each_stage_owns_exactly_its_layers_weights(case):
    compiled, stages = case
    gm, lg = compiled.captured.module, compiled.layer_graph
    everything = {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
    seen: set[str] = set()
    for st in stages:
        owned = set(st.owned)
        expected = {p for layer in lg.layers[st.layers[0]:st.layers[1]] for p in layer.params}
        assert owned == expected, (st.index, owned ^ expected)
        assert not owned & seen, owned & seen
        seen |= owned
        for name, p in st.module.named_parameters():  # the captured tensors themselves, not copies
            assert p is gm.get_parameter(name)
        for name, b in st.module.named_buffers():
            assert b is gm.get_buffer(name)
    assert seen == everything


def test_stage_signatures_follow_the_cuts(case):
    compiled, stages = case
    lg, captured = compiled.layer_graph, compiled.captured
    by_name = {n.name: n for n in captured.module.graph.nodes}
    for st in stages:
        lo, hi = st.layers
        placeholders = [n.name for n in st.module.graph.nodes if n.op == "placeholder"]
        received = [v for v in lg.cuts[lo].values if captured.is_batched(by_name[v].meta.get("val"))]
        assert list(st.inputs) == placeholders == received
        assert st.input_specs == tuple(tensor_spec(by_name[v].meta["val"]) for v in received)
        if st.index < len(stages) - 1:
            sent = [v for v in lg.cuts[hi].values if captured.is_batched(by_name[v].meta.get("val"))]
            assert list(st.outputs) == sent
            assert len(st.output_specs) == len(st.output_grads) == len(sent)
            assert stages[st.index + 1].inputs == st.outputs
    if compiled.captured.method == "export":
        assert not stages[0].input_grads[0]  # model inputs are data: no gradient goes back


def test_a_boundary_inside_a_residual_block_sends_skip_and_branch(resnet):
    compiled, stages = resnet
    assert len(stages[1].inputs) == 2 and len(stages[0].outputs) == 2
    assert all(stages[0].output_grads)  # both carry a gradient back to stage 0


def test_chained_stages_reproduce_the_captured_module(case):
    compiled, stages = case
    gm = compiled.captured.module
    inputs = compiled.captured.example_inputs
    saved = {k: v.clone() for k, v in gm.state_dict().items()}  # train-mode BatchNorm moves statistics
    try:
        with torch.no_grad():
            expected = gm(*inputs)
            values = tuple(inputs)
            for st in stages:
                values = st.module(*values)
    finally:
        gm.load_state_dict(saved)
    assert len(values) == len(expected)
    for got, want in zip(values, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_stages_run_on_any_row_count(case):
    """Captured with a dynamic batch, each stage runs a slice of any size (what a group member gets)."""
    compiled, stages = case
    gm = compiled.captured.module
    saved = {k: v.clone() for k, v in gm.state_dict().items()}
    try:
        with torch.no_grad():
            values = tuple(t[:3] for t in compiled.captured.example_inputs)
            for st in stages:
                values = st.module(*values)
                assert all(v.shape[0] == 3 for v in values)
    finally:
        gm.load_state_dict(saved)


# ------------------------------------------------------------------------------------------------
# Tied weights


MICROBATCHES, ROWS = 2, 4
BATCH = MICROBATCHES * ROWS


@pytest.fixture(scope="module")
def tied():
    entry = models.get("gpt")
    torch.manual_seed(0)
    model = entry.build(small=True, tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    compiled = asteroid.compile(model, _cluster(), example=entry.example(BATCH, True), loss=entry.loss,
                                microbatches=MICROBATCHES, groups=[["a", "b"]], rows=[[3, 1]])
    return entry, model, compiled


def test_a_tied_weight_lives_in_one_stage_once(tied):
    _, model, compiled = tied
    owners = [st for st in compiled.stages if {"tok_emb.weight", "lm_head.weight"} & set(st.owned)]
    assert len(owners) == 1
    (stage,) = owners
    params = dict(stage.module.named_parameters(remove_duplicate=False))
    tie = [p for n, p in params.items() if n in ("tok_emb.weight", "lm_head.weight")]
    assert tie and all(p is tie[0] for p in tie)
    n_unique = len({id(p) for p in stage.module.parameters()})
    assert n_unique == len(list(model.parameters()))  # the tie is one parameter, not two


def test_a_tied_model_trains_like_eager(tied):
    """Both uses of the tied weight add into one gradient inside a replica, and the group's
    all-reduce sums the replicas: the update equals eager training's."""
    entry, model, compiled = tied
    make_opt = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    torch.manual_seed(1)
    batches = [(entry.example(BATCH, True), entry.labels(BATCH, True)) for _ in range(3)]
    runner, losses = compiled.run(iter(batches), 3, optimizer=make_opt)
    ref, ref_losses = eager_train(model, batches, entry.loss, make_opt, microbatches=MICROBATCHES, rows=ROWS)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    got = runner.state_dict()
    assert_same_state(got, ref.state_dict())  # both names of the tie included
    assert torch.equal(got["lm_head.weight"], got["tok_emb.weight"])
    assert not torch.equal(got["lm_head.weight"], model.lm_head.weight)  # it did train


def test_a_tied_model_can_be_cut_between_the_uses(tied):
    """The tie is recorded (each stage reading it holds a copy: tests/test_ties.py) instead of
    forbidding every cut between its users."""
    _, _, compiled = tied
    lg = compiled.layer_graph
    assert len(lg) > 1
    assert not any("lm_head.weight" in why or "tok_emb.weight" in why for why in lg.blocked)
    assert [set(t.names) for t in lg.ties if t.kind == "param"] == [{"tok_emb.weight", "lm_head.weight"}]


def test_a_tied_model_splits_into_two_stages(tied):
    _, _, compiled = tied
    plan = balanced(compiled.layer_graph, compiled.cluster, microbatches=MICROBATCHES, microbatch_rows=ROWS,
                    stages=2)
    assert len(plan.stages) == 2
    stages = split(compiled.captured, compiled.layer_graph, plan)
    assert all({"tok_emb.weight", "lm_head.weight"} <= set(st.owned) for st in stages)


def test_a_stage_recomputes_a_batch_independent_value_and_trains_like_eager():
    """The table Positional builds from positions and a buffer is not received: the second stage
    copies its ops and holds the buffer as a copy its owner saves; training equals eager with
    the second stage's rows split 3 + 1 over two devices."""
    from asteroid_fx.passes.linearize import node_cuts
    from tests.test_linearize import Positional

    torch.manual_seed(0)
    model = Positional()
    cluster = Cluster.uniform([Device("d0", "jetson-tx2"), Device("d1", "jetson-nano"),
                               Device("d2", "jetson-xavier-nx")], bandwidth=125e6, latency=1e-3)
    example = (torch.randn(8, 6, 8),)
    probe = asteroid.compile(model, cluster, example=example, loss=torch.nn.functional.cross_entropy,
                             max_layers=None, stages=1)
    cuts = node_cuts(probe.captured)
    table = next(n.name for n in probe.captured.module.graph.nodes if "sin" in n.name)
    cut = next(c.index for c in cuts[1:-1] if table in c.recomputed and c.allowed
               and any("linear" in v for v in c.values))
    compiled = asteroid.compile(model, cluster, example=example, loss=torch.nn.functional.cross_entropy,
                                microbatches=2, max_layers=None, layers=[0, cut, len(cuts) - 1],
                                groups=[["d0"], ["d1", "d2"]], rows=[[4], [3, 1]])
    second = compiled.stages[1]
    assert table not in second.inputs and len(second.inputs) == 1
    assert any(n.name == table for n in second.module.graph.nodes)  # its ops are copied in
    assert second.copies == ("freq",)
    assert "freq" not in second.module.state_dict() and "freq" not in second.owned
    assert "freq" in compiled.stages[0].owned

    make_opt = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    torch.manual_seed(1)
    batches = [((torch.randn(8, 6, 8),), torch.randint(0, 5, (8,))) for _ in range(3)]
    runner, losses = compiled.run(iter(batches), 3, optimizer=make_opt)
    ref, ref_losses = eager_train(model, batches, torch.nn.functional.cross_entropy, make_opt, microbatches=2, rows=4)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())
