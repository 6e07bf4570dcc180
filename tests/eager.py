"""Eager training with a program's micro-batches: the reference a compiled run must equal
(docs/semantics.md)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch


class Call(NamedTuple):
    """The inputs of a model that takes keyword inputs too; a plain tuple is positional only."""

    args: tuple
    kwargs: dict


def _slice(x: Any, sl: slice) -> Any:
    return x[sl] if isinstance(x, torch.Tensor) else x


def eager_train(model: torch.nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], loss: Callable,
                make_opt: Callable, *, microbatches: int, rows: int, clip_grad_norm: float | None = None,
                after_step: Callable[[], None] | None = None,
                smaller_microbatches: int | None = None) -> tuple[torch.nn.Module, list[float]]:
    """A trained copy of ``model`` and its losses: per batch (inputs, labels), each micro-batch's
    loss weighted by rows / batch, gradients accumulated, with ``clip_grad_norm`` clipped by
    ``torch.nn.utils.clip_grad_norm_``, one optimizer step (then ``after_step``, e.g. a
    scheduler's). ``make_opt`` takes the parameters, or (name, parameter) pairs when it is
    marked ``named``. A batch of fewer than ``microbatches x rows`` rows (an epoch's smaller
    last batch) runs as ``smaller_microbatches`` equal micro-batches, its loss the mean over its
    own rows."""
    model = copy.deepcopy(model)
    model.train()
    opt = make_opt(list(model.named_parameters()) if getattr(make_opt, "named", False) else model.parameters())
    losses = []
    for inputs, labels in batches:
        args, kwargs = (inputs.args, inputs.kwargs) if isinstance(inputs, Call) else (inputs, {})
        count, each = microbatches, rows
        n = labels.shape[0] if isinstance(labels, torch.Tensor) else microbatches * rows
        if n != microbatches * rows:
            assert smaller_microbatches is not None, f"a batch of {n} rows and no smaller_microbatches"
            count, each = smaller_microbatches, n // smaller_microbatches
            assert count * each == n
        batch = count * each
        total = 0.0
        for m in range(count):
            sl = slice(m * each, (m + 1) * each)
            out = model(*(_slice(a, sl) for a in args), **{k: _slice(v, sl) for k, v in kwargs.items()})
            value = loss(out, labels[sl]) * (each / batch)
            value.backward()
            total += float(value.detach())
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(total)
    return model, losses


def assert_same_state(got: dict, ref: dict, rtol: float = 1e-5) -> None:
    """Same keys; every tensor within ``rtol`` relative error in norm (float rounding differs
    between summation orders, so not bit for bit)."""
    assert got.keys() == ref.keys(), sorted(got.keys() ^ ref.keys())
    for k, v in ref.items():
        err = float((got[k] - v).norm() / (v.norm() + 1e-7 * v.numel() ** 0.5))
        assert err <= rtol, f"{k}: relative error {err:.2e}"


def eager_train_job(job, batches: Iterable[tuple[Any, torch.Tensor]], *, microbatches: int,
                    seed: int = 0, smaller_microbatches: int | None = None) -> tuple[torch.nn.Module, list[float]]:
    """A job trained eagerly with the program's micro-batching (``smaller_microbatches``: that of
    the program of an epoch's smaller last batch): its model built under ``seed``, its optimizer
    (parameter groups by name), gradients clipped by the global norm if the job says so, its
    scheduler stepped after every step."""
    torch.manual_seed(seed)
    model = job.model()
    batches = list(batches)
    made: dict = {}

    def make_opt(named):
        made["opt"] = job.settings.build([(n, p) for n, p in named if p.requires_grad])
        made["sched"] = job.scheduler(made["opt"]) if job.scheduler is not None else None
        return made["opt"]

    make_opt.named = True
    return eager_train(model, batches, job.loss, make_opt, microbatches=microbatches,
                       rows=job.batch // microbatches, clip_grad_norm=job.clip_grad_norm,
                       after_step=lambda: made["sched"] and made["sched"].step(),
                       smaller_microbatches=smaller_microbatches)
