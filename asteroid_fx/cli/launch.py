"""asteroid launch (N local workers emulating a cluster) and asteroid worker (one device of a run)."""

from __future__ import annotations

import argparse
import logging

from asteroid_fx.cli import args as args_
from asteroid_fx.cli.compile import schedule_name
from asteroid_fx.passes.partition import PLANNER_NAMES
from asteroid_fx.runtime.job import LAST_BATCH


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


def show_progress(args: argparse.Namespace) -> None:
    """A run's progress (its workers, iterations, failures and switches: the runtime's INFO
    messages) is what `launch` and `worker` show as they go, so it is on by default; -q hides it,
    -v and -vv set the level themselves."""
    if not getattr(args, "quiet", False) and not getattr(args, "verbose", 0):
        logging.getLogger("asteroid_fx.runtime").setLevel(logging.INFO)


def register(sub: argparse._SubParsersAction) -> None:
    la = sub.add_parser("launch", help="train on N local worker processes (gloo) emulating a cluster")
    la.add_argument("model", help="the job: package.module:attribute (a Job, or a callable returning one; every "
                    "worker imports it), or a zoo model, e.g. resnet18:small")
    la.add_argument("--cluster", required=True, type=args_.cluster)
    la.add_argument("-n", type=int, default=None, help="number of workers (must match the cluster)")
    la.add_argument("--out", default="asteroid-run", type=args_.out_folder, help="folder for worker logs, losses and weights")
    la.add_argument("--batch", type=args_.count(), default=None, help="rows per iteration (default: the job's; a zoo model: 32)")
    la.add_argument("--microbatches", type=args_.count(), default=None,
                    help="micro-batches per iteration (default: the planner chooses)")
    la.add_argument("--planner", choices=PLANNER_NAMES, default="asteroid")
    la.add_argument("--schedule", type=schedule_name, default="1f1b")
    la.add_argument("--dilation", type=args_.number(0.0, above=True), default=1.0,
                    help="with --emulate: run every emulated duration this many times slower, for a host slower "
                         "than the devices it emulates (divide the measured times by it)")
    la.add_argument("--stages", type=args_.count(), default=None)
    la.add_argument("--iterations", type=args_.count(), default=None,
                    help="iterations to train (default: the job's epochs over its dataset; a zoo model: 3)")
    la.add_argument("--optimizer", type=args_.optimizer, default=None, help="a torch.optim class name (default: the job's; a zoo model: sgd)")
    la.add_argument("--lr", type=args_.number(0.0, above=True), default=None, help="learning rate (default: the job's; a zoo model: 0.05)")
    la.add_argument("--last-batch", choices=LAST_BATCH, default=None,
                    help="an epoch's last partial batch: 'drop' it, or train it as a 'smaller' batch on the same "
                    "stages and groups (default: the job's choice; a job's default is drop)")
    la.add_argument("--checkpoint-every", type=args_.count(0), default=0, metavar="N",
                    help="write a checkpoint into --out every N iterations (one is always written at the end)")
    la.add_argument("--resume", default=None, metavar="RUN",
                    help="continue the run in folder RUN from its newest checkpoint (same job; --out may be RUN)")
    la.add_argument("--new-cluster", action="store_true",
                    help="with --resume: the checkpoint was made on other devices; plan anew for these")
    la.add_argument("--seed", type=int, default=0)
    la.add_argument("--timeout", type=args_.number(0.0, above=True), default=600.0, help="seconds before the run is stopped")
    la.add_argument("--listen", default="127.0.0.1:0", type=args_.listen,
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
    la.add_argument("--backup-budget", type=args_.number(0.0, above=True, most=0.99), default=0.02,
                    help="with --backup-every auto: the fraction of the run's time backups may cost (default 0.02)")
    la.add_argument("--heartbeat-timeout", type=args_.number(0.0, above=True), default=1.5,
                    help="seconds of silence after which a device has failed (with --recover)")
    la.add_argument("--kill", action="append", default=[], metavar="DEVICE@SECONDS",
                    help="SIGKILL that worker so long after the first iteration (a failure drill)")
    la.add_argument("--join", action="append", default=[], metavar="DEVICE@SECONDS",
                    help="start with the cluster minus DEVICE; so long after the first iteration it starts and "
                    "asks to join, and is taken in by a re-plan at an iteration boundary (with --recover)")
    la.add_argument("--no-replan", action="store_true",
                    help="with --recover: keep replay's local rewrite after a failure instead of switching to the "
                    "planner's plan for the survivors when it predicts a gain")
    la.set_defaults(func=run_launch)
    w = sub.add_parser("worker", help="one device of a run (started by `asteroid launch`, or by hand)")
    w.add_argument("--coordinator", default=None, help="HOST:PORT of the run's store (default: torchrun's "
                   "MASTER_ADDR:MASTER_PORT)")
    w.add_argument("--device", default=None, help="this device's name in the cluster (default: the program's "
                   "device number $RANK)")
    w.add_argument("--out", default=".", type=args_.out_folder, help="folder for this worker's weights")
    w.add_argument("--connect-timeout", type=args_.number(above=True, most=86400.0), default=60.0,
                   help="seconds to wait for the coordinator (the worker gives up after them)")
    w.add_argument("--join", action="store_true", help="join a running job (started with --recover) as a device "
                   "of its cluster it does not use yet: taken in at an iteration boundary by a re-plan")
    w.set_defaults(func=run_worker)


def run_launch(args: argparse.Namespace) -> int:
    from asteroid_fx.ir.cluster import resolve_cluster
    from asteroid_fx.runtime.launcher import launch, load_weights
    from asteroid_fx.runtime.spec import RunSpec

    spec = RunSpec(model=args.model, batch=args.batch, microbatches=args.microbatches, planner=args.planner,
                   schedule=args.schedule,
                   iterations=args.iterations, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
                   stages=args.stages, emulate=args.emulate, dilation=args.dilation, recovery=args.recover,
                   backup_every=args.backup_every, backup_budget=args.backup_budget, replan=not args.no_replan,
                   heartbeat_timeout_s=args.heartbeat_timeout, checkpoint_every=args.checkpoint_every,
                   last_batch=args.last_batch)
    if args.new_cluster and args.resume is None:
        raise SystemExit("--new-cluster goes with --resume RUN")
    if args.shape_links:
        from asteroid_fx.runtime import netns

        try:
            netns.require()
        except netns.Unavailable as e:
            raise SystemExit(f"asteroid launch --shape-links: {e}") from None
    cluster = resolve_cluster(args.cluster)
    if args.n is not None and args.n != len(cluster.devices):
        raise SystemExit(f"-n {args.n} but cluster {args.cluster!r} has {len(cluster.devices)} devices; "
                         "give a cluster with that many devices, or leave -n out")
    host, _, port = args.listen.rpartition(":")  # checked by its argument type
    remote = [d for d in args.remote.split(",") if d] if args.remote else []
    unknown = [d for d in remote if d not in cluster.names]
    if unknown:
        raise SystemExit(f"bad --remote {args.remote!r}: {unknown[0]!r} is not a device of the cluster "
                         f"({', '.join(cluster.names)})")
    kills, joins = [], []
    for flag, given, into in (("--kill", args.kill, kills), ("--join", args.join, joins)):
        for k in given:
            device, _, seconds = k.partition("@")
            try:
                at = float(seconds)
            except ValueError:
                at = -1.0
            if not 0 <= at < float("inf"):
                raise SystemExit(f"bad {flag} {k!r}: write DEVICE@SECONDS with seconds 0 or more, e.g. host1@0.5")
            if device not in cluster.names:
                raise SystemExit(f"bad {flag} {k!r}: {device!r} is not a device of the cluster "
                                 f"({', '.join(cluster.names)})")
            into.append((device, at))
    show_progress(args)
    result = launch(spec, cluster, args.out, timeout_s=args.timeout, shape_links=args.shape_links,
                    host=host, port=int(port), remote=remote, kills=kills, joins=joins, resume=args.resume,
                    new_cluster=args.new_cluster, progress=not getattr(args, "quiet", False))
    print(f"trained {spec.model} on {len(result['workers'])} workers:")
    first = result["start"]
    shown = list(enumerate(result["losses"], start=first + 1))
    for row in (shown if len(shown) <= 12 else shown[:5] + [None] + shown[-5:]):
        if row is None:
            print("  ...")
        else:
            i, loss = row
            print(f"  iteration {i}: loss {loss:.4f}  {result['seconds'][i - 1 - first] * 1e3:.1f} ms")
    for v in result["validation"]:
        print(f"  validation after {v['iteration']} iterations: loss {v['val_loss']:.4f}"
              + (f", accuracy {v['val_accuracy']:.1%}" if v["val_accuracy"] is not None else ""))
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
    print(f"worker logs, metrics, weights and checkpoints in {args.out}/ (`asteroid report {args.out}` plots the "
          f"run; `asteroid export {args.out} model.pt` writes the model's state_dict)")
    return _diverged(result)


DIVERGED = 3  # the exit code of a run whose loss stopped being finite


def _diverged(result: dict) -> int:
    """0, or DIVERGED with one line on stderr when an iteration's loss was nan or infinite: the run
    trained to the end, as eager training would, but a script must not take its weights for a model."""
    import math
    import sys

    bad = next(((i, loss) for i, loss in enumerate(result["losses"], start=result["start"] + 1)
                if not math.isfinite(loss)), None)
    if bad is None:
        return 0
    print(f"asteroid launch: the loss was {bad[1]} at iteration {bad[0]}: training diverged, and the weights "
          "written are the diverged model's; try a lower --lr, or clip the gradients (Job.clip_grad_norm)",
          file=sys.stderr)
    return DIVERGED


def run_worker(args: argparse.Namespace) -> int:
    from asteroid_fx.runtime.worker import run_worker as worker

    show_progress(args)
    return worker(args.coordinator, args.device, args.out, connect_timeout_s=args.connect_timeout, join=args.join)
