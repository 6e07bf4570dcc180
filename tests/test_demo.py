"""The README's main command: the demo's job (real digits from scikit-learn, or the generated ones),
and a short demo run end to end (compile, plan, simulated trace, worker processes, checkpoints
and validation, data-parallel comparison)."""

from __future__ import annotations

import json

import torch

from asteroid_fx.ir import catalog

from asteroid_fx import models
from examples import demo
from asteroid_fx.models import digits_cnn


def test_digits_are_deterministic_and_labelled():
    x1, y1 = digits_cnn.dataset("train")
    digits_cnn.dataset.cache_clear()
    x2, y2 = digits_cnn.dataset("train")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (digits_cnn.TRAIN, 1, 16, 16) and set(y1.tolist()) == set(range(10))
    xt, _ = digits_cnn.dataset("test")
    assert not torch.equal(xt[:16], x1[:16])  # held-out images are other draws


def test_a_batch_is_a_function_of_the_seed():
    entry = models.get("digits")
    torch.manual_seed(7)
    (a,), ya = entry.example(8), entry.labels(8)
    torch.manual_seed(7)
    (b,), yb = entry.example(8), entry.labels(8)
    images, labels = digits_cnn.dataset("train")
    assert torch.equal(a, b) and torch.equal(ya, yb)
    # the images and labels drawn together belong together
    idx = [int((images == a[i]).flatten(1).all(1).nonzero()[0]) for i in range(8)]
    assert labels[idx].tolist() == ya.tolist()


def test_the_demo_runs_end_to_end(tmp_path, capsys):
    assert "edge-4-pi-1g" in catalog.PRESETS
    assert demo.main(["--iterations", "4", "--checkpoint-every", "2", "--compare-iterations", "2",
                      "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for expected in ("== job examples.digits_job:build", "== plan", "== program", "validation after 2 iterations",
                     "validation after 4 iterations", "data parallel", "samples/s"):
        assert expected in out, expected
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["traceEvents"]
    assert (tmp_path / "compiled" / "program.txt").exists()


def test_the_demos_jobs_hold_real_and_generated_digits():
    from examples import digits_job

    real = digits_job.build()
    assert (len(real.dataset), len(real.validation)) == (1500, digits_job.VALIDATION)
    assert set(real.labels.tolist()) == set(range(10)) and real.dataset[0].shape == (1, 8, 8)
    generated = digits_job.generated()
    assert generated.dataset[0].shape == (1, 16, 16)
    assert not set(generated.dataset.indices.tolist()) & set(generated.validation.indices.tolist())
