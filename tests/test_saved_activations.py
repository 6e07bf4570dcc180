"""Activation memory against what autograd saves: every zoo model's layers are charged, per row,
what autograd's saved-tensor hooks see the layer's nodes keep for backward, each storage once.

The reference here is measured independently of annotate_costs: the whole captured graph runs with
gradients at two batch sizes (not annotate_costs' rows), every saved storage that is not a weight
is charged to the layer of the first node that saves it, and the slope over the batch is the bytes
per row. A layer may be charged a little more (at most 10%), never less: an under-count would let
a plan that does not fit run out of memory. A stage that starts at a cut also holds what it
receives there (``Cut.bytes_per_row``), so a stage is charged at least what all its layers save,
inputs included."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from asteroid_fx import models
from asteroid_fx.ir import catalog
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.passes.annotate_costs import annotate_costs
from asteroid_fx.passes.capture import Captured, capture
from asteroid_fx.passes.linearize import linearize

ZOO = ("mlp", "resnet18", "resnet50", "vgg16", "gpt", "bert", "mobilenetv2", "digits")
BATCH = 8
SLACK = 0.10  # a layer is charged at most this much above what autograd saves


def _saves(captured: Captured, rows: int) -> list[tuple[str, dict[tuple[int, int], int]]]:
    """Per compute node in graph order, the storages (data pointer, bytes) autograd saves while it
    runs on ``rows`` rows of the example, weights left out (a storage a node shares with an earlier
    one is listed under both)."""
    gm = captured.module
    weights = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # the rows in a storage of their own: a slice's is the whole example's
    inputs = [x[:rows].clone() if isinstance(x, torch.Tensor) and captured.is_batched(p.meta.get("val")) else x
              for p, x in zip(placeholders, captured.example_inputs)]
    out: list[tuple[str, dict[tuple[int, int], int]]] = []
    keep: list[torch.Tensor] = []  # held to the end, so no freed storage's address is reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            out[-1][1][(st.data_ptr(), st.nbytes())] = st.nbytes()
        keep.append(t)
        return t

    class Tracking(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out.append((n.name, {}))
            return super().run_node(n)

    state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    try:
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            Tracking(gm).run(*inputs)
    finally:
        gm.load_state_dict(state)
    return out


def _autograd_per_row(saves: dict[int, list], lg: LayerGraph, lo: int = 0) -> list[float]:
    """Per layer, the bytes per row autograd saves for it, each storage at the layer of the first
    node saving it: the slope over the row counts of ``saves`` (rows -> ``_saves``); with ``lo``,
    for layers [lo, L) run as one stage: a storage that a layer before ``lo`` saved first and a
    layer of the stage saves again counts at the first layer of the stage that saves it."""
    layer_of = {name: layer.index for layer in lg.layers for name in layer.nodes}
    per_rows = []
    for rows in sorted(saves):
        saved = [0.0] * len(lg)
        seen: set[tuple[int, int]] = set()
        for name, storages in saves[rows]:
            i = layer_of.get(name)
            if i is None or i < lo:
                continue
            for key, nbytes in storages.items():
                if key not in seen:
                    seen.add(key)
                    saved[i] += nbytes
        per_rows.append(saved)
    (r0, r1), (a, b) = sorted(saves), per_rows
    return [(y - x) / (r1 - r0) for x, y in zip(a, b)]


def _graph(name: str, max_layers: int | None) -> tuple[dict[int, list], LayerGraph]:
    """What autograd saves for the small ``name`` at BATCH / 2 and BATCH rows, and its LayerGraph."""
    entry = models.get(name)
    torch.manual_seed(0)
    captured = capture(entry.build(small=True), entry.example(BATCH, True))
    lg = linearize(annotate_costs(captured, ["jetson-nano"]), max_layers=max_layers)
    return {rows: _saves(captured, rows) for rows in (BATCH // 2, BATCH)}, lg


@pytest.fixture(scope="module", params=ZOO)
def zoo_graph(request):
    return _graph(request.param, None)


def test_every_layer_is_charged_what_autograd_saves(zoo_graph):
    saves, lg = zoo_graph
    reference = _autograd_per_row(saves, lg)
    assert sum(reference) > 0
    for layer, want in zip(lg.layers, reference):
        got = layer.saved_bytes_per_row
        where = (f"layer {layer.index} ({layer.nodes[0]}..{layer.nodes[-1]}): charged {got:.1f} B/row, "
                 f"autograd saves {want:.1f}")
        assert got >= want - 1e-6, where
        assert got <= want * (1 + SLACK) + 1e-6, where


def test_the_whole_model_is_charged_what_autograd_saves(zoo_graph):
    saves, lg = zoo_graph
    want = sum(_autograd_per_row(saves, lg))
    assert want <= lg.saved_bytes_per_row(0, len(lg)) <= want * (1 + SLACK)


def test_a_stage_is_charged_at_least_what_it_saves(zoo_graph):
    """From every allowed cut on, the stage's saved bytes plus what it receives cover what its
    layers save when run as that stage (inputs they save that an earlier layer saved first too)."""
    saves, lg = zoo_graph
    for lo in lg.allowed_cuts():
        want = sum(_autograd_per_row(saves, lg, lo))
        got = lg.saved_bytes_per_row(lo, len(lg)) + lg.cuts[lo].bytes_per_row
        assert got >= want - 1e-6, f"stage from layer {lo}: charged {got:.1f} B/row, autograd saves {want:.1f}"


@pytest.mark.parametrize("name, max_layers", [("gpt", 12), ("resnet18", 10)])
def test_coarsened_layers_are_charged_what_autograd_saves(name, max_layers):
    """The planner tests' graphs (tests/test_planner.py): merged layers sum their nodes' bytes."""
    saves, lg = _graph(name, max_layers)
    reference = _autograd_per_row(saves, lg)
    for layer, want in zip(lg.layers, reference):
        assert want - 1e-6 <= layer.saved_bytes_per_row <= want * (1 + SLACK) + 1e-6, layer.index
