"""sim: time a Program on a Cluster with the cost model, without running it (see engine.py)."""

from asteroid_fx.sim.engine import backups_held, element_bytes, simulate, spec_bytes, transfer_bytes
from asteroid_fx.sim.report import DeviceReport, MemoryTimeline, Simulation, Span, Transfer

__all__ = ["DeviceReport", "MemoryTimeline", "Simulation", "Span", "Transfer", "backups_held", "element_bytes",
           "simulate", "spec_bytes", "transfer_bytes"]
