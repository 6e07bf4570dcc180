"""The `asteroid` command line: compile writes a folder that show reads back."""

from __future__ import annotations

import json

import pytest

from asteroid_fx import cli
from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.program_text import parse_program, program_from_json


def test_compile_then_show(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["compile", "mlp:small", "--cluster", "edge-4-1g", "--batch", "16", "--microbatches", "2",
                     "--stages", "2", "--out", str(out)]) == 0
    for name in ("plan.json", "plan.txt", "program.txt", "program.json", "layers.txt", "cluster.json",
                 "stage_0.py", "stage_0.pt", "stage_1.py", "stage_1.pt"):
        assert (out / name).exists(), name
    plan = Plan.from_json(json.loads((out / "plan.json").read_text()))
    assert len(plan.stages) == 2 and plan.batch == 16
    program = parse_program((out / "program.txt").read_text())
    assert program == program_from_json(json.loads((out / "program.json").read_text()))
    capsys.readouterr()
    assert cli.main(["show", str(out), "program"]) == 0
    assert capsys.readouterr().out == (out / "program.txt").read_text()
    assert cli.main(["show", str(out), "plan"]) == 0
    assert "Plan (asteroid): 2 stages" in capsys.readouterr().out


def test_compile_into_a_folder_of_more_stages_leaves_none_of_theirs(tmp_path, capsys):
    """A save replaces the folder as a whole (written beside it, then swapped in)."""
    out = tmp_path / "out"
    common = ["compile", "mlp:small", "--cluster", "edge-4-1g", "--batch", "16", "--microbatches", "2", "--out", str(out)]
    assert cli.main([*common, "--stages", "3"]) == 0
    assert sorted(p.name for p in out.glob("stage_2.*"))  # the three-stage layout's last stage
    (out / "notes.txt").write_text("mine")
    assert cli.main([*common, "--stages", "2"]) == 0
    assert not list(out.glob("stage_2.*"))
    assert (out / "notes.txt").read_text() == "mine"  # what a save does not write stays
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it
    capsys.readouterr()
    assert cli.main(["show", str(out), "stages"]) == 0
    shown = capsys.readouterr().out
    assert "# stage_1.py" in shown and "stage_2" not in shown


def test_compile_says_how_many_cuts_the_model_allows_and_what_forbids_the_others(tmp_path, capsys):
    from collections import Counter

    import torch

    from asteroid_fx.passes.capture import capture
    from asteroid_fx.passes.linearize import node_cuts
    from tests.cli_model import Centred

    out = tmp_path / "o"
    assert cli.main(["compile", "tests.cli_model:centred", "--input", "f32[8,6]", "--cluster", "edge-4-1g",
                     "--batch", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    layers = (out / "layers.txt").read_text().splitlines()[0]  # "LayerGraph: 3 layers, 2 allowed cuts"
    n_layers, n_cuts = (int(w) for w in layers.replace(",", "").split() if w.isdigit())
    assert n_cuts < 4
    assert f"cuts: the model allows {n_cuts} between its {n_layers} layers; at most {n_cuts + 1} stages" in printed
    # the reasons, the one that forbids the most cuts first
    counts = Counter(c.why_not for c in node_cuts(capture(Centred(), (torch.randn(8, 6),)))[1:-1] if not c.allowed)
    assert len(counts) == 2 and len(set(counts.values())) == 2, counts
    listed = [line[4:] for line in printed.splitlines() if line.startswith("  - ")]
    assert listed == sorted(counts, key=lambda why: -counts[why])
    assert "value 'mean' is not a batch-first tensor" in listed[0]


def test_compile_lists_no_reasons_when_the_model_allows_enough_cuts(tmp_path, capsys):
    assert cli.main(["compile", "mlp:small", "--cluster", "edge-4-1g", "--batch", "16", "--stages", "2",
                     "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "cuts: the model allows 5 between its 6 layers; at most 3 stages on this cluster" in printed
    assert "not allowed" not in printed


def test_compile_module_callable(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["compile", "tests.cli_model:build", "--input", "f32[8,6]", "--cluster", "host-2",
                     "--batch", "8", "--microbatches", "2", "--out", str(out)]) == 0
    assert (out / "program.txt").exists()


def test_show_on_an_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="no compiled plan"):
        cli.main(["show", str(tmp_path)])


def test_bad_input_spec():
    with pytest.raises(SystemExit, match=r"write DTYPE\[SIZES\]"):
        cli.parse_input_spec("float[3")


def test_unknown_model_names_the_zoo():
    with pytest.raises(SystemExit, match="zoo model"):
        cli.load_model("nosuchmodel", 8, [])


def test_bad_cluster_is_an_error_not_a_traceback(tmp_path, capsys):
    assert cli.main(["compile", "mlp:small", "--cluster", "no-such-preset", "--out", str(tmp_path)]) == 2
    assert "no-such-preset" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["tests.jobs:build", "tests.jobs:vector_loss"])
def test_compile_a_job_at_the_batch_asked_for(tmp_path, entry):
    # --batch was ignored for a job: the plan was always at the job's own batch
    from tests import jobs

    out = tmp_path / "o"
    rows = jobs.BATCH // 2
    assert cli.main(["compile", entry, "--cluster", "host-2", "--batch", str(rows), "--microbatches", "2",
                     "--out", str(out)]) == 0
    assert Plan.from_json(json.loads((out / "plan.json").read_text())).batch == rows
    assert cli.main(["compile", entry, "--cluster", "host-2", "--out", str(out)]) == 0
    assert Plan.from_json(json.loads((out / "plan.json").read_text())).batch == jobs.BATCH


def test_compile_a_job_above_its_own_example_says_so(tmp_path):
    from tests import jobs

    with pytest.raises(SystemExit, match=f"example has {jobs.BATCH} rows, fewer than --batch {2 * jobs.BATCH}"):
        cli.main(["compile", "tests.jobs:vector_loss", "--cluster", "host-2", "--batch", str(2 * jobs.BATCH),
                  "--out", str(tmp_path / "o")])


def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path, capsys, monkeypatch):
    from asteroid_fx.cli import show

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(show, "run", interrupted)
    assert cli.main(["show", str(tmp_path), "plan"]) == 130
    assert capsys.readouterr().err == "asteroid show: interrupted\n"


def test_an_error_is_one_line_and_debug_adds_its_traceback(tmp_path, capsys):
    (tmp_path / "plan.json").write_text("{")
    assert cli.main(["show", str(tmp_path), "plan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asteroid show: error: ") and err.count("\n") == 1
    with pytest.raises(Exception) as raised:
        cli.main(["--debug", "show", str(tmp_path), "plan"])
    assert str(raised.value) in capsys.readouterr().err


def test_a_save_that_fails_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    from asteroid_fx.ir import cluster as cluster_module

    out = tmp_path / "out"
    assert cli.main(["compile", "mlp:small", "--cluster", "edge-4-1g", "--batch", "16", "--stages", "3",
                     "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(cluster_module.Cluster, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["compile", "mlp:small", "--cluster", "edge-4-1g", "--batch", "16", "--stages", "2",
                  "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]



def test_a_run_whose_loss_diverges_trains_to_the_end_and_exits_with_its_own_code(tmp_path, capsys):
    from asteroid_fx.cli.launch import DIVERGED
    from asteroid_fx.runtime.metrics import read_metrics

    run = tmp_path / "run"
    # a learning rate of 1e30: the first step sends every weight to inf, the second loss is nan
    assert cli.main(["-q", "launch", "mlp:small", "--cluster", "host-2", "--iterations", "3", "--lr", "1e30",
                     "--out", str(run)]) == DIVERGED
    out, err = capsys.readouterr()
    assert "iteration 3: loss nan" in out
    assert "the loss was nan at iteration 2: training diverged" in err and "--lr" in err
    assert [r["loss"] for r in read_metrics(run)[0]][1:] == [None, None]  # strict JSON: a diverged loss is null
