"""benchmarks/runtime.py end to end on the smallest model: both pipeline runtimes and the one-stage
runtimes train the same numbers, and the report has every row. Timings are not checked here."""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import runtime  # noqa: E402


def test_runtime_benchmark_runs_the_same_training_on_every_runtime(tmp_path):
    case = runtime.Case("mlp:small", batch=16, microbatches=2, warmup=1, seconds=0.0, min_rounds=3, max_rounds=3)
    row = runtime.measure(case, tmp_path)
    assert row["ratio"]["rounds"] == 3
    # asteroid and torch.distributed.pipelining: same split, batches and optimizer, so the same losses
    assert row["two_loss_gap"] < 1e-5
    # one stage: eager, the captured graph and the worker compute in the same order
    assert row["one_loss_gap"] < 1e-6
    text = runtime.report([row], "smoke test")
    assert "| mlp:small | 16 | 2 |" in text
    assert "### One stage on one worker process vs eager training in one process" in text
