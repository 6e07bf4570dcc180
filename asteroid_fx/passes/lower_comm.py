"""lower_comm: compute-only Program -> Program with SEND/RECV, ALLREDUCE and STEP.

Between stages p and p+1 the rows of a micro-batch are redistributed: device d of stage p sends
each device e of stage p+1 exactly the rows their slots share; gradients go back the same way.
A RECV sits right before the compute that consumes it and a SEND right after the compute that
produces it, so sends never wait for later work. After its last backward a device of a group of
two or more all-reduces the stage's gradients with the group (slot order), then steps. A device
holding several stages does this per stage, after that stage's last backward, and exchanges each
stage's messages with the devices of the stages next to it, as any device does.

Expects: ``cut_specs[p]`` = (activation specs, gradient specs) of the cut after stage p. A cut
whose tensors need no gradient gets no gradient messages.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program import Action, Op, Program, StageInfo, TensorSpec

CutSpecs = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]


def _overlaps(lo: int, hi: int, other: StageInfo):
    for slot in other.slots:
        a, b = max(lo, slot.lo), min(hi, slot.hi)
        if a < b:
            yield slot.device, (a, b)


def lower_comm(program: Program, cut_specs: Sequence[CutSpecs]) -> Program:
    stages = program.stages
    S = len(stages)
    if len(cut_specs) != S - 1:
        raise InputError(f"{S} stages need specs for {S - 1} cuts, got {len(cut_specs)}")
    lowered = []
    for device, acts in program.actions:
        out: list[Action] = []
        # each stage the device holds all-reduces and steps after its own last backward
        last_b = {a.stage: i for i, a in enumerate(acts) if a.op == Op.B}
        for i, a in enumerate(acts):
            p = a.stage
            info = stages[p]
            slot = program.slot_of(device, p)
            if a.op == Op.F and p > 0:
                act_specs = cut_specs[p - 1][0]
                out += [Action(Op.RECV, p - 1, a.mb, rows, src, "act", act_specs)
                        for src, rows in _overlaps(slot.lo, slot.hi, stages[p - 1])]
            if a.op == Op.B and p < S - 1 and cut_specs[p][1]:
                out += [Action(Op.RECV, p, a.mb, rows, src, "grad", cut_specs[p][1])
                        for src, rows in _overlaps(slot.lo, slot.hi, stages[p + 1])]
            out.append(a)
            if a.op == Op.F and p < S - 1:
                out += [Action(Op.SEND, p, a.mb, rows, dst, "act", cut_specs[p][0])
                        for dst, rows in _overlaps(slot.lo, slot.hi, stages[p + 1])]
            if a.op == Op.B and p > 0 and cut_specs[p - 1][1]:
                out += [Action(Op.SEND, p - 1, a.mb, rows, dst, "grad", cut_specs[p - 1][1])
                        for dst, rows in _overlaps(slot.lo, slot.hi, stages[p - 1])]
            if last_b.get(p) == i:
                if len(info.slots) > 1:
                    out.append(Action(Op.ALLREDUCE, p, group=info.devices))
                out.append(Action(Op.STEP, p))
        lowered.append((device, tuple(out)))
    return dataclasses.replace(program, actions=tuple(lowered))
