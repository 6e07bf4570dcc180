"""Hand-made plans, and the checks every lowered program must pass."""

from __future__ import annotations

from collections.abc import Sequence

from asteroid_fx.ir.plan import Plan, StagePlan
from asteroid_fx.ir.program import Program
from asteroid_fx.ir.program_text import format_program, parse_program, program_from_json, program_to_json
from asteroid_fx.ir.verify import verify


def layer_per_stage(groups: Sequence[Sequence[str]], rows: Sequence[Sequence[int]], microbatches: int,
                    kind: str) -> Plan:
    """A plan of one layer per stage: schedule and lower_comm read nothing else."""
    stages = tuple(StagePlan((p, p + 1), tuple(g), tuple(r)) for p, (g, r) in enumerate(zip(groups, rows)))
    return Plan(stages, microbatches, sum(rows[0]), kind, "test")


def check_roundtrip_and_verify(program: Program) -> None:
    """The text and JSON forms give the program back exactly, and verify accepts it."""
    assert parse_program(format_program(program)) == program
    assert program_from_json(program_to_json(program)) == program
    verify(program)
