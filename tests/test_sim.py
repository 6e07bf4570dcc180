"""sim: hand-checkable pipelines against their closed forms (GPipe, 1F1B, with and without
communication), link sharing (sender, receiver, one pair in order, full duplex, a shared medium,
max-min fairness), the all-reduce ring, the memory timeline against the planner's in-flight count,
deadlocks reported as the dry run reports them, the planner's prediction against the simulation of
the compiled program for every zoo model, and the exports (Chrome trace schema, Gantt, grid, CLI)."""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.costs import Cost, TimeFit
from asteroid_fx.cost.estimate import ADAM_STATE_FACTOR, device_memory, in_flight, ring_allreduce_s
from asteroid_fx.ir.layer_graph import Cut, Layer, LayerGraph
from asteroid_fx.ir.plan import Plan, StagePlan
from asteroid_fx.ir.program import Op
from asteroid_fx.ir.program_text import parse_program
from asteroid_fx.cli.simulate import register as register_cli
from asteroid_fx.ir.layer_graph import costs_from_json, costs_to_json, write_costs
from asteroid_fx.passes.lower import planned_program
from asteroid_fx.sim import simulate, transfer_bytes
from asteroid_fx.sim.network import Flow as _Flow, fair_rates as _fair_rates
from asteroid_fx.ir.verify import DeadlockError, dry_run

KIND = "jetson-nano"


def chain(fwd, bwd, *, cut_bytes: float = 0.0, params: int = 0, buffers: int = 0, saved: float = 0.0) -> LayerGraph:
    """A LayerGraph of len(fwd) layers whose layer i takes fwd[i] / bwd[i] seconds per row."""
    layers = tuple(Layer(i, (f"n{i}",), ((KIND, Cost(TimeFit(((1.0, f),)), TimeFit(((1.0, b),)))),), params,
                         buffers, saved) for i, (f, b) in enumerate(zip(fwd, bwd)))
    cuts = tuple(Cut(i, ("x",), cut_bytes, True) for i in range(len(layers) + 1))
    return LayerGraph(layers, cuts)


def cluster(names, bandwidth: float = math.inf, latency: float = 0.0) -> Cluster:
    return Cluster.uniform([Device(n, KIND) for n in names], bandwidth=bandwidth, latency=latency)


def plan(groups, rows, microbatches: int, schedule: str) -> Plan:
    """One layer per stage."""
    stages = tuple(StagePlan((p, p + 1), tuple(g), tuple(r)) for p, (g, r) in enumerate(zip(groups, rows)))
    return Plan(stages, microbatches, sum(rows[0]), schedule, "test")


def pipeline(S: int, M: int, schedule: str) -> Plan:
    return plan([[f"d{p}"] for p in range(S)], [[1]] * S, M, schedule)


def run(pl: Plan, lg: LayerGraph, cl: Cluster, **kw):
    return simulate(planned_program(pl, lg), lg, cl, **kw)


# ------------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S", [2, 4])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_uniform_pipeline_without_communication(schedule, S, M):
    f, b = 1e-3, 2.5e-3
    sim = run(pipeline(S, M, schedule), chain([f] * S, [b] * S), cluster([f"d{p}" for p in range(S)]))
    assert sim.iteration_s == pytest.approx((M + S - 1) * (f + b), rel=1e-12)
    assert sim.throughput == pytest.approx(M / sim.iteration_s)
    for r in sim.devices:  # every device computes M (f + b); the rest of the iteration is bubble
        assert r.compute_s == pytest.approx(M * (f + b))
        assert r.bubble == pytest.approx((S - 1) / (M + S - 1))


def test_gpipe_with_unequal_stages_is_two_flow_shops():
    f, b, M = [1.0, 3.0, 2.0, 1.0], [2.0, 5.0, 3.0, 2.0], 5
    sim = run(pipeline(4, M, "gpipe"), chain(f, b), cluster([f"d{p}" for p in range(4)]))
    assert sim.iteration_s == pytest.approx(sum(f) + (M - 1) * max(f) + sum(b) + (M - 1) * max(b))


@pytest.mark.parametrize("S", [2, 4])
@pytest.mark.parametrize("link", ["latency", "bandwidth"])
def test_gpipe_with_communication(S, link):
    f, b, c, M = 1.0, 2.0, 0.5, 6
    lg = chain([f] * S, [b] * S, cut_bytes=1000.0)
    cl = cluster([f"d{p}" for p in range(S)], latency=c) if link == "latency" else \
        cluster([f"d{p}" for p in range(S)], bandwidth=1000.0 / c)
    assert run(pipeline(S, M, "gpipe"), lg, cl).iteration_s == pytest.approx((M + S - 1) * (f + b) + 2 * (S - 1) * c)


def test_a_slow_link_is_a_stage_of_its_own():
    """Messages of one pair go in order: a link slower than the compute is one more flow-shop
    machine (forward: f, c, f; backward: b, c, b)."""
    f, b, c, M = 1.0, 2.0, 1.5, 4
    sim = run(pipeline(2, M, "gpipe"), chain([f, f], [b, b], cut_bytes=1000.0), cluster(["d0", "d1"], bandwidth=1000.0 / c))
    assert sim.iteration_s == pytest.approx((2 * f + c) + (M - 1) * c + (2 * b + c) + (M - 1) * b)
    first = [t for t in sim.transfers if t.src == "d0"]
    assert [t.started for t in first] == pytest.approx([1.0, 2.5, 4.0, 5.5])  # one after another
    assert [t.drained for t in first] == pytest.approx([2.5, 4.0, 5.5, 7.0])


@pytest.mark.parametrize("link", ["latency", "bandwidth"])
def test_one_f_one_b_with_communication_by_hand(link):
    """S=2, M=3, f=1, b=2, c=0.5, worked out on paper: s0 F0 [0,1] F1 [1,2]; s1 F0 [1.5,2.5]
    B0 [2.5,4.5]; s0 B0 [5,7]; s1 F1 [4.5,5.5] B1 [5.5,7.5]; s0 F2 [7,8] B1 [8,10]; s1 F2
    [8.5,9.5] B2 [9.5,11.5]; s0 B2 [12,14]. The round trip makes 1F1B slower than GPipe here."""
    lg = chain([1.0, 1.0], [2.0, 2.0], cut_bytes=1000.0)
    cl = cluster(["d0", "d1"], latency=0.5) if link == "latency" else cluster(["d0", "d1"], bandwidth=2000.0)
    sim = run(pipeline(2, 3, "1f1b"), lg, cl)
    assert sim.iteration_s == pytest.approx(14.0)
    spans = [(s.label, s.start, s.end) for s in sim.spans if s.device == "d0" and s.what == "compute"]
    assert spans == [("F s0 mb0", 0, 1), ("F s0 mb1", 1, 2), ("B s0 mb0", 5, 7), ("F s0 mb2", 7, 8),
                     ("B s0 mb1", 8, 10), ("B s0 mb2", 12, 14)]
    assert sim.device("d0").wait_s == pytest.approx(3 + 2)
    path = [(x.what, x.where, round(x.start, 9), round(x.end, 9)) for x in sim.critical_path()]
    assert path == ([
        ("compute", "d0", 0, 1), ("link", "d0 -> d1", 1, 1.5), ("compute", "d1", 1.5, 2.5), ("compute", "d1", 2.5, 4.5),
        ("link", "d1 -> d0", 4.5, 5), ("compute", "d0", 5, 7), ("compute", "d0", 7, 8), ("link", "d0 -> d1", 8, 8.5),
        ("compute", "d1", 8.5, 9.5), ("compute", "d1", 9.5, 11.5), ("link", "d1 -> d0", 11.5, 12),
        ("compute", "d0", 12, 14)])
    assert sim.binding() == "compute (86% of the critical path; most: d0 of stage 0, 43%)"
    assert run(pipeline(2, 3, "gpipe"), lg, cl).iteration_s == pytest.approx(13.0)


# ------------------------------------------------------------------------------------------------
# links


def test_a_sender_shares_its_link_and_a_receiver_its_own():
    """a sends one row to b and one to c at once (each alone: 1 s), then both send gradients back
    to a at once: 2 s each way."""
    lg = chain([0.0, 0.0], [0.0, 0.0], cut_bytes=1000.0)
    sim = run(plan([["a"], ["b", "c"]], [[2], [1, 1]], 1, "1f1b"), lg, cluster(["a", "b", "c"], bandwidth=1000.0))
    assert sim.iteration_s == pytest.approx(4.0)
    sends = sorted((t.src, t.dst, round(t.drained - t.started, 9)) for t in sim.transfers if t.label.startswith("SEND"))
    assert sends == [("a", "b", 2.0), ("a", "c", 2.0), ("b", "a", 2.0), ("c", "a", 2.0)]


def test_full_duplex_and_a_shared_medium():
    """a->c and b->d at once, then back: separate links take 1 s each way; one Wi-Fi channel 2 s."""
    lg = chain([0.0, 0.0], [0.0, 0.0], cut_bytes=1000.0)
    pl = plan([["a", "b"], ["c", "d"]], [[1, 1], [1, 1]], 1, "1f1b")
    cl = cluster(["a", "b", "c", "d"], bandwidth=1000.0)
    assert run(pl, lg, cl).iteration_s == pytest.approx(2.0)
    shared = run(pl, lg, cl, shared_medium=True)
    assert shared.iteration_s == pytest.approx(4.0)
    assert "shared medium" in shared.binding()


def _flow(*uses):
    return _Flow(tuple((u, 1.0) for u in uses), 1.0, 1.0, 0.0, None, (), 0.0, None)


def test_fair_shares_are_max_min():
    # out channels 0 (a), 2 (e), 4 (f); in channels 7 (b), 9 (c). c receives three flows: 1/3 each;
    # a's other flow takes what a's link has left, 2/3, not an equal half.
    ab, ac, ec, fc = _flow(0, 7), _flow(0, 9), _flow(2, 9), _flow(4, 9)
    _fair_rates([ab, ac, ec, fc])
    assert [f.rate for f in (ab, ac, ec, fc)] == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 3])
    # full duplex: a->b and b->a do not share
    ab, ba = _flow(0, 3), _flow(2, 1)
    _fair_rates([ab, ba])
    assert [ab.rate, ba.rate] == [1.0, 1.0]
    # one medium for all: halves
    ab, ba = _flow(0, 3, -1), _flow(2, 1, -1)
    _fair_rates([ab, ba])
    assert [ab.rate, ba.rate] == pytest.approx([0.5, 0.5])


def test_allreduce_is_a_ring_bounded_by_its_slowest_link():
    params, buffers = 3000, 600
    lg = chain([0.0], [0.0], params=params, buffers=buffers)
    pl = plan([["a", "b", "c"]], [[1, 1, 1]], 1, "1f1b")
    bw = [[math.inf, 1e3, 1e3], [1e3, math.inf, 250.0], [1e3, 1e3, math.inf]]  # b -> c is slow
    lat = [[0.0, 0.01, 0.01], [0.01, 0.0, 0.02], [0.01, 0.01, 0.0]]
    cl = Cluster([Device(n, KIND) for n in "abc"], bw, lat)
    sim = run(pl, lg, cl)
    nbytes = params + buffers
    assert sim.iteration_s == pytest.approx(2 * 2 / 3 * nbytes / 250.0 + 2 * 2 * 0.02)
    assert sim.iteration_s == pytest.approx(ring_allreduce_s(cl, ("a", "b", "c"), nbytes))
    assert all(r.allreduce_s == pytest.approx(sim.iteration_s) for r in sim.devices)
    # on one medium, all three edges' bytes go over the air one after another
    shared = run(pl, lg, cl, shared_medium=True)
    assert shared.iteration_s == pytest.approx(2 * 2 / 3 * nbytes * (1 / 1e3 + 1 / 250.0 + 1 / 1e3) + 2 * 2 * 0.02)


def test_transfer_bytes_are_rows_times_the_specs():
    p = parse_program("asteroid-program v1\nschedule 1f1b\nmicrobatches 1\nmicrobatch_rows 3\n"
                      "stage 0 layers 0:1 a[0:3]\nstage 1 layers 1:2 b[0:3]\n\ndevice a\n"
                      "  SEND act s0 mb0 r0:3 -> b : f32(4,2) i64() b8(5)\ndevice b\n"
                      "  RECV act s0 mb0 r0:3 <- a : f32(4,2) i64() b8(5)\n")
    assert transfer_bytes(p.of("a")[0]) == 3 * (4 * 2 * 4 + 8 + 5)


# ------------------------------------------------------------------------------------------------
# memory


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_memory_peak_is_the_planners_in_flight_count(schedule):
    S, M, rows = 4, 8, 3
    lg = chain([1e-3, 2e-3, 1e-3, 1e-3], [2e-3, 3e-3, 2e-3, 2e-3], cut_bytes=512.0, params=10_000, buffers=64,
               saved=1000.0)
    pl = plan([[f"d{p}"] for p in range(S)], [[rows]] * S, M, schedule)
    sim = run(pl, lg, cluster([f"d{p}" for p in range(S)], bandwidth=1e6, latency=1e-4))
    for p, r in enumerate(sim.devices):
        k = in_flight(schedule, p, S, M)
        assert k == (M if schedule == "gpipe" else S - p)
        assert r.memory.peak_bytes == device_memory(lg, (p, p + 1), rows, k, ADAM_STATE_FACTOR)
        static = device_memory(lg, (p, p + 1), rows, 0, ADAM_STATE_FACTOR)
        assert r.memory.points[0] == (0.0, static) and r.memory.points[-1][1] == static  # all freed
        assert (r.memory.weights, r.memory.gradients, r.memory.optimizer, r.memory.buffers) == (10_000, 10_000, 20_000, 64)
        live = max(n for _, n in r.memory.points) - static
        assert live == pytest.approx(k * (1000.0 + 2 * 512.0) * rows, abs=1)


# ------------------------------------------------------------------------------------------------
# deadlocks


DEADLOCK = """asteroid-program v1
schedule 1f1b
microbatches 1
microbatch_rows 2
stage 0 layers 0:1 a[0:2]
stage 1 layers 1:2 b[0:2]

device a
  F s0 mb0 r0:2
  RECV grad s0 mb0 r0:2 <- b : f32(4)
  SEND act s0 mb0 r0:2 -> b : f32(4)
  B s0 mb0 r0:2
  STEP s0
device b
  RECV act s0 mb0 r0:2 <- a : f32(4)
  F s1 mb0 r0:2
  B s1 mb0 r0:2
  SEND grad s0 mb0 r0:2 -> a : f32(4)
  STEP s1
"""


def test_a_deadlock_is_reported_not_hung():
    p = parse_program(DEADLOCK)
    lg = chain([1.0, 1.0], [1.0, 1.0])
    with pytest.raises(DeadlockError) as info:
        simulate(p, lg, cluster(["a", "b"]))
    message = str(info.value)
    assert "deadlock at t=2000.000 ms" in message  # after a's F of two rows
    assert "device a, line 10: RECV grad s0 mb0 r0:2 <- b" in message
    assert "device b, line 15: RECV act s0 mb0 r0:2 <- a" in message
    assert "on a (line 11), but a is blocked at line 10" in message
    assert info.value.blocked == {"a": 1, "b": 0}
    with pytest.raises(DeadlockError):
        dry_run(p)


def test_a_recv_without_a_send_and_a_group_that_never_meets():
    lonely = DEADLOCK.replace("  SEND act s0 mb0 r0:2 -> b : f32(4)\n", "").replace(
        "  RECV grad s0 mb0 r0:2 <- b : f32(4)\n", "")
    with pytest.raises(DeadlockError, match="which a never runs"):
        simulate(parse_program(lonely), chain([1.0, 1.0], [1.0, 1.0]), cluster(["a", "b"]))
    group = ("asteroid-program v1\nschedule 1f1b\nmicrobatches 1\nmicrobatch_rows 2\n"
             "stage 0 layers 0:1 a[0:1] b[1:2]\n\ndevice a\n  ALLREDUCE s0 [a b]\n  STEP s0\n"
             "device b\n  STEP s0\n")
    with pytest.raises(DeadlockError, match="waits for its group, but b has finished all its actions"):
        simulate(parse_program(group), chain([1.0], [1.0]), cluster(["a", "b"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(S=st.integers(1, 3), M=st.integers(1, 4), schedule=st.sampled_from(["1f1b", "gpipe"]),
       wide=st.booleans(), data=st.data())
def test_deadlocks_are_the_dry_runs(S, M, schedule, wide, data):
    """Swap two actions of one device: the simulation deadlocks exactly when the dry run does, and
    otherwise every transfer arrives after it was posted and before the RECV that waits for it ends."""
    groups = [[f"s{p}a", f"s{p}b"] if wide and p % 2 == 0 else [f"s{p}a"] for p in range(S)]
    rows = [[2, 2] if len(g) == 2 else [4] for g in groups]
    lg = chain([1e-3] * S, [2e-3] * S, cut_bytes=4000.0, params=1000)
    program = planned_program(plan(groups, rows, M, schedule), lg)
    device, acts = data.draw(st.sampled_from(program.actions))
    i = data.draw(st.integers(0, len(acts) - 1))
    j = data.draw(st.integers(0, len(acts) - 1))
    swapped = list(acts)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    mutated = type(program)(program.schedule, M, program.microbatch_rows, program.stages,
                            tuple((d, tuple(swapped) if d == device else a) for d, a in program.actions))
    cl = cluster([d for g in groups for d in g], bandwidth=1e6, latency=1e-4)
    try:
        dry_run(mutated)
        expect_deadlock = False
    except DeadlockError:
        expect_deadlock = True
    event("deadlock" if expect_deadlock else "runs")
    if expect_deadlock:
        with pytest.raises(DeadlockError):
            simulate(mutated, lg, cl)
        return
    sim = simulate(mutated, lg, cl)
    for t in sim.transfers:
        assert t.posted <= t.started <= t.drained <= t.arrived
    for d, acts in mutated.actions:  # a device does one thing at a time, in its order
        mine = sorted((s for s in sim.spans if s.device == d), key=lambda s: (s.start, s.index))
        for x, y in zip(mine, mine[1:]):
            assert x.end <= y.start + 1e-12 and x.index <= y.index
    path = sim.critical_path()  # from 0 to the end, without a gap
    assert path[0].start == 0 and path[-1].end == pytest.approx(sim.iteration_s)
    assert all(x.end == pytest.approx(y.start, abs=1e-12) for x, y in zip(path, path[1:]))


# ------------------------------------------------------------------------------------------------
# the planner's prediction is the simulation of the compiled program


@pytest.mark.parametrize("cluster_name", ["edge-4-1g", "edge-8-100m"])
@pytest.mark.parametrize("model", sorted(models.ZOO))
def test_prediction_is_the_simulated_time_of_the_compiled_program(model, cluster_name):
    entry = models.get(model)
    torch.manual_seed(0)
    compiled = asteroid.compile(entry.build(small=True), cluster_name, example=entry.example(16, True),
                                loss=entry.loss, microbatches=4)
    sim = compiled.simulate()
    predicted = compiled.plan.prediction
    assert predicted.iteration_s == pytest.approx(sim.iteration_s, rel=0.02)
    assert predicted.throughput == pytest.approx(sim.throughput, rel=0.02)
    memory = {u.device: u.memory_bytes for u in predicted.devices if u.stage is not None}
    assert memory == {r.device: r.memory.peak_bytes for r in sim.devices}
    # the bytes a SEND of activations moves are the cut's bytes per row times its rows
    lg = compiled.layer_graph
    for device, acts in compiled.program.actions:
        for a in acts:
            if a.op == Op.SEND and a.payload == "act":
                cut = compiled.program.stages[a.stage].layers[1]
                assert transfer_bytes(a) == lg.cuts[cut].bytes_per_row * (a.rows[1] - a.rows[0])


# ------------------------------------------------------------------------------------------------
# exports


@pytest.fixture(scope="module")
def hybrid():
    """Two stages, the first a group of two (so an ALLREDUCE), with real communication."""
    lg = chain([1e-3, 2e-3, 1e-3], [2e-3, 4e-3, 2e-3], cut_bytes=40_000.0, params=50_000, saved=2000.0)
    pl = Plan((StagePlan((0, 2), ("a", "b"), (3, 1)), StagePlan((2, 3), ("c",), (4,))), 4, 4, "1f1b", "test")
    return run(pl, lg, cluster(["a", "b", "c"], bandwidth=125e6, latency=5e-4))


def test_chrome_trace_schema(hybrid, tmp_path):
    path = tmp_path / "trace.json"
    hybrid.trace(path)
    trace = json.loads(path.read_text())
    assert set(trace) >= {"traceEvents", "displayTimeUnit"} and trace["displayTimeUnit"] in ("ms", "ns")
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    required = {"X": {"name", "ph", "ts", "dur", "pid", "tid"}, "M": {"name", "ph", "pid", "args"},
                "C": {"name", "ph", "ts", "pid", "args"}}
    tracks: dict[tuple[int, int], list[tuple[float, float]]] = {}
    names: dict[tuple[int, int], str] = {}
    for e in events:
        assert e["ph"] in required, e
        assert required[e["ph"]] <= set(e), e
        assert isinstance(e["name"], str) and isinstance(e["pid"], int)
        if "tid" in e:
            assert isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0 and e["dur"] >= 0
            tracks.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
        elif e["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in e["args"].values())
        elif e["name"] == "thread_name":
            names[(e["pid"], e["tid"])] = e["args"]["name"]
    # a compute track and link tracks per device, and no slices overlapping on a track
    assert sorted(names.values()) == sorted(["compute", "link out", "link in"] * 3)
    for key, spans in tracks.items():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:])), names[key]
    assert {e["cat"] for e in events if e["ph"] == "X"} >= {"compute", "link", "allreduce"}
    assert trace["otherData"]["iteration_ms"] == pytest.approx(hybrid.iteration_s * 1e3)


def test_grid_is_steps_by_devices(hybrid):
    grid = hybrid.grid().splitlines()
    assert [c.strip() for c in grid[0].split("|")] == ["step", "t (ms)", "a", "b", "c"]
    assert grid[2].split("|")[2].strip() == "0F0" and grid[2].split("|")[3].strip() == "0F0"
    assert any("0AR" in line for line in grid)
    assert sum(line.count("F") for line in grid[2:]) == 4 * 3  # every forward once


def test_gantt_png_and_svg(hybrid, tmp_path):
    pytest.importorskip("matplotlib")
    png = hybrid.gantt(tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = hybrid.gantt(tmp_path / "g.svg")
    assert "<svg" in svg.read_text()
    with pytest.raises(ValueError, match="ending in .png"):
        hybrid.gantt(tmp_path / "g.gif")


def test_gantt_without_matplotlib_says_what_to_install(hybrid, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'asteroid-fx\[plot\]'"):
        hybrid.gantt(tmp_path / "g.png")


def test_summary_names_what_binds(hybrid):
    text = str(hybrid)
    assert f"iteration {hybrid.iteration_s * 1e3:.2f} ms" in text and "bound by" in text
    assert "critical path: compute" in text
    assert [line.split()[0] for line in text.splitlines()[4:]] == ["a", "b", "c"]


def test_the_critical_path_tiles_the_iteration(hybrid):
    path = hybrid.critical_path()
    assert path[0].start == 0 and path[-1].end == pytest.approx(hybrid.iteration_s)
    assert all(x.end == pytest.approx(y.start) for x, y in zip(path, path[1:]))
    assert {x.what for x in path} <= {"compute", "link", "allreduce"} and "allreduce" in {x.what for x in path}


def test_costs_round_trip_and_the_simulate_command(tmp_path, capsys):
    entry = models.get("mlp")
    torch.manual_seed(0)
    compiled = asteroid.compile(entry.build(small=True), "edge-4-1g", example=entry.example(16, True),
                                loss=entry.loss, microbatches=2, stages=2)
    assert costs_from_json(json.loads(json.dumps(costs_to_json(compiled.layer_graph)))) == compiled.layer_graph
    out = compiled.save(tmp_path / "out")
    parser = argparse.ArgumentParser(prog="asteroid")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", str(out), "--trace", str(tmp_path / "t.json"), "--grid"])
    if not (out / "costs.json").exists():  # until Compiled.save writes it
        with pytest.raises(SystemExit, match="costs.json"):
            args.func(args)
        write_costs(compiled.layer_graph, out / "costs.json")
    capsys.readouterr()
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"iteration {compiled.simulate().iteration_s * 1e3:.2f} ms" in printed
    assert "step | t (ms)" in printed
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]


def test_the_critical_path_ends_on_links_of_absurd_latency():
    """A latency of 2**63 s (hostile cluster files reach the planner) makes the walk's time
    tolerance span several spans; the walk still ends, every step once, and the plan says what binds."""
    import dataclasses

    from asteroid_fx.passes.planners.predict import predict

    entry = models.get("mlp")
    torch.manual_seed(0)
    cluster = Cluster.uniform([Device(n, "laptop-i7") for n in ("a", "b", "c")], bandwidth="1Gbps", latency=1e-4)
    compiled = asteroid.compile(entry.build(small=True), cluster, example=entry.example(24, True), loss=entry.loss,
                                microbatches=3, groups=[["a", "b"], ["c"]], rows=[[5, 3], [8]])
    latency = [list(r) for r in cluster.latency]
    latency[2][0] = float(2**63)  # c -> a
    hostile = dataclasses.replace(cluster, latency=tuple(tuple(r) for r in latency))
    # the plan the planner's polish met there: c's gradients to a take 2**63 s
    plan = Plan((StagePlan((0, 3), ("a",), (2,)), StagePlan((3, 6), ("b", "c"), (1, 1))), 12, 2, "1f1b+4", "x")
    pred = predict(plan, compiled.layer_graph, hostile, ADAM_STATE_FACTOR)
    assert math.isfinite(pred.iteration_s) and pred.binding
