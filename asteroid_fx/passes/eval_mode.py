"""eval_mode: a training graph -> the same computation as ``module.eval()`` would run it.

Captured and split graphs come from torch.export's training IR, where train mode is baked into
the ops (``aten.batch_norm(..., training=True, ...)``, ``aten.dropout(x, p, True)``, an in-place
``add_`` on every BatchNorm's ``num_batches_tracked``), and exported modules refuse ``.eval()``.
Inference backends and checks need the eval-mode meaning, so this pass rewrites the graph.

Expects an fx.GraphModule (a captured module or a stage). Guarantees a new GraphModule that:
  - computes what the source model computes in eval mode: BatchNorm normalizes with its running
    statistics, dropout is the identity, and no buffer is written (``EVAL_RULES``; every other
    op is unchanged, so an op that behaves differently in training and is not in the table keeps
    its training behaviour: add it there);
  - runs ``call_module`` submodules (the symbolic_trace capture path) as eval-mode copies;
  - shares the source's parameters and buffers (nothing is copied but eval-mode submodules)
    and keeps its node names, placeholders, outputs and node.meta;
  - leaves the source module and its graph untouched.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


def _set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    """Set an argument given either by position or by keyword."""
    if len(node.args) > index:
        node.args = (*node.args[:index], value, *node.args[index + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}


def _not_training(index: int) -> Callable[[fx.GraphModule, fx.Node], None]:
    """BatchNorm: normalize with the running statistics and leave them alone."""
    def rule(gm: fx.GraphModule, node: fx.Node) -> None:
        _set_arg(node, index, "training", False)
    return rule


def _identity(gm: fx.GraphModule, node: fx.Node) -> None:
    """Dropout in eval mode passes its input through."""
    node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["input"])
    node.graph.erase_node(node)


def _drop_batch_count(gm: fx.GraphModule, node: fx.Node) -> None:
    """``num_batches_tracked += 1`` happens only in training; other in-place adds are the model's own."""
    target = node.args[0]
    counter = (isinstance(target, fx.Node) and target.op == "get_attr"
               and str(target.target).rsplit(".", 1)[-1] == "num_batches_tracked")
    if counter and not node.users:
        node.graph.erase_node(node)


def _unchanged(gm: fx.GraphModule, node: fx.Node) -> None:
    pass


EVAL_RULES: dict[Any, Callable[[fx.GraphModule, fx.Node], None]] = {
    aten.batch_norm.default: _not_training(5),
    F.batch_norm: _not_training(5),
    aten.add_.Tensor: _drop_batch_count,
    aten.dropout.default: _identity,
    aten.feature_dropout.default: _identity,
    aten.alpha_dropout.default: _identity,
    aten.feature_alpha_dropout.default: _identity,
    F.dropout: _identity,
    F.dropout1d: _identity,
    F.dropout2d: _identity,
    F.dropout3d: _identity,
    F.alpha_dropout: _identity,
    F.feature_alpha_dropout: _identity,
}


def eval_mode(gm: fx.GraphModule) -> fx.GraphModule:
    graph = copy.deepcopy(gm.graph)  # same node names and meta; the source graph is not touched
    out = fx.GraphModule(gm, graph, class_name=f"{type(gm).__name__}Eval")
    for node in list(graph.nodes):
        if node.op == "call_function":
            EVAL_RULES.get(node.target, _unchanged)(out, node)
        elif node.op == "call_module":
            # the submodule object is shared with the source: switch a copy, not it
            out.set_submodule(node.target, copy.deepcopy(out.get_submodule(node.target)).eval())
    # the get_attr nodes of dropped buffer updates are dead now; graph.eliminate_dead_code would also
    # drop side effects the model meant to keep, so only unused attribute reads go
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    out.recompile()
    return out
