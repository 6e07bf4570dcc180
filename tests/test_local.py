"""The local backend against eager training: same losses and the same weights after 3 steps.

Reference: eager training of the original module with the same micro-batches, each micro-batch's
loss weighted by its rows / batch and the gradients accumulated, then one optimizer step. For
models with BatchNorm the reference normalizes over exactly the rows one device holds in the stage
that owns the layer (``ChunkedBatchNorm``) and averages the running statistics over the group at
the end of the iteration: that is what BatchNorm means under a hybrid pipeline (docs/semantics.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.passes.planners.stage_count import most_stages
from tests import zoo

# stage groups over a 7-device mixed cluster: (groups, rows per device of an 8-row micro-batch).
# No chunk has a single row: BatchNorm over one row normalizes a handful of nearly equal values,
# which amplifies float rounding so much that no two summation orders agree (docs/semantics.md).
KINDS = ["jetson-agx-orin", "jetson-xavier-nx", "jetson-nano", "jetson-tx2", "jetson-orin-nano",
         "raspberry-pi-5", "laptop-i7"]
LAYOUTS = {
    1: ([["d0", "d1", "d2"]], [[3, 2, 3]]),
    2: ([["d0", "d1"], ["d2"]], [[5, 3], [8]]),
    3: ([["d0"], ["d1", "d2", "d3"], ["d4", "d5"]], [[8], [2, 4, 2], [6, 2]]),
    4: ([["d0", "d1"], ["d2"], ["d3", "d4", "d5"], ["d6"]], [[3, 5], [8], [2, 4, 2], [8]]),
}
MICROBATCHES, ROWS = 3, 8
BATCH = MICROBATCHES * ROWS


def _named_cluster() -> Cluster:
    from asteroid_fx.ir.catalog import kind
    from asteroid_fx.ir.cluster import Device

    devices = [Device(f"d{i}", k, kind(k).memory_bytes) for i, k in enumerate(KINDS)]
    return Cluster.uniform(devices, bandwidth=125e6, latency=1e-3)


class ChunkedBatchNorm(torch.nn.Module):
    """BatchNorm over fixed row chunks of each micro-batch, one running-statistics copy per chunk."""

    def __init__(self, bn: torch.nn.modules.batchnorm._BatchNorm, bounds: list[tuple[int, int]]):
        super().__init__()
        self.bn, self.bounds = bn, bounds
        self.means = [bn.running_mean.clone() for _ in bounds]
        self.vars = [bn.running_var.clone() for _ in bounds]

    def forward(self, x):
        outs = []
        for (lo, hi), rm, rv in zip(self.bounds, self.means, self.vars):
            outs.append(F.batch_norm(x[lo:hi], rm, rv, self.bn.weight, self.bn.bias, True,
                                     self.bn.momentum, self.bn.eps))
        self.bn.num_batches_tracked += 1
        return torch.cat(outs)

    def sync(self):
        mean, var = torch.stack(self.means).mean(0), torch.stack(self.vars).mean(0)
        self.bn.running_mean.copy_(mean)
        self.bn.running_var.copy_(var)
        for m, v in zip(self.means, self.vars):
            m.copy_(mean)
            v.copy_(var)


def chunk_batchnorms(model: torch.nn.Module, compiled) -> list[ChunkedBatchNorm]:
    """Swap every BatchNorm of ``model`` for a ChunkedBatchNorm over its owning stage's slots."""
    wrapped = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            continue
        owner = next(s for s in compiled.stages if f"{name}.running_mean" in s.owned)
        slots = compiled.plan.stages[owner.index].slots
        chunked = ChunkedBatchNorm(mod, [(lo, hi) for _, lo, hi in slots])
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, chunked)
        wrapped.append((parent, leaf, chunked))
    return wrapped


def eager_reference(model, compiled, batches, make_opt):
    model = copy.deepcopy(model)
    model.train()
    wrapped = chunk_batchnorms(model, compiled)
    chunked = [c for _, _, c in wrapped]
    opt = make_opt(model.parameters())
    losses = []
    for inputs, labels in batches:
        total = 0.0
        for m in range(MICROBATCHES):
            sl = slice(m * ROWS, (m + 1) * ROWS)
            out = model(*(t[sl] for t in inputs))
            loss = compiled.loss(out, labels[sl]) * (ROWS / BATCH)
            loss.backward()
            total += float(loss.detach())
        with torch.no_grad():
            for c in chunked:
                c.sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    for parent, leaf, c in wrapped:
        setattr(parent, leaf, c.bn)
    return model, losses


def assert_close_state(ref_model, runner, rtol=1e-5, atol=1e-7):
    """Every parameter and buffer within ``rtol`` relative error (in norm, per tensor; ``atol`` per
    element keeps tensors that stay near zero from dividing noise by noise)."""
    ref = ref_model.state_dict()
    got = runner.state_dict()
    assert got.keys() == ref.keys(), sorted(got.keys() ^ ref.keys())
    for k, v in got.items():
        if v.is_floating_point():
            err = float((v - ref[k]).norm() / (ref[k].norm() + atol * v.numel() ** 0.5))
            assert err <= rtol, f"{k}: relative error {err:.2e} > {rtol:.0e}"
        else:
            assert torch.equal(v, ref[k]), k


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
}


# BatchNorm over 2-5-row chunks of the small configs' 1x1-4x4 feature maps is so ill-conditioned
# that float32 rounding alone moves weights by 1e-4 between any two summation orders (a batch
# statistic of a few nearly equal values; seen for eager-vs-eager with different row splits too).
# Those models are compared in float64, where the same check holds to 1e-12 and so still catches
# any difference in meaning; the others in float32.
DTYPES = {"resnet18": torch.float64, "resnet50": torch.float64, "mobilenetv2": torch.float64}


def _cast(inputs, dtype):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def _parity_cases():
    """Every model x stage count x schedule; the default run takes one stage count and schedule per
    model so that together they cover every (stage count, schedule) pair, the rest are slow."""
    names = sorted(models.ZOO)
    for i, name in enumerate(names):
        for n_stages in (1, 2, 3, 4):
            for schedule in ("1f1b", "gpipe"):
                default = n_stages == 1 + i % 4 and schedule == ("1f1b", "gpipe")[(i // 4) % 2]
                yield pytest.param(name, n_stages, schedule, marks=() if default else pytest.mark.slow,
                                   id=f"{name}-{n_stages}-{schedule}")


@pytest.mark.parametrize("name, n_stages, schedule", list(_parity_cases()))
def test_training_parity(name, n_stages, schedule):
    entry = models.get(name)
    dtype = DTYPES.get(name, torch.float32)
    torch.manual_seed(0)
    model = entry.build(small=True).to(dtype)
    groups, rows = LAYOUTS[n_stages]
    example = _cast(entry.example(BATCH, True), dtype)
    # the small mlp and digits have three stages that compute: four stages are pinned by hand
    lg = zoo.layer_graph(name, KINDS)
    layers = [0, *lg.allowed_cuts()[:n_stages - 1], len(lg)] if n_stages > most_stages(lg) else None
    compiled = asteroid.compile(model, _named_cluster(), example=example, loss=entry.loss,
                                microbatches=MICROBATCHES, schedule_kind=schedule, groups=groups, rows=rows,
                                layers=layers)
    assert [list(s.rows) for s in compiled.plan.stages] == rows
    torch.manual_seed(1)
    batches = [(_cast(entry.example(BATCH, True), dtype), entry.labels(BATCH, True)) for _ in range(3)]
    opt_name = "adam" if n_stages % 2 == 0 else "sgd"
    runner, losses = compiled.run(iter(batches), 3, optimizer=OPTIMIZERS[opt_name])
    ref_model, ref_losses = eager_reference(model, compiled, batches, OPTIMIZERS[opt_name])
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_close_state(ref_model, runner)
