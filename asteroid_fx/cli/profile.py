"""asteroid profile: measure a model's layer costs on this device, the links between workers, or
calibrate the catalog from one measured profile."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from asteroid_fx.cli import args as args_
from asteroid_fx.ir.profile import DEFAULT_ROWS, Method, ProfileError, load, save


def parse_rows(text: str) -> tuple[int, ...]:
    try:
        rows = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows takes comma-separated positive integers, got {text!r}") from None
    if not rows or rows[0] < 1:
        raise argparse.ArgumentTypeError(f"--rows takes comma-separated positive integers, got {text!r}")
    return tuple(rows)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `asteroid profile` to the CLI's subparsers."""
    p = sub.add_parser(
        "profile", help="measure a model's layer costs on this device, or the links between workers",
        description="Measure forward/backward time, saved activations and memory of every layer of a "
                    "model's LayerGraph on this device (CPU or CUDA) and write a DeviceProfile. "
                    "Interrupt it at any time: running the same command again resumes. With --links, "
                    "measure bandwidth and latency between N workers instead and write them into a "
                    "cluster file. With --calibrate-from, derive a profile for a device kind you do not "
                    "have from one measured profile and the catalog.")
    p.add_argument("--model", help="zoo model (resnet50, gpt:small, ...) or package.module:callable")
    p.add_argument("--rows", type=parse_rows, default=DEFAULT_ROWS, help="row counts to time (default 1,2,4,8,16,32)")
    p.add_argument("--out", type=args_.out_file, help="profile (or, with --links, cluster) JSON to write; an unfinished one is resumed")
    p.add_argument("--kind", default=None, help="catalog kind this device stands for (default: host-cpu on CPU)")
    p.add_argument("--device", type=args_.torch_device, default=None, help="torch device to run on (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=args_.count(), default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--max-layers", type=args_.count(), default=48, help="as for `asteroid compile` (must match it)")
    p.add_argument("--input", action="append", default=[], help="example input for module:callable, e.g. f32[2,3,32,32]")
    p.add_argument("--budget", type=args_.number(), default=Method.budget_s, help="seconds of timed repeats per cell")
    p.add_argument("--min-repeats", type=args_.count(), default=Method.min_repeats)
    p.add_argument("--max-repeats", type=args_.count(), default=Method.max_repeats)
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="wall time, or this thread's CPU time (immune to other processes; exact for "
                        "1 thread on CPU); auto: cpu there, wall elsewhere")
    p.add_argument("--fresh", action="store_true", help="discard an unfinished --out instead of resuming it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--links", action="store_true", help="probe the links between workers instead")
    p.add_argument("--cluster", help="with --links: the cluster file whose devices the workers are (rank i = device i)")
    p.add_argument("--workers", type=args_.count(2), default=None, help="with --links: spawn this many local workers")
    p.add_argument("--master", default=None, help="with --links on real devices: HOST:PORT of rank 0")
    p.add_argument("--rank", type=int, default=None, help="with --links --master: this worker's rank")
    p.add_argument("--sizes", default=None, help="with --links: message sizes in bytes, comma-separated")
    p.add_argument("--timeout", type=args_.number(0.0, above=True), default=60.0, help="with --links: seconds before giving up")
    p.add_argument("--calibrate-from", default=None, help="a measured profile of --model to calibrate the "
                                                          "catalog's --kind from")
    p.set_defaults(func=run)
    return p


def _progress_printer(stream=sys.stderr):
    tty = stream.isatty()
    last = [0.0]

    def show(ev: Any) -> None:
        now = time.monotonic()
        done = ev.done == ev.total
        if not done and now - last[0] < (0.2 if tty else 5.0):
            return
        last[0] = now
        eta = f", ~{ev.eta_s:.0f}s left" if ev.eta_s is not None and not done else ""
        text = (f"[{ev.done:>4}/{ev.total}] rows {ev.rows:>4}  round {ev.round + 1}/{ev.rounds}"
                f"  layer {ev.layer + 1:>3}/{ev.layers}"
                f"  fwd {ev.fwd_s * 1e3:8.3f} ms  bwd {ev.bwd_s * 1e3:8.3f} ms  {ev.elapsed_s:6.1f}s{eta}")
        stream.write(("\r" + text + ("\n" if done else "")) if tty else text + "\n")
        stream.flush()

    return show


def run(args: argparse.Namespace) -> int:
    """`asteroid profile`: measure and write a profile (or links, or a calibrated profile)."""
    if args.links:
        return _links(args)
    if not args.model or not args.out:
        raise SystemExit("asteroid profile needs --model and --out (or --links to probe links)")
    import torch

    from asteroid_fx.cli.models import load_model
    from asteroid_fx.runtime import profiler as measure

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    capture_batch = 2  # rows are made by repeating the example: a small capture is enough
    model, example, _ = load_model(args.model, capture_batch, args.input)
    if args.calibrate_from:
        from asteroid_fx.cost import calibrate

        if not args.kind:
            raise SystemExit("--calibrate-from needs --kind: the catalog kind to make a profile for")
        captured, lg = measure.prepare(model, example, args.kind, args.max_layers)
        source = load(args.calibrate_from, lg=lg, max_layers=args.max_layers)
        calib = calibrate.fit([(captured, lg, source)])
        result = calibrate.calibrated_profile(captured, lg, calib, args.kind, rows=args.rows, model=args.model,
                                              max_layers=args.max_layers, memory_from=source)
        save(result, out)
        print(calib)
        print(f"wrote a calibrated profile for {args.kind} to {out}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    method = Method(min_repeats=args.min_repeats, max_repeats=args.max_repeats, budget_s=args.budget,
                    clock=args.clock)
    started = time.perf_counter()
    print(f"profiling {args.model} on {device} ...", file=sys.stderr)
    captured, lg = measure.prepare(model, example, None, args.max_layers)
    resume = None
    if out.exists() and not args.fresh:
        try:
            resume = load(out, lg=lg, max_layers=args.max_layers, model=args.model, allow_partial=True)
        except ProfileError as e:
            raise SystemExit(f"{e}\n(pass --fresh to overwrite {out})") from None
        if resume.complete and set(args.rows) <= set(resume.rows):
            print(f"{out} is already complete for these rows; pass --fresh to measure again", file=sys.stderr)
            return 0
        print(f"resuming {out}: {sum(len(la.cells) for la in resume.layers)} cells already measured", file=sys.stderr)
    try:
        profile = measure.measure(captured, lg, args.rows, device=device, kind=args.kind, model=args.model,
                                  max_layers=args.max_layers, method=method, resume=resume,
                                  checkpoint=lambda p: save(p, out), progress=_progress_printer())
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished measurements are saved in {out}; run the same command to resume",
              file=sys.stderr)
        return 130
    save(profile, out)
    print(profile)
    print(f"wrote {out} ({len(profile.layers)} layers x {len(profile.rows)} row counts, "
          f"{time.perf_counter() - started:.1f}s)", file=sys.stderr)
    return 0


def _links(args: argparse.Namespace) -> int:
    """`asteroid profile --links`: probe, then write the links into the cluster file."""
    from asteroid_fx.runtime import linkprobe

    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else linkprobe.DEFAULT_SIZES
    cluster = None
    if args.cluster:
        from asteroid_fx.ir.cluster import resolve_cluster

        cluster = resolve_cluster(args.cluster)
    out = args.out or (args.cluster if args.cluster and os.path.exists(args.cluster) else None)
    if args.master:
        return _links_as_rank(args, cluster, out, sizes)
    workers = args.workers or (len(cluster) if cluster else None)
    if not workers:
        raise SystemExit("asteroid profile --links needs --workers N (local workers) or --cluster, or "
                         "--master HOST:PORT --rank R on each real device")
    print(f"probing links between {workers} local workers (gloo on loopback) ...", file=sys.stderr)
    links = linkprobe.probe_local(workers, sizes=sizes, timeout_s=args.timeout)
    print(links)
    return _write_links(cluster, links, out, workers)


def _links_as_rank(args: argparse.Namespace, cluster, out: str | None, sizes) -> int:
    import datetime

    import torch.distributed as dist

    from asteroid_fx.runtime import linkprobe

    if cluster is None or args.rank is None:
        raise SystemExit("--master needs --cluster (rank i is its device i) and --rank")
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=len(cluster),
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        links = linkprobe.probe(sizes)
    finally:
        dist.destroy_process_group()
    if links is None:
        return 0
    print(links)
    return _write_links(cluster, links, out, len(cluster))


def _write_links(cluster, links, out: str | None, workers: int) -> int:
    from asteroid_fx.ir.cluster import Cluster
    from asteroid_fx.runtime import linkprobe

    if cluster is None:
        cluster = Cluster.from_kinds(["host-cpu"] * workers, 1.0, 0.0, name=f"host-{workers}-probed")
    if not out:
        print("(no --out: cluster not written)", file=sys.stderr)
        return 0
    linkprobe.apply_links(cluster, links).save(Path(out))
    print(f"wrote measured links into {out}", file=sys.stderr)
    return 0
