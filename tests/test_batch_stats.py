"""passes/batch_stats and what is built on it: the layers that normalize over the rows they are given
(BatchNorm in training) are found in a captured graph and recorded per layer, the planners never give
a device of their stage fewer than MIN_BATCH_STAT_ROWS rows, pinned rows and micro-batches below it
are refused by name, and a stage refuses an F over one row that BatchNorm1d cannot take (where eager
torch refuses it too) instead of training without a gradient before it. Test models: the zoo's
ResNet-18 (BatchNorm2d) and a small MLP with BatchNorm1d."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import asteroid_fx as asteroid
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import MIN_BATCH_STAT_ROWS, costs_from_json, costs_to_json
from asteroid_fx.ir.plan import NoPlanError
from asteroid_fx.ir.program import StageInfo, StageSlot
from asteroid_fx.passes.annotate_costs import annotate_costs
from asteroid_fx.passes.batch_stats import batch_stats
from asteroid_fx.passes.capture import capture
from asteroid_fx.passes.eval_mode import eval_mode
from asteroid_fx.passes.linearize import linearize
from asteroid_fx.passes.lower import lower
from asteroid_fx.passes.partition import PLANNER_NAMES, partition
from asteroid_fx.passes.replay import split_rows
from tests import zoo
from tests.test_local import KINDS, _named_cluster

EQUAL = [Device(f"d{i}", "jetson-orin-nano") for i in range(4)]  # four alike: data parallel is tempting


class BatchNormMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear: one row of the BatchNorm's input is one value per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _mlp() -> BatchNormMLP:
    torch.manual_seed(0)
    return BatchNormMLP()


def _compile_mlp(cluster: Cluster, batch: int = 8, **kw) -> asteroid.Compiled:
    return asteroid.compile(_mlp(), cluster, example=torch.randn(batch, 6), loss=F.cross_entropy, **kw)


@pytest.fixture(scope="module")
def resnet_lg():
    return zoo.layer_graph("resnet18", KINDS)


@pytest.fixture(scope="module")
def mlp_lg():
    captured = annotate_costs(capture(_mlp(), (torch.randn(8, 6),)), {d.kind for d in EQUAL})
    return linearize(captured)


# --- finding them --------------------------------------------------------------------------------


def test_the_captured_batchnorms_are_found_with_their_values_per_row():
    mlp = batch_stats(capture(_mlp(), (torch.randn(8, 6),)).module)
    assert [(b.module, b.values_per_row) for b in mlp] == [("bn (BatchNorm1d)", 1)]
    resnet = batch_stats(zoo.captured("resnet18").module)
    model = zoo.models.get("resnet18").build(small=True)
    assert len(resnet) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert resnet[0].module == "stem.1 (BatchNorm2d)"
    x = zoo.models.get("resnet18").example(2, True)[0]
    assert resnet[0].values_per_row == x.shape[2] * x.shape[3]  # the stem keeps the image's size
    assert all(b.values_per_row > 1 and b.takes(1) for b in resnet)  # one image is legal for BatchNorm2d


def test_eval_mode_and_per_row_norms_take_no_batch_statistics():
    captured = capture(_mlp(), (torch.randn(8, 6),))
    assert batch_stats(eval_mode(captured.module)) == ()
    assert batch_stats(zoo.captured("gpt").module) == ()  # LayerNorm normalizes each row on its own


def test_the_symbolic_trace_form_is_found_by_its_module():
    gm = fx.symbolic_trace(_mlp())
    ShapeProp(gm).propagate(torch.randn(4, 6))
    assert [(b.node, b.module, b.values_per_row) for b in batch_stats(gm)] == [("bn", "bn (BatchNorm1d)", 1)]
    gm.eval()
    assert batch_stats(gm) == ()


def test_linearize_records_them_per_layer_and_the_cost_file_keeps_them(mlp_lg, resnet_lg):
    assert [b.module for b in mlp_lg.batch_stats(0, len(mlp_lg))] == ["bn (BatchNorm1d)"]
    holding = [layer.index for layer in mlp_lg.layers if layer.batch_stats]
    assert len(holding) == 1
    assert mlp_lg.min_rows(0, len(mlp_lg)) == MIN_BATCH_STAT_ROWS
    assert mlp_lg.min_rows(holding[0] + 1, len(mlp_lg)) == 1
    assert costs_from_json(costs_to_json(resnet_lg)) == resnet_lg
    assert resnet_lg.batch_stats(0, len(resnet_lg)) == batch_stats(zoo.captured("resnet18").module)


# --- the planners keep the minimum ---------------------------------------------------------------


@pytest.mark.parametrize("planner", [p for p in PLANNER_NAMES if p not in ("balanced", "oracle")])
@pytest.mark.parametrize("batch", [4, 8])
def test_no_planner_gives_a_device_fewer_rows_than_its_batchnorm_takes(mlp_lg, planner, batch):
    cluster = Cluster.uniform(EQUAL, bandwidth=125e6, latency=1e-3)
    try:
        plan = partition(mlp_lg, cluster, planner=planner, batch=batch)
    except NoPlanError as e:  # data parallel over all four: one row each, whatever the micro-batching
        assert (planner, batch) == ("dp", 4) and "use a larger batch" in str(e)
        return
    for st in plan.stages:
        assert min(st.rows) >= mlp_lg.min_rows(*st.layers), plan


def test_the_asteroid_planner_keeps_two_images_per_resnet_device(resnet_lg):
    # four slow boards on a fast link: without the minimum the plan is data parallel, one image each
    cluster = Cluster.uniform([Device(f"d{i}", "raspberry-pi-5") for i in range(4)], bandwidth=1.25e9,
                              latency=1e-4)
    for batch, microbatches in ((4, 1), (4, None), (8, 2)):
        plan = partition(resnet_lg, cluster, batch=batch, microbatches=microbatches)
        assert all(min(st.rows) >= MIN_BATCH_STAT_ROWS for st in plan.stages), plan
        if batch == 4:  # two boards take the four images: the others are left out, and the plan says why
            notes = [u.note for u in plan.prediction.devices if u.stage is None]
            assert notes and all(n.startswith("no stage has rows to spare for it") for n in notes), notes
    balanced = partition(resnet_lg, cluster, planner="balanced", batch=8, microbatches=1,
                         groups=[[d.name for d in cluster.devices[:4]]])
    assert balanced.stages[0].rows == (2, 2, 2, 2)


def test_pinned_rows_below_the_minimum_name_the_stage_the_device_and_the_layer(mlp_lg, resnet_lg):
    cluster = Cluster.uniform(EQUAL, bandwidth=125e6, latency=1e-3)
    with pytest.raises(InputError, match=r"device 'd1' 1 row of every micro-batch in stage 0, but that stage holds "
                                         r"bn \(BatchNorm1d\).*one value per channel.*at least 2 rows"):
        partition(mlp_lg, cluster, batch=8, microbatches=2, groups=[["d0", "d1"]], rows=[[3, 1]])
    L = len(resnet_lg)
    cut = resnet_lg.allowed_cuts()[-1]  # the BatchNorms are in stage 0; stage 1 (the head) has none
    assert not resnet_lg.batch_stats(cut, L)
    plan = partition(resnet_lg, cluster, batch=8, microbatches=2, groups=[["d0", "d1"], ["d2", "d3"]],
                     rows=[[2, 2], [3, 1]], layers=[0, cut, L])
    assert plan.stages[1].rows == (3, 1)  # no batch statistics there: one row is fine
    with pytest.raises(InputError, match=r"device 'd1' 1 row .* stage 0, but that stage holds stem.1 "
                                         r"\(BatchNorm2d\).*too noisy"):
        partition(resnet_lg, cluster, batch=8, microbatches=2, groups=[["d0", "d1"], ["d2", "d3"]],
                  rows=[[3, 1], [2, 2]], layers=[0, cut, L])


def test_micro_batches_too_small_for_batchnorm_are_refused_by_name():
    cluster = Cluster.uniform(EQUAL, bandwidth=125e6, latency=1e-3)
    with pytest.raises(InputError, match=r"micro-batches of 1 row cannot train bn \(BatchNorm1d\)"):
        _compile_mlp(cluster, batch=4, microbatch_rows=1)

def test_a_batch_too_small_for_batchnorm_is_refused_by_name(mlp_lg):
    cluster = Cluster.uniform(EQUAL, bandwidth=125e6, latency=1e-3)
    with pytest.raises(InputError, match=r"a batch of 1 row cannot train bn \(BatchNorm1d\).*or a larger batch"):
        partition(mlp_lg, cluster, batch=1)


def test_replay_re_splits_a_batchnorm_stage_with_two_rows_a_device(resnet_lg):
    cluster = _named_cluster()
    L = len(resnet_lg)
    names = cluster.names
    for a in names:
        for b in names:
            for rows in (4, 5, 7):
                if a < b:
                    slots = split_rows([a, b], rows, (0, L), lg=resnet_lg, cluster=cluster)
                    assert sum(s.hi - s.lo for s in slots) == rows
                    assert min(s.hi - s.lo for s in slots) >= MIN_BATCH_STAT_ROWS, (a, b, slots)


# --- a stage refuses what torch refuses ----------------------------------------------------------


def _one_stage(compiled: asteroid.Compiled, microbatches: int, rows: tuple[int, ...]) -> asteroid.Compiled:
    """The compiled model as one stage over ``rows`` of every micro-batch per device, lowered by hand
    (what a hand-made or rewritten program may hold, past the planner's checks)."""
    L = len(compiled.layer_graph)
    slots, lo = [], 0
    for i, r in enumerate(rows):
        slots.append(StageSlot(f"d{i}", lo, lo + r))
        lo += r
    program = lower("1f1b", microbatches, sum(rows), (StageInfo(0, (0, L), tuple(slots)),), [])
    return dataclasses.replace(compiled, program=program)


def test_a_stage_refuses_batchnorm1d_over_one_row_like_eager_torch():
    cluster = Cluster.uniform(EQUAL, bandwidth=125e6, latency=1e-3)
    compiled = _compile_mlp(cluster, batch=8, microbatches=2, groups=[["d0", "d1"]], rows=[[2, 2]])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        _mlp()(x[:1])  # eager refuses one row
    runner = _one_stage(compiled, 2, (3, 1)).runner(lr=0.1)
    with pytest.raises(InputError, match=r"stage 0 on device 'd1': F of micro-batch 0 over 1 row \(r3:4\), but "
                                         r"bn \(BatchNorm1d\) .* one value per channel.*at least 2 rows"):
        runner.step((x,), y)
    # two rows a device train like eager on the same chunks: the layer before BatchNorm learns
    runner = _one_stage(compiled, 2, (2, 2)).runner(lr=0.1)
    before = runner.state_dict()["fc1.weight"].clone()
    runner.step((x,), y)
    assert not torch.equal(runner.state_dict()["fc1.weight"], before)


def test_a_stage_warns_once_of_batchnorm2d_over_one_image(caplog):
    cluster = Cluster.uniform(EQUAL, bandwidth=125e6, latency=1e-3)
    compiled = zoo.compiled("resnet18", cluster, batch=4, microbatches=2, groups=[["d0"]], rows=[[2]])
    entry = zoo.models.get("resnet18")
    runner = _one_stage(compiled, 2, (1, 1)).runner()
    with caplog.at_level(logging.WARNING, logger="asteroid_fx.backends.stage"):
        for _ in range(2):
            runner.step(entry.example(4, True), entry.labels(4, True))
    warned = [r.getMessage() for r in caplog.records if r.name == "asteroid_fx.backends.stage"]
    assert len(warned) == 2, warned  # once per device
    assert "stage 0 on device 'd0': F over 1 row: stem.1 (BatchNorm2d) normalizes over" in warned[0]
    assert "noisy; give every device of stage 0 at least 2 rows" in warned[0]
