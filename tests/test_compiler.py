"""compile: the passes top to bottom give, for every zoo model, stage count and schedule, a program
that round trips and verifies, whose transfers carry what split says crosses each cut; a golden
(tests/golden/compiler/) pins the printed IR of a small hybrid program."""

from __future__ import annotations

import pytest
import torch

import asteroid_fx
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program import Op
from asteroid_fx.ir.program_text import format_program, parse_program
from asteroid_fx.passes.planners.stage_count import most_stages
from tests import zoo
from tests.plans import check_roundtrip_and_verify

SCHEDULES = ("gpipe", "1f1b", "1f1b+1", "1f1b+3")


def _four_devices() -> Cluster:
    kinds = ("jetson-tx2", "jetson-nano", "jetson-xavier-nx", "jetson-orin-nano")
    return Cluster.uniform([Device(n, k) for n, k in zip("abcd", kinds)], bandwidth=125e6, latency=1e-3)


def _round_trip_cases():
    """mlp and gpt x stage count x schedule; the default run takes every stage count of both and
    every schedule of each, the rest are slow."""
    for i, name in enumerate(["mlp", "gpt"]):
        for n_stages in (1, 2, 3, 4):
            for j, kind in enumerate(SCHEDULES):
                default = j == (n_stages - 1 + i) % len(SCHEDULES)
                yield pytest.param(name, n_stages, kind, marks=() if default else pytest.mark.slow,
                                   id=f"{name}-{n_stages}-{kind}")


@pytest.mark.parametrize("name, n_stages, kind", list(_round_trip_cases()))
def test_compiled_programs_round_trip_and_verify(name, n_stages, kind):
    most = most_stages(zoo.layer_graph(name, [d.kind for d in _four_devices().devices]))
    if n_stages > most:  # the small mlp's third relu would be a stage alone: refused, not a sham stage
        with pytest.raises(InputError, match=f"{n_stages} stages asked for, .* at most {most} stages"):
            zoo.compiled(name, _four_devices(), microbatches=2, schedule_kind=kind, stages=n_stages)
        return
    compiled = zoo.compiled(name, _four_devices(), microbatches=2, schedule_kind=kind, stages=n_stages)
    program = compiled.program
    assert len(program.stages) == n_stages and program.schedule == kind
    check_roundtrip_and_verify(program)
    # the transfers carry what split says crosses each cut
    for p, stage in enumerate(compiled.stages[:-1]):
        acts = [a for _, a_list in program.actions for a in a_list if a.op == Op.SEND and a.stage == p]
        assert {a.specs for a in acts if a.payload == "act"} == {stage.output_specs}


def test_golden_mlp_2stage_3dev_1f1b(golden):
    compiled = zoo.compiled("mlp", zoo.three_devices(), microbatches=2, schedule_kind="1f1b",
                            groups=[["a", "b"], ["c"]], rows=[[3, 1], [4]], layers=[0, 3, 6])
    file = golden("compiler/mlp_2stage_3dev_1f1b.txt")
    file.check(format_program(compiled.program), section=None)
    assert parse_program(file.path.read_text()) == compiled.program


class _NoParameters(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2


def test_a_model_without_parameters_is_refused_at_compile():
    # it compiled before and failed at the first backward, deep in autograd
    with pytest.raises(InputError, match="_NoParameters has no parameter that requires grad"):
        asteroid_fx.compile(_NoParameters(), "edge-4-1g", example=torch.randn(8, 4))
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(InputError, match="nothing to train"):
        asteroid_fx.compile(frozen, "edge-4-1g", example=torch.randn(8, 4))


def test_an_example_the_model_cannot_run_names_the_node():
    # integer inputs to a float layer: export's fake tensors let them through, the first real
    # run (the cost annotation) did not, with a raw traceback
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(InputError, match=r"fails on the example inputs at node 'linear' .*module '0'.*dtype"):
        asteroid_fx.compile(model, "edge-4-1g", example=torch.randint(0, 4, (8, 4)))
