"""Cluster description: catalog, presets, validation messages, units and the JSON file format."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asteroid_fx.ir import catalog
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.catalog import GiB, DeviceKind
from asteroid_fx.ir.cluster import (
    Cluster,
    Device,
    parse_bandwidth,
    parse_latency,
    parse_memory,
    resolve_cluster,
)


def two_nanos(**kw) -> Cluster:
    return Cluster.from_kinds(["jetson-nano", "jetson-nano"], 125e6, 0.5e-3, **kw)


# -- catalog ---------------------------------------------------------------------------------


def test_catalog_kinds_are_cited_and_sane():
    for name in ("jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano",
                 "jetson-agx-orin", "raspberry-pi-5", "laptop-i7"):
        k = catalog.kind(name)
        assert k.name == name
        assert k.source and k.peak_flops > 0 and k.memory_bandwidth > 0 and k.memory_bytes > 0
        assert 0 < k.efficiency <= 1 and k.overhead_s >= 0
    # The derived FP32 peaks from the datasheets (cores x 2 x clock).
    assert catalog.kind("jetson-nano").peak_flops == pytest.approx(235.9e9, rel=1e-3)
    assert catalog.kind("jetson-tx2").peak_flops == pytest.approx(665.6e9, rel=1e-3)
    assert catalog.kind("jetson-xavier-nx").peak_flops == pytest.approx(844.8e9, rel=1e-3)
    assert catalog.kind("jetson-nano").memory_bytes == 4 * GiB
    assert catalog.kind("jetson-nano").memory_bandwidth == 25.6e9


def test_unknown_kind_lists_known_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown device kind 'jetson-nanoo'.*jetson-nano.*host-cpu",
    ):
        catalog.kind("jetson-nanoo")


def test_bad_kind_numbers_rejected():
    with pytest.raises(ValueError, match=r"device kind 'x': efficiency must be in \(0, 1\]"):
        DeviceKind("x", 1e9, 1e9, GiB, 1.5, 0.0, "test")


def test_host_cpu_is_measured_and_cached():
    h = catalog.host_cpu()
    assert h.name == "host-cpu" and h.source == "measured on this machine"
    assert h.peak_flops > 0 and h.memory_bandwidth > 0 and h.memory_bytes > 0
    assert 0 < h.overhead_s < 1e-2
    assert catalog.kind("host-cpu") is h  # cached: every host device sees the same numbers


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"unknown cluster preset 'edge-9'.*edge-4-1g.*host-2"):
        catalog.preset("edge-9")


@pytest.mark.parametrize("name", sorted(catalog.PRESETS))
def test_every_preset_validates_and_round_trips(name, tmp_path):
    c = catalog.preset(name)
    assert c.name == name and len(c) >= 2
    assert Cluster.from_json(json.loads(json.dumps(c.to_json()))) == c
    c.save(tmp_path / "c.json")
    assert Cluster.load(tmp_path / "c.json") == c
    assert name in str(c)


def test_preset_links():
    c = catalog.preset("edge-4-1g")
    assert [d.kind for d in c.devices] == [
        "jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano"]
    assert c.link("nano0", "tx2-0") == (125e6, 0.5e-3)
    assert catalog.preset("edge-8-100m").link("nano0", "nano1")[0] == 12.5e6
    assert {d.kind for d in catalog.preset("host-3").devices} == {"host-cpu"}
    assert "laptop-i7" in {d.kind for d in catalog.preset("edge-5-mixed-1g").devices}


# -- construction and queries ----------------------------------------------------------------


def test_from_kinds_names_and_queries():
    c = Cluster.from_kinds(["jetson-nano", "jetson-tx2", "jetson-nano"], "1Gbps", "2ms", name="lab")
    assert c.names == ("nano0", "tx2-0", "nano1")
    assert c.index("nano1") == 2
    assert c.device("tx2-0").memory_bytes == 8 * GiB
    assert c.kind_of("nano1") is catalog.kind("jetson-nano")
    assert c.link("nano0", "nano1") == (125e6, 2e-3)
    assert c.bandwidth[0][0] == math.inf and c.latency[1][1] == 0.0
    with pytest.raises(
        ValueError,
        match=r"no device 'nano9' in cluster 'lab'; devices: nano0, tx2-0, nano1",
    ):
        c.index("nano9")


def test_lists_are_frozen_to_tuples_and_hashable():
    d = [Device("a", "jetson-nano"), Device("b", "jetson-tx2", 2 * GiB)]
    c = Cluster(d, [[math.inf, 1e6], [2e6, math.inf]], [[0, 1e-3], [1e-3, 0]])
    assert isinstance(c.devices, tuple) and isinstance(c.bandwidth[0], tuple)
    assert c == Cluster.from_json(c.to_json())
    assert hash(c) == hash(Cluster.from_json(c.to_json()))
    assert c.link("a", "b") == (1e6, 1e-3) and c.link("b", "a") == (2e6, 1e-3)  # asymmetric


def test_subset_keeps_links_in_given_order():
    c = Cluster(
        [Device("a", "jetson-nano"), Device("b", "jetson-tx2"), Device("c", "laptop-i7")],
        [[math.inf, 1, 2], [3, math.inf, 4], [5, 6, math.inf]],
        [[0, 0.1, 0.2], [0.3, 0, 0.4], [0.5, 0.6, 0]],
        name="x",
    )
    s = c.subset(["c", "a"])
    assert s.names == ("c", "a")
    assert s.link("c", "a") == (5, 0.5) and s.link("a", "c") == (2, 0.2)
    with pytest.raises(ValueError, match="no device 'z'"):
        c.subset(["a", "z"])
    with pytest.raises(ValueError, match="must be distinct"):
        c.subset(["a", "a"])


def test_str_shows_table_and_matrix():
    text = str(two_nanos(name="pair"))
    assert "cluster 'pair'" in text and "jetson-nano" in text and "4.00" in text
    assert "235.9" in text and "Mbit/s" in text and "1000" in text


# -- validation messages ---------------------------------------------------------------------


def test_unknown_kind_rejected():
    with pytest.raises(
        ValueError,
        match=r"device 'x0': unknown device kind 'tpu'; known kinds: jetson-nano",
    ):
        Device("x0", "tpu")


def test_negative_memory_rejected():
    with pytest.raises(
        ValueError,
        match=r"device 'nano0': memory_bytes must be positive, got -1; "
        r"give the memory budget in bytes",
    ):
        Device("nano0", "jetson-nano", -1)


def test_memory_above_physical_rejected():
    with pytest.raises(
        ValueError,
        match=r"device 'nano0': memory_bytes 8589934592 exceeds .* 'jetson-nano'",
    ):
        Device("nano0", "jetson-nano", 8 * GiB)


def test_non_square_matrix_rejected():
    d = [Device("a", "jetson-nano"), Device("b", "jetson-nano")]
    with pytest.raises(
        ValueError,
        match=r"bandwidth must be a square 2x2 matrix for 2 device\(s\), got 1 rows",
    ):
        Cluster(d, [[math.inf, 1.0]], [[0, 0], [0, 0]])
    with pytest.raises(
        ValueError,
        match=r"latency must be a square 2x2 matrix, but row 1 \('b'\) has 3 entries",
    ):
        Cluster(d, [[math.inf, 1.0], [1.0, math.inf]], [[0, 0], [0, 0, 0]])


def test_duplicate_names_rejected():
    d = [Device("a", "jetson-nano"), Device("a", "jetson-tx2")]
    with pytest.raises(
        ValueError,
        match=r"device names must be unique, but 'a' appear more than once",
    ):
        Cluster.uniform(d, 1e6)


def test_zero_bandwidth_rejected():
    d = [Device("a", "jetson-nano"), Device("b", "jetson-nano")]
    with pytest.raises(
        ValueError,
        match=r"bandwidth\[0\]\[1\] \(from 'a' to 'b'\) must be positive.*got 0",
    ):
        Cluster(d, [[math.inf, 0], [1.0, math.inf]], [[0, 0], [0, 0]])


def test_other_validation_errors():
    d = [Device("a", "jetson-nano"), Device("b", "jetson-nano")]
    with pytest.raises(
        ValueError,
        match=r"latency\[1\]\[0\] \(from 'b' to 'a'\) must be finite and >= 0",
    ):
        Cluster(d, [[math.inf, 1], [1, math.inf]], [[0, 0], [-1, 0]])
    with pytest.raises(ValueError, match=r"bandwidth\[0\]\[1\].*must be a number"):
        Cluster(d, [[math.inf, float("nan")], [1, math.inf]], [[0, 0], [0, 0]])
    with pytest.raises(ValueError, match="at least one device"):
        Cluster((), (), ())
    with pytest.raises(ValueError, match="device name must be a non-empty string"):
        Device("", "jetson-nano")
    with pytest.raises(ValueError, match=r"devices\[0\] must be a Device.*from_kinds"):
        Cluster(["jetson-nano"], [[math.inf]], [[0]])


# -- units -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("100kB", 100_000),
    ("1.5 GiB", 3 * 2**29), ("2048B", 2048), (1234, 1234), (4e9, 4 * 10**9),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("1Gbps", 125e6), ("100Mbps", 12.5e6), ("300 Mbps", 37.5e6), ("8Kbps", 1e3), ("8bps", 1.0),
    ("125MB/s", 125e6), ("1GB/s", 1e9), ("2 B/s", 2.0), ("10Gbit/s", 1.25e9), ("1MiB/s", 2**20),
    (5e6, 5e6),
])
def test_parse_bandwidth(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("0.5ms", 0.5e-3), ("2 ms", 2e-3), ("20us", 20e-6), ("1s", 1.0), ("100ns", 1e-7), (0.25, 0.25),
])
def test_parse_latency(text, expected):
    assert parse_latency(text) == pytest.approx(expected)


@pytest.mark.parametrize("parse, text, hint", [
    (parse_memory, "4 GX", "'4GiB'"),
    (parse_memory, "4096", "integer number of bytes"),  # a bare string number is ambiguous
    (parse_bandwidth, "1G", "'1Gbps'"),
    (parse_latency, "5 minutes", "'0.5ms'"),
])
def test_parse_errors_suggest_a_form(parse, text, hint):
    with pytest.raises(ValueError, match=f"cannot parse .*{text!r}.*{hint}"):
        parse(text)


# -- JSON ------------------------------------------------------------------------------------


def test_json_round_trip_and_canonical_file(tmp_path):
    c = two_nanos(name="pair")
    data = c.to_json()
    assert data["format"] == "asteroid-cluster" and data["version"] == 1
    assert data["bandwidth"][0][0] is None  # infinity as null
    assert Cluster.from_json(data) == c
    path = tmp_path / "pair.json"
    c.save(path)
    assert Cluster.load(path) == c
    assert json.loads(path.read_text()) == data
    assert [p.name for p in tmp_path.iterdir()] == ["pair.json"]  # no temp file left behind
    c.save(str(path))  # overwrite in place
    assert Cluster.load(path) == c


def test_hand_written_file_with_units_and_links(tmp_path):
    path = tmp_path / "lab.json"
    path.write_text(json.dumps({
        "format": "asteroid-cluster", "version": 1, "name": "lab",
        "devices": [
            {"name": "n0", "kind": "jetson-nano", "memory_bytes": "3GiB"},
            {"name": "p0", "kind": "raspberry-pi-5"},
        ],
        "links": {"bandwidth": "1Gbps", "latency": "0.5ms"},
    }))
    c = Cluster.load(path)
    assert c.device("n0").memory_bytes == 3 * GiB
    assert c.device("p0").memory_bytes == 8 * GiB
    assert c.link("n0", "p0") == (125e6, 0.5e-3)
    devices = [Device("n0", "jetson-nano", 3 * GiB), Device("p0", "raspberry-pi-5")]
    assert c == Cluster.uniform(devices, 125e6, 0.5e-3, name="lab")
    # Matrix entries may carry units too.
    data = c.to_json()
    data["bandwidth"] = [[None, "100Mbps"], ["1Gbps", None]]
    assert Cluster.from_json(data).link("n0", "p0")[0] == 12.5e6


def test_load_errors_name_file_and_field(tmp_path):
    path = tmp_path / "bad.json"
    good = two_nanos().to_json()

    path.write_text('{"format": "asteroid-cluster",\n  "version": 1,,\n}')
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(path))}: invalid JSON at line 2 column 16",
    ):
        Cluster.load(path)

    for mutate, pattern in [
        (lambda d: d.update(format="other"), r"field 'format' must be 'asteroid-cluster'"),
        (lambda d: d.update(version=2), r"field 'version' is 2, but .* reads version 1"),
        (lambda d: d.update(colour="red"), r"unknown field\(s\) 'colour'"),
        (lambda d: d["devices"][1].update(memory_bytes="lots"),
         r"devices\[1\]\.memory_bytes: cannot parse"),
        (lambda d: d["devices"][0].update(kind="tpu"),
         r"devices\[0\]: device 'nano0': unknown device kind 'tpu'"),
        (lambda d: d.update(links={"bandwidth": "1Gbps"}), r"give either 'links' .* not both"),
        (lambda d: d.pop("bandwidth"), r"missing field 'bandwidth'"),
        (lambda d: d["bandwidth"][0].__setitem__(1, 0),
         r"bandwidth\[0\]\[1\] \(from 'nano0' to 'nano1'\) must be positive"),
    ]:
        data = json.loads(json.dumps(good))
        mutate(data)
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {pattern}"):
            Cluster.load(path)


# -- measured kinds travel with the cluster ---------------------------------------------------


def _host(peak_flops: float) -> DeviceKind:
    return DeviceKind(catalog.HOST_CPU, peak_flops, 10e9, 16 * GiB, 0.7, 2e-6, "measured on this machine", "host")


@pytest.fixture
def measurements(monkeypatch):
    """``catalog.measure_host_cpu`` replaced by figures the test sets, counting the calls; a new
    process is a cleared cache (host-cpu is measured once per process)."""
    calls: list[float] = []
    figures = {"peak_flops": 20e9}

    def measure() -> DeviceKind:
        calls.append(figures["peak_flops"])
        return _host(figures["peak_flops"])

    catalog.host_cpu.cache_clear()
    monkeypatch.setattr(catalog, "measure_host_cpu", measure)
    yield calls, figures
    catalog.host_cpu.cache_clear()  # the next test measures the real machine again


def test_host_cpu_is_measured_once_and_shipped_with_the_cluster(measurements):
    from tests import zoo

    calls, figures = measurements
    # the launcher's process: the cluster measures host-cpu once and plans with it
    launcher = Cluster.from_kinds(["host-cpu", "host-cpu", "jetson-nano"], "1Gbps", "0.5ms")
    assert launcher.measured == (_host(20e9),) and launcher.kind_of("host0") == _host(20e9)
    planned = zoo.compiled("mlp", launcher)
    assert calls == [20e9]
    text = json.dumps(launcher.to_json())  # what the launcher puts in the store
    # a worker's process: this machine would measure other figures, but the cluster carries its own
    catalog.host_cpu.cache_clear()
    figures["peak_flops"] = 80e9
    worker = Cluster.from_json(json.loads(text))
    assert worker == launcher
    again = zoo.compiled("mlp", worker)
    assert calls == [20e9]  # not measured again
    assert again.layer_graph == planned.layer_graph
    assert again.plan.dumps() == planned.plan.dumps()
    # the same cluster built afresh there measures and plans with that machine's figures
    fresh = zoo.compiled("mlp", Cluster.from_kinds(["host-cpu", "host-cpu", "jetson-nano"], "1Gbps", "0.5ms"))
    assert calls == [20e9, 80e9]
    assert fresh.layer_graph != planned.layer_graph


def test_measured_kinds_in_json(measurements, tmp_path):
    calls, _ = measurements
    c = Cluster.uniform([Device("h0", "host-cpu", 4 * GiB), Device("n0", "jetson-nano")], "1Gbps", "0.5ms",
                        measured=[_host(30e9)])
    assert calls == []  # given figures are not measured
    c.save(tmp_path / "c.json")
    assert '"measured": [' in (tmp_path / "c.json").read_text()
    assert Cluster.load(tmp_path / "c.json") == c and calls == []
    assert c.subset(["n0"]).measured == () and c.subset(["h0"]).measured == c.measured
    assert "measured" not in two_nanos().to_json()  # spec-sheet kinds only: the file is as before
    hand = {"format": "asteroid-cluster", "version": 1, "measured": c.to_json()["measured"],
            "devices": [{"name": "h0", "kind": "host-cpu"}], "links": {"bandwidth": "1Gbps"}}
    assert Cluster.from_json(hand).device("h0").memory_bytes == 16 * GiB and calls == []  # the measured memory
    good = c.to_json()
    for mutate, pattern in [
        (lambda d: d.update(measured={}), r"field 'measured' must be a list"),
        (lambda d: d["measured"][0].pop("peak_flops"), r"measured\[0\]: missing field\(s\) 'peak_flops'"),
        (lambda d: d["measured"][0].update(colour=1), r"measured\[0\]: unknown field\(s\) 'colour'"),
        (lambda d: d["measured"][0].update(efficiency="high"), r"measured\[0\]\.efficiency must be a number"),
        (lambda d: d["measured"][0].update(efficiency=2.0), r"measured\[0\]: device kind 'host-cpu': efficiency"),
        (lambda d: d["measured"][0].update(name="jetson-nano"),
         r"measured\[0\]: kind 'jetson-nano' comes from the catalog's spec sheet"),
        (lambda d: d["measured"].append(dict(d["measured"][0])), r"measured\[1\]: kind 'host-cpu' is given twice"),
        (lambda d: d["devices"][0].update(kind="jetson-nano"), r"measured gives kind 'host-cpu', but no device is of it"),
    ]:
        data = json.loads(json.dumps(good))
        mutate(data)
        with pytest.raises(ValueError, match=rf"^cluster JSON: {pattern}"):
            Cluster.from_json(data)


# -- resolve_cluster -------------------------------------------------------------------------


def test_resolve_cluster_forms(tmp_path):
    c = two_nanos(name="pair")
    assert resolve_cluster(c) is c
    assert resolve_cluster("edge-4-1g") == catalog.preset("edge-4-1g")
    path = tmp_path / "pair.json"
    c.save(path)
    assert resolve_cluster(path) == c and resolve_cluster(str(path)) == c
    assert resolve_cluster(c.to_json()) == c
    by_kinds = resolve_cluster(["jetson-nano", "jetson-nano"], bandwidth="1Gbps", latency="0.5ms")
    assert by_kinds == two_nanos()
    assert resolve_cluster(list(c.devices), bandwidth=125e6, latency=0.5e-3) == two_nanos()
    assert resolve_cluster("jetson-nano, jetson-tx2").names == ("nano0", "tx2-0")
    with pytest.raises(ValueError, match=r"cannot resolve cluster 'edge-99'.*accepted: a Cluster"):
        resolve_cluster("edge-99")
    with pytest.raises(ValueError, match=r"cluster file .*missing\.json' does not exist"):
        resolve_cluster(str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="accepted: a Cluster, a list of Device"):
        resolve_cluster(42)  # type: ignore[arg-type]


# -- property: any valid cluster survives JSON -----------------------------------------------

_STATIC_KINDS = sorted(catalog.KINDS)


@st.composite
def clusters(draw) -> Cluster:
    n = draw(st.integers(1, 5))
    names = draw(st.lists(st.text("abcxyz019_-", min_size=1, max_size=6), min_size=n, max_size=n,
                          unique=True))
    devices = []
    for name in names:
        kind = draw(st.sampled_from(_STATIC_KINDS + ["host-cpu"]))
        cap = catalog.kind(kind).memory_bytes
        devices.append(Device(name, kind, draw(st.one_of(st.none(), st.integers(1, cap)))))
    bw = st.one_of(st.floats(1e-3, 1e13, allow_nan=False), st.just(math.inf))
    lat = st.floats(0, 10, allow_nan=False)
    bandwidth = [[math.inf if i == j else draw(bw) for j in range(n)] for i in range(n)]
    latency = [[0.0 if i == j else draw(lat) for j in range(n)] for i in range(n)]
    return Cluster(devices, bandwidth, latency, name=draw(st.text(max_size=8)))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clusters())
def test_random_clusters_round_trip(tmp_path, c):
    assert Cluster.from_json(json.loads(json.dumps(c.to_json()))) == c
    path = tmp_path / "c.json"
    c.save(path)
    assert Cluster.load(path) == c
    assert c.subset(list(reversed(c.names))).subset(list(c.names)) == c
    str(c)  # renders for any valid cluster
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("name, shown", [("nano\u202e0", "U+202E"), ("a/b", "'/'"), ("../x", "'/'"),
                                          ("n\x00", "U+0000"), ("x" * 65, "65 characters")])
def test_a_device_name_that_could_not_be_a_file_name_or_shown_plainly_is_refused(name, shown):
    with pytest.raises(InputError, match=re.escape(shown)):
        Device(name, "jetson-nano")


def test_device_names_of_letters_digits_and_marks_are_fine():
    assert [Device(n, "jetson-nano").name for n in ("tx2-0", "pi_5.a", "nœud0")] == ["tx2-0", "pi_5.a", "nœud0"]
