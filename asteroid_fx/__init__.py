"""asteroid_fx: train one PyTorch model across heterogeneous devices with hybrid pipeline
parallelism, compiled over torch.fx (after the MobiCom 2024 paper Asteroid)."""

from asteroid_fx.ir.cluster import Cluster, Device, resolve_cluster
from asteroid_fx.compiler import Compiled, compile
from asteroid_fx.ir.plan import Plan, StagePlan
from asteroid_fx.ir.program import Action, Op, Program

__all__ = ["Action", "Cluster", "Compiled", "Device", "Job", "Op", "Plan", "Program", "StagePlan", "Trained", "compile",
           "resolve_cluster", "train"]

# the runtime (torch.distributed, worker processes) loads only when training is asked for
_RUNTIME = {"train": "asteroid_fx.runtime.train", "Trained": "asteroid_fx.runtime.train",
            "Job": "asteroid_fx.runtime.job"}


def __getattr__(name: str):
    if name in _RUNTIME:
        import importlib

        return getattr(importlib.import_module(_RUNTIME[name]), name)
    raise AttributeError(f"module 'asteroid_fx' has no attribute {name!r}")
__version__ = "0.1.0"
