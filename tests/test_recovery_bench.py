"""benchmarks/recovery.py --quick end to end: a trial of each kind of failure (a single kill and a
kill inside a redone iteration on the BatchNorm model, three cascading kills, a joiner that dies in
its hand-over on the GPT-style model) recovers, with the weights of the failure-free run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recovery  # noqa: E402


@pytest.mark.slow  # a few minutes: worker processes of four runs, their restarts and references
def test_the_quick_recovery_benchmark_recovers_every_trial_exactly():
    summary = recovery.main(["--quick"])
    assert summary["trials"] == len(recovery.QUICK)
    for row in summary["rows"]:
        s = row["setup"]
        what = f"{s.model}, {s.kind}, faults {s.spec.faults}"
        assert row["recovered"], f"{what}: {row['error']}"
        assert len(row["failures"]) == len(s.victims), what
        assert row["gap"] <= 1e-6 and row["loss_gap"] <= 1e-6, f"{what}: weights {row['gap']}, losses {row['loss_gap']}"
    assert (summary["recovered"], summary["exact"]) == (summary["trials"], summary["trials"])
