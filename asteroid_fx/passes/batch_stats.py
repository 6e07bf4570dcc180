"""batch_stats: the nodes of a graph that take statistics over the rows they are given in training.

BatchNorm in train mode normalizes each channel over its input's rows (and their spatial
positions); in a stage group that is one device's row chunk (docs/semantics.md). From a chunk of one
row BatchNorm over (N, C) gets one value per channel: eager torch refuses it ("Expected more than 1
value per channel when training"), but the captured op computes it without a word, its output is
its bias and no gradient reaches the layers before it. So linearize records these nodes
(``Layer.batch_stats``), the planners give their stages at least ``MIN_BATCH_STAT_ROWS`` rows per
device, and ``backends/stage.StageReplica`` refuses an F over rows such a node cannot take.

Expects an fx.GraphModule whose nodes carry torch.export's ``val`` (or ShapeProp's
``tensor_meta``) and ``nn_module_stack`` metadata; without a shape, a node counts as one value per
row (the cautious reading). Guarantees: nothing in the graph is changed.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from asteroid_fx.ir.layer_graph import BatchStat

aten = torch.ops.aten


def _argument(index: int, name: str = "training") -> Callable[[fx.Node], bool]:
    """The op trains on its batch's statistics when its ``training`` argument says so."""
    def rule(node: fx.Node) -> bool:
        value = node.args[index] if len(node.args) > index else node.kwargs.get(name, False)
        return bool(value) if not isinstance(value, fx.Node) else True
    return rule


def _always(node: fx.Node) -> bool:
    return True


# op -> whether a node of it normalizes over its batch; an op not here takes no batch statistics
# (LayerNorm, GroupNorm and InstanceNorm normalize each row on its own)
TRAINS_ON_BATCH: dict[Any, Callable[[fx.Node], bool]] = {
    aten.batch_norm.default: _argument(5),
    aten.native_batch_norm.default: _argument(5),
    aten._native_batch_norm_legit.default: _argument(5),
    aten._native_batch_norm_legit_functional.default: _argument(5),
    aten._native_batch_norm_legit.no_stats: _argument(3),
    aten._batch_norm_with_update.default: _always,
    aten._batch_norm_with_update_functional.default: _always,
    F.batch_norm: _argument(5),
}


def _values_per_row(node: fx.Node) -> int:
    """Values per channel in one row of the node's input: the product of its spatial sizes."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    meta = x.meta if isinstance(x, fx.Node) else {}
    val = meta.get("val", meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    if shape is None:
        return 1
    return math.prod(s for s in shape[2:] if isinstance(s, int)) or 1


def _module_name(node: fx.Node) -> str:
    """The model's name of the layer and its class, e.g. "stages.0.0.bn1 (BatchNorm2d)"."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        return f"{path} ({cls.rsplit('.', 1)[-1]})"
    return f"node {node.name!r}"


def batch_stat(gm: fx.GraphModule, node: fx.Node) -> BatchStat | None:
    """What ``node`` normalizes over if it takes batch statistics in training, else None."""
    if node.op == "call_function":
        rule = TRAINS_ON_BATCH.get(node.target)
        if rule is None or not rule(node):
            return None
        return BatchStat(node.name, _module_name(node), _values_per_row(node))
    if node.op == "call_module":  # the symbolic_trace capture: the BatchNorm module itself
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            return None
        if not (mod.training or (mod.running_mean is None and mod.running_var is None)):
            return None
        return BatchStat(node.name, f"{node.target} ({type(mod).__name__})", _values_per_row(node))
    return None


def batch_stats(gm: fx.GraphModule) -> tuple[BatchStat, ...]:
    """Every node of ``gm`` that takes batch statistics in training, in graph order."""
    return tuple(b for n in gm.graph.nodes if (b := batch_stat(gm, n)) is not None)
