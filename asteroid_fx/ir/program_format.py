"""Printing a Program in its canonical text (the grammar is in ``program_text``'s docstring)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import NamedTuple

from asteroid_fx.ir import ops
from asteroid_fx.ir.ops import PAYLOADS, Op
from asteroid_fx.ir.program import Action, Program, StageInfo, TensorSpec, slot_chunks

FORMAT_NAME = "asteroid-program"

# Short dtype names keep spec lists readable; a dtype not listed prints as torch's own name.
DTYPE_SHORT: Mapping[str, str] = {
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "float64": "f64",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "b8",
}
DTYPE_LONG: Mapping[str, str] = {short: long for long, short in DTYPE_SHORT.items()}

# Names that print bare; any other is written as a JSON string.
BARE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@/+\-]*")


class ProgramLayout(NamedTuple):
    """The canonical text and where each part of the program landed in it (1-based lines)."""

    text: str
    stage_lines: tuple[int, ...]  # one per entry of Program.stages
    device_lines: Mapping[str, int]  # the `device NAME` line of each device
    action_lines: Mapping[tuple[str, int], int]  # (device, action index) -> line




def _name(s: str) -> str:
    # ensure_ascii keeps the quoted form on one line whatever characters the name holds
    return s if BARE_NAME.fullmatch(s) else json.dumps(s, ensure_ascii=True)


@functools.cache
def _torch_dtype_names() -> frozenset[str]:
    import torch  # only needed for dtypes outside the short table

    # vars(), not getattr: looking a word up must not trigger torch's lazy submodule imports
    return frozenset(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))


def is_torch_dtype(name: str) -> bool:
    return name in _torch_dtype_names()


def _format_dtype(dtype: str) -> str:
    if dtype in DTYPE_SHORT:
        return DTYPE_SHORT[dtype]
    if dtype not in DTYPE_LONG and BARE_NAME.fullmatch(dtype) and is_torch_dtype(dtype):
        return dtype
    return json.dumps(dtype, ensure_ascii=True)  # not a torch dtype: kept, but visibly quoted


def format_float(x: float) -> str:
    """The shortest text that reads back to the same float (``repr``: 0.5, 1e-05, inf)."""
    return repr(float(x))


def format_spec(spec: TensorSpec) -> str:
    return f"{_format_dtype(spec.dtype)}({','.join(str(d) for d in spec.shape)})"


def format_action(a: Action, *, short: bool = False) -> str:
    """One action as its text line (without indentation).

    ``short`` leaves out rows, group and specs: the form schedule grids use for their cells.
    """
    op = Op(a.op)
    parts = [op.value]
    if a.payload is not None:
        parts.append(a.payload if a.payload in PAYLOADS else json.dumps(a.payload, ensure_ascii=True))
    parts.append(f"s{a.stage}")
    if a.mb is not None:
        parts.append(f"mb{a.mb}")
    if a.rows is not None and not short:
        parts.append(f"r{a.rows[0]}:{a.rows[1]}")
    if a.peer is not None:
        parts += [ops.info(op).arrow, _name(a.peer)]
    if a.group and not short:
        parts.append("[" + " ".join(_name(d) for d in a.group) + "]")
    if a.params and not short:
        parts.append("{" + " ".join(_name(n) for n in a.params) + "}")
    if a.max_norm is not None:
        parts.append(f"max_norm={format_float(a.max_norm)}")
    if a.specs and not short:
        parts += [":", *(format_spec(s) for s in a.specs)]
    return " ".join(parts)


def _format_stage(st: StageInfo) -> str:
    # a slot run as several chunks shows its chunk boundaries: b[0:3:5] is rows 0:3 and 3:5
    slots = "".join(f" {_name(s.device)}[{':'.join(str(x) for x in [s.lo, *(hi for _, hi in slot_chunks(s, st.splits))])}]"
                    for s in st.slots)
    return f"stage {st.index} layers {st.layers[0]}:{st.layers[1]}{slots}"


def layout_program(p: Program) -> ProgramLayout:
    """The canonical text of ``p`` together with the line of every stage, device and action."""
    lines = [
        f"{FORMAT_NAME} v{p.version}",
        f"schedule {_name(p.schedule)}",
        f"microbatches {p.microbatches}",
        f"microbatch_rows {p.microbatch_rows}",
    ]
    stage_lines: list[int] = []
    for st in p.stages:
        lines.append(_format_stage(st))
        stage_lines.append(len(lines))
    lines.append("")  # the stage table and the device blocks read better apart
    device_lines: dict[str, int] = {}
    action_lines: dict[tuple[str, int], int] = {}
    for device, acts in p.actions:
        lines.append(f"device {_name(device)}")
        device_lines.setdefault(device, len(lines))
        for i, a in enumerate(acts):
            lines.append("  " + format_action(a))
            action_lines.setdefault((device, i), len(lines))
    return ProgramLayout("\n".join(lines) + "\n", tuple(stage_lines), device_lines, action_lines)


def format_program(p: Program) -> str:
    """The canonical text of ``p``; ``parse_program`` reads it back to an equal Program."""
    return layout_program(p).text


def format_program_lines(p: Program) -> tuple[str, dict[tuple[str, int], int]]:
    """The canonical text and the 1-based line of every (device, action index) in it."""
    layout = layout_program(p)
    return layout.text, dict(layout.action_lines)
