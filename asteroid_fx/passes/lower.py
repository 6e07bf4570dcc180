"""lower: a Plan -> the complete Program, schedule then lower_comm.

The one place that composes the two lowering passes. ``compile``, ``replan`` and the planner's
prediction lower a Plan through ``lower_plan``; ``replay``, which rewrites a running program's
stage table without a Plan, through ``lower``. Expects a verified plan or stage table; guarantees
the program ``verify`` accepts (compile checks it under its debug flag, the tests always).
"""

from __future__ import annotations

from typing import Sequence

from asteroid_fx.ir.layer_graph import LayerGraph, Tie
from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.program import Program, StageInfo, TensorSpec
from asteroid_fx.passes.lower_comm import CutSpecs, lower_comm
from asteroid_fx.passes.schedule import schedule, schedule_table
from asteroid_fx.passes.split import Stage


def lower(schedule_kind: str, microbatches: int, microbatch_rows: int, table: Sequence[StageInfo],
          cut_specs: Sequence[CutSpecs], ties: Sequence[Tie] = (), clip_grad_norm: float | None = None) -> Program:
    """The program of ``table`` under ``schedule_kind``: every device's F/B order, then the
    row-slice SEND/RECV between stages, each group's ALLREDUCE, the TIEs of weights that several
    stages hold (``ties``: the LayerGraph's), with ``clip_grad_norm`` every device's NORM (the
    gradients clipped by their global norm), and the STEP."""
    return lower_comm(schedule_table(schedule_kind, microbatches, microbatch_rows, tuple(table)), cut_specs, ties,
                      clip_grad_norm)


def lower_plan(plan: Plan, cut_specs: Sequence[CutSpecs], ties: Sequence[Tie] = (),
               clip_grad_norm: float | None = None) -> Program:
    """``lower`` of the plan's stages and micro-batching."""
    return lower_comm(schedule(plan), cut_specs, ties, clip_grad_norm)


def stage_cut_specs(stages: Sequence[Stage]) -> list[CutSpecs]:
    """(activation specs, gradient specs) of every cut between split's stages: a cut's gradients
    are the ones of its values that need one."""
    return [(s.output_specs, tuple(spec for spec, g in zip(s.output_specs, s.output_grads) if g))
            for s in stages[:-1]]


def planned_program(plan: Plan, lg: LayerGraph) -> Program:
    """The program ``compile`` emits for ``plan``, with each cut's tensors as one byte string of
    ``lg.cuts[c].bytes_per_row`` bytes per row (activations, and the same back as gradients: the
    LayerGraph does not say which values need none, so this over-counts such values' gradients)."""
    specs = []
    for st in plan.stages[:-1]:
        one = (TensorSpec("uint8", (int(round(lg.cuts[st.layers[1]].bytes_per_row)),)),)
        specs.append((one, one))
    return lower_plan(plan, specs, lg.ties)
