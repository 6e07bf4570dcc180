"""verify's rules for NORM, the clipping of every gradient by the global norm (a part of phase 3 of
``verify``, apart because it looks across devices: every device of the program runs the same one)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from asteroid_fx.ir.ops import Op
from asteroid_fx.ir.program import Action, Program
from asteroid_fx.ir.program_format import format_action, format_float

# what a device's NORM must follow: the gradients it reads are final only after these
_BEFORE_NORM = (Op.B, Op.ALLREDUCE, Op.TIE)


def check_norms(p: Program, where: Any, held: Mapping[str, tuple[int, ...]]) -> list[str]:
    """NORMs: none at all, or exactly one on every device, naming its first stage, over every
    device of the program in program order, with one positive finite ``max_norm`` for all; on each
    device after every B, ALLREDUCE and TIE and before every STEP (the optimizer steps on clipped
    gradients, and the norm must see every gradient summed)."""
    norms = {d: [(i, a) for i, a in enumerate(acts) if a.op == Op.NORM] for d, acts in p.actions}
    first = next(((d, found[0]) for d, found in norms.items() if found), None)
    if first is None:
        return []
    problems: list[str] = []
    everyone = p.devices
    model = first[1][1]._replace(group=everyone)
    for device, acts in p.actions:
        found = norms[device]
        mine = held.get(device, ())
        if not found:
            fix = model._replace(stage=mine[0]) if mine else model
            problems.append(f"{where.device(device)}: never runs NORM, which every device of the program runs "
                            f"together before its STEP; add '{format_action(fix)}' after its last B, ALLREDUCE and "
                            "TIE")
            continue
        for extra, _ in found[1:]:
            problems.append(f"{where.action(device, extra)}: a second NORM (first on line "
                            f"{where.line(device, found[0][0])}); the gradients are clipped once per iteration")
        i, a = found[0]
        at = where.action(device, i)
        if mine and a.stage != mine[0]:
            problems.append(f"{at}: names stage {a.stage}; a NORM covers every stage of its device and names the "
                            f"first, s{mine[0]}")
        if a.group != everyone:
            problems.append(f"{at}: the group must be every device of the program in program order, "
                            f"[{' '.join(everyone)}]")
        if not (math.isfinite(a.max_norm) and a.max_norm > 0):
            problems.append(f"{at}: max_norm {format_float(a.max_norm)} is not a positive finite number; clip to "
                            "a norm above 0")
        elif a.max_norm != first[1][1].max_norm:
            problems.append(f"{at}: max_norm {format_float(a.max_norm)} differs from {first[0]}'s "
                            f"({format_float(first[1][1].max_norm)}); every device clips to one norm")
        problems += _order(where, device, acts, i)
    return problems


def _order(where: Any, device: str, acts: tuple[Action, ...], i: int) -> list[str]:
    """The NORM at index ``i`` of ``device``'s actions after what makes the gradients final, before
    every STEP."""
    problems: list[str] = []
    late = [j for j, b in enumerate(acts) if j > i and b.op in _BEFORE_NORM]
    if late:
        j = late[0]
        problems.append(f"{where.action(device, i)}: runs before {acts[j].op.value} (line {where.line(device, j)}); "
                        "the norm is taken once every gradient of the device is summed, so it comes after its last "
                        "B, ALLREDUCE and TIE")
    early = [j for j, b in enumerate(acts) if j < i and b.op == Op.STEP]
    if early:
        j = early[0]
        problems.append(f"{where.action(device, j)}: runs before NORM (line {where.line(device, i)}); the optimizer "
                        "must step on the clipped gradients, so every STEP comes after the device's NORM")
    return problems
