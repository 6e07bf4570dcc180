"""linearize: layers partition the compute nodes in order; a cut carries everything live across it
(skip connections included); cuts that would split a tied weight or send a value that is not a row
slice are not allowed and say why; max_layers coarsens only at allowed cuts; a size computed from
the batch at the top of forward crosses a cut by being recomputed, and trains like eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import asteroid_fx as asteroid
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.cost.stage import step_s
from asteroid_fx.passes.annotate_costs import COMPUTE_OPS, annotate_costs
from asteroid_fx.passes.capture import capture
from asteroid_fx.passes.linearize import linearize, node_cuts
from asteroid_fx.passes.partition import balanced
from tests import zoo
from tests.eager import assert_same_state, eager_train

KINDS = ("jetson-nano", "jetson-tx2")


def _prepare(model: torch.nn.Module, example: tuple):
    captured = capture(model, example)
    return annotate_costs(captured, KINDS)


@pytest.fixture(scope="module")
def resnet():
    return zoo.annotated("resnet18", KINDS)


@pytest.fixture(scope="module")
def tied_gpt():
    return zoo.annotated("gpt", KINDS, 4, tie_weights=True)


def _compute_nodes(captured) -> list[str]:
    return [n.name for n in captured.module.graph.nodes if n.op in COMPUTE_OPS]


def _node_position_of_cuts(lg) -> list[int]:
    """The node index (cut of ``node_cuts``) each layer cut sits at."""
    out, pos = [0], 0
    for layer in lg.layers:
        pos += len(layer.nodes)
        out.append(pos)
    return out


def _row_bytes(captured, name: str) -> int:
    val = next(n for n in captured.module.graph.nodes if n.name == name).meta["val"]
    return int(val[0].numel()) * val.element_size()


@pytest.mark.parametrize("max_layers", [None, 4, 8, 16, 48])
def test_layers_partition_the_compute_nodes_in_order(resnet, max_layers):
    lg = linearize(resnet, max_layers=max_layers)
    assert [name for layer in lg.layers for name in layer.nodes] == _compute_nodes(resnet)
    assert all(layer.nodes for layer in lg.layers)
    assert [layer.index for layer in lg.layers] == list(range(len(lg)))
    assert [cut.index for cut in lg.cuts] == list(range(len(lg) + 1))
    assert set(lg.kinds) == set(KINDS)


def test_a_cut_inside_a_residual_block_carries_the_skip(resnet):
    """The first residual add joins the block input (skip) and the branch; every cut between the
    skip's definition and the add carries the skip, and the cut right before the add carries both,
    with the bytes of both."""
    cuts = node_cuts(resnet)
    order = _compute_nodes(resnet)
    gm = resnet.module
    add = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor)
    branch, skip = add.args
    if order.index(skip.name) > order.index(branch.name):
        branch, skip = skip, branch
    at_add = cuts[order.index(add.name)]
    assert at_add.allowed
    assert set(at_add.values) == {skip.name, branch.name}
    assert at_add.bytes_per_row == _row_bytes(resnet, skip.name) + _row_bytes(resnet, branch.name)
    inside = range(order.index(skip.name) + 2, order.index(add.name) + 1)
    assert len(inside) >= 5  # conv, bn, relu, conv, bn
    for k in inside:
        assert skip.name in cuts[k].values, k
        assert len(cuts[k].values) == 2 and cuts[k].allowed, cuts[k]
        branch_value = next(v for v in cuts[k].values if v != skip.name)
        assert cuts[k].bytes_per_row == _row_bytes(resnet, skip.name) + _row_bytes(resnet, branch_value)
    # and the layer graph keeps that cut, with the same values and bytes
    lg = linearize(resnet, max_layers=None)
    layer_cut = lg.cuts[_node_position_of_cuts(lg).index(order.index(add.name))]
    assert (layer_cut.values, layer_cut.bytes_per_row) == (at_add.values, at_add.bytes_per_row)


def test_cuts_between_tied_weight_users_are_allowed_and_the_tie_recorded(tied_gpt):
    """A weight read on both sides of a cut is a tie (each stage holds a copy, tests/test_ties.py),
    not a reason to forbid the cut; the layer graph says which layers read it."""
    gm = tied_gpt.module
    tied = gm.get_parameter("tok_emb.weight")
    names = {n for n, p in gm.named_parameters(remove_duplicate=False) if p is tied}
    assert names == {"tok_emb.weight", "lm_head.weight"}
    users = [n.name for n in gm.graph.nodes
             if n.op in COMPUTE_OPS and any(a.op == "get_attr" and a.target in names for a in n.all_input_nodes)]
    order = _compute_nodes(tied_gpt)
    first, last = order.index(users[0]), order.index(users[-1])
    assert last - first > 10
    cuts = node_cuts(tied_gpt)
    for k in range(first + 1, last + 1):
        assert not any(repr(name) in cuts[k].why_not for name in names), cuts[k].why_not
    lg = linearize(tied_gpt, max_layers=None)
    assert len(lg) > 10
    (tie,) = [t for t in lg.ties if t.kind == "param"]
    assert set(tie.names) == names and tie.layers == (0, len(lg) - 1)
    assert names <= set(lg.layers[0].params) and names <= set(lg.layers[-1].params)
    # a stage holding both ends holds one copy
    assert lg.param_bytes(0, len(lg)) == sum(p.numel() * p.element_size() for p in gm.parameters())


def test_a_tied_model_can_be_cut_into_two_stages(tied_gpt):
    lg = linearize(tied_gpt)
    cluster = Cluster.uniform([Device("a", "jetson-tx2"), Device("b", "jetson-tx2")], bandwidth=125e6)
    plan = balanced(lg, cluster, microbatches=2, microbatch_rows=2, stages=2)
    assert len(plan.stages) == 2


class TiedModules(torch.nn.Module):
    """A weight shared by two modules. torch.export reads it through one get_attr node; the
    symbolic_trace fallback keeps the two modules, so the tie is only visible by identity."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_a_weight_tied_between_modules_is_one_weight():
    from asteroid_fx.passes.capture import _symbolic_trace  # the fallback path, which keeps call_module nodes

    torch.manual_seed(0)
    captured = annotate_costs(_symbolic_trace(TiedModules(), (torch.randint(0, 10, (4, 3)),), {}, 4), KINDS)
    assert {n.target for n in captured.module.graph.nodes if n.op == "call_module"} == {"emb", "mid", "head"}
    cuts = node_cuts(captured)
    assert all(c.allowed for c in cuts[1:-1])  # the tie no longer blocks them
    lg = linearize(captured)
    (tie,) = lg.ties
    assert set(tie.names) == {"emb.weight", "head.weight"} and tie.layers == (0, len(lg) - 1)
    assert {"emb.weight", "head.weight"} <= set(lg.layers[0].params)
    assert lg.param_bytes(0, len(lg)) == sum(p.numel() * 4 for p in TiedModules().parameters())


@pytest.mark.parametrize("max_layers", [4, 8, 16])
def test_coarsening_bounds_the_count_and_keeps_allowed_cuts(resnet, max_layers):
    fine = node_cuts(resnet)
    allowed_units = sum(c.allowed for c in fine[1:-1]) + 1
    assert allowed_units > 16
    lg = linearize(resnet, max_layers=max_layers)
    assert 1 <= len(lg) <= max_layers
    assert len(lg) == max_layers  # there are more allowed cuts than that, so it stops at the bound
    for layer_cut, k in zip(lg.cuts, _node_position_of_cuts(lg)):
        assert fine[k].allowed, fine[k]
        assert (layer_cut.values, layer_cut.bytes_per_row, layer_cut.allowed) == (
            fine[k].values, fine[k].bytes_per_row, True)
    # coarsening only merges: per-layer costs and bytes add up to the uncoarsened totals
    full = linearize(resnet, max_layers=None)
    assert lg.param_bytes(0, len(lg)) == full.param_bytes(0, len(full))
    assert lg.buffer_bytes(0, len(lg)) == full.buffer_bytes(0, len(full))
    assert lg.saved_bytes_per_row(0, len(lg)) == pytest.approx(full.saved_bytes_per_row(0, len(full)))
    for kind in KINDS:
        assert step_s(lg, kind, (0, len(lg)), 8) == pytest.approx(step_s(full, kind, (0, len(full)), 8))


def test_no_coarsening_below_the_bound(resnet):
    fine = node_cuts(resnet)
    allowed_units = sum(c.allowed for c in fine[1:-1]) + 1
    assert len(linearize(resnet, max_layers=allowed_units)) == allowed_units
    assert len(linearize(resnet, max_layers=None)) == allowed_units


# ------------------------------------------------------------------------------------------------
# A SymInt live across a cut


class BatchSized(torch.nn.Module):
    """Reads the batch size at the top of forward and reshapes with it near the end, so the size is
    live across every cut in between."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        h = torch.relu(self.a(x))
        h = torch.tanh(self.b(h))
        h = h.view(n, 4, 4).sum(1)
        return self.c(h.reshape(n, 4).repeat(1, 4))


MICROBATCHES, ROWS = 3, 4
BATCH = MICROBATCHES * ROWS


def _cluster() -> Cluster:
    return Cluster.uniform([Device("d0", "jetson-tx2"), Device("d1", "jetson-nano"), Device("d2", "jetson-xavier-nx")],
                           bandwidth=125e6, latency=1e-3)


def test_a_cut_with_a_batch_size_live_across_it_trains_like_eager():
    torch.manual_seed(0)
    model = BatchSized()
    example = (torch.randn(BATCH, 8),)
    captured = _prepare(model, example)
    cuts = node_cuts(captured)
    order = _compute_nodes(captured)
    size_node = next(n for n in captured.module.graph.nodes if n.target == torch.ops.aten.sym_size.int)
    crossing = [c.index for c in cuts[1:-1] if size_node.name in c.values and c.allowed]
    assert len(crossing) >= 5  # every cut between the size and its last use
    cut = crossing[-2]  # inside the body, with a tensor and the size both live
    assert len(cuts[cut].values) == 2

    lg = linearize(captured, max_layers=None)  # one node per layer here: layer cut k = node cut k
    assert [layer.nodes[0] for layer in lg.layers] == order
    compiled = asteroid.compile(model, _cluster(), example=example, loss=F.cross_entropy, microbatches=MICROBATCHES,
                                max_layers=None, layers=[0, cut, len(order)],
                                groups=[["d0"], ["d1", "d2"]], rows=[[ROWS], [3, 1]])
    second = compiled.stages[1]
    # the size is not received: stage 1 gets one tensor and recomputes the size from its rows
    assert second.inputs == tuple(v for v in cuts[cut].values if v != size_node.name)
    assert any(n.target == torch.ops.aten.sym_size.int for n in second.module.graph.nodes)
    for rows in (3, 1):  # each device of the group runs its own row count
        x = torch.randn(rows, *second.input_specs[0].shape)
        assert second.module(x)[0].shape == (rows, 5)

    make_opt = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    torch.manual_seed(1)
    batches = [((torch.randn(BATCH, 8),), torch.randint(0, 5, (BATCH,))) for _ in range(3)]
    runner, losses = compiled.run(iter(batches), 3, optimizer=make_opt)
    ref, ref_losses = eager_train(model, batches, F.cross_entropy, make_opt, microbatches=MICROBATCHES, rows=ROWS)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())


class HalfBatch(torch.nn.Module):
    """A size that is not a polynomial in the batch (batch // 2) cannot be recomputed from a row
    slice's batch by ``split``: the cuts it crosses are not allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0) // 2
        h = torch.relu(self.a(x))
        return self.b(h) * n


def test_a_size_that_is_not_a_polynomial_of_the_batch_forbids_the_cut():
    torch.manual_seed(0)
    captured = _prepare(HalfBatch(), (torch.randn(8, 8),))
    order = _compute_nodes(captured)
    half = next(n.name for n in captured.module.graph.nodes if "floordiv" in n.name)
    cuts = node_cuts(captured)
    between = [c for c in cuts[1:-1] if half in c.values]
    assert between
    for c in between:
        assert not c.allowed and repr(half) in c.why_not and "polynomial" in c.why_not
    lg = linearize(captured, max_layers=None)
    for k in _node_position_of_cuts(lg)[1:-1]:
        assert half not in cuts[k].values
    assert [name for layer in lg.layers for name in layer.nodes] == order


# ------------------------------------------------------------------------------------------------
# Values that do not depend on the batch's data


class Positional(torch.nn.Module):
    """Adds a table built from positions (an arange over the sequence) and a constant buffer to the
    input of every linear layer: the table does not depend on the batch and is live across every
    cut between the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freq", torch.linspace(0.1, 1.0, 8), persistent=False)
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 6, 8)
        pos = torch.arange(x.shape[1], dtype=x.dtype)
        table = torch.sin(pos[:, None] * self.freq)
        h = torch.relu(self.a(x + table))
        h = torch.tanh(self.b(h + table))
        return self.c(h + table).sum(1)


def _values_across(captured, name: str):
    return [c for c in node_cuts(captured)[1:-1] if name in c.values]


def _table(captured) -> str:
    return next(n.name for n in captured.module.graph.nodes if n.op == "call_function" and "sin" in n.name)


def test_a_value_that_does_not_depend_on_the_batch_is_recomputed_not_sent():
    torch.manual_seed(0)
    captured = _prepare(Positional(), (torch.randn(4, 6, 8),))
    table = _table(captured)
    across = _values_across(captured, table)
    assert len(across) >= 4
    for c in across:
        assert c.allowed, c.why_not
        assert table in c.recomputed
        sent = [v for v in c.values if v not in c.recomputed]
        assert c.bytes_per_row == sum(_row_bytes(captured, v) for v in sent)


class Transposed(torch.nn.Module):
    """Keeps the batch transposed (dim 0 is not the batch) across the linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.t()
        h = torch.tanh(self.b(torch.relu(self.a(x))))
        return self.c(h) + t.mean(0)[:, None]


class Expensive(torch.nn.Module):
    """A batch-independent value that costs far more than a row's forward: it is not recomputed."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("m", torch.randn(64, 64) / 8)
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.m @ self.m @ self.m)[:5, :5].sum()
        h = torch.tanh(self.b(torch.relu(self.a(x))))
        return self.c(h) * w


class Random(torch.nn.Module):
    """Noise drawn once per forward: another stage would draw other numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(5)
        h = torch.tanh(self.b(torch.relu(self.a(x))))
        return self.c(h) + noise


class Written(torch.nn.Module):
    """A tensor made from a size and later written in place: recomputed, it would miss the write."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(5)
        h = torch.tanh(self.b(torch.relu(self.a(x))))
        scale.add_(h.mean())
        return self.c(h) * scale


@pytest.mark.parametrize("model, value, reason", [
    (Written, "ones", "is written in place (by 'add_')"),
    (Transposed, "t", "is not a batch-first tensor and depends on the batch's data"),
    (Expensive, "sum_1", "does not depend on the batch, but recomputing it"),
    (Random, "rand", "is random"),
])
def test_a_value_that_cannot_be_recomputed_or_sent_blocks_with_its_reason(model, value, reason):
    torch.manual_seed(0)
    captured = _prepare(model(), (torch.randn(4, 8),))
    names = {n.name for n in captured.module.graph.nodes}
    assert value in names, sorted(names)
    across = _values_across(captured, value)
    assert len(across) >= 3
    for c in across:
        assert not c.allowed and repr(value) in c.why_not and reason in c.why_not, c.why_not


def test_coarsening_is_the_layer_graphs_own_and_a_view_keeps_the_layers(resnet):
    """linearize(max_layers=) merges where LayerGraph.coarsening of the uncoarsened graph says, and
    cut_only_at keeps every layer and allows only the cuts it is given."""
    fine = linearize(resnet, max_layers=None)
    for max_layers in (4, 16):
        coarse = linearize(resnet, max_layers=max_layers)
        at = {layer.nodes[0]: layer.index for layer in fine.layers}
        bounds = fine.coarsening(max_layers)
        assert tuple(at[layer.nodes[0]] for layer in coarse.layers) + (len(fine),) == bounds
        view = fine.cut_only_at(bounds)
        assert view.layers == fine.layers and view.allowed_cuts() == bounds[1:-1]
        assert all(c.why_not for c in view.cuts[1:-1] if not c.allowed)
