"""benchmarks/models.py's row on tiny transformers models: the counts agree with each other and
with the model (every boundary between two blocks is an allowed cut, a plan has no more stages
than the cuts allow), a row that fails says so, and nothing is written to RESULTS.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import models  # noqa: E402
import results  # noqa: E402

PRESET = "edge-4-1g"


@pytest.fixture(scope="module")
def gpt2_row():
    before = results.RESULTS.read_text() if results.RESULTS.exists() else None
    r = models.row(models.CASES["hf-gpt2-tiny"], presets=(PRESET,), repeats=1)
    after = results.RESULTS.read_text() if results.RESULTS.exists() else None
    assert after == before  # a row is measured, not recorded
    return r


def test_row_counts_are_consistent(gpt2_row):
    r = gpt2_row
    assert r["error"] is None, r["notes"]
    assert r["blocks"] == 4  # hf_zoo.TINY's blocks, counted from the model's GPT2Block modules
    assert r["cuts"] >= r["blocks"] + 1
    assert r["fine_layers"] == r["cuts"] + 1  # fine layers are the runs between allowed cuts
    assert r["nodes"] >= r["fine_layers"]
    assert 2 <= r["most_stages"] <= r["cuts"] + 1
    plan = r["plans"][PRESET]
    assert 1 <= plan["stages"] <= min(r["most_stages"], 4)
    assert plan["asteroid"] > 0 and plan["dp"] > 0
    assert len(r["times"]) == 1 and r["median"] == r["times"][0]
    assert r["goal_met"] == (r["median"] <= r["goal_s"])


def test_table_row_shows_the_measured_values(gpt2_row):
    line = models.table([gpt2_row], (PRESET,))[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "hf-gpt2-tiny"
    assert cells[4:9] == [str(gpt2_row[k]) for k in ("nodes", "fine_layers", "cuts", "most_stages", "blocks")]
    plan = gpt2_row["plans"][PRESET]
    assert cells[12] == f"{plan['asteroid'] / plan['dp']:.2f}x"
    assert cells[-2] == ("yes" if gpt2_row["goal_met"] else "no")


def test_a_model_that_fails_to_compile_is_a_row_with_its_error():
    class NoParams(torch.nn.Module):
        def forward(self, x):
            return x * 2

    case = models.Case("no-params", "zoo", NoParams, lambda b: ((torch.randn(b, 3),), {}), None, 4, 10.0, "")
    r = models.row(case, presets=(PRESET,), repeats=1)
    assert r["error"].startswith("InputError: NoParams has no parameter")
    assert not r["goal_met"] and r["plans"] == {}
    line = models.table([r], (PRESET,))[-1]
    assert "failed: InputError" in line and line.count("| - ") >= 4


def test_no_benchmark_script_shadows_an_installed_package():
    """benchmarks/ is put first on sys.path by its scripts and by these tests: a script named like a
    package (onnxruntime.py did) replaces that package for every later import in the process."""
    import importlib.util
    here = Path(__file__).resolve().parents[1] / "benchmarks"
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        shadowing = [f.stem for f in sorted(here.glob("*.py"))
                     if f.stem not in sys.modules and importlib.util.find_spec(f.stem) is not None
                     or f.stem in sys.modules and Path(getattr(sys.modules[f.stem], "__file__", "") or "").parent != here]
    finally:
        sys.path[:] = saved
    assert not shadowing, f"rename these benchmarks/ scripts, they shadow packages: {shadowing}"
