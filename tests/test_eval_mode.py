"""eval_mode: a training-IR graph rewritten to what the model computes in eval mode. Each case is a
Before/Expected pair of the graph's ops, plus the rewritten module against ``model.eval()``."""

from __future__ import annotations

import torch
import torch.fx as fx

from asteroid_fx.passes.capture import capture
from asteroid_fx.passes.eval_mode import eval_mode


def _ops(gm: fx.GraphModule) -> list[str]:
    """The compute nodes, batch_norm with its training flag."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
            out.append(f"{name}(training={n.args[5]})" if name == "batch_norm" else name)
        elif n.op == "call_module":
            out.append(f"module {type(gm.get_submodule(n.target)).__name__}(training={gm.get_submodule(n.target).training})")
    return out


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))


def test_exported_batchnorm_and_dropout():
    model, x = _net(), torch.randn(5, 6)
    captured = capture(model, (x,))
    before_code = captured.module.code
    state = {k: v.clone() for k, v in captured.module.state_dict().items()}
    assert _ops(captured.module) == [
        "linear", "add_", "batch_norm(training=True)", "relu", "dropout", "linear"]

    evaluated = eval_mode(captured.module)

    assert _ops(evaluated) == ["linear", "batch_norm(training=False)", "relu", "linear"]
    with torch.no_grad():
        assert torch.equal(evaluated(x)[0], model.eval()(x))
    # the source graph and its buffers are untouched, even after the rewritten module ran
    assert captured.module.code == before_code
    assert all(torch.equal(v, state[k]) for k, v in captured.module.state_dict().items())
    # parameters are shared, not copied
    assert {id(p) for p in evaluated.parameters()} <= {id(p) for p in captured.module.parameters()}


class Counting(torch.nn.Module):
    """A model that counts its calls in a buffer: eval mode counts too, so the update stays."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x)


def test_a_models_own_buffer_update_stays():
    captured = capture(Counting(), (torch.randn(3, 4),))
    assert _ops(captured.module) == ["add_", "linear"]
    assert _ops(eval_mode(captured.module)) == ["add_", "linear"]


def test_symbolic_trace_submodules_run_as_eval_copies():
    model, x = _net(), torch.randn(5, 6)
    traced = fx.symbolic_trace(model)
    assert _ops(traced) == ["module Linear(training=True)", "module BatchNorm1d(training=True)",
                            "module ReLU(training=True)", "module Dropout(training=True)",
                            "module Linear(training=True)"]

    evaluated = eval_mode(traced)

    assert _ops(evaluated) == ["module Linear(training=False)", "module BatchNorm1d(training=False)",
                               "module ReLU(training=False)", "module Dropout(training=False)",
                               "module Linear(training=False)"]
    assert all(m.training for m in traced.modules())
    with torch.no_grad():
        assert torch.equal(evaluated(x), model.eval()(x))
