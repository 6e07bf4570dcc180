"""sim: time a Program on a Cluster with the cost model, without running it (see engine.py)."""

from asteroid_fx.sim.engine import (DeviceReport, MemoryTimeline, Simulation, Span, Transfer, backups_held,
                                    element_bytes, simulate, spec_bytes, transfer_bytes)

__all__ = ["DeviceReport", "MemoryTimeline", "Simulation", "Span", "Transfer", "backups_held", "element_bytes",
           "simulate", "spec_bytes", "transfer_bytes"]
