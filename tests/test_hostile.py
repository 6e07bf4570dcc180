"""Hostile inputs: a crafted folder or file is refused with one clear error naming the file and the
field, and nothing in it runs. Every case is seeded and small."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from asteroid_fx.cli import main as cli_main
from asteroid_fx.ir.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from hostile import mutate_json  # noqa: E402  (the fuzz's seeded mutation of a JSON document)


class _Touch:
    """Unpickled, it creates ``path``: the stand-in for any command a crafted file could run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_Touch(marker), protocol=2)


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli_main(argv)
    except SystemExit as e:  # argparse and the commands' own refusals
        rc = e.code if isinstance(e.code, int) else 2
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=__import__("sys").stderr)
    captured = capsys.readouterr()
    return rc, captured.err


# --- 1. a check folder holds nothing that is unpickled or run -------------------------------------

@pytest.fixture(scope="module")
def check_folder(tmp_path_factory):
    """A small compiled plan folder (two stages), as `asteroid compile --out` writes it."""
    pytest.importorskip("onnxruntime")
    from tests.test_onnxruntime import _compile

    _, compiled = _compile("mlp", 2)
    folder = tmp_path_factory.mktemp("plan")
    compiled.save(folder)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "crafted"
    shutil.copytree(folder, out)
    return out


def test_the_payload_is_live(tmp_path):
    """What the crafted folders below carry does run when unpickled (so their refusal means something)."""
    marker = tmp_path / "ran"
    pickle.loads(_payload(marker))
    assert marker.exists()


def test_a_saved_folder_holds_no_torch_export_archive_and_passes(check_folder):
    from asteroid_fx.backends.onnxruntime import check_folder as run_check

    assert not list(check_folder.glob("*.pt2"))
    manifest = json.loads((check_folder / "check.json").read_text())
    assert [e["graph"] for e in manifest["stages"]] == ["stage_0.eval.json", "stage_1.eval.json"]
    assert run_check(check_folder, repeats=0).ok


def _pickled_pt2(path: Path, marker: Path) -> None:
    """A real torch.export archive whose first weight is marked use_pickle and holds the payload."""
    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(2, 2),))
    plain = path.with_suffix(".plain.pt2")
    torch.export.save(ep, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                data = json.dumps(config).encode()
            elif info.filename.endswith("weights/weight_0"):
                data = _payload(marker)
            dst.writestr(info, data)


def test_a_folder_with_a_pickled_torch_export_archive_is_refused_unrun(check_folder, tmp_path, capsys):
    live = tmp_path / "live"
    _pickled_pt2(tmp_path / "probe.pt2", live)
    with pytest.raises(Exception):
        torch.export.load(tmp_path / "probe.pt2")  # the archive is live: torch's loader runs it
    assert live.exists()
    folder = _copy(check_folder, tmp_path)
    marker = tmp_path / "marker"
    _pickled_pt2(folder / "stage_0.eval.pt2", marker)
    manifest = json.loads((folder / "check.json").read_text())
    manifest["version"] = 1
    manifest["stages"][0] = {**manifest["stages"][0], "torch": "stage_0.eval.pt2"}
    (folder / "check.json").write_text(json.dumps(manifest))
    rc, err = _run_cli(["check", str(folder), "--repeats", "0"], capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "check.json is not a version 2 asteroid check manifest" in err
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["stage_0.eval.pt", "stage_1.eval.pt", "check_inputs.pt"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["raw-pickle", "torch-save"])
def test_a_pickled_weights_or_inputs_file_is_refused_unrun(check_folder, tmp_path, capsys, victim, wrapped):
    folder = _copy(check_folder, tmp_path)
    marker = tmp_path / "marker"
    if wrapped:
        torch.save({"w": _Touch(marker)}, folder / victim)
    else:
        (folder / victim).write_bytes(_payload(marker))
    rc, err = _run_cli(["check", str(folder), "--repeats", "0"], capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{victim}: not a file of plain tensors, refused without running it" in err
    assert not marker.exists()


def _call(graph: dict) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == "call_function")


def _attr(graph: dict) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == "get_attr")


_GRAPH_EDITS = {
    "target os.system": (lambda g: _call(g).update(target="torch.os.system"), "target 'torch.os.system'"),
    "target builtins": (lambda g: _call(g).update(target="builtins.eval"), "target 'builtins.eval'"),
    "target dunder": (lambda g: _call(g).update(target="aten.__class__.__init__"), "is neither an ATen op"),
    "op call_module": (lambda g: _call(g).update(op="call_module"), "'op' must be one of"),
    "unknown argument": (lambda g: _call(g).update(args={"pickle": "x"}), "none of the values a graph holds"),
    "forward reference": (lambda g: _call(g).update(args={"tuple": [{"node": "nosuch"}]}), "names node 'nosuch'"),
    "weight not named": (lambda g: g["weights"].update({"extra": "buffer"}), "where the graph names"),
    "weight dunder": (lambda g: _attr(g).update(target="__class__"), "is no weight of this graph"),
    "no output": (lambda g: g.update(nodes=[n for n in g["nodes"] if n["op"] != "output"]), "has no output node"),
    "nodes not a list": (lambda g: g.update(nodes={"a": 1}), "'nodes' a list"),
    "wrong format": (lambda g: g.update(format="pickle"), "not a version 1 asteroid-stage-graph file"),
}


def test_a_crafted_graph_that_does_not_run_is_refused_naming_its_file(check_folder, tmp_path, capsys):
    folder = _copy(check_folder, tmp_path)
    graph = json.loads((folder / "stage_1.eval.json").read_text())
    linear = next(n for n in graph["nodes"] if n.get("target") == "aten.linear.default")
    linear["args"]["tuple"] = list(reversed(linear["args"]["tuple"]))  # weights times the activations
    (folder / "stage_1.eval.json").write_text(json.dumps(graph))
    rc, err = _run_cli(["check", str(folder), "--repeats", "0"], capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "stage_1.eval.json: stage 1 does not run on the saved inputs" in err


@pytest.mark.parametrize("edit", sorted(_GRAPH_EDITS))
def test_a_crafted_stage_graph_is_refused_naming_the_file_and_field(check_folder, tmp_path, capsys, edit):
    folder = _copy(check_folder, tmp_path)
    change, message = _GRAPH_EDITS[edit]
    graph = json.loads((folder / "stage_0.eval.json").read_text())
    change(graph)
    (folder / "stage_0.eval.json").write_text(json.dumps(graph))
    rc, err = _run_cli(["check", str(folder), "--repeats", "0"], capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "stage_0.eval.json" in err and message in err


@pytest.mark.parametrize("field, value, message", [
    ("inputs", "../../etc/passwd", "inputs must be a file name in the folder"),
    ("inputs", "nosuch.pt", "nosuch.pt (named by check.json inputs) is missing"),
    ("stages", [], "'stages' must be a non-empty list"),
    ("stages", [{"index": 3}], "stages[0] must be an object with 'index' 0"),
])
def test_a_crafted_manifest_is_refused(check_folder, tmp_path, capsys, field, value, message):
    folder = _copy(check_folder, tmp_path)
    manifest = json.loads((folder / "check.json").read_text())
    manifest[field] = value
    (folder / "check.json").write_text(json.dumps(manifest))
    rc, err = _run_cli(["check", str(folder), "--repeats", "0"], capsys)
    assert rc == 2 and "Traceback" not in err and message in err, err


def test_the_graph_reader_rebuilds_what_the_writer_wrote():
    from asteroid_fx.backends.onnxruntime.graph_file import graph_from_data, graph_to_data

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.GELU()).eval()
    ep = torch.export.export(model, (torch.zeros(2, 3),), dynamic_shapes=({0: torch.export.Dim("rows", min=1)},))
    from asteroid_fx.backends.onnxruntime.export import _plain_module

    data, weights = graph_to_data(_plain_module(ep))
    rebuilt = graph_from_data(json.loads(json.dumps(data)), weights, Path("x.json"))
    x = torch.randn(5, 3)
    assert torch.equal(rebuilt(x)[0], model(x))
    with pytest.raises(InputError, match="x.json: .*the weights file holds"):
        graph_from_data(data, {}, Path("x.json"))


# --- 2. plan.json and costs.json: a seeded mutation fuzz through the commands that read them -----

@pytest.fixture(scope="module")
def plan_folder(tmp_path_factory):
    """The small MLP compiled on two stages (the first a group of two), saved as `asteroid compile` does."""
    import asteroid_fx as asteroid
    from asteroid_fx import models
    from tests.test_local import BATCH, LAYOUTS, MICROBATCHES, _named_cluster

    entry = models.get("mlp")
    torch.manual_seed(0)
    groups, rows = LAYOUTS[2]
    compiled = asteroid.compile(entry.build(small=True), _named_cluster(), example=entry.example(BATCH, True),
                                loss=entry.loss, microbatches=MICROBATCHES, groups=groups, rows=rows)
    folder = tmp_path_factory.mktemp("compiled")
    compiled.save(folder)
    return folder


def _command(argv: list[str]):
    from asteroid_fx.cli import build_parser

    args = build_parser().parse_args(argv)
    return lambda: args.func(args)


@pytest.mark.parametrize("name, argv, cases", [
    ("plan.json", ["show", "{folder}", "plan"], 320),
    ("plan.json", ["simulate", "{folder}"], 320),
    ("costs.json", ["simulate", "{folder}"], 400),
])
def test_a_mutated_file_is_refused_naming_it_never_a_traceback(plan_folder, tmp_path, capsys, name, argv, cases):
    import random

    from asteroid_fx.ir.errors import AsteroidError

    folder = _copy(plan_folder, tmp_path)
    original = (folder / name).read_text()
    run = _command([a.format(folder=folder) for a in argv])
    assert run() == 0  # the untouched folder passes
    rng = random.Random(f"{name} {argv[0]}")
    refused = 0
    for case in range(cases):
        text, what, key = mutate_json(original, rng)
        (folder / name).write_text(text)
        try:
            rc = run()
        except AsteroidError as e:
            message = str(e)
            assert str(folder / name) in message, f"case {case} ({what}): the error does not name the file: {message}"
            if isinstance(key, str):
                assert key in message or "field" in message, f"case {case} ({what}): no field named: {message}"
            refused += 1
        else:
            assert rc == 0, f"case {case} ({what})"
            assert key is None or not what.startswith("cut at byte"), what
    capsys.readouterr()
    assert refused > cases // 2  # most mutations break the file, and each was refused, not run


# --- 3. verify is bounded, and the commands that run a program verify it first --------------------

TWO_STAGES = """asteroid-program v1
schedule gpipe
microbatches {M}
microbatch_rows 2
stage 0 layers 0:1 a[0:2]
stage 1 layers 1:2 b[0:2]

device a
{a}
device b
{b}
"""


def _text(M: int = 1, a: str = "", b: str = "") -> str:
    return TWO_STAGES.format(M=M, a=a or "  STEP s0", b=b or "  STEP s1")


@pytest.mark.parametrize("M", [1_000_000, 10**12])
def test_an_absurd_microbatch_count_is_refused_at_once(M):
    import time

    from asteroid_fx.ir.errors import VerifyError
    from asteroid_fx.ir.program_text import parse_program
    from asteroid_fx.ir.verify import MAX_MICROBATCHES, verify

    program = parse_program(_text(M))
    started = time.perf_counter()
    with pytest.raises(VerifyError, match=f"microbatches is {M}, more than the {MAX_MICROBATCHES}") as info:
        verify(program)
    assert time.perf_counter() - started < 1.0 and len(info.value.problems) < 5


def test_a_program_that_runs_nothing_lists_a_few_missing_computes_and_counts_the_rest():
    import time

    from asteroid_fx.ir.errors import VerifyError
    from asteroid_fx.ir.program_text import parse_program
    from asteroid_fx.ir.verify import MAX_MICROBATCHES, verify

    program = parse_program(_text(MAX_MICROBATCHES))
    started = time.perf_counter()
    with pytest.raises(VerifyError) as info:
        verify(program)
    assert time.perf_counter() - started < 5.0
    problems = info.value.problems
    # per device: 20 missing computes listed, one line that counts the rest, and its STEP's
    assert len(problems) == 2 * 22 and max(len(p) for p in problems) < 400
    assert problems[0].endswith("never runs F s0 mb0; add 'F s0 mb0 r0:2'")
    assert f"and {2 * MAX_MICROBATCHES - 20} more F or B actions it never runs" in problems[20]
    assert f"runs before the backward of mb0 mb1 mb2 mb3 mb4 mb5 mb6 mb7 mb8 mb9 mb10 mb11 mb12 mb13 mb14 mb15 mb16 " \
           f"mb17 mb18 mb19 and {MAX_MICROBATCHES - 20} more" in " ".join(problems)


def test_activations_sent_after_their_backward_are_refused():
    from asteroid_fx.ir.errors import VerifyError
    from asteroid_fx.ir.program_text import parse_program
    from asteroid_fx.ir.verify import verify

    send = "  SEND act s0 mb0 r0:2 -> b : f32(4)"
    b = "  RECV act s0 mb0 r0:2 <- a : f32(4)\n  F s1 mb0 r0:2\n  B s1 mb0 r0:2\n  STEP s1"
    verify(parse_program(_text(a=f"  F s0 mb0 r0:2\n{send}\n  B s0 mb0 r0:2\n  STEP s0", b=b)))
    late = parse_program(_text(a=f"  F s0 mb0 r0:2\n  B s0 mb0 r0:2\n{send}\n  STEP s0", b=b))
    with pytest.raises(VerifyError, match=r"device a, line 11: SEND act .* after B s0 mb0 \(line 10\), which frees"):
        verify(late)


@pytest.fixture(scope="module")
def compiled_mlp():
    import asteroid_fx as asteroid
    from asteroid_fx import models
    from tests.test_local import BATCH, LAYOUTS, MICROBATCHES, _named_cluster

    entry = models.get("mlp")
    torch.manual_seed(0)
    groups, rows = LAYOUTS[2]
    return asteroid.compile(entry.build(small=True), _named_cluster(), example=entry.example(BATCH, True),
                            loss=entry.loss, microbatches=MICROBATCHES, groups=groups, rows=rows)


def test_transfer_specs_and_layer_ranges_are_checked_against_the_model(compiled_mlp):
    import dataclasses

    from asteroid_fx.ir.errors import VerifyError
    from asteroid_fx.ir.program import TensorSpec
    from asteroid_fx.ir.verify import verify
    from asteroid_fx.passes.lower import stage_cut_specs

    program, lg = compiled_mlp.program, compiled_mlp.layer_graph
    cut_specs = stage_cut_specs(compiled_mlp.stages)
    verify(program, layers=len(lg), cut_specs=cut_specs)
    # both sides of every transfer agree on a wrong shape: only the stage modules can tell
    wrong = dataclasses.replace(program, actions=tuple(
        (d, tuple(a._replace(specs=(TensorSpec("float32", (999,)),)) if a.payload == "act" else a
                  for a in acts)) for d, acts in program.actions))
    verify(wrong)
    with pytest.raises(VerifyError, match=r"carries f32\(999\), but the cut after stage 0 has act tensors"):
        verify(wrong, cut_specs=cut_specs)
    with pytest.raises(VerifyError, match=f"the stages end at layer {len(lg)} but the model has {len(lg) + 1} layers"):
        verify(program, layers=len(lg) + 1)


def _drop_compute(program_json: dict) -> dict:
    for device in program_json["devices"]:
        device["actions"] = [a for a in device["actions"] if a["op"] not in ("F", "B")]
    return program_json


@pytest.mark.parametrize("command", ["show", "simulate", "check"])
def test_a_program_without_compute_is_refused_by_every_command_that_reads_it(plan_folder, tmp_path, capsys, command):
    from asteroid_fx.ir.program_text import format_program, program_from_json

    folder = _copy(plan_folder, tmp_path)
    program = _drop_compute(json.loads((folder / "program.json").read_text()))
    (folder / "program.json").write_text(json.dumps(program))
    (folder / "program.txt").write_text(format_program(program_from_json(program)))
    rc, err = _run_cli([command, str(folder)] + (["--repeats", "0"] if command == "check" else []), capsys)
    assert rc == 2 and "Traceback" not in err
    read = "program.txt" if command == "show" else "program.json"
    assert f"{folder / read}: program failed verification" in err and "never runs F s0 mb0" in err
    assert "samples/s" not in capsys.readouterr().out


def test_simulate_refuses_a_program_whose_stages_do_not_cover_the_costed_layers(plan_folder, tmp_path, capsys):
    folder = _copy(plan_folder, tmp_path)
    costs = json.loads((folder / "costs.json").read_text())
    costs["layers"].append({**costs["layers"][-1], "index": len(costs["layers"])})
    costs["cuts"].append({**costs["cuts"][-1], "index": len(costs["cuts"])})
    (folder / "costs.json").write_text(json.dumps(costs))
    rc, err = _run_cli(["simulate", str(folder)], capsys)
    assert rc == 2 and f"but the model has {len(costs['layers'])} layers" in err


# --- 4. command-line mistakes: one line naming the argument, before any work ----------------------

CLI_CASES = [
    ("compile mlp:small --cluster edge-4-1g --out FILE", "--out", "exists and is not a folder"),
    ("compile mlp:small --cluster edge-4-1g --out FILE/x", "--out", "which is a file, not a folder"),
    ("compile mlp:small --cluster DIR --out OUT", "--cluster", "is not a cluster file"),
    ("compile mlp:small --cluster FIFO --out OUT", "--cluster", "is not a cluster file"),
    ("compile mlp:small --cluster HUGE --out OUT", "--cluster", "more than the"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --batch -4", "--batch", "out of range"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --max-layers 0", "--max-layers", "out of range"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --profile DIR", "--profile", "is not a regular file"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --profile /dev/zero", "--profile", "is not a regular file"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --profile FIFO", "--profile", "is not a regular file"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --profile HUGE", "--profile", "more than the"),
    ("launch mlp:small --cluster host-3 --listen 127.0.0.1:99999", "--listen", "port of 0 to 65535"),
    ("launch mlp:small --cluster host-3 --optimizer nosuch", "--optimizer", "unknown optimizer 'nosuch'"),
    ("launch mlp:small --cluster host-3 --iterations 0", "--iterations", "out of range"),
    ("launch mlp:small --cluster host-3 --iterations -1", "--iterations", "out of range"),
    ("launch mlp:small --cluster host-3 --lr nan", "--lr", "out of range"),
    ("launch mlp:small --cluster host-3 --kill host9@0.1", "--kill", "'host9' is not a device of the cluster"),
    ("launch mlp:small --cluster host-3 --remote host9", "--remote", "'host9' is not a device of the cluster"),
    ("check DIR --rtol -1", "--rtol", "out of range"),
    ("simulate DIR --optimizer-state -5", "--optimizer-state", "out of range"),
    ("simulate DIR --trace FILE/t.json", "--trace", "which is a file, not a folder"),
    ("profile --model mlp:small --out FILE/p.json", "--out", "which is a file, not a folder"),
    ("export DIR FIFO", "out", "is not a regular file"),
    ("report DIR --out DIR", "--out", "is a folder"),
]


@pytest.mark.parametrize("line, argument, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_a_command_line_mistake_is_one_line_naming_the_argument(line, argument, message, tmp_path, capsys,
                                                                  monkeypatch):
    import os
    import signal

    afile = tmp_path / "afile"
    afile.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: no disk used
        f.truncate(300 << 20)
    paths = {"FILE": str(afile), "DIR": str(tmp_path), "OUT": str(tmp_path / "out"), "FIFO": str(fifo),
             "HUGE": str(huge)}
    argv = [next((v + w[len(k):] for k, v in paths.items() if w.startswith(k)), w) for w in line.split()]
    # nothing may block (a FIFO opened for reading waits for a writer) or start compiling
    monkeypatch.setattr("asteroid_fx.compile", lambda *a, **k: pytest.fail("compile ran"), raising=False)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"{line} blocked"))
    signal.alarm(30)
    try:
        rc, err = _run_cli(argv, capsys)
    finally:
        signal.alarm(0)
    assert rc not in (0, None), err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert argument in lines[0] and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
