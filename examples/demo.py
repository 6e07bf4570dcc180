"""The main demo (`./dev demo`): compile, plan and train a job on an emulated heterogeneous
cluster on this machine, and compare its plan with a data-parallel one.

The job (examples/digits_job.py, a file to copy) is a small CNN on real handwritten digits, the
UCI set scikit-learn ships (``--generated``: the project's own generated digits instead). Steps:
compile the job's model for the cluster (the plan and the schedule IR), write a simulated trace,
train on one worker process per device with every worker paced like the device it emulates
(torch.distributed, gloo on loopback), each device reading only the rows its actions use, with
checkpoints and a validation pass at each, then report the loss curve, validation accuracy and the
measured throughput of the plan against the data-parallel plan on the same emulated cluster.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's module, examples.digits_job

from asteroid_fx.cli import configure_logging  # noqa: E402
from asteroid_fx.runtime.launcher import launch  # noqa: E402
from asteroid_fx.runtime.spec import RunSpec, compile_spec, iterations_of, job_of, pinned  # noqa: E402

JOB = "examples.digits_job:build"
GENERATED = "examples.digits_job:generated"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=JOB, help=f"the job's entry (default {JOB})")
    parser.add_argument("--generated", action="store_true",
                        help=f"the project's generated digits ({GENERATED}) instead of scikit-learn's")
    parser.add_argument("--cluster", default="edge-4-pi-1g", help="a preset, a cluster JSON file or device kinds")
    parser.add_argument("--iterations", type=int, default=None, help="default: the job's epochs")
    parser.add_argument("--checkpoint-every", type=int, default=30,
                        help="iterations between checkpoints (each validated on the held-out images)")
    parser.add_argument("--compare-iterations", type=int, default=30,
                        help="iterations of the data-parallel run measured for the comparison (0: skip it)")
    parser.add_argument("--dilation", type=float, default=4.0,
                        help="time dilation of the emulation: every emulated duration this many times longer, "
                             "so that this machine keeps the emulated devices' pace (throughputs are per "
                             "emulated second)")
    parser.add_argument("--out", default="asteroid-demo", help="folder for the plan, IR, trace and the run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a worker run is stopped")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="the launcher's messages too (-vv: debug); the progress bar is shown either way")
    args = parser.parse_args(argv)
    # as `asteroid` does: the project's warnings on stderr; the launcher's progress lines (INFO) only
    # with -v, since the bar below, drawn from the first worker's log, already shows the progress
    configure_logging(args.verbose)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    entry = GENERATED if args.generated else args.job
    base = RunSpec(model=entry, iterations=args.iterations, emulate=True, dilation=args.dilation,
                   checkpoint_every=args.checkpoint_every)
    job = job_of(base)
    print(f"== job {entry}: {job.name or entry}, {len(job.dataset)} training samples"
          + (f", {len(job.validation)} held out" if job.validation is not None else "")
          + f"; batch {job.batch}, {iterations_of(base)} iterations ({job.epochs} epochs), "
          f"{job.settings.optimizer} lr {job.lr:g}" + (f", gradients clipped at norm {job.clip_grad_norm:g}"
                                                        if job.clip_grad_norm else ""))
    started = time.perf_counter()
    compiled = compile_spec(base, args.cluster)
    print(f"\n== cluster\n{compiled.cluster}\n")
    print(f"== plan (compiled in {time.perf_counter() - started:.1f}s)\n{compiled.plan}\n")
    compiled.save(out / "compiled")
    lines = str(compiled.program).splitlines()
    print(f"== program (schedule IR; {len(lines)} lines, all of it in {out / 'compiled' / 'program.txt'})")
    print("\n".join(lines[:24]) + ("\n..." if len(lines) > 24 else ""))
    trace = out / "trace.json"
    compiled.simulate(opt_state_factor=job.settings.state_factor()).trace(trace)
    print(f"\n== simulated iteration written to {trace} (open it in https://ui.perfetto.dev)")

    spec = pinned(base, compiled.plan)
    print(f"\n== training {spec.iterations} iterations on {len(compiled.program.devices)} worker processes, "
          f"each paced like the device it emulates with time dilation {args.dilation:g}")
    result = _run_with_progress(spec, compiled.cluster, out / "run", args.timeout, compiled.program.devices[0])

    losses = result["losses"]
    step = max(1, len(losses) // 10)
    print("  loss: " + "  ".join(f"{i + 1}:{losses[i]:.3f}" for i in range(0, len(losses), step))
          + f"  {len(losses)}:{losses[-1]:.3f}")
    for v in result["validation"]:
        print(f"  validation after {v['iteration']} iterations: loss {v['val_loss']:.4f}"
              + (f", accuracy {v['val_accuracy']:.1%}" if v["val_accuracy"] is not None else ""))
    print(f"  checkpoints in {out / 'run' / 'checkpoints'}; `asteroid export {out / 'run'} model.pt` writes the "
          "trained state_dict")

    ours = _throughput(result, job.batch, args.dilation)
    print(f"\n== throughput (measured on this machine, emulated devices, per emulated second): "
          f"plan {ours:.1f} samples/s")
    if args.compare_iterations > 0:
        dp_spec = RunSpec(model=entry, iterations=args.compare_iterations, emulate=True, dilation=args.dilation,
                          planner="dp")
        print(f"   running the data-parallel plan for {args.compare_iterations} iterations ...")
        dp = _run_with_progress(dp_spec, compiled.cluster, out / "run-dp", args.timeout, None)
        theirs = _throughput(dp, job.batch, args.dilation)
        print(f"   data parallel {theirs:.1f} samples/s: the plan is {ours / theirs:.2f}x "
              f"(the simulator predicted {compiled.plan.prediction.throughput:.1f} samples/s for the plan)")
    return 0


def _throughput(result: dict, batch: int, dilation: float) -> float:
    """Samples per emulated second over the iterations after the first (which warms allocators and
    caches): measured seconds divided by the time dilation."""
    seconds = result["seconds"][1:] or result["seconds"]
    return batch / (statistics.median(seconds) / dilation)


def _run_with_progress(spec: RunSpec, cluster, out: Path, timeout: float, watch: str | None) -> dict:
    """``launch`` in a thread, with a progress bar drawn from the first worker's log."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = launch(spec, cluster, out, timeout_s=timeout)
        except BaseException as e:  # shown by the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    pattern = re.compile(r"iteration (\d+)/(\d+): ([\d.]+) ms")
    shown = -1
    tty = sys.stderr.isatty()
    while t.is_alive():
        t.join(0.25)
        logs = [out / f"worker_{watch}.log"] if watch else sorted(out.glob("worker_*.log"))
        done, ms = 0, 0.0
        for log in logs[:1]:
            if log.exists():
                found = pattern.findall(log.read_text(errors="replace"))
                if found:
                    done, ms = int(found[-1][0]), float(found[-1][2])
        total = iterations_of(spec)
        if done != shown and (tty or done in (1, total) or done % max(1, total // 10) == 0):
            bar = "#" * (30 * done // total)
            end = "\r" if tty and done < total else "\n"
            print(f"  [{bar:<30}] {done}/{total} iterations, last {ms:.0f} ms", end=end,
                  file=sys.stderr, flush=True)
            shown = done
    if "error" in box:
        raise box["error"]
    return box["result"]


if __name__ == "__main__":
    sys.exit(main())
