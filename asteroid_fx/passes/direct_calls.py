"""direct_calls: a stage module -> the same computation, cheaper to call once per micro-batch.

A stage of a small model runs in tens of microseconds, and two costs of a captured graph's Python
code are of that order: every parameter and buffer is read through a chain of
``Module.__getattr__`` calls (``getattr(self.layers, "0").weight`` is three), and every op is
called as an aten ``OpOverload``, whose generic entry matches its arguments against the schema
on each call. A worker calls its stage a few times per iteration, on the same tensors every time.

Expects an fx.GraphModule whose get_attr nodes name tensors (split's stages, captured modules).
Guarantees ``DirectCalls.module(*DirectCalls.bind(owner), *inputs)`` computes what
``owner(*inputs)`` does, op for op (same kernels, same order, same results bit for bit), where
``owner`` is that GraphModule or a copy of it:
  - every get_attr target becomes a leading placeholder, in ``attrs`` order; ``bind`` fetches the
    owner's tensors once, so the owner must keep them as its tensors, updated in place (as an
    optimizer over its parameters already requires);
  - an op in ``DIRECT`` is called through torch's own Python binding of the same aten op
    (``torch.relu`` for ``aten.relu.default``); every other op, and a call that names ``self``
    as a keyword (the bindings call it ``input``), stays as it is;
  - ``call_module`` nodes (the symbolic_trace capture path) call the owner's submodules, shared;
  - node names and node.meta are kept; the source module and its graph are left untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.fx as fx

aten = torch.ops.aten

# aten op -> torch's Python binding of it. Both dispatch the same op; the binding parses its
# arguments with generated code instead of the generic schema matching. An entry must reach the
# same aten ops on the same arguments (tests/test_direct_calls.py checks each with a sample).
DIRECT: dict[torch._ops.OpOverload, Callable] = {
    aten.adaptive_avg_pool2d.default: torch._C._nn.adaptive_avg_pool2d,
    aten.add.Tensor: torch.add,
    aten.batch_norm.default: torch.batch_norm,
    aten.bitwise_not.default: torch.bitwise_not,
    aten.conv2d.default: torch.conv2d,
    aten.dropout.default: torch.dropout,
    aten.embedding.default: torch.embedding,
    aten.flatten.using_ints: torch.flatten,
    aten.gelu.default: torch._C._nn.gelu,
    aten.hardtanh.default: torch._C._nn.hardtanh,
    aten.layer_norm.default: torch.layer_norm,
    aten.linear.default: torch._C._nn.linear,
    aten.masked_fill.Scalar: torch.masked_fill,
    aten.matmul.default: torch.matmul,
    aten.max_pool2d.default: torch.max_pool2d,
    aten.mul.Tensor: torch.mul,
    aten.relu.default: torch.relu,
    aten.select.int: torch.select,
    aten.softmax.int: torch.softmax,
    aten.tanh.default: torch.tanh,
    aten.transpose.int: torch.transpose,
    aten.unflatten.int: torch.unflatten,
    aten.unsqueeze.default: torch.unsqueeze,
}


@dataclasses.dataclass(frozen=True)
class DirectCalls:
    module: fx.GraphModule  # takes the tensors named by ``attrs``, then the source's inputs
    attrs: tuple[str, ...]  # get_attr targets (qualified names), in placeholder order

    def bind(self, owner: torch.nn.Module) -> tuple[Any, ...]:
        """``owner``'s tensors for ``attrs``: the leading arguments of every call."""
        out = []
        for target in self.attrs:
            value: Any = owner
            for part in target.split("."):
                value = getattr(value, part)
            out.append(value)
        return tuple(out)


def direct_calls(gm: fx.GraphModule) -> DirectCalls:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    read: dict[str, fx.Node] = {}
    # placeholders come first, in order: the tensors read, then the source's own inputs
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in read:
            read[node.target] = graph.placeholder(node.name)
            read[node.target].meta = dict(node.meta)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            env[node] = read[node.target]
            continue
        copied = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and node.target in DIRECT and "self" not in node.kwargs:
            copied.target = DIRECT[node.target]
        env[node] = copied
    graph.lint()
    return DirectCalls(fx.GraphModule(gm, graph, class_name=f"{type(gm).__name__}Direct"), tuple(read))
