"""Measured activation memory against what autograd saves: a profile measures every layer as a
stage of its own, so a tensor at a layer boundary that both sides save (ReLU keeps its output, the
convolution after it the same tensor as its input) is in two layers' cells; the profile's stage
sums and the per-layer bytes ``profile_costs`` sets count it once.

The references run what is compared in one go under saved-tensor hooks, each storage once and
weights left out: a whole block of layers as one stage (for ``DeviceProfile.saved_bytes_per_row``),
and the whole graph with each storage charged to the first node saving it
(tests/test_saved_activations.py, for ``profile_costs``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from asteroid_fx import models
from asteroid_fx.ir import profile as P
from asteroid_fx.ir.profile import BoundaryStorage, Cell, LayerProfile, Timing
from asteroid_fx.passes.profile_costs import profile_costs
from asteroid_fx.runtime import profiler as measure
from asteroid_fx.runtime.profiler.timing import example_rows, stages_for
from tests.test_saved_activations import _autograd_per_row, _saves

QUICK = P.Method(min_repeats=1, max_repeats=1, budget_s=0.0, rounds=1)
ROWS = (2, 4)
SLACK = 0.10  # a stage's measured saved bytes are within this share of what autograd saves


@pytest.fixture(scope="module", params=("mlp", "resnet18", "gpt"))
def measured(request):
    """The small zoo model's captured graph, LayerGraph and a quick measured CPU profile."""
    entry = models.get(request.param)
    torch.manual_seed(0)
    captured, lg = measure.prepare(entry.build(small=True), entry.example(8, True), "host-cpu", None)
    profile = measure.measure(captured, lg, ROWS, model=request.param, kind="host-cpu", method=QUICK)
    return captured, lg, profile


def _stage_saves(captured, lg, bounds: list[int], rows: int) -> dict[tuple[int, int], int]:
    """Per stage of the split at ``bounds``, the bytes autograd saves while it runs on ``rows``
    rows as one stage (on the outputs of the stages before it), each storage once, weights left
    out."""
    gm = captured.module
    weights = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}
    x = example_rows(captured, rows, torch.device("cpu"))
    stages = stages_for(captured, lg, bounds)
    inputs = tuple(x[name] for name in stages[0].inputs)
    out: dict[tuple[int, int], int] = {}
    state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    try:
        for stage in stages:
            saved: dict[tuple[int, int], int] = {}
            keep: list[torch.Tensor] = []  # held to the end, so no freed storage's address is reused

            def pack(t: torch.Tensor) -> torch.Tensor:
                st = t.untyped_storage()
                if st.data_ptr() not in weights:
                    saved[(st.data_ptr(), st.nbytes())] = st.nbytes()
                keep.append(t)
                return t

            args = [t.detach().requires_grad_(g and t.is_floating_point()) for t, g in zip(inputs, stage.input_grads)]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                outputs = stage.module(*args)
            out[stage.layers] = sum(saved.values())
            inputs = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in outputs)
    finally:
        gm.load_state_dict(state)
    return out


def _splits(lg) -> list[list[int]]:
    """The whole model as one stage, four stages at allowed cuts, a stage between every two
    consecutive allowed cuts."""
    cuts = lg.allowed_cuts()
    four = sorted({cuts[len(cuts) * k // 4] for k in (1, 2, 3)}) if cuts else []
    return [[0, len(lg)], [0, *four, len(lg)], [0, *cuts, len(lg)]]


def test_a_stage_is_charged_what_autograd_saves_running_it(measured):
    captured, lg, profile = measured
    r0, r1 = ROWS
    for bounds in _splits(lg):
        at = {rows: _stage_saves(captured, lg, bounds, rows) for rows in ROWS}
        for lo, hi in zip(bounds, bounds[1:]):
            want = (at[r1][(lo, hi)] - at[r0][(lo, hi)]) / (r1 - r0)
            got = profile.saved_bytes_per_row(lo, hi)
            assert abs(got - want) <= SLACK * want + 1e-6, \
                f"layers [{lo}, {hi}): measured {got:.1f} B/row, autograd saves {want:.1f} running them as one stage"
            if (lo, hi) == (0, len(lg)):
                # each layer's bytes as measured alone count the tensors two layers save twice
                alone = sum(layer.saved_bytes_per_row() for layer in profile.layers)
                assert alone > (1 + SLACK) * want, f"measured alone {alone:.1f} B/row, autograd {want:.1f}"


def test_profile_costs_charges_each_layer_once(measured):
    """profile_costs gives each layer what autograd saves for it in the whole graph, each storage
    in the first layer saving it: what annotate_costs gives it."""
    captured, lg, profile = measured
    reference = _autograd_per_row({rows: _saves(captured, rows) for rows in (4, 8)}, lg)
    charged = profile_costs(lg, [profile], max_layers=None)
    for layer, want in zip(charged.layers, reference):
        got = layer.saved_bytes_per_row
        assert abs(got - want) <= SLACK * want + 1e-6, \
            f"layer {layer.index} ({layer.nodes[0]}..{layer.nodes[-1]}): {got:.1f} B/row, autograd saves {want:.1f}"
    assert charged.saved_bytes_per_row(0, len(lg)) == pytest.approx(profile.saved_bytes_per_row(0, len(lg)))


def _without_boundary(profile: P.DeviceProfile) -> P.DeviceProfile:
    return dataclasses.replace(profile, layers=tuple(
        dataclasses.replace(la, cells=tuple(dataclasses.replace(c, boundary=None) for c in la.cells))
        for la in profile.layers))


def test_a_profile_without_boundary_storages_loads_and_counts_as_before(measured, tmp_path):
    """A profile written before cells recorded their boundary storages (no "boundary" field, its
    checksum over what it has) loads, and counts each layer's saved bytes as measured alone."""
    _, lg, profile = measured
    old = _without_boundary(profile)
    path = tmp_path / "old.json"
    path.write_text(P.dumps(old))
    assert '"boundary"' not in path.read_text() and '"checksum"' in path.read_text()
    loaded = P.load(path, lg=lg, max_layers=None)
    assert loaded == old
    alone = [layer.saved_bytes_per_row() for layer in loaded.layers]
    assert list(loaded.layer_saved_bytes_per_row(0, len(lg))) == alone
    charged = profile_costs(lg, [path], max_layers=None)
    assert [layer.saved_bytes_per_row for layer in charged.layers] == alone
    # the new field round-trips
    assert P.loads(P.dumps(profile)) == profile and '"boundary"' in P.dumps(profile)


def _layer(index: int, saved: int, boundary: tuple[BoundaryStorage, ...] | None) -> LayerProfile:
    """A layer whose one cell, at 1 row, saved ``saved`` bytes (so as many per row)."""
    t = Timing.exact(1e-3)
    return LayerProfile(index, f"n{index}", f"n{index}", 1, cells=(Cell(1, t, t, saved, saved, boundary=boundary),))


def _profile(*layers: LayerProfile) -> P.DeviceProfile:
    return P.DeviceProfile(model="m", graph=P.GraphKey("sha256:0", len(layers), None),
                           device=P.DeviceInfo("host-cpu", "cpu", "cpu", 1, torch.__version__),
                           method=P.Method(clock="wall"), rows=(1,), layers=layers)


def test_a_boundary_tensor_counts_in_the_first_layer_of_the_stage_that_saves_it():
    """Layer 0 saves its output a with 100 bytes of its own; layer 1 passes a on as its view b
    (one storage) and saves 10 bytes of its own; layer 2 saves b and 5 bytes of its own, layer 3
    saves a value c no layer before saved."""
    profile = _profile(
        _layer(0, 150, (BoundaryStorage(("a",), 50),)),
        _layer(1, 10, (BoundaryStorage(("a", "b"), 0),)),
        _layer(2, 55, (BoundaryStorage(("b",), 50),)),
        _layer(3, 20, (BoundaryStorage(("b",), 0), BoundaryStorage(("c",), 20))))
    assert profile.layer_saved_bytes_per_row(0, 4) == (150, 10, 5, 20)
    assert profile.layer_saved_bytes_per_row(1, 4) == (10, 55, 20)  # the stage's own copy of b, in layer 2
    assert profile.layer_saved_bytes_per_row(2, 3) == (55,)
    assert profile.saved_bytes_per_row(0, 4) == 185
    # an older profile's layer (nothing recorded) counts what it saved and holds nothing for later layers
    old = _profile(_layer(0, 150, None), *profile.layers[1:])
    assert old.layer_saved_bytes_per_row(0, 4) == (150, 10, 55, 20)
    # so does one with a cell that lists nothing (measured before, then resumed)
    two = dataclasses.replace(profile.layers[2], cells=(*profile.layers[2].cells,
                                                        dataclasses.replace(profile.layers[2].cells[0], rows=2,
                                                                            saved_bytes=110, boundary=None)))
    mixed = _profile(*profile.layers[:2], two, profile.layers[3])
    assert mixed.layer_saved_bytes_per_row(0, 4) == (150, 10, 55, 20)
    assert P.loads(P.dumps(profile)) == profile
