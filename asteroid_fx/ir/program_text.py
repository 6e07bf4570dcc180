"""The canonical text and JSON forms of a Program (the schedule IR): import them from here.

Printing is ``program_format``, reading the text back ``program_parse``, the JSON form
``program_json``; this module is their one public face.

The text is what people read in bug reports and what golden tests compare, so it is one action per
line, with every field spelled the same way everywhere::

    asteroid-program v1
    schedule 1f1b
    microbatches 4
    microbatch_rows 16
    stage 0 layers 0:5 nano0[0:10] tx20[10:16]
    stage 1 layers 5:9 xavier0[0:16]

    device nano0
      F s0 mb0 r0:10
      SEND act s0 mb0 r0:10 -> xavier0 : f32(64,8,8) i64(16)
      ALLREDUCE s0 [nano0 tx20]
      TIE s0 [nano0 tx20 xavier0] {tok_emb.weight} : f32(64,32)
      NORM s0 [nano0 tx20 xavier0] max_norm=1.0
      ...

An action line is
``OP [PAYLOAD] sSTAGE [mbMB] [rLO:HI] [ARROW PEER] [[GROUP ...]] [{PARAM ...}] [max_norm=X] [: SPEC ...]``:
a field at its ``Action`` default is left out, so each op prints only what it uses. The arrow says
which way data flows (``->`` for SEND and BACKUP, ``<-`` for RECV and RESTORE). A SPEC is the
dtype's short name (or torch's name) and the shape of one row: ``f32(64,8,8)``, ``i64()`` (a
TIE's specs are its weights' whole shapes). A NORM's ``max_norm`` is written as Python's ``repr``
of the float, the shortest text that reads back to it.

Names (devices, the schedule) that are not plain words are written as JSON strings, so
``parse_program(format_program(p)) == p`` holds for every Program, whatever its names. The parser
also takes ``#`` comments, blank lines and any spacing between tokens.
"""

from __future__ import annotations

from asteroid_fx.ir.ops import PAYLOADS
from asteroid_fx.ir.program_format import (
    DTYPE_SHORT,
    FORMAT_NAME,
    ProgramLayout,
    format_action,
    format_program,
    format_program_lines,
    format_spec,
    layout_program,
)
from asteroid_fx.ir.program_json import program_from_json, program_to_json, read_program_json
from asteroid_fx.ir.program_parse import ProgramParseError, parse_action, parse_program

__all__ = [
    "DTYPE_SHORT",
    "FORMAT_NAME",
    "PAYLOADS",
    "ProgramLayout",
    "ProgramParseError",
    "format_action",
    "format_program",
    "format_program_lines",
    "format_spec",
    "layout_program",
    "parse_action",
    "parse_program",
    "program_from_json",
    "program_to_json",
    "read_program_json",
]
