"""Device profiles: the schema's round trip and its rejections, monotone fits, the per-stage
overhead fit, resuming an interrupted measurement, a tiny model profiled end to end through the
command line and compiled with its profile, calibration, and link probing between workers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asteroid_fx as asteroid
from asteroid_fx.cost import calibrate
from asteroid_fx.cost.stage import step_s
from asteroid_fx.runtime import linkprobe
from asteroid_fx.ir import device_profile as DP
from asteroid_fx.ir import profile as P
from asteroid_fx.cli import profile as profile_cli
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.runtime import profiler as measure
from asteroid_fx.passes.profile_costs import profile_costs

QUICK = P.Method(min_repeats=2, max_repeats=3, budget_s=0.0)
ROWS = (2, 4)


def _mlp(hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))


class _ConvMean(torch.nn.Module):
    """Its parameters do not depend on the input size, its cut sizes do."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def tiny():
    captured, lg = measure.prepare(_mlp(), (torch.randn(4, 8),), "host-cpu", 48)
    profile = measure.measure(captured, lg, ROWS, model="mlp", kind="host-cpu", max_layers=48, method=QUICK)
    return captured, lg, profile


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="asteroid")
    profile_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


# -- the schema -----------------------------------------------------------------------------------


def test_round_trip(tiny, tmp_path):
    _, lg, profile = tiny
    assert profile.complete and not profile.missing()
    assert len(profile.layers) == len(lg) and profile.rows == ROWS
    assert P.loads(P.dumps(profile)) == profile
    assert P.from_json(json.loads(json.dumps(P.to_json(profile)))) == profile
    path = P.save(profile, tmp_path / "dev.json")
    assert P.load(path, lg=lg, max_layers=48, model="mlp") == profile
    text = str(profile)
    assert "DeviceProfile (measured, complete)" in text and "host-cpu" in text


def test_measured_memory(tiny):
    _, lg, profile = tiny
    for layer, lp in zip(lg.layers, profile.layers):
        assert lp.param_bytes == layer.param_bytes
        if layer.param_bytes:  # a Linear: weight and bias get gradients, Adam keeps two moments each
            assert lp.grad_bytes == layer.param_bytes
            assert lp.optimizer_bytes >= 2 * layer.param_bytes
            # it saves its input for the weight gradient: 8 or 16 floats per row
            assert lp.saved_bytes_per_row() in (8 * 4, 16 * 4)
        for cell in lp.cells:
            assert cell.fwd.repeats >= QUICK.min_repeats and cell.fwd.median > 0
            assert cell.peak_bytes >= 0
    assert max(c.peak_bytes for lp in profile.layers for c in lp.cells) > 0


def _edit(profile: P.DeviceProfile, change, keep_checksum: bool = False) -> str:
    data = P.to_json(profile)
    if not keep_checksum:
        del data["checksum"]  # a deliberate edit: only the field checks apply
    change(data)
    return json.dumps(data)


def _set_median(data, value):
    data["layers"][1]["cells"][0]["fwd"]["median"] = value


def _zero_times(data):
    for layer in data["layers"]:
        for cell in layer["cells"]:
            for t in (cell["fwd"], cell["bwd"]):
                t.update(median=0.0, mad=0.0, best=0.0)


REJECTIONS = {
    "empty": (lambda p: "", "empty"),
    "truncated": (lambda p: P.dumps(p)[: len(P.dumps(p)) // 2], "truncated"),
    "not json": (lambda p: "{format: profile}", "corrupt: invalid JSON"),
    "not an object": (lambda p: "[1, 2]", "expected a JSON object"),
    "other format": (lambda p: _edit(p, lambda d: d.update(format="asteroid-cluster")), "is this a profile"),
    "other version": (lambda p: _edit(p, lambda d: d.update(version=99)), "version 99 is not supported"),
    "edited": (lambda p: _edit(p, lambda d: _set_median(d, 1.0), keep_checksum=True), "checksum mismatch"),
    "negative time": (lambda p: _edit(p, lambda d: _set_median(d, -1.0)),
                      "'layers[1].cells[0].fwd.median' must be a finite number >= 0"),
    "nan time": (lambda p: _edit(p, lambda d: _set_median(d, math.nan)), "must be a finite number"),
    "missing field": (lambda p: _edit(p, lambda d: d.pop("device")), "missing field 'device'"),
    "unknown field": (lambda p: _edit(p, lambda d: d.update(extra=1)), "unknown field(s) 'extra'"),
    "wrong type": (lambda p: _edit(p, lambda d: d["device"].update(threads="one")),
                   "'device.threads' must be an integer"),
    "layer count": (lambda p: _edit(p, lambda d: d["layers"].pop()), "lists 2 layers but graph.layers is 3"),
    "rows order": (lambda p: _edit(p, lambda d: d.update(rows=[4, 2])), "strictly increasing"),
    "missing cell": (lambda p: _edit(p, lambda d: d["layers"][0]["cells"].pop()), "marked complete but layer 0"),
    "time of 1e300": (lambda p: _edit(p, lambda d: _set_median(d, 1e300)), "more than a day for one layer"),
    "every time 0": (lambda p: _edit(p, _zero_times), "every layer's forward and backward time at 2 rows is 0"),
    "bad cold timing": (lambda p: _edit(p, lambda d: d["layers"][0]["cells"][0]["cold"]["bwd"].pop("mad")),
                        "missing field 'layers[0].cells[0].cold.bwd.mad'"),
    "boundary value twice": (lambda p: _edit(p, lambda d: _boundary(d).append({"values": ["relu"], "saved_bytes": 0})),
                             "'layers[1].cells[0].boundary[1].values' names 'relu' again"),
    "boundary saves too much": (lambda p: _edit(p, lambda d: _boundary(d)[0].update(saved_bytes=10**6)),
                                "saved 1000000 bytes, more than the cell's saved_bytes"),
    "boundary without names": (lambda p: _edit(p, lambda d: _boundary(d)[0].update(values=[""])),
                               "must be a non-empty list of value names"),
    "boundary negative": (lambda p: _edit(p, lambda d: _boundary(d)[0].update(saved_bytes=-1)),
                          "'layers[1].cells[0].boundary[0].saved_bytes' must be an integer >= 0"),
    "boundary extra field": (lambda p: _edit(p, lambda d: _boundary(d)[0].update(bytes=1)),
                             "unknown field(s) 'layers[1].cells[0].boundary[0].bytes'"),
    "boundary not a list": (lambda p: _edit(p, lambda d: d["layers"][1]["cells"][0].update(boundary={})),
                            "'layers[1].cells[0].boundary' must be a list"),
}


def _boundary(data):
    """The boundary storages of the ReLU's first cell: its output, which it saves."""
    return data["layers"][1]["cells"][0]["boundary"]


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejects_bad_profiles(tiny, tmp_path, case):
    make, message = REJECTIONS[case]
    path = tmp_path / "bad.json"
    path.write_text(make(tiny[2]))
    with pytest.raises(P.ProfileError) as e:
        P.load(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_partial_profile_needs_allow_partial(tiny, tmp_path):
    profile = tiny[2]
    partial = dataclasses.replace(profile, complete=False,
                                  layers=tuple(dataclasses.replace(la, cells=la.cells[:1]) for la in profile.layers))
    path = P.save(partial, tmp_path / "partial.json")
    with pytest.raises(P.ProfileError, match="partial profile .3 of 6 cells missing"):
        P.load(path)
    assert P.load(path, allow_partial=True).missing() == [(0, 4), (1, 4), (2, 4)]


def test_rejects_other_model_and_graph(tiny, tmp_path):
    _, lg, profile = tiny
    path = P.save(profile, tmp_path / "dev.json")
    _, wider = measure.prepare(_mlp(hidden=32), (torch.randn(4, 8),), None, 48)
    with pytest.raises(P.ProfileError, match=r"measured for model 'mlp', not 'other'"):
        P.load(path, lg=wider, max_layers=48, model="other")
    with pytest.raises(P.ProfileError, match=r"layer 0 differs .*param_bytes 576 vs 1152"):
        P.load(path, lg=wider, max_layers=48)
    _, coarse = measure.prepare(_mlp(), (torch.randn(4, 8),), None, 2)
    with pytest.raises(P.ProfileError, match="max_layers=48, but this graph was linearized with max_layers=2"):
        P.load(path, lg=coarse, max_layers=2)
    # same layers and weights, another input size: only the cut sizes tell them apart
    _, small = measure.prepare(_ConvMean(), (torch.randn(2, 3, 8, 8),), None, 48)
    _, large = measure.prepare(_ConvMean(), (torch.randn(2, 3, 16, 16),), None, 48)
    conv = dataclasses.replace(profile, graph=P.graph_key(small, 48), complete=False,
                               layers=tuple(P.LayerProfile(i, la.nodes[0], la.nodes[-1], len(la.nodes), la.param_bytes)
                                            for i, la in enumerate(small.layers)))
    P.check_matches(conv, small, 48)
    with pytest.raises(P.ProfileError, match="another input shape"):
        P.check_matches(conv, large, 48)


# -- fits -----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4096), st.floats(-1e-3, 1.0, allow_nan=False)), min_size=1,
                max_size=8, unique_by=lambda p: p[0]))
def test_fitted_times_are_monotone(points):
    fit = P.monotone_fit(points)
    probes = sorted({0.5, *(r for r, _ in points), *(r * 1.5 for r, _ in points), 10_000.0})
    values = [fit(r) for r in probes]
    assert all(v >= 0 for v in values)
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))


def test_noisy_cells_fit_monotone(tiny):
    profile = tiny[2]
    layer = profile.layers[1]
    slow = P.Timing.exact(layer.cells[1].fwd.median * 3)
    noisy = dataclasses.replace(layer, cells=(P.Cell(1, slow, slow), *layer.cells))  # 1 row slower than 2
    p = dataclasses.replace(profile, layers=(profile.layers[0], noisy, profile.layers[2]), rows=(1, *ROWS))
    cost = p.layer_cost(1)
    values = [cost.fwd(r) for r in (1, 1.5, 2, 3, 4, 8, 64)]
    assert values == sorted(values)
    assert cost.source == "measured"


def test_overhead_fit_recovers_each_layers_call_overhead():
    own = [9e-6, 12e-6, 15e-6, 10e-6, 11e-6, 13e-6]  # what each layer pays when run alone
    work = [10e-6, 30e-6, 12e-6, 25e-6, 2e-3, 3e-3]  # the last two are heavy: their blocks are noise
    timed = [o + w for o, w in zip(own, work)]
    layers = [P.LayerProfile(i, f"n{i}", f"n{i}", 1, cells=(P.Cell(1, P.Timing.exact(t), P.Timing.exact(2 * t)),))
              for i, t in enumerate(timed)]
    blocks = []
    for a in range(len(timed) - 1):  # a pair pays its first layer's overhead only
        noise = 80e-6 if a >= 3 else 0.0
        fwd = own[a] + work[a] + work[a + 1] + noise
        bwd = 2 * (timed[a] + timed[a + 1]) - own[a + 1]
        blocks.append(P.Block(a, a + 2, 1, P.Timing.exact(fwd), P.Timing.exact(bwd)))
    typical, per_layer = measure.fit_overhead(layers, blocks)
    assert typical.fwd == pytest.approx(statistics.median(own[1:4]))  # the cheaper half of the pairs
    for i in (1, 2, 3):  # cheap pairs: each layer's own overhead
        assert per_layer[i].fwd == pytest.approx(own[i])
        assert per_layer[i].bwd == pytest.approx(own[i])
    assert per_layer[0].fwd == pytest.approx(typical.fwd)  # no pair ends in layer 0
    assert per_layer[4].fwd == per_layer[5].fwd == pytest.approx(typical.fwd)  # pairs too heavy to tell
    layers = [dataclasses.replace(la, overhead=o) for la, o in zip(layers, per_layer)]
    p = P.DeviceProfile("m", P.GraphKey("sha256:x", len(timed), None), P.DeviceInfo("host-cpu", "cpu", "x", 1, "t"),
                        P.Method(), (1,), tuple(layers), tuple(blocks), typical)
    assert p.stage_fwd_bwd(0, 3, 1)[0] == pytest.approx(own[0] + sum(work[:3]))


def _layer(index: int, points: dict[int, tuple[float, float]], param_bytes: int = 0,
           saved_per_row: int = 0) -> P.LayerProfile:
    """A layer with (warm, cold) forward seconds per row count; backward twice that."""
    cells = tuple(P.Cell(r, P.Timing.exact(w), P.Timing.exact(2 * w), saved_bytes=saved_per_row * r,
                         cold_fwd=P.Timing.exact(c), cold_bwd=P.Timing.exact(2 * c))
                  for r, (w, c) in sorted(points.items()))
    return P.LayerProfile(index, f"n{index}", f"n{index}", 1, param_bytes=param_bytes, grad_bytes=param_bytes,
                          cells=cells)


def test_stage_time_goes_from_warm_to_cold_with_the_working_set():
    cache = 1 << 20
    small = _layer(0, {1: (1e-3, 2e-3), 2: (2e-3, 3e-3)}, param_bytes=cache // 8)
    big = _layer(1, {1: (1e-3, 2e-3), 2: (2e-3, 3e-3)}, param_bytes=4 * cache)
    p = P.DeviceProfile("m", P.GraphKey("sha256:x", 2, None),
                        P.DeviceInfo("host-cpu", "cpu", "x", 1, "t", cache_bytes=cache), P.Method(), (1, 2),
                        (small, big))
    assert p.cold_share(0, 1, 1) == 0.0 and p.cold_share(1, 2, 1) == 1.0 and p.cold_share(0, 2, 1) == 1.0
    assert p.stage_fwd_bwd(0, 1, 1) == pytest.approx((1e-3, 2e-3))  # fits the cache: as timed alone
    assert p.stage_fwd_bwd(0, 2, 2) == pytest.approx((6e-3, 12e-3))  # outgrows it: flushed times
    middle = dataclasses.replace(big, param_bytes=cache // 2, grad_bytes=cache // 2)  # between 0.5 and 4 caches
    q = dataclasses.replace(p, layers=(small, middle))
    share = q.cold_share(0, 2, 1)
    assert 0.0 < share < 1.0
    assert q.stage_fwd_bwd(0, 2, 1)[0] == pytest.approx(2e-3 + share * 2e-3)
    # the LayerGraph gets the cold times; an unknown cache size counts as cold
    assert p.layer_cost(0).fwd(1) == pytest.approx(2e-3) and p.layer_cost(0, cold=False).fwd(1) == pytest.approx(1e-3)
    unknown = dataclasses.replace(p, device=dataclasses.replace(p.device, cache_bytes=0))
    assert unknown.cold_share(0, 1, 1) == 1.0


def test_probes_where_a_layer_bends_down():
    def cells(times: dict[int, float]) -> dict[tuple[int, int], P.Cell]:
        return {(0, r): P.Cell(r, P.Timing.exact(t), P.Timing.exact(t)) for r, t in times.items()}

    rows = (1, 2, 4, 8, 16, 32)
    straight = cells({r: 1e-4 + 1e-4 * r for r in rows})
    assert measure.probe_rows(straight, rows, 1) == {}
    # a faster kernel from 16 rows on: 16 rows cost what 11 did before, and the line 8..16 is too low at 15
    switch = cells({r: 1e-4 * (r if r < 16 else 0.7 * r) for r in rows})
    assert measure.probe_rows(switch, rows, 1) == {15: [0]}
    # a layer that bends up (its data outgrows a cache) is left alone
    assert measure.probe_rows(cells({r: 1e-4 * r ** 1.5 for r in rows}), rows, 1) == {}


def test_a_probed_row_count_joins_the_fit(tiny):
    profile = tiny[2]
    layer = profile.layers[0]
    t = layer.cells[-1].fwd.median
    probe = P.Cell(ROWS[-1] - 1, P.Timing.exact(2 * t), P.Timing.exact(2 * t))  # slower just below 4 rows
    probed = dataclasses.replace(layer, cells=(layer.cells[0], probe, layer.cells[1]))
    p = dataclasses.replace(profile, layers=(probed, *profile.layers[1:]))
    assert P.loads(P.dumps(p)) == p and not p.missing()
    assert p.layer_cost(0, cold=False).fwd(ROWS[-1] - 1) > profile.layer_cost(0, cold=False).fwd(ROWS[-1] - 1)
    # its cold time is its warm time scaled like its neighbour's
    near = layer.cells[-1]
    assert DP._cell_seconds(probed, probe, "fwd", True) == pytest.approx(2 * t * near.cold_fwd.median / t)


# -- measuring: resume, command line, compile -------------------------------------------------------


class _Stop(KeyboardInterrupt):
    pass


def test_resume_after_interrupt(tiny, tmp_path):
    captured, lg, _ = tiny
    path = tmp_path / "dev.json"

    def stop_in_the_second_row_count(ev: measure.Progress) -> None:
        if ev.rows == ROWS[1]:
            raise _Stop

    with pytest.raises(_Stop):
        measure.measure(captured, lg, ROWS, model="mlp", max_layers=48, method=QUICK,
                        checkpoint=lambda p: P.save(p, path), progress=stop_in_the_second_row_count)
    partial = P.load(path, allow_partial=True)
    assert not partial.complete and partial.missing() == [(i, ROWS[1]) for i in range(len(lg))]
    before = {(la.index, c.rows): c for la in partial.layers for c in la.cells}

    resumed = []
    final = measure.measure(captured, lg, ROWS, model="mlp", max_layers=48, method=QUICK, resume=partial,
                            progress=lambda ev: resumed.append((ev.layer, ev.rows)))
    assert final.complete and not final.missing()
    assert {r for _, r in resumed} == {ROWS[1]}  # only what was missing was measured
    assert len(resumed) == len(lg) * QUICK.rounds
    for (i, r), cell in before.items():
        assert final.layers[i].cell(r) == cell  # kept, not measured again
    assert set(partial.blocks) <= set(final.blocks) and final.elapsed_s >= partial.elapsed_s


def test_resume_refuses_another_device(tiny):
    captured, lg, profile = tiny
    other = dataclasses.replace(profile, complete=False, device=dataclasses.replace(profile.device, threads=7))
    with pytest.raises(P.ProfileError, match="threads 7"):
        measure.measure(captured, lg, ROWS, max_layers=48, method=QUICK, resume=other)


def test_tiny_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    argv = ["profile", "--model", "mlp:small", "--rows", "2,4", "--out", str(out), "--min-repeats", "2",
            "--max-repeats", "3", "--budget", "0", "--threads", "1"]
    assert _parse(argv).func(_parse(argv)) == 0
    profile = P.load(out)
    assert profile.model == "mlp:small" and profile.kind == "host-cpu" and profile.method.clock == "cpu"
    assert "DeviceProfile" in capsys.readouterr().out

    # an interrupted run leaves a partial file: drop cells as a kill would, then run it again
    data = json.loads(out.read_text())
    del data["checksum"]
    data["complete"] = False
    for layer in data["layers"][2:]:
        layer["cells"] = layer["cells"][:1]
    out.write_text(json.dumps(data))
    kept = P.load(out, allow_partial=True)
    assert _parse(argv).func(_parse(argv)) == 0
    again = P.load(out)
    assert again.complete and again.layers[0] == kept.layers[0] and again.layers[2].cells[0] == kept.layers[2].cells[0]
    assert "resuming" in capsys.readouterr().err

    from asteroid_fx import models

    entry = models.get("mlp")
    compiled = asteroid.compile(entry.build(small=True), "host-2", example=entry.example(8, True), loss=entry.loss,
                                microbatches=2, profiles=[out])
    lg = compiled.layer_graph
    assert all(layer.cost("host-cpu").source == "measured" for layer in lg.layers)
    assert step_s(lg, "host-cpu", (0, len(lg)), 4) > 0
    with pytest.raises(P.ProfileError, match="max_layers"):
        asteroid.compile(entry.build(small=True), "host-2", example=entry.example(8, True), max_layers=2,
                         microbatches=2, profiles=[out])

    # a device kind this machine is not: calibrated from the measured profile
    nano = tmp_path / "nano.json"
    argv = ["profile", "--model", "mlp:small", "--calibrate-from", str(out), "--kind", "jetson-nano",
            "--rows", "1,2,4,8", "--out", str(nano)]
    assert _parse(argv).func(_parse(argv)) == 0
    assert P.load(nano).source == "calibrated"
    mixed = asteroid.compile(entry.build(small=True), "host-cpu,jetson-nano", example=entry.example(8, True),
                             loss=entry.loss, microbatches=2, profiles=[out, nano])
    assert {layer.cost("jetson-nano").source for layer in mixed.layer_graph.layers} == {"calibrated"}


def test_compile_uses_the_measured_costs(tiny, tmp_path):
    _, lg, profile = tiny
    path = P.save(profile, tmp_path / "mlp.json")
    model, example = _mlp(), torch.randn(8, 8)
    analytic = asteroid.compile(model, "host-2", example=example, microbatches=2)
    measured = asteroid.compile(model, "host-2", example=example, microbatches=2, profiles=[path])
    for i, layer in enumerate(measured.layer_graph.layers):
        cost, want = layer.cost("host-cpu"), profile.layer_cost(i)
        assert cost.source == "measured" and cost.fwd(3) == pytest.approx(want.fwd(3))
        assert cost.bwd(3) == pytest.approx(want.bwd(3))
        assert cost.fwd(3) != pytest.approx(analytic.layer_graph.layers[i].cost("host-cpu").fwd(3))
    assert measured.plan.prediction.iteration_s != pytest.approx(analytic.plan.prediction.iteration_s)


def test_asteroid_cli_has_profile(capsys):
    from asteroid_fx import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["profile", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--rows" in text and "--links" in text and "--calibrate-from" in text and "resumes" in text


def test_profile_costs_checks_kinds(tiny):
    _, lg, profile = tiny
    with pytest.raises(P.ProfileError, match="second profile for device kind 'host-cpu'"):
        profile_costs(lg, [profile, profile], max_layers=48)
    nano = dataclasses.replace(profile, device=dataclasses.replace(profile.device, kind="jetson-nano"))
    with pytest.raises(P.ProfileError, match="cluster has kinds host-cpu"):
        profile_costs(lg, [nano], max_layers=48)
    replaced = profile_costs(lg, [profile], max_layers=48)
    assert replaced.layers[1].cost("host-cpu") == profile.layer_cost(1)
    assert lg.layers[1].cost("host-cpu").source == "analytic"  # the input is not changed


# -- calibration ----------------------------------------------------------------------------------


def test_calibrated_profile_for_a_kind_not_measured(tiny):
    captured, lg, profile = tiny
    calib = calibrate.fit([(captured, lg, profile)])
    assert calib.kind == "host-cpu" and all(f >= 0 for _, f in calib.fwd + calib.bwd)
    assert "Calibration from host-cpu" in str(calib)
    nano = calibrate.calibrated_profile(captured, lg, calib, "jetson-nano", rows=(1, 2, 4, 8), model="mlp",
                                        max_layers=48, memory_from=profile)
    assert nano.source == "calibrated" and nano.kind == "jetson-nano" and nano.graph == profile.graph
    assert P.loads(P.dumps(nano)) == nano
    assert nano.layers[1].cell(2).saved_bytes == profile.layers[1].cell(2).saved_bytes
    for i in range(len(lg)):
        cost = nano.layer_cost(i)
        values = [cost.fwd(r) + cost.bwd(r) for r in (1, 2, 4, 8, 16)]
        assert values == sorted(values) and values[-1] > 0
    # fitted on what a calibration predicts, a calibration predicts the same again: exactly, so a
    # fit that loses evidence or an application that drops a factor shows here, whatever the load
    host = calibrate.calibrated_profile(captured, lg, calib, "host-cpu", rows=ROWS, max_layers=48,
                                        memory_from=profile)
    refit = calibrate.calibrated_profile(captured, lg, calibrate.fit([(captured, lg, host)]), "host-cpu",
                                         rows=ROWS, max_layers=48, memory_from=profile)
    for r in ROWS:
        assert refit.stage_time(0, len(lg), r) == pytest.approx(host.stage_time(0, len(lg), r), rel=1e-9)
    # against the measurement it was fitted on, the same order of magnitude: this model's layers
    # take a fraction of a millisecond, where the host's load moves a measurement by several times
    measured, modelled = profile.stage_time(0, len(lg), 4), host.stage_time(0, len(lg), 4)
    assert 0.1 < modelled / measured < 10.0


def test_nnls_matches_a_known_solution():
    import numpy as np

    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert np.allclose(calibrate.nnls(a, np.array([2.0, 3.0, 5.0])), [2.0, 3.0])
    assert np.allclose(calibrate.nnls(a, np.array([2.0, -3.0, -1.0])), [0.5, 0.0])


# -- links ----------------------------------------------------------------------------------------


def test_fit_link_recovers_bandwidth_and_latency():
    sizes = (1024, 65536, 1 << 20)
    bw, lat = 1e8, 50e-6
    bandwidth, latency = linkprobe.fit_link(sizes, [2 * lat + s / bw for s in sizes])
    assert bandwidth == pytest.approx(bw) and latency == pytest.approx(lat)


def test_probe_two_local_workers_into_cluster_file(tmp_path, capsys):
    path = tmp_path / "cluster.json"
    Cluster.from_kinds(["host-cpu", "host-cpu"], "1Gbps", "1ms", name="pair").save(path)
    args = _parse(["profile", "--links", "--cluster", str(path), "--sizes", "1024,65536,1048576",
                   "--timeout", "60"])
    assert args.func(args) == 0
    cluster = Cluster.load(path)
    assert cluster.name == "pair" and cluster.names == ("host0", "host1")
    for i, j in ((0, 1), (1, 0)):
        assert 0 < cluster.bandwidth[i][j] < math.inf and cluster.bandwidth[i][j] != 125e6
        assert 0 <= cluster.latency[i][j] < 1.0
    assert "links: bandwidth" in capsys.readouterr().out


@pytest.mark.slow
def test_probe_three_workers_default_sizes():
    links = linkprobe.probe_local(3, timeout_s=120)
    assert len(links) == 3 and len(links.samples) == 6 * len(linkprobe.DEFAULT_SIZES)
    assert all(links.bandwidth[i][j] > 0 for i in range(3) for j in range(3) if i != j)


def test_apply_links_checks_the_device_count():
    links = linkprobe.Links(((math.inf, 1e9), (1e9, math.inf)), ((0.0, 1e-5), (1e-5, 0.0)))
    with pytest.raises(ValueError, match="measured 2 workers but the cluster has 3 devices"):
        linkprobe.apply_links(Cluster.from_kinds(["host-cpu"] * 3, "1Gbps"), links)
    applied = linkprobe.apply_links(Cluster.from_kinds(["host-cpu"] * 2, "1Gbps"), links)
    assert applied.bandwidth[0][1] == 1e9 and applied.latency[1][0] == 1e-5


def test_cli_needs_model_and_out():
    with pytest.raises(SystemExit, match="needs --model and --out"):
        args = _parse(["profile", "--rows", "1,2"])
        args.func(args)
    with pytest.raises(SystemExit):
        _parse(["profile", "--rows", "0,x"])

