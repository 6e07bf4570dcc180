"""asteroid compile: plan a model on a cluster and write plan, program and stages."""

from __future__ import annotations

import argparse
import sys

import torch

from asteroid_fx.cli import args as args_
from asteroid_fx.cli.models import load_model
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.plan import warmup_depth
from asteroid_fx.passes.partition import PLANNER_NAMES
from asteroid_fx.passes.planners.stage_count import BLOCKED_SHOWN, stage_limit


def schedule_name(text: str) -> str:
    try:
        warmup_depth(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# Fewer allowed cuts than this (or than the stages asked for) and `asteroid compile` says what
# forbids the others: a model that allows three cuts pipelines over four devices at most.
FEW_CUTS = 4


def cuts_summary(lg: LayerGraph, cluster: Cluster, asked: int | None = None) -> str:
    """How many cuts the model allows and the most stages they give on ``cluster``; when they are
    few, the reasons that forbid the most other cuts (LayerGraph.blocked, first BLOCKED_SHOWN)."""
    cuts = len(lg.allowed_cuts())
    most, why = stage_limit(lg, cluster)
    lines = [f"cuts: the model allows {cuts} between its {len(lg)} layers; at most {most} stage"
             f"{'' if most == 1 else 's'} on this cluster" + (f" ({' and '.join(why)})" if why else "")]
    if lg.blocked and (cuts < FEW_CUTS or (asked is not None and cuts < asked)):
        shown = lg.blocked[:BLOCKED_SHOWN]
        lines.append(f"other cuts are not allowed; the reason{'s' if len(shown) > 1 else ''} that forbid"
                     f"{'' if len(shown) > 1 else 's'} the most of them:")
        lines += [f"  - {reason}" for reason in shown]
        if len(lg.blocked) > len(shown):
            lines.append(f"  (and {len(lg.blocked) - len(shown)} more)")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compile", help="plan a model on a cluster and write plan, program and stages")
    c.add_argument("model", help="zoo model (resnet18, gpt:small, ...) or package.module:callable")
    c.add_argument("--cluster", required=True, type=args_.cluster, help="preset name, cluster JSON file, or comma-separated device kinds")
    c.add_argument("--out", required=True, type=args_.out_folder, help="folder to write into")
    c.add_argument("--batch", type=args_.count(), default=None,
                   help="global batch (rows per iteration; default: a job's own batch, else 32)")
    c.add_argument("--microbatches", type=args_.count(), default=None,
                   help="micro-batches per iteration (default: the planner chooses)")
    c.add_argument("--planner", choices=PLANNER_NAMES, default="asteroid",
                   help="asteroid (default), or a baseline to compare with")
    c.add_argument("--schedule", type=schedule_name, default="1f1b",
                   help="gpipe, 1f1b (the planner may deepen its warm-up: 1f1b+N) or 1f1b+N pinned")
    c.add_argument("--stages", type=args_.count(), default=None, help="pin the stage count (default: the fastest)")
    c.add_argument("--max-layers", type=args_.count(), default=48, help="coarsen the graph to at most this many layers")
    c.add_argument("--profile", action="append", default=[], metavar="FILE", type=args_.in_file,
                   help="a profile from `asteroid profile` (one per device kind; repeat for more)")
    c.add_argument("--recover", action="store_true",
                   help="plan for a run with recovery (`asteroid launch --recover`): every device's memory also "
                        "holds its rollback point and the backups it holds")
    c.add_argument("--input", action="append", default=[], help="example input for module:callable, e.g. f32[32,3,32,32]")
    c.add_argument("--no-capture-check", dest="capture_check", action="store_false",
                   help="skip checking that the captured graph computes what the model's forward does "
                        "(on the example and on a second batch drawn like it)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asteroid_fx as asteroid

    torch.manual_seed(args.seed)
    model, example, loss = load_model(args.model, args.batch, args.input)
    print(f"compiling {args.model} for {args.cluster} ...", file=sys.stderr)
    compiled = asteroid.compile(model, args.cluster, example=example, loss=loss, microbatches=args.microbatches,
                                planner=args.planner, schedule_kind=args.schedule, stages=args.stages,
                                max_layers=args.max_layers, profiles=args.profile, recovery=args.recover,
                                check_capture=args.capture_check)
    out = compiled.save(args.out)
    print(cuts_summary(compiled.layer_graph, compiled.cluster, args.stages))
    print(compiled.plan)
    print(f"\nwrote plan, program (text and JSON), layers and {len(compiled.stages)} stage modules to {out}/")
    return 0
