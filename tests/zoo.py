"""The zoo's small models set up the way the pass tests start from: captured (and cost-annotated,
and linearized) on an example batch, or compiled for a cluster; and a cluster of named devices.
Every set-up seeds the weights with 0, so two tests that build the same model get the same one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.ir import catalog
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.passes.annotate_costs import annotate_costs
from asteroid_fx.passes.capture import Captured, capture
from asteroid_fx.passes.linearize import linearize


def captured(name: str, batch: int = 8, **build: Any) -> Captured:
    """The small ``name`` captured on an example batch of ``batch`` rows (``build``: its options)."""
    entry = models.get(name)
    torch.manual_seed(0)
    return capture(entry.build(small=True, **build), entry.example(batch, True))


def annotated(name: str, kinds: Sequence[str], batch: int = 8, **build: Any) -> Captured:
    """``captured``, with costs for ``kinds``."""
    return annotate_costs(captured(name, batch, **build), kinds)


def layer_graph(name: str, kinds: Sequence[str], batch: int = 8, **build: Any) -> LayerGraph:
    """``annotated``, linearized with the default coarsening."""
    return linearize(annotated(name, kinds, batch, **build))


def compiled(name: str, cluster: Any, batch: int = 8, **kw: Any) -> asteroid.Compiled:
    """The small ``name`` compiled for ``cluster`` with its zoo loss (``kw``: compile's options)."""
    entry = models.get(name)
    torch.manual_seed(0)
    return asteroid.compile(entry.build(small=True), cluster, example=entry.example(batch, True), loss=entry.loss,
                            **kw)


def three_devices() -> Cluster:
    """a, b, c (a Nano, a TX2, a Xavier NX) with stated budgets and links: a program printed for
    it does not depend on the machine."""
    return Cluster.uniform([Device("a", "jetson-nano", 2 * catalog.GiB), Device("b", "jetson-tx2", 4 * catalog.GiB),
                            Device("c", "jetson-xavier-nx", 4 * catalog.GiB)], bandwidth="1Gbps", latency="0.5ms")
