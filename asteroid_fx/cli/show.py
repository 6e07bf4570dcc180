"""asteroid show: print what `asteroid compile` wrote."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.program_text import parse_program


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
        print(Plan.from_json(json.loads((folder / "plan.json").read_text())))
    if what in ("program", "all"):
        if what == "all":
            print()
        print(parse_program((folder / "program.txt").read_text()), end="")
    if what == "layers":
        print((folder / "layers.txt").read_text(), end="")
    if what == "stages":
        for path in sorted(folder.glob("stage_*.py")):
            print(f"# {path.name}\n{path.read_text()}")
    return 0
