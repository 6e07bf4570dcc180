"""Every reader of an IR file (plan, costs, profile, cluster, program JSON) turns a bad or cut-short
file into an AsteroidError that names the file and the field, never a KeyError, IndexError or
TypeError from inside the reader. Each sample document is mutated: every key dropped in turn,
every value given a wrong type, the text truncated."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from asteroid_fx.ir import profile as P
from asteroid_fx.ir.catalog import DeviceKind
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.costs import Cost, TimeFit
from asteroid_fx.ir.errors import AsteroidError
from asteroid_fx.ir.layer_graph import BatchStat, Cut, Layer, LayerGraph, costs_from_json, costs_to_json, read_costs
from asteroid_fx.ir.plan import DeviceUse, Plan, Prediction, StagePlan
from asteroid_fx.ir.program_text import parse_program, program_from_json, program_to_json, read_program_json


def _plan() -> dict[str, Any]:
    uses = (DeviceUse("a", 0, 100, 200, 0.5), DeviceUse("b", None, 0, 200, 0.0, "too slow"))
    plan = Plan((StagePlan((0, 2), ("a",), (4,)), StagePlan((2, 3), ("c", "d"), (1, 3))), 2, 4, "1f1b", "asteroid",
                Prediction(1.0, 8.0, uses, "compute"), recovery=True)
    return plan.to_json()


def _costs() -> dict[str, Any]:
    fit = TimeFit(((1.0, 1e-3), (4.0, 3e-3)))
    layers = tuple(Layer(i, (f"n{i}",), (("host-cpu", Cost(fit, fit, "measured")),), 16, 0, 4.0, (f"w{i}",),
                         (BatchStat(f"n{i}", "bn (BatchNorm1d)", 1),) if i == 0 else ())
                   for i in range(2))
    cuts = tuple(Cut(i, (f"v{i}",), 32.0, i not in (0, 2)) for i in range(3))
    return costs_to_json(LayerGraph(layers, cuts, ("a reason",)))


def _profile() -> dict[str, Any]:
    t = P.Timing.exact(1e-3)
    cells = tuple(P.Cell(r, t, t, 8 * r, 16 * r, t, t) for r in (1, 2))
    layers = tuple(P.LayerProfile(i, f"n{i}", f"n{i}", 1, 16, 0, 16, 32, cells, P.Overhead(1e-6, 2e-6))
                   for i in range(2))
    prof = P.DeviceProfile("mlp", P.GraphKey("sha256:00", 2, None),
                           P.DeviceInfo("host-cpu", "cpu", "test cpu", 1, "2.0", 1 << 30, 1 << 20),
                           P.Method(clock="cpu"), (1, 2), layers, (P.Block(0, 2, 1, t, t),), P.Overhead(1e-6, 1e-6))
    data = P.to_json(prof)
    del data["checksum"]  # an edited file without its checksum is read field by field
    return data


def _cluster() -> dict[str, Any]:
    host = DeviceKind("host-cpu", 2e10, 1e10, 1 << 33, 0.7, 2e-6, "measured on this machine", "host")
    devices = [Device("nano0", "jetson-nano"), Device("tx2-0", "jetson-tx2"), Device("host0", "host-cpu", 1 << 30)]
    return Cluster.uniform(devices, "1Gbps", "0.5ms", name="lab", measured=[host]).to_json()


PROGRAM_TEXT = """asteroid-program v1
schedule gpipe
microbatches 1
microbatch_rows 2
stage 0 layers 0:1 a[0:2]
stage 1 layers 1:2 b[0:2]

device a
  F s0 mb0 r0:2
  SEND act s0 mb0 r0:2 -> b : f32(4)
  RECV grad s0 mb0 r0:2 <- b : f32(4)
  B s0 mb0 r0:2
  NORM s0 [a b] max_norm=1.0
  STEP s0
  BACKUP s0 -> b
device b
  RECV act s0 mb0 r0:2 <- a : f32(4)
  F s1 mb0 r0:2
  B s1 mb0 r0:2
  SEND grad s0 mb0 r0:2 -> a : f32(4)
  NORM s1 [a b] max_norm=1.0
  STEP s1
  RESTORE s0 <- a
"""


def _program() -> dict[str, Any]:
    return program_to_json(parse_program(PROGRAM_TEXT))


def _write(data: Any, path: Path) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
    return path


class Reader(NamedTuple):
    sample: Callable[[], dict[str, Any]]
    from_json: Callable[[Any], Any]
    load: Callable[[Path], Any]
    optional: frozenset[str]  # keys a document may leave out


READERS = {
    "plan": Reader(_plan, Plan.from_json, Plan.load, frozenset({"prediction", "recovery", "note"})),
    "costs": Reader(_costs, costs_from_json, read_costs,
                    frozenset({"source", "params", "why_not", "blocked", "ties", "kind", "recomputed", "batch_stats",
                               "host-cpu", "flops_per_row"})),  # costs maps kinds
    "profile": Reader(_profile, P.from_json, P.load, frozenset()),
    "cluster": Reader(_cluster, Cluster.from_json, Cluster.load,
                      frozenset({"name", "latency", "memory_bytes", "measured"})),
    "program": Reader(_program, program_from_json, read_program_json,
                      frozenset({"mb", "rows", "peer", "payload", "specs", "group", "params", "max_norm"})),
}


def _keys(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every key of every object in ``doc`` (lists: each of their elements)."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*path, k)
            yield from _keys(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _keys(v, (*path, i))


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _wrong(value: Any) -> Any:
    """A value of another JSON type than ``value``."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "many"
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return {"x": 1}
    return [1, 2]  # an object


def _sample(name: str) -> dict[str, Any]:
    return json.loads(json.dumps(READERS[name].sample()))  # as a file holds it: lists, not tuples


def _mutations(name: str, kind: str) -> list[tuple[Any, ...]]:
    doc = _sample(name)
    paths = list(_keys(doc))
    if kind == "wrong":
        paths = [p for p in paths if _at(doc, p) is not None]
    return paths


def _call(reader: Reader, doc: Any) -> Exception | None:
    try:
        reader.from_json(doc)
    except AsteroidError as e:
        return e
    return None  # anything else escapes and fails the test


@pytest.mark.parametrize("name", READERS)
def test_samples_read_back(name, tmp_path):
    reader = READERS[name]
    assert reader.from_json(reader.sample()) == reader.load(_write(reader.sample(), tmp_path / f"{name}.json"))


@pytest.mark.parametrize("name", READERS)
def test_dropping_any_key_is_named(name):
    reader = READERS[name]
    for path in _mutations(name, "drop"):
        doc = _sample(name)
        del _at(doc, path[:-1])[path[-1]]
        error = _call(reader, doc)
        key = str(path[-1])
        if key in reader.optional and error is None:
            continue
        assert error is not None, f"{name}: dropping {path} was accepted"
        assert key in str(error), f"{name}: dropping {path} gave an error that does not name {key!r}: {error}"


@pytest.mark.parametrize("name", READERS)
def test_a_wrong_type_anywhere_is_named(name):
    reader = READERS[name]
    for path in _mutations(name, "wrong"):
        doc = _sample(name)
        parent = _at(doc, path[:-1])
        parent[path[-1]] = _wrong(parent[path[-1]])
        error = _call(reader, doc)
        assert error is not None, f"{name}: {path} = {parent[path[-1]]!r} was accepted"
        assert str(path[-1]) in str(error), f"{name}: {path} of a wrong type gave an error not naming it: {error}"


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("doc", [None, [], "text", 3])
def test_a_document_that_is_no_object(name, doc):
    assert _call(READERS[name], copy.deepcopy(doc)) is not None


@pytest.mark.parametrize("name", READERS)
def test_a_cut_short_or_missing_file_names_the_file(name, tmp_path):
    reader = READERS[name]
    text = json.dumps(reader.sample(), indent=1)
    for cut in (0, 1, len(text) // 3, len(text) // 2, len(text) - 1):
        path = _write(text[:cut], tmp_path / f"{name}-{cut}.json")
        with pytest.raises(AsteroidError) as info:
            reader.load(path)
        assert str(path) in str(info.value)
    with pytest.raises(AsteroidError, match="no such"):
        reader.load(tmp_path / "absent.json")


@pytest.mark.parametrize("name", READERS)
def test_a_bad_field_in_a_file_names_the_file_and_the_field(name, tmp_path):
    reader = READERS[name]
    doc = reader.sample()
    key = next(k for k in doc if k not in ("format", "version", *reader.optional))
    del doc[key]
    path = _write(doc, tmp_path / f"{name}.json")
    with pytest.raises(AsteroidError) as info:
        reader.load(path)
    assert str(path) in str(info.value) and key in str(info.value)
