"""predict: a Plan's numbers are the simulation of the program it lowers to.

Every planner reports ``predict``'s Prediction, so a plan's predicted time, throughput and memory
are what ``sim`` measures on the program ``compile`` emits (the closed form in cost/estimate.py is
for searching only).
"""

from __future__ import annotations

from typing import Sequence

from asteroid_fx.cost.estimate import ADAM_STATE_FACTOR
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.plan import Plan, Prediction
from asteroid_fx.passes.lower import planned_program
from asteroid_fx.sim import simulate


def predict(plan: Plan, lg: LayerGraph, cluster: Cluster, opt_state_factor: float = ADAM_STATE_FACTOR,
            left_out: Sequence[tuple[str, str]] = (), *, shared_medium: bool = False) -> Prediction:
    """``plan``'s prediction by simulating ``planned_program(plan, lg)``. A plan made for recovery
    (``plan.recovery``) counts recovery's state copies in memory."""
    return simulate(planned_program(plan, lg), lg, cluster, shared_medium=shared_medium,
                    opt_state_factor=opt_state_factor, recovery=plan.recovery).prediction(left_out)
