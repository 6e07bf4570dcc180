"""direct_calls: a stage's graph with its tensors as leading arguments and ops called through
torch's own bindings. Each binding in the table must reach the aten ops its overload does; a whole
stage must compute what it computed before, bit for bit, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from asteroid_fx.passes.capture import capture
from asteroid_fx.passes.direct_calls import DIRECT, direct_calls

aten = torch.ops.aten


class _Ops(TorchDispatchMode):
    """The aten ops a call reaches, in order."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


# one call per table entry, with arguments like the ones export records
SAMPLES = {
    aten.adaptive_avg_pool2d.default: lambda: (_x(2, 3, 5, 5), [1, 1]),
    aten.add.Tensor: lambda: (_x(2, 3), _x(2, 3)),
    aten.batch_norm.default: lambda: (_x(4, 3, 2, 2), _x(3), _x(3), torch.zeros(3), torch.ones(3), True, 0.1, 1e-5,
                                      False),
    aten.bitwise_not.default: lambda: (torch.rand(3, 3) > 0.5,),
    aten.conv2d.default: lambda: (_x(1, 2, 5, 5), _x(3, 2, 3, 3), _x(3), [1, 1], [1, 1]),
    aten.dropout.default: lambda: (_x(4, 5), 0.5, True),
    aten.embedding.default: lambda: (_x(10, 4), torch.randint(0, 10, (2, 3))),
    aten.flatten.using_ints: lambda: (_x(2, 3, 4), 1),
    aten.gelu.default: lambda: (_x(3, 4),),
    aten.hardtanh.default: lambda: (_x(3, 4), 0.0, 6.0),
    aten.layer_norm.default: lambda: (_x(2, 3, 4), [4], _x(4), _x(4), 1e-5),
    aten.linear.default: lambda: (_x(2, 3), _x(4, 3), _x(4)),
    aten.masked_fill.Scalar: lambda: (_x(3, 3), torch.rand(3, 3) > 0.5, float("-inf")),
    aten.matmul.default: lambda: (_x(2, 3, 4), _x(2, 4, 5)),
    aten.max_pool2d.default: lambda: (_x(1, 2, 6, 6), [2, 2], [2, 2]),
    aten.mul.Tensor: lambda: (_x(2, 3), 0.125),
    aten.relu.default: lambda: (_x(2, 3),),
    aten.select.int: lambda: (_x(2, 3, 4), 1, 0),
    aten.softmax.int: lambda: (_x(2, 5), -1),
    aten.tanh.default: lambda: (_x(2, 3),),
    aten.transpose.int: lambda: (_x(2, 3, 4), 1, 2),
    aten.unflatten.int: lambda: (_x(2, 12), 1, [3, 4]),
    aten.unsqueeze.default: lambda: (_x(2, 3), 1),
}


def test_every_entry_has_a_sample():
    assert set(SAMPLES) == set(DIRECT)


@pytest.mark.parametrize("op", sorted(DIRECT, key=str), ids=str)
def test_a_binding_reaches_the_ops_of_its_overload(op):
    torch.manual_seed(0)
    args = SAMPLES[op]()
    runs = []
    for call in (op, DIRECT[op]):
        torch.manual_seed(1)  # dropout draws the same mask
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]  # batch_norm writes its stats
        with _Ops() as seen:
            out = call(*copies)
        runs.append((seen.ops, out, copies))
    (ops, out, state), (direct_ops, direct_out, direct_state) = runs
    assert direct_ops == ops
    assert torch.equal(direct_out, out)
    assert all(torch.equal(a, b) for a, b in zip(direct_state, state) if isinstance(a, torch.Tensor))


class _Block(torch.nn.Module):
    """Every kind of node a stage has: a nested parameter, a buffer written in place (BatchNorm's
    running statistics), a dropout, an op the table leaves alone (aten.add_ on the counter)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                        torch.nn.ReLU(), torch.nn.Dropout(0.2))
        self.head = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def test_a_direct_stage_computes_what_the_stage_does():
    torch.manual_seed(0)
    gm = capture(_Block(), (torch.randn(4, 3, 6, 6),)).module
    twin = copy.deepcopy(gm)
    direct = direct_calls(twin)
    bound = direct.bind(twin)
    assert direct.attrs and "getattr" not in direct.module.code
    assert all(isinstance(b, torch.Tensor) for b in bound)
    assert {n.target for n in direct.module.graph.nodes if n.op == "call_function"} & set(DIRECT) == set()
    x = torch.randn(8, 3, 6, 6)
    for _ in range(2):  # the second call sees the first one's buffer updates
        torch.manual_seed(2)
        (out,) = gm(x)
        torch.manual_seed(2)
        (direct_out,) = direct.module(*bound, x)
        assert torch.equal(direct_out, out)
        out.square().sum().backward()
        direct_out.square().sum().backward()
    for (name, a), b in zip(gm.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(gm.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), name
    # the source module and its graph are untouched
    assert [n.op for n in twin.graph.nodes] == [n.op for n in gm.graph.nodes]
    assert [n.target for n in twin.graph.nodes] == [n.target for n in gm.graph.nodes]
