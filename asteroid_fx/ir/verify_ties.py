"""verify's rules for TIE, the gradient sum of a weight several stages hold (a part of phase 3 of
``verify``, apart because it looks across devices: every holder must run the same TIE)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from asteroid_fx.ir import ops
from asteroid_fx.ir.ops import Op
from asteroid_fx.ir.program import Action, Program
from asteroid_fx.ir.program_format import format_action, format_spec


def check_ties(p: Program, where: Any, held: Mapping[str, tuple[int, ...]]) -> list[str]:
    """TIEs: a group of whole stages (two or more, each device of them once, in stage and slot
    order) that includes the device; one spec per weight; a weight tied once per stage; and every
    holder runs the same TIE, in the same order relative to the other TIEs it shares."""
    problems: list[str] = []
    ties: dict[str, list[tuple[int, Action]]] = {d: [] for d, _ in p.actions}
    for device, acts in p.actions:
        seen: dict[tuple[int, str], int] = {}
        for i, a in enumerate(acts):
            if a.op != Op.TIE:
                continue
            ties[device].append((i, a))
            at = where.action(device, i)
            stages = sorted({s for d in a.group for s in held.get(d, ())})
            canonical = tuple(d for s in stages for d in p.stages[s].devices if d in a.group)
            whole = tuple(d for s in stages for d in p.stages[s].devices)
            if device not in a.group:
                problems.append(f"{at}: {device} is not in its group; a holder ties its own copy")
            if len(set(a.group)) != len(a.group) or any(held.get(d, ()) and sum(s in stages for s in held[d]) > 1
                                                      for d in a.group):
                problems.append(f"{at}: a device is in its group twice (or holds two of its stages); each copy of "
                                "the weights is one member")
            elif len(stages) < 2:
                problems.append(f"{at}: its group holds one stage; a stage's own copies are summed by its ALLREDUCE")
            elif a.group != whole:
                fix = " ".join(whole)
                how = "in stage and slot order" if canonical == whole else "every device of those stages"
                problems.append(f"{at}: the group must be {how}, [{fix}]")
            if len(a.specs) != len(a.params):
                problems.append(f"{at}: {len(a.params)} weights but {len(a.specs)} specs; give each weight its shape")
            for n in a.params:
                if (a.stage, n) in seen:
                    problems.append(f"{at}: ties {n} a second time (first on line {where.line(device, seen[(a.stage, n)])})")
                seen[(a.stage, n)] = i
    for device, mine in ties.items():
        for i, a in mine:
            for m in a.group:
                if m == device or m not in ties:
                    continue
                if not any(b.group == a.group and b.params == a.params for _, b in ties[m]):
                    problems.append(f"{where.action(device, i)}: has no matching TIE on {m}, which holds a copy; "
                                    f"add '{format_action(a._replace(stage=held[m][0]))}' to {m}'s actions")
                elif b_specs := [b.specs for _, b in ties[m] if b.group == a.group and b.params == a.params
                                 and b.specs != a.specs]:
                    problems.append(f"{where.action(device, i)}: specs differ from the TIE on {m} "
                                    f"({' '.join(map(format_spec, b_specs[0]))}); every copy has the same shape")
        for m in ties:
            if m <= device:
                continue
            ours = [ops.collective_key(a) for _, a in mine if m in a.group]
            theirs = [ops.collective_key(b) for _, b in ties[m] if device in b.group]
            if sorted(ours) == sorted(theirs) and ours != theirs:
                problems.append(f"{where.device(device)} and {where.device(m)}: run the TIEs they share in different "
                                "orders; every holder runs them in one order")
    return problems
