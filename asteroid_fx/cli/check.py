"""asteroid check PLAN_DIR: inference-check a compiled plan through ONNX Runtime, stage by stage."""

from __future__ import annotations

import argparse

from asteroid_fx.cli import args as args_
from asteroid_fx.backends.onnxruntime import ATOL, EXPORTERS, ROUNDING, RTOL, check_folder


def register(sub: argparse._SubParsersAction) -> None:
    """Add `asteroid check` to the CLI's subparsers."""
    c = sub.add_parser("check", help="inference-check a compiled plan: run its forward through ONNX Runtime "
                                            "and compare with PyTorch, stage by stage")
    c.add_argument("folder", help="what `asteroid compile --out` wrote")
    c.add_argument("--backend", choices=["onnxruntime"], default="onnxruntime")
    c.add_argument("--rtol", type=args_.number(),  default=RTOL, help=f"relative tolerance (default {RTOL:g})")
    c.add_argument("--atol", type=args_.number(),  default=ATOL, help=f"absolute tolerance (default {ATOL:g})")
    c.add_argument("--rounding", type=args_.number(), default=ROUNDING,
                   help=f"widen atol by this many times PyTorch's own float32 error on each output, measured "
                        f"against a float64 run (default {ROUNDING:g}; 0: atol and rtol alone)")
    c.add_argument("--repeats", type=args_.count(0), default=3, help="timed forward passes for the latency columns (0: none)")
    c.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="torch.export-based, TorchScript, or auto: the first, then the second where it fails")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the check's table; exit status 0 when every stage agrees, 1 on a mismatch."""
    report = check_folder(args.folder, rtol=args.rtol, atol=args.atol, rounding=args.rounding, repeats=args.repeats,
                          exporter=args.exporter)
    print(report)
    return 0 if report.ok else 1
