"""Validation: a job's validation set through the job's own model with a checkpoint's weights.

The model is built by the job's factory, loads the state strictly and runs in eval mode (dropout
off, BatchNorm on its running statistics) without gradients, ``job.batch`` samples at a time, in
dataset order: what the user's model does with the trained weights, not a pipeline's view of it.
The loss is the job's, weighted by rows (so the mean over every sample); accuracy is the job's
``accuracy`` or, for integer labels and tensor outputs, the share whose argmax is the label.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime.data import Batches


def evaluate(job, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """{"val_loss", "val_accuracy" (None when it has no meaning for the job), "samples"}."""
    if job.validation is None:
        raise InputError("the job has no validation set (Job.validation)")
    model = job.model()
    model.load_state_dict(dict(state), strict=True)
    model.eval()
    data = Batches(job, seed=0, flatten=lambda collated: (collated,), validation=True)  # inputs as the job gives them
    n = len(job.validation)
    total, correct, counted, seen = 0.0, 0, True, 0
    with torch.no_grad():
        for lo in range(0, n, job.batch):
            hi = min(n, lo + job.batch)
            (inputs,), labels = data.rows(range(lo, hi))
            outputs = (model(**inputs) if isinstance(inputs, dict) else
                       model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs))
            total += float(job.loss(outputs, labels)) * (hi - lo)
            right = _correct(job, outputs, labels)
            if right is None:
                counted = False
            else:
                correct += right
            seen += hi - lo
    return {"val_loss": total / seen, "val_accuracy": correct / seen if counted else None, "samples": seen}


def _correct(job, outputs, labels) -> int | None:
    if job.accuracy is not None:
        return int(job.accuracy(outputs, labels))
    if (isinstance(outputs, torch.Tensor) and isinstance(labels, torch.Tensor) and not labels.is_floating_point()
            and outputs.dim() == labels.dim() + 1):
        return int((outputs.argmax(-1) == labels).sum())
    return None


class Validation:
    """Validates each new checkpoint of a run folder in a background thread, in order: ``poll``
    looks at ``checkpoints/latest`` (cheap, called from a watching loop), ``finish`` waits for
    what is pending and returns every result, {"iteration", "val_loss", "val_accuracy",
    "samples", "time"} each. A checkpoint whose stage files are not in this folder (devices on
    other machines write theirs where they run) is skipped with a warning through ``warn``."""

    def __init__(self, job, run, warn=None):
        import concurrent.futures

        self.job, self.run, self.warn = job, run, warn
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asteroid-validation")
        self._seen: str | None = None
        self._pending: list = []

    def poll(self) -> None:
        from pathlib import Path

        pointer = Path(self.run) / "checkpoints" / "latest"
        try:
            name = pointer.read_text().strip()
        except OSError:
            return
        if name and name != self._seen:
            self._seen = name
            self._pending.append(self._pool.submit(self._one, Path(self.run) / "checkpoints" / name))

    def _one(self, folder) -> dict | None:
        import time

        from asteroid_fx.runtime import checkpoint

        try:
            manifest = checkpoint.read_manifest(folder)
            got = evaluate(self.job, checkpoint.model_state(manifest))
        except InputError as e:
            if self.warn is not None:
                self.warn(f"validation of {folder} skipped: {e}")
            return None
        return {"iteration": manifest["iteration"], **got, "time": time.time()}

    def finish(self) -> list[dict]:
        self.poll()
        done = [f.result() for f in self._pending]
        self._pool.shutdown()
        return [r for r in done if r is not None]
