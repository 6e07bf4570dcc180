"""Every backend against the local backend, the meaning of a Program: the same program from the
same weights gives the same losses and the same weights. Also the contract of backends/base.py:
the runners and transports of this package satisfy its protocols."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.distributed as dist

from asteroid_fx.backends import base
from asteroid_fx.backends.local import LocalRunner
from asteroid_fx.backends.torch_dist import Comm, DistWorker
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.errors import AsteroidError
from asteroid_fx.runtime.launcher import launch, load_weights
from asteroid_fx.runtime.spec import RunSpec, batches, compile_spec, iterations_of, optimizer_of

CLUSTER = Cluster.uniform([Device("a", "jetson-nano"), Device("b", "jetson-tx2"), Device("c", "jetson-xavier-nx")],
                          bandwidth=125e6, latency=1e-3)

CASES = {
    "mlp-hybrid-1f1b": RunSpec(model="mlp:small", batch=16, microbatches=2, groups=(("a", "b"), ("c",)),
                               rows=((5, 3), (8,)), iterations=3, optimizer="adam", lr=1e-3),
    "resnet18-hybrid-1f1b": RunSpec(model="resnet18:small", batch=16, microbatches=2, groups=(("a",), ("b", "c")),
                                    rows=((8,), (3, 5)), iterations=2),
    "gpt-pipeline-gpipe": RunSpec(model="gpt:small", batch=12, microbatches=3, schedule="gpipe",
                                  groups=(("a",), ("b", "c")), rows=((4,), (1, 3)), iterations=2),
}


def _local(spec: RunSpec, out) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A fresh compile of the spec (as every worker compiles it) run through the Runner protocol."""
    compiled = compile_spec(spec, CLUSTER)
    runner = compiled.runner(optimizer=optimizer_of(spec))
    assert isinstance(runner, base.Runner)
    losses = [runner.step(inputs, labels) for inputs, labels in batches(spec)]
    return losses, runner.state_dict()


def _torch_dist(spec: RunSpec, out) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One gloo process per device of the program, on loopback, within a bounded time."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    result = launch(spec, CLUSTER, out, timeout_s=240, log=lambda m: None)
    return result["losses"], load_weights(out, result["program"].devices)


BACKENDS: dict[str, Callable] = {"local": _local, "torch_dist": _torch_dist}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_backend_trains_like_the_local_backend(backend, case, tmp_path):
    spec = CASES[case]
    got_losses, got = BACKENDS[backend](spec, tmp_path)
    local = compile_spec(spec, CLUSTER)
    runner, losses = local.run(batches(spec), iterations_of(spec), optimizer=optimizer_of(spec))
    assert got_losses == pytest.approx(losses, rel=1e-6)
    want = runner.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")


# --- the contract ---------------------------------------------------------------------------------


def test_the_runners_and_the_gloo_transport_satisfy_the_protocols():
    for runner in (LocalRunner, DistWorker):
        assert all(callable(getattr(runner, m, None)) for m in ("step", "state_dict", "load")), runner
    for method in ("send_rows", "recv_rows", "sum_stage_chunks", "allreduce_tie", "allreduce_norm", "send_state",
                   "recv_state", "wait", "wait_all", "barrier"):
        assert callable(getattr(Comm, method, None)), method


def _two_stage():
    spec = RunSpec(model="mlp:small", batch=8, microbatches=2, groups=(("a",), ("b",)), rows=((4,), (4,)))
    return spec, compile_spec(spec, CLUSTER)


def test_load_sets_every_replica_and_names_what_is_missing():
    spec, c = _two_stage()
    runner = c.runner()
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in runner.state_dict().items()}
    runner.load(state)
    assert all(torch.equal(runner.state_dict()[k], v) for k, v in state.items())
    missing = next(iter(state))
    with pytest.raises(AsteroidError, match=missing.replace(".", r"\.")):
        runner.load({k: v for k, v in state.items() if k != missing})


def test_actions_and_stop_run_what_they_name():
    spec, c = _two_stage()
    inputs, labels = next(batches(spec))
    whole, by_actions, stopped = c.runner(), c.runner(), c.runner()
    loss = whole.step(inputs, labels)
    # the program's own action lists, given by name: the same iteration
    assert by_actions.step(inputs, labels, actions=dict(c.program.actions)) == loss
    assert by_actions.iteration == whole.iteration == 1
    # a prefix as a failure leaves it: no device has stepped, the iteration is unfinished
    before = stopped.state_dict()
    stopped.step(inputs, labels, stop={d: len(acts) - 1 for d, acts in c.program.actions})
    assert stopped.iteration == 0
    assert all(torch.equal(v, before[k]) for k, v in stopped.state_dict().items())
