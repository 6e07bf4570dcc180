"""The layer profiler: every layer of a LayerGraph run and timed on this device -> DeviceProfile.

  measurement.py  ``measure`` (the contract is its docstring), ``prepare``, the overhead fit
  timing.py       running and timing a block of layers as one stage; ``time_stage``
  memory.py       bytes saved for backward, the peak, gradients and optimizer state

Imports run measurement -> timing -> memory.
"""

from asteroid_fx.runtime.profiler.measurement import Progress, fit_overhead, measure, prepare, probe_rows
from asteroid_fx.runtime.profiler.timing import BlockRunner, example_rows, stage_inputs, stages_for, time_stage

__all__ = ["BlockRunner", "Progress", "example_rows", "fit_overhead", "measure", "prepare", "probe_rows",
           "stage_inputs", "stages_for", "time_stage"]
