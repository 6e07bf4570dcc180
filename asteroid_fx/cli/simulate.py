"""asteroid simulate PLAN_DIR: time a compiled program with the cost model; trace and Gantt chart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asteroid_fx.cli import args as args_
from asteroid_fx.cost.estimate import ADAM_STATE_FACTOR
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.layer_graph import read_costs
from asteroid_fx.ir.plan import Plan
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program_text import read_program_json
from asteroid_fx.ir.verify import verify
from asteroid_fx.sim import simulate


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``asteroid simulate`` to the CLI's subcommands."""
    s = sub.add_parser("simulate", help="time a compiled program with the cost model; write a trace and a Gantt chart")
    s.add_argument("folder", help="what `asteroid compile --out` wrote (program.json, cluster.json, costs.json)")
    s.add_argument("--trace", metavar="OUT.json", type=args_.out_file, help="write a Chrome/Perfetto trace (open in ui.perfetto.dev)")
    s.add_argument("--png", metavar="OUT.png", type=args_.out_file, help="write a Gantt chart as PNG (needs matplotlib)")
    s.add_argument("--svg", metavar="OUT.svg", type=args_.out_file, help="write a Gantt chart as SVG (needs matplotlib)")
    s.add_argument("--grid", action="store_true", help="print the steps x devices grid")
    s.add_argument("--shared-medium", action="store_true",
                   help="all transfers share one channel (Wi-Fi) instead of per-device full-duplex links")
    s.add_argument("--optimizer-state", type=args_.number(), default=ADAM_STATE_FACTOR,
                   help="optimizer state per weight, in weights (2 Adam, 1 SGD with momentum, 0 SGD)")
    s.add_argument("--recover", action="store_true",
                   help="count the state copies recovery keeps (rollback points, backups) in memory; "
                        "on by itself for a plan compiled with --recover")
    s.set_defaults(func=run)
    return s


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    needed = {"program.json": "the program", "cluster.json": "the cluster", "costs.json": "the cost model"}
    missing = [f"{name} ({what})" for name, what in needed.items() if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"{folder} lacks {', '.join(missing)}; run `asteroid compile ... --out {folder}` "
                         "(a folder compiled before costs.json was written needs compiling again)")
    program = read_program_json(folder / "program.json")
    cluster = Cluster.load(folder / "cluster.json")
    lg = read_costs(folder / "costs.json")
    compiled_for_recovery = (folder / "plan.json").exists() and Plan.load(folder / "plan.json").recovery
    # a program that would not run has no time: timing one with F or B missing gave a throughput
    verify(program, layers=len(lg), origin=str(folder / "program.json"))
    _check_costs_cover(folder, program, cluster, lg)
    result = simulate(program, lg, cluster, shared_medium=args.shared_medium, opt_state_factor=args.optimizer_state,
                      recovery=args.recover or compiled_for_recovery)
    print(result.summary())
    if args.grid:
        print()
        print(result.grid())
    if args.trace:
        result.trace(args.trace)
        print(f"wrote {args.trace} (open it in https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)
    for path in (args.png, args.svg):
        if path:
            result.gantt(path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _check_costs_cover(folder: Path, program, cluster: Cluster, lg) -> None:
    """Every device of the program is in cluster.json, with a kind costs.json has costs for."""
    names = {d.name: d for d in cluster.devices}
    for device in program.devices:
        if device not in names:
            raise InputError(f"{folder / 'program.json'}: device {device!r} is not in {folder / 'cluster.json'}; "
                             "compile again")
        if names[device].kind not in lg.kinds:
            raise InputError(f"{folder / 'costs.json'}: no costs for device kind {names[device].kind!r} of device "
                             f"{device!r} (it has {', '.join(lg.kinds)}); compile again")
