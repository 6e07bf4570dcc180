"""capture: models written elsewhere compile and train through the local backend exactly as eager
training does (several inputs, keyword inputs, structured outputs, buffers, a user loss, the
symbolic-trace fallback), and what cannot be captured fails with a CaptureError that names the
construct and says what to do.

Every parity test compiles for two single-device stages and trains 2 steps of 2 micro-batches
against eager gradient accumulation over the same micro-batches (docs/semantics.md).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import asteroid_fx as asteroid
from asteroid_fx.passes.capture import CaptureError, Captured, capture
from tests.eager import Call, eager_train

CLUSTER = "laptop-i7,laptop-i7"  # catalog kinds: nothing is measured on this machine
GROUPS = [["i7-0"], ["i7-1"]]
MICROBATCHES, ROWS = 2, 4
BATCH = MICROBATCHES * ROWS
LR = 0.1


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


def _like(x: Any) -> Any:
    return torch.randn_like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def train_both(model: nn.Module, args: tuple, loss: Callable, labels: Callable[[], torch.Tensor],
               kwargs: dict | None = None, stages: int = 2):
    """Compile, train 2 steps through ``compiled.run`` and eagerly; check they agree; return both."""
    kwargs = kwargs or {}
    torch.manual_seed(0)
    compiled = asteroid.compile(model, CLUSTER, example=args, kwargs=kwargs, loss=loss,
                                microbatches=MICROBATCHES, groups=GROUPS[:stages])
    assert len(compiled.stages) == stages
    batches = [(Call(tuple(_like(a) for a in args), {k: _like(v) for k, v in kwargs.items()}), labels())
               for _ in range(2)]
    flat = [(compiled.captured.flatten_inputs(a, k), y) for (a, k), y in batches]
    runner, losses = compiled.run(iter(flat), 2, optimizer=sgd)
    ref, ref_losses = eager_train(model, batches, loss, sgd, microbatches=MICROBATCHES, rows=ROWS)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    got, want = runner.state_dict(), ref.state_dict()
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, want[k]), k
    return compiled, runner, ref


def _mse(out, y):
    return F.mse_loss(out, y)


def _targets(width: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(BATCH, width)


def _classes(n: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, n, (BATCH,))


# --- inputs, outputs, buffers, loss --------------------------------------------------------------

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x, y):
        return self.head(torch.relu(self.a(x) + self.b(y)))


def test_several_positional_inputs():
    train_both(TwoInputs(), (torch.randn(BATCH, 4), torch.randn(BATCH, 3)), _mse, _targets(2))


class Towers(nn.Module):
    """Two inputs that never meet in forward still share one batch size."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(3, 2)

    def forward(self, x, y):
        return torch.tanh(self.a(x)), torch.tanh(self.b(y))


def test_inputs_that_never_meet_share_the_batch():
    captured = capture(Towers(), (torch.randn(BATCH, 4), torch.randn(BATCH, 3)))
    placeholders = [n for n in captured.module.graph.nodes if n.op == "placeholder"]
    assert all(captured.is_batched(n.meta["val"]) for n in placeholders)
    train_both(Towers(), (torch.randn(BATCH, 4), torch.randn(BATCH, 3)),
               lambda out, y: F.mse_loss(out[0], y) + F.mse_loss(out[1], y), _targets(2))


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, *, mask=None, scale: float = 1.0, shift=None):
        h = torch.relu(self.a(x)) * scale
        if mask is not None:
            h = h * mask
        if shift is not None:
            h = h + shift
        return self.head(h)


def test_keyword_inputs_flatten_in_placeholder_order():
    args, kwargs = (torch.randn(BATCH, 4),), {"scale": 0.5, "mask": torch.rand(BATCH, 8)}
    compiled, _, _ = train_both(Masked(), args, _mse, _targets(2), kwargs=kwargs)
    captured = compiled.captured
    names = [n.name for n in captured.module.graph.nodes if n.op == "placeholder"]
    assert names == ["x", "scale", "mask"]  # positional, then keywords in the example's order
    x, mask = torch.randn(BATCH, 4), torch.randn(BATCH, 8)
    flat = captured.flatten_inputs((x,), {"mask": mask, "scale": 0.5})  # any keyword order
    assert flat[0] is x and flat[1] == 0.5 and flat[2] is mask
    with pytest.raises(ValueError, match=r"keywords \['scale', 'mask'\]"):
        captured.flatten_inputs((x,), {"mask": mask})


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.cls, self.box = nn.Linear(8, 3), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.cls(h), {"box": self.box(h), "feature": h}


def test_tuple_and_dict_outputs_reach_the_loss_unflattened():
    seen = []

    def loss(out, y):
        logits, extra = out
        seen.append((type(out), type(extra), tuple(sorted(extra))))
        return F.cross_entropy(logits, y) + extra["box"].pow(2).mean() + 0.1 * extra["feature"].abs().mean()

    train_both(Heads(), (torch.randn(BATCH, 4),), loss, _classes(3))
    assert set(seen) == {(tuple, dict, ("box", "feature"))}


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.a(x))))


def test_batchnorm_running_statistics_train_like_eager():
    model = Normed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, runner, _ = train_both(model, (torch.randn(BATCH, 4),), F.cross_entropy, _classes(3))
    state = runner.state_dict()
    assert int(state["bn.num_batches_tracked"]) == 2 * MICROBATCHES
    assert not torch.equal(state["bn.running_mean"], before["bn.running_mean"])
    for k, v in model.state_dict().items():  # compile and run leave the user's model alone
        assert torch.equal(v, before[k]), k


class SmoothedHuber:
    """A user loss: an object with state, not a torch.nn.functional function."""

    def __init__(self, delta: float):
        self.delta = delta

    def __call__(self, out, y):
        return F.huber_loss(out, y, delta=self.delta) + 0.01 * out.pow(2).sum(1).mean()


def test_user_loss_function():
    train_both(TwoInputs(), (torch.randn(BATCH, 4), torch.randn(BATCH, 3)), SmoothedHuber(0.5), _targets(2))


# --- models written elsewhere ----------------------------------------------------------------------

class Containers(nn.Module):
    """nn.Sequential, nn.ModuleList and nn.ModuleDict, as model code in the wild nests them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        self.heads = nn.ModuleDict({"mean": nn.Linear(8, 3), "gate": nn.Linear(8, 3)})

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h) + h
        return self.heads["mean"](h) * torch.sigmoid(self.heads["gate"](h))


class Functional(nn.Module):
    """Functional calls, torch.cat, einsum and parameters used directly."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6) * 0.3)
        self.mix = nn.Parameter(torch.randn(12, 3) * 0.3)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h = F.relu(torch.einsum("bi,ij->bj", x, self.w))
        h = torch.cat([h, F.gelu(h)], dim=1)
        return torch.einsum("bk,kc->bc", h, self.mix) + self.bias


class Reshaping(nn.Module):
    """A reshape by ``x.shape[0]`` and a chain of tensor methods."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.proj(x).view(x.shape[0], 3, 4).transpose(1, 2).contiguous().softmax(-1)
        h = h.reshape(x.shape[0], -1).mul(2.0).sub(1.0).tanh()
        return self.head(h)


@pytest.mark.parametrize("model_type", [Containers, Functional, Reshaping])
def test_models_written_elsewhere_train_like_eager(model_type):
    torch.manual_seed(0)
    compiled, _, _ = train_both(model_type(), (torch.randn(BATCH, 4),), _mse, _targets(3))
    assert compiled.captured.method == "export"


# --- the symbolic-trace fallback -------------------------------------------------------------------

@torch.fx.wrap
def clip_outliers(x: torch.Tensor, limit: float) -> torch.Tensor:
    """A branch on data, the kind of helper people wrap so fx keeps it as one call: export
    cannot follow it, symbolic_trace records the call."""
    if x.abs().max() > limit:
        return x.clamp(-limit, limit)
    return x


class Clipped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x, mask, gain: float = 1.0):
        h = clip_outliers(self.a(x) * gain, 0.5)
        h = F.relu(self.bn(h)) * self.scale * mask
        return {"logits": self.head(h.view(x.shape[0], -1)), "hidden": h}


def _clipped_loss(out, y):
    return F.cross_entropy(out["logits"], y) + 0.1 * out["hidden"].pow(2).mean()


def test_fallback_captures_what_export_rejects():
    model = Clipped()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    captured = capture(model, (torch.randn(BATCH, 4),), {"mask": torch.rand(BATCH, 8), "gain": 3.0})
    assert captured.method == "symbolic_trace"
    gm = captured.module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders[:2]] == ["x", "mask"] and placeholders[2].meta["val"] == 3.0
    assert not placeholders[2].users  # a constant input: traced as its value
    for n in gm.graph.nodes:
        if n.op != "output":
            assert "val" in n.meta, n.name
    batched = {n.name for n in gm.graph.nodes if captured.is_batched(n.meta.get("val"))}
    assert {"x", "mask", "clip_outliers", "bn", "view", "head"} <= batched
    assert not captured.is_batched(gm.graph.find_nodes(op="get_attr", target="scale")[0].meta["val"])
    sizes = [n for n in gm.graph.nodes if captured.is_batch_sym(n.meta.get("val"))]
    assert [n.name for n in sizes] == ["getitem"]  # x.shape[0]
    for k, v in captured.module.state_dict().items():  # running forward to find shapes left no trace
        assert torch.equal(v, before[k]), k
    assert captured.unflatten_outputs([1, 2]) == {"logits": 1, "hidden": 2}


def test_fallback_trains_like_eager():
    compiled, _, _ = train_both(Clipped(), (torch.randn(BATCH, 4),), _clipped_loss, _classes(3),
                                kwargs={"mask": torch.rand(BATCH, 8), "gain": 3.0})
    assert compiled.captured.method == "symbolic_trace"


# --- what cannot be captured -----------------------------------------------------------------------

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            return h * 2
        return h


def test_a_branch_on_data_names_the_line_and_the_fix(capsys):
    with pytest.raises(CaptureError) as info:
        capture(Branchy(), (torch.randn(BATCH, 4),))
    message = str(info.value)
    lines, first = inspect.getsourcelines(Branchy.forward)
    line = first + next(i for i, text in enumerate(lines) if "if h.sum() > 0:" in text)
    assert message.startswith("cannot capture Branchy: forward makes a Python decision on a tensor's value")
    assert f"test_capture.py:{line}" in message and "if h.sum() > 0:" in message
    assert "torch.where" in message and "torch.cond" in message and "out of forward" in message
    assert len(message.splitlines()) <= 4
    assert "def forward" not in capsys.readouterr().err  # export's partial graph is not dumped


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x).view(BATCH, 2, 2).sum(1)


class FixedBatchClipped(nn.Module):
    """Export rejects the branch in clip_outliers; the fallback's run on another batch size fails."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return clip_outliers(self.a(x), 0.5).view(BATCH, 2, 2).sum(1)


@pytest.mark.parametrize("model_type, match", [
    (FixedBatch, rf"FixedBatch: forward depends on the batch size, it only runs on batches of {BATCH} rows"),
    (FixedBatchClipped, rf"FixedBatchClipped: forward runs on the example batch of {BATCH} rows but not on "
                        rf"{2 * BATCH} \(RuntimeError: shape"),
])
def test_a_fixed_batch_size_is_refused(model_type, match):
    with pytest.raises(CaptureError, match=match) as info:
        capture(model_type(), (torch.randn(BATCH, 4),))
    assert "write x.shape[0] or -1" in str(info.value)


class Bounded(nn.Module):
    """``[:4]`` needs batch >= 4: captured as default export does (the guard dropped), unless the
    inputs then lose their common batch size."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x, y=None):
        h = self.a(x)[:4]
        return h if y is None else h + y[:4]


def test_a_bounded_batch():
    captured = capture(Bounded(), (torch.randn(BATCH, 4),))
    assert captured.method == "export" and captured.is_batched(
        next(n for n in captured.module.graph.nodes if n.op == "placeholder").meta["val"])
    with pytest.raises(CaptureError, match=r"Bounded: forward depends on the batch size, it needs 4 <= batch"):
        capture(Bounded(), (torch.randn(BATCH, 4), torch.randn(BATCH, 3)))


def test_not_a_module():
    with pytest.raises(CaptureError, match="takes a torch.nn.Module, got function"):
        asteroid.compile(lambda x: x * 2, CLUSTER, example=torch.randn(BATCH, 4), loss=_mse)


def test_inputs_with_different_first_dimensions():
    with pytest.raises(CaptureError, match=r"first dimensions differ \(args\[0\]: 8, args\[1\]: 5\)"):
        capture(TwoInputs(), (torch.randn(BATCH, 4), torch.randn(5, 3)))


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, n: int):
        return self.w * n


def test_no_tensor_input():
    with pytest.raises(CaptureError, match="Counter got no tensor input.*batch-first tensor"):
        capture(Counter(), (4,))


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.randn(BATCH, 4), torch.tensor(2.0)), {}, r"input args\[1\] is a 0-dim tensor"),
    ((torch.randn(1, 4), torch.randn(1, 3)), {}, "example batch has 1 row"),
    ((torch.randn(BATCH, 4),), {"z": torch.randn(BATCH, 3)}, "do not fit TwoInputs.forward"),
])
def test_inputs_that_cannot_be_batched(args, kwargs, match):
    with pytest.raises(CaptureError, match=match):
        capture(TwoInputs(), args, kwargs)


def test_export_contract():
    captured = capture(TwoInputs(), (torch.randn(BATCH, 4), torch.randn(BATCH, 3)))
    assert isinstance(captured, Captured) and captured.method == "export"
    assert captured.example_batch == BATCH
    for n in captured.module.graph.nodes:
        if n.op in ("placeholder", "call_function", "get_attr"):
            assert "val" in n.meta, n.name
    attrs = {n.target for n in captured.module.graph.nodes if n.op == "get_attr"}
    assert attrs == {name for name, _ in TwoInputs().named_parameters()}
