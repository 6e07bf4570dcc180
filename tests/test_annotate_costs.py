"""annotate_costs: per-node FLOPs, bytes and parameters, a roofline Cost per device kind, and a
graph whose parameters and buffers are exactly as before (the stats run must leave no trace)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from asteroid_fx.ir import catalog

from asteroid_fx import models
from asteroid_fx.ir.costs import ROW_GRID, Cost, NodeStats
from asteroid_fx.passes.annotate_costs import COMPUTE_OPS, annotate_costs
from asteroid_fx.passes.capture import capture
from tests import zoo

IN, OUT = 12, 20
# a mixed cluster's kinds; never "host-cpu", whose numbers are measured on the machine running the test
KINDS = ("jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano", "laptop-i7")


def _linear_node(captured) -> fx.Node:
    (node,) = [n for n in captured.module.graph.nodes if n.op in COMPUTE_OPS and "linear" in str(n.target)]
    return node


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    captured = capture(torch.nn.Sequential(torch.nn.Linear(IN, OUT)), (torch.randn(8, IN),))
    return annotate_costs(captured, KINDS)


@pytest.fixture(scope="module")
def resnet():
    """The small ResNet-18 annotated for KINDS, with its state before annotation."""
    captured = zoo.captured("resnet18")
    before = {k: v.detach().clone() for k, v in captured.module.state_dict().items()}
    annotate_costs(captured, KINDS)
    return captured, before


def test_linear_stats(linear):
    stats: NodeStats = _linear_node(linear).meta["asteroid.stats"]
    assert stats.flops_per_row == 2 * IN * OUT  # one multiply-add per weight per row
    assert stats.flops_fixed == 0
    assert stats.param_bytes == (IN * OUT + OUT) * 4  # weight and bias, float32
    assert stats.out_bytes_per_row == OUT * 4
    assert stats.bytes_per_row == (IN + OUT) * 4
    assert stats.saved_bytes_per_row == IN * 4  # the input, for the weight gradient


def test_a_tensor_saved_by_two_nodes_counts_once():
    """ReLU keeps its output for backward and the linear after it keeps the same tensor as its
    input: one storage, charged to the ReLU, which saves it first; the weights count apart."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT), torch.nn.ReLU(), torch.nn.Linear(OUT, 3))
    captured = annotate_costs(capture(model, (torch.randn(8, IN),)), KINDS[:1])
    saved = [n.meta["asteroid.stats"].saved_bytes_per_row for n in captured.module.graph.nodes
             if n.op in COMPUTE_OPS]
    assert saved == [IN * 4, OUT * 4, 0.0]


def test_stats_do_not_depend_on_the_example_batch():
    """Every node's stats are the same whether the example batch is 8 or 16 rows, although 16 is
    also the GPT's sequence length (a shape equal to the batch size is not the batch)."""
    entry = models.get("gpt")
    stats = []
    for batch in (8, entry.build(small=True).cfg.seq_len):
        captured = zoo.annotated("gpt", KINDS[:1], batch)
        stats.append({n.name: n.meta["asteroid.stats"] for n in captured.module.graph.nodes if n.op in COMPUTE_OPS})
    assert stats[0].keys() == stats[1].keys()
    for name, s in stats[0].items():
        assert _same(s, stats[1][name]), (name, s, stats[1][name])


def _same(a: NodeStats, b: NodeStats) -> bool:
    return all(getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-9) for f in NodeStats.__dataclass_fields__)


@pytest.mark.parametrize("kind", KINDS)
def test_roofline_at_a_sample_point(linear, kind):
    node = _linear_node(linear)
    stats, cost = node.meta["asteroid.stats"], node.meta["asteroid.cost"][kind]
    spec = catalog.kind(kind)
    flops_rate = spec.peak_flops * spec.efficiency
    bytes_rate = spec.memory_bandwidth * spec.efficiency
    rows = 32
    compute = stats.flops_per_row * rows / flops_rate
    memory = (stats.bytes_per_row * rows + stats.param_bytes) / bytes_rate
    assert cost.fwd(rows) == pytest.approx(spec.overhead_s + max(compute, memory), rel=1e-12)
    assert cost.bwd(rows) == pytest.approx(spec.overhead_s + 2 * max(compute, memory), rel=1e-12)
    assert cost.source == "analytic"


def test_every_compute_node_has_a_cost_for_every_kind(resnet):
    captured, _ = resnet
    compute = [n for n in captured.module.graph.nodes if n.op in COMPUTE_OPS]
    assert len(compute) > 50
    for n in compute:
        assert isinstance(n.meta["asteroid.stats"], NodeStats), n.name
        costs = n.meta["asteroid.cost"]
        assert set(costs) == set(KINDS), n.name
        assert all(isinstance(c, Cost) for c in costs.values())
    for n in captured.module.graph.nodes:
        if n.op not in COMPUTE_OPS:
            assert "asteroid.cost" not in n.meta, n.name


def test_costs_are_monotone_in_rows(resnet):
    captured, _ = resnet
    rows = sorted({0, *ROW_GRID, *range(1, 5000, 37)})
    for n in captured.module.graph.nodes:
        for kind, cost in n.meta.get("asteroid.cost", {}).items():
            for fit in (cost.fwd, cost.bwd):
                times = [fit(r) for r in rows]
                assert all(t >= 0 for t in times), (n.name, kind)
                assert all(a <= b for a, b in zip(times, times[1:])), (n.name, kind)


def test_flops_of_a_convolution(resnet):
    """The stem convolution's FLOPs come from FlopCounterMode: 2 x (output elements) x (kernel MACs)."""
    captured, _ = resnet
    conv = next(n for n in captured.module.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    weight = captured.module.get_parameter(conv.args[1].target)
    out = conv.meta["val"]
    out_per_row = out.shape[1] * out.shape[2] * out.shape[3]
    macs_per_output = weight.shape[1] * weight.shape[2] * weight.shape[3]
    assert conv.meta["asteroid.stats"].flops_per_row == 2 * int(out_per_row) * macs_per_output


def test_buffers_and_parameters_unchanged(resnet):
    captured, before = resnet
    after = captured.module.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert torch.equal(v, before[k]), f"{k} changed during annotate_costs"


def test_the_stats_run_would_move_batchnorm_statistics(resnet):
    """Guard for the test above: a train-mode run of this graph does update the running statistics,
    so annotate_costs has something to restore."""
    captured, before = resnet
    gm = captured.module
    try:
        with torch.no_grad():
            fx.Interpreter(gm).run(*captured.example_inputs)
        moved = [k for k, v in gm.state_dict().items() if "running_mean" in k and not torch.equal(v, before[k])]
    finally:
        gm.load_state_dict(before)
    assert moved
