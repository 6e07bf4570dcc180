"""The `asteroid` command line: compile a model for a cluster, show what was compiled."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from asteroid_fx.passes.partition import PLANNER_NAMES

DTYPES = {"f32": torch.float32, "f16": torch.float16, "f64": torch.float64, "i64": torch.int64,
          "i32": torch.int32, "b8": torch.bool}


def parse_input_spec(spec: str) -> torch.Tensor:
    """'f32[32,3,32,32]' -> a random tensor; integer inputs 'i64[8,16]<100' draw from [0, 100)."""
    m = re.fullmatch(r"(\w+)\[([\d,\s]+)\](?:<(\d+))?", spec.strip())
    if not m or m.group(1) not in DTYPES:
        raise SystemExit(f"bad --input {spec!r}: write DTYPE[SIZES], e.g. f32[32,3,32,32] or i64[8,16]<1000 "
                         f"(dtypes: {', '.join(DTYPES)})")
    shape = [int(s) for s in m.group(2).split(",") if s.strip()]
    dtype = DTYPES[m.group(1)]
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.randint(0, int(m.group(3) or 2), shape, dtype=dtype)


def load_model(name: str, batch: int, inputs: Sequence[str]) -> tuple[torch.nn.Module, tuple, Any]:
    """A zoo name (small config with ':small'), or 'module:callable' returning a module or (module, example)."""
    from asteroid_fx import models

    base, _, variant = name.partition(":")
    if base in models.ZOO and variant in ("", "small"):
        entry = models.get(base)
        small = variant == "small"
        return entry.build(small=small), entry.example(batch, small), entry.loss
    if ":" not in name:
        raise SystemExit(f"unknown model {name!r}: use a zoo model ({', '.join(models.ZOO)}, add ':small' "
                         "for the test config) or 'package.module:callable'")
    module_name, attr = name.split(":", 1)
    try:
        made = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"cannot load {name!r}: {e}") from e
    if isinstance(made, tuple):
        model, example = made[0], made[1]
        example = example if isinstance(example, tuple) else (example,)
    else:
        model = made
        if not inputs:
            raise SystemExit(f"{name!r} returned a module without example inputs: pass --input DTYPE[SIZES] "
                             "for each positional input, or return (module, example_inputs)")
        example = tuple(parse_input_spec(s) for s in inputs)
    return model, example, None


def cmd_compile(args: argparse.Namespace) -> int:
    import asteroid_fx as asteroid

    torch.manual_seed(args.seed)
    model, example, loss = load_model(args.model, args.batch, args.input)
    print(f"compiling {args.model} for {args.cluster} ...", file=sys.stderr)
    compiled = asteroid.compile(model, args.cluster, example=example, loss=loss, microbatches=args.microbatches,
                                planner=args.planner, schedule_kind=args.schedule, stages=args.stages,
                                max_layers=args.max_layers, profiles=args.profile, recovery=args.recover)
    out = compiled.save(args.out)
    print(compiled.plan)
    print(f"\nwrote plan, program (text and JSON), layers and {len(compiled.stages)} stage modules to {out}/")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from asteroid_fx.plan import Plan
    from asteroid_fx.program_text import parse_program

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


def _backup_every(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number of iterations (1 or more)")
    return n


def cmd_launch(args: argparse.Namespace) -> int:
    from asteroid_fx.cluster import resolve_cluster
    from asteroid_fx.launch import RunSpec, launch, load_weights

    spec = RunSpec(model=args.model, batch=args.batch, microbatches=args.microbatches, planner=args.planner,
                   schedule=args.schedule,
                   iterations=args.iterations, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
                   stages=args.stages, emulate=args.emulate, dilation=args.dilation, recovery=args.recover,
                   backup_every=args.backup_every, backup_budget=args.backup_budget, replan=not args.no_replan,
                   heartbeat_timeout_s=args.heartbeat_timeout)
    if args.dilation <= 0:
        raise SystemExit(f"--dilation must be positive, got {args.dilation:g}")
    if args.shape_links:
        from asteroid_fx import netns

        try:
            netns.require()
        except netns.Unavailable as e:
            raise SystemExit(f"asteroid launch --shape-links: {e}") from None
    cluster = resolve_cluster(args.cluster)
    if args.n is not None and args.n != len(cluster.devices):
        raise SystemExit(f"-n {args.n} but cluster {args.cluster!r} has {len(cluster.devices)} devices; "
                         "give a cluster with that many devices, or leave -n out")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--listen {args.listen!r} is not HOST:PORT (e.g. 127.0.0.1:0, or 0.0.0.0:29500 to accept "
                         "workers from other machines)")
    remote = [d for d in args.remote.split(",") if d] if args.remote else []
    kills, joins = [], []
    for flag, given, into in (("--kill", args.kill, kills), ("--join", args.join, joins)):
        for k in given:
            device, _, seconds = k.partition("@")
            try:
                into.append((device, float(seconds)))
            except ValueError:
                raise SystemExit(f"bad {flag} {k!r}: write DEVICE@SECONDS, e.g. host1@0.5") from None
    result = launch(spec, cluster, args.out, timeout_s=args.timeout, log=lambda m: print(m, file=sys.stderr),
                    shape_links=args.shape_links,
                    host=host, port=int(port), remote=remote, kills=kills, joins=joins)
    print(f"trained {spec.model} on {len(result['workers'])} workers:")
    for i, loss in enumerate(result["losses"]):
        print(f"  iteration {i + 1}: loss {loss:.4f}  {result['seconds'][i] * 1e3:.1f} ms")
    if args.emulate:
        lag = max(r["lag_s"] for r in result["workers"].values())
        predicted = result["plan"].prediction.iteration_s * args.dilation
        print(f"planner's prediction: {predicted * 1e3:.1f} ms/iteration"
              + (f" (dilated {args.dilation:g}x)" if args.dilation != 1 else "") + "; worst compute lag behind the "
              f"emulated devices: {lag * 1e3:.1f} ms in total (this host was slower than the device it emulated)"
              if lag > 0 else f"planner's prediction: {predicted * 1e3:.1f} ms/iteration"
              + (f" (dilated {args.dilation:g}x)" if args.dilation != 1 else ""))
    if not remote:
        load_weights(args.out, result["program"].devices)  # proves the weights are readable
    for f in result["failures"]:
        print(f"  {f['device']} failed in iteration {f['iteration'] + 1} ({f['reason']}): agreed after "
              f"{f['detected_s']:.2f}s, training back after {f['recovery_s']:.2f}s")
    for s in result["switches"]:
        print(f"  iteration {s['iteration'] + 1}: switched to a new plan on {', '.join(s['devices'])} ({s['reason']})")
    print(f"worker logs, losses and weights in {args.out}/")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from asteroid_fx.launch import run_worker

    return run_worker(args.coordinator, args.device, args.out, connect_timeout_s=args.connect_timeout, join=args.join)


def schedule_name(text: str) -> str:
    from asteroid_fx.plan import warmup_depth

    try:
        warmup_depth(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asteroid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="plan a model on a cluster and write plan, program and stages")
    c.add_argument("model", help="zoo model (resnet18, gpt:small, ...) or package.module:callable")
    c.add_argument("--cluster", required=True, help="preset name, cluster JSON file, or comma-separated device kinds")
    c.add_argument("--out", required=True, help="folder to write into")
    c.add_argument("--batch", type=int, default=32, help="global batch (rows per iteration)")
    c.add_argument("--microbatches", type=int, default=None,
                   help="micro-batches per iteration (default: the planner chooses)")
    c.add_argument("--planner", choices=PLANNER_NAMES, default="asteroid",
                   help="asteroid (default), or a baseline to compare with")
    c.add_argument("--schedule", type=schedule_name, default="1f1b",
                   help="gpipe, 1f1b (the planner may deepen its warm-up: 1f1b+N) or 1f1b+N pinned")
    c.add_argument("--stages", type=int, default=None, help="pin the stage count (default: the fastest)")
    c.add_argument("--max-layers", type=int, default=48, help="coarsen the graph to at most this many layers")
    c.add_argument("--profile", action="append", default=[], metavar="FILE",
                   help="a profile from `asteroid profile` (one per device kind; repeat for more)")
    c.add_argument("--recover", action="store_true",
                   help="plan for a run with recovery (`asteroid launch --recover`): every device's memory also "
                        "holds its rollback point and the backups it holds")
    c.add_argument("--input", action="append", default=[], help="example input for module:callable, e.g. f32[32,3,32,32]")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_compile)
    s = sub.add_parser("show", help="print what `asteroid compile` wrote")
    s.add_argument("folder")
    s.add_argument("what", nargs="?", choices=["all", "plan", "program", "layers", "stages"], default="all")
    s.set_defaults(func=cmd_show)
    from asteroid_fx import profile, sim

    sim.register_cli(sub)
    profile.register_cli(sub)
    from asteroid_fx.backends.onnxruntime import register_cli as register_check

    register_check(sub)
    la = sub.add_parser("launch", help="train on N local worker processes (gloo) emulating a cluster")
    la.add_argument("model", help="zoo model, e.g. resnet18:small")
    la.add_argument("--cluster", required=True)
    la.add_argument("-n", type=int, default=None, help="number of workers (must match the cluster)")
    la.add_argument("--out", default="asteroid-run", help="folder for worker logs, losses and weights")
    la.add_argument("--batch", type=int, default=32)
    la.add_argument("--microbatches", type=int, default=None,
                    help="micro-batches per iteration (default: the planner chooses)")
    la.add_argument("--planner", choices=PLANNER_NAMES, default="asteroid")
    la.add_argument("--schedule", type=schedule_name, default="1f1b")
    la.add_argument("--dilation", type=float, default=1.0,
                    help="with --emulate: run every emulated duration this many times slower, for a host slower "
                         "than the devices it emulates (divide the measured times by it)")
    la.add_argument("--stages", type=int, default=None)
    la.add_argument("--iterations", type=int, default=3)
    la.add_argument("--optimizer", default="sgd")
    la.add_argument("--lr", type=float, default=0.05)
    la.add_argument("--seed", type=int, default=0)
    la.add_argument("--timeout", type=float, default=600.0, help="seconds before the run is stopped")
    la.add_argument("--listen", default="127.0.0.1:0",
                    help="HOST:PORT the coordinator's store listens on, and only there (port 0: a free one)")
    la.add_argument("--remote", default="", help="comma-separated devices that join from other machines "
                    "with `asteroid worker` instead of being started here")
    la.add_argument("--emulate", action="store_true",
                    help="pace each worker's compute and links like its device in the cluster")
    la.add_argument("--shape-links", action="store_true",
                    help="run each worker in a network namespace of its own with its links shaped by tc to the "
                    "cluster's bandwidths (Linux, root; latency is not shaped); with --emulate only compute is "
                    "paced in process")
    la.add_argument("--recover", action="store_true",
                    help="survive devices that die or leave: heartbeats, backups, pipeline replay in place")
    la.add_argument("--backup-every", type=_backup_every, default=None, metavar="N|auto",
                    help="iterations between backups (with --recover; a failure redoes up to N). Default auto: as "
                         "few as keep the backups' measured cost within --backup-budget of the run's time")
    la.add_argument("--backup-budget", type=float, default=0.02,
                    help="with --backup-every auto: the fraction of the run's time backups may cost (default 0.02)")
    la.add_argument("--heartbeat-timeout", type=float, default=1.5,
                    help="seconds of silence after which a device has failed (with --recover)")
    la.add_argument("--kill", action="append", default=[], metavar="DEVICE@SECONDS",
                    help="SIGKILL that worker so long after the first iteration (a failure drill)")
    la.add_argument("--join", action="append", default=[], metavar="DEVICE@SECONDS",
                    help="start with the cluster minus DEVICE; so long after the first iteration it starts and "
                    "asks to join, and is taken in by a re-plan at an iteration boundary (with --recover)")
    la.add_argument("--no-replan", action="store_true",
                    help="with --recover: keep replay's local rewrite after a failure instead of switching to the "
                    "planner's plan for the survivors when it predicts a gain")
    la.set_defaults(func=cmd_launch)
    w = sub.add_parser("worker", help="one device of a run (started by `asteroid launch`, or by hand)")
    w.add_argument("--coordinator", default=None, help="HOST:PORT of the run's store (default: torchrun's "
                   "MASTER_ADDR:MASTER_PORT)")
    w.add_argument("--device", default=None, help="this device's name in the cluster (default: the program's "
                   "device number $RANK)")
    w.add_argument("--out", default=".", help="folder for this worker's weights")
    w.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for the coordinator")
    w.add_argument("--join", action="store_true", help="join a running job (started with --recover) as a device "
                   "of its cluster it does not use yet: taken in at an iteration boundary by a re-plan")
    w.set_defaults(func=cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"asteroid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
