"""asteroid show: print what `asteroid compile` wrote."""

from __future__ import annotations

import argparse
from pathlib import Path

from asteroid_fx.ir.json_fields import read_text
from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.program_text import ProgramParseError, parse_program
from asteroid_fx.ir.verify import verify


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("show", help="print what `asteroid compile` wrote")
    s.add_argument("folder")
    s.add_argument("what", nargs="?", choices=["all", "plan", "program", "layers", "stages"], default="all")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not (folder / "plan.json").exists():
        raise SystemExit(f"{folder} holds no compiled plan (plan.json missing); run `asteroid compile ... --out {folder}`")
    what = args.what
    if what in ("plan", "all"):
        print(Plan.load(folder / "plan.json"))
    if what in ("program", "all"):
        if what == "all":
            print()
        path = folder / "program.txt"
        try:
            program = parse_program(read_text(path, "program", ProgramParseError))
        except ProgramParseError as e:
            raise ProgramParseError(e if str(path) in str(e) else f"{path}: {e}") from None
        verify(program, origin=str(path))  # a program that would not run is shown as such, not printed as if it would
        print(program, end="")
    if what == "layers":
        print(read_text(folder / "layers.txt", "layer table"), end="")
    if what == "stages":
        for path in sorted(folder.glob("stage_*.py")):
            print(f"# {path.name}\n{read_text(path, 'stage code')}")
    return 0
