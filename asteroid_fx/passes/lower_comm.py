"""lower_comm: compute-only Program -> Program with SEND/RECV, ALLREDUCE, TIE, NORM and STEP.

Between stages p and p+1 the rows of a micro-batch are redistributed: device d of stage p sends
each device e of stage p+1 exactly the rows their slots share, one message per pair of chunks
(a slot cut by its stage's splits runs each chunk as its own F and B); gradients go back the same
way.
A RECV sits right before the compute that consumes it and a SEND right after the compute that
produces it, so sends never wait for later work. After its last backward a device of a group of
two or more (or a device running its slot as several chunks) all-reduces the stage's gradients
with the group (chunk order), then steps. A device
holding several stages does this per stage, after that stage's last backward, and exchanges each
stage's messages with the devices of the stages next to it, as any device does.

A trained weight that two stages or more read (``ties``: a LayerGraph's, e.g. GPT-2's embedding and
head) is held by each of them; every device of those stages runs one TIE of it after the stage's
ALLREDUCE and before its STEP, so the copies sum their gradients and step alike. Weights tied
over the same stages share one TIE; a device with several runs them in one order (by stages,
then names), the same on every holder.

With ``clip_grad_norm`` (a positive number; None: no clipping) the gradients are clipped by their
global norm before any device steps, as ``torch.nn.utils.clip_grad_norm_`` before
``optimizer.step()``: every device runs one NORM over every device of the program after its last
backward, ALLREDUCE and TIE, and its STEPs come after it (a device holding several stages steps
them all there, in the order their last backwards ran, instead of after each stage's own).

Expects: ``cut_specs[p]`` = (activation specs, gradient specs) of the cut after stage p. A cut
whose tensors need no gradient gets no gradient messages.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import Tie
from asteroid_fx.ir.program import Action, Op, Program, StageInfo, TensorSpec

CutSpecs = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]


def _overlaps(lo: int, hi: int, other: StageInfo):
    """The devices of ``other`` owning rows of [lo, hi), one message per chunk of theirs."""
    for device, clo, chi in other.chunks:
        a, b = max(lo, clo), min(hi, chi)
        if a < b:
            yield device, (a, b)


def tie_actions(stages: Sequence[StageInfo], ties: Sequence[Tie]) -> dict[int, tuple[Action, ...]]:
    """Stage -> the TIEs each of its devices runs (in that order): one per set of holder stages,
    naming the trained weights those stages share, by the model's first name of each."""
    by_holders: dict[tuple[int, ...], list[Tie]] = {}
    for tie in ties:
        held = tie.stages(tuple(st.layers for st in stages))
        if tie.kind == "param" and len(held) > 1:
            by_holders.setdefault(held, []).append(tie)
    out: dict[int, list[Action]] = {}
    for held, tied in sorted(by_holders.items()):
        tied.sort(key=lambda t: t.names[0])
        group = tuple(d for p in held for d in stages[p].devices)
        twice = sorted({d for d in group if group.count(d) > 1})
        if twice:
            raise InputError(f"{', '.join(twice)} would hold two stages ({', '.join(map(str, held))}) of the tied "
                             f"weight {tied[0].names[0]}; a device holds one copy of a tie: place those stages "
                             "on different devices")
        params = tuple(t.names[0] for t in tied)
        specs = tuple(TensorSpec(t.dtype, t.shape) for t in tied)
        for p in held:
            out.setdefault(p, []).append(Action(Op.TIE, p, group=group, params=params, specs=specs))
    return {p: tuple(acts) for p, acts in out.items()}


def check_clip(clip_grad_norm: float | None) -> float | None:
    """``clip_grad_norm`` as a float, or InputError when it is not a positive finite number."""
    if clip_grad_norm is None:
        return None
    if isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, int | float) \
            or not (math.isfinite(clip_grad_norm) and clip_grad_norm > 0):
        raise InputError(f"clip_grad_norm={clip_grad_norm!r} is not a positive finite number; give the global "
                         "gradient norm to clip to (e.g. 1.0), or None for no clipping")
    return float(clip_grad_norm)


def lower_comm(program: Program, cut_specs: Sequence[CutSpecs], ties: Sequence[Tie] = (),
               clip_grad_norm: float | None = None) -> Program:
    stages = program.stages
    S = len(stages)
    if len(cut_specs) != S - 1:
        raise InputError(f"{S} stages need specs for {S - 1} cuts, got {len(cut_specs)}")
    tied = tie_actions(stages, ties)
    max_norm = check_clip(clip_grad_norm)
    lowered = []
    for device, acts in program.actions:
        out: list[Action] = []
        # each stage the device holds all-reduces and steps after its own last backward
        last_b = {a.stage: i for i, a in enumerate(acts) if a.op == Op.B}
        for i, a in enumerate(acts):
            p = a.stage
            info = stages[p]
            lo, hi = a.rows  # the chunk the compute runs: its messages carry its rows only
            if a.op == Op.F and p > 0:
                act_specs = cut_specs[p - 1][0]
                out += [Action(Op.RECV, p - 1, a.mb, rows, src, "act", act_specs)
                        for src, rows in _overlaps(lo, hi, stages[p - 1])]
            if a.op == Op.B and p < S - 1 and cut_specs[p][1]:
                out += [Action(Op.RECV, p, a.mb, rows, src, "grad", cut_specs[p][1])
                        for src, rows in _overlaps(lo, hi, stages[p + 1])]
            out.append(a)
            if a.op == Op.F and p < S - 1:
                out += [Action(Op.SEND, p, a.mb, rows, dst, "act", cut_specs[p][0])
                        for dst, rows in _overlaps(lo, hi, stages[p + 1])]
            if a.op == Op.B and p > 0 and cut_specs[p - 1][1]:
                out += [Action(Op.SEND, p - 1, a.mb, rows, dst, "grad", cut_specs[p - 1][1])
                        for dst, rows in _overlaps(lo, hi, stages[p - 1])]
            if last_b.get(p) == i:
                if len(info.chunks) > 1:  # a group, or one device running several chunks
                    out.append(Action(Op.ALLREDUCE, p, group=info.devices))
                out += tied.get(p, ())
                if max_norm is None:
                    out.append(Action(Op.STEP, p))
        if max_norm is not None:
            # the norm needs every gradient of every device: all its stages step after it
            first = program.stages_of(device)[0].index
            out.append(Action(Op.NORM, first, group=program.devices, max_norm=max_norm))
            out += [Action(Op.STEP, p) for p in sorted(last_b, key=last_b.get)]
        lowered.append((device, tuple(out)))
    return dataclasses.replace(program, actions=tuple(lowered))
