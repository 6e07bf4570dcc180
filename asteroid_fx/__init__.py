"""asteroid_fx: train one PyTorch model across heterogeneous devices with hybrid pipeline
parallelism, compiled over torch.fx (after the MobiCom 2024 paper Asteroid)."""

from asteroid_fx.ir.cluster import Cluster, Device, resolve_cluster
from asteroid_fx.compiler import Compiled, compile
from asteroid_fx.ir.plan import Plan, StagePlan
from asteroid_fx.ir.program import Action, Op, Program

__all__ = ["Action", "Cluster", "Compiled", "Device", "Op", "Plan", "Program", "StagePlan", "compile",
           "resolve_cluster"]
__version__ = "0.1.0"
