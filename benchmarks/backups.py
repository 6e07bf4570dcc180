"""What being recoverable costs a failure-free run: iteration time with recovery off against
recovery on without backups, with backups every 10 iterations and with backups every iteration, on
worker processes of this machine (gloo on loopback, clusters of laptop-i7 devices as in
benchmarks/recovery.py). Writes the "backups" section of RESULTS.md.

  plans      the three benchmarks/recovery.py trains (mlp:small, 2-7 ms iterations, where a backup's
             fixed costs show most), and resnet18:small and gpt:small on three devices with a group,
             whose longer iterations carry 0.2-1 MB of state per backup.
  settings   "off": no recovery; "no backups": recovery on (heartbeats, interruptible waits,
             rollback points) with backup_every larger than the run, so only iteration 0 backs up;
             "every 10" and "every 1". The backups' own cost is every N against "no backups".
  order      runs are interleaved: round k runs the settings in order, round k+1 in reverse (A B C
             D D C B A ...), so load that drifts on this shared machine falls on every setting alike.
  step       a run's median over its iterations (the first SETTLE left out) of the iteration's
             step time (barrier to the slowest device's last action): what benchmarks/recovery.py
             reported. A median leaves out the one-in-ten iterations that back up with every 10.
  period     a run's mean wall time per iteration, from when the iterations' losses appear in the
             run's store: throughput, with everything recovery adds between steps.
  A setting's value is the median over its runs.

    .venv/bin/python benchmarks/backups.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import PLANS as RECOVERY_PLANS  # noqa: E402
from recovery import cluster_of  # noqa: E402
from results import machine, write_section  # noqa: E402

from asteroid_fx.launch import RunSpec, launch  # noqa: E402

HYBRID = dict(batch=48, microbatches=2, optimizer="adam", lr=1e-3, groups=(("host0",), ("host1", "host2")),
              rows=((24,), (12, 12)))
# plan -> (devices, spec without recovery, iterations per run); clusters as benchmarks/recovery.py's
PLANS = {name: (n, dataclasses.replace(spec, recovery=False), 150) for name, (n, spec) in RECOVERY_PLANS.items()}
PLANS["resnet18:small, 1 + group of 2"] = (3, RunSpec(model="resnet18:small", **HYBRID), 50)
PLANS["gpt:small, 1 + group of 2"] = (3, RunSpec(model="gpt:small", **HYBRID), 80)
SETTINGS = {"off": dict(recovery=False), "no backups": dict(recovery=True, backup_every=10**6),
            "every 10": dict(recovery=True, backup_every=10), "every 1": dict(recovery=True, backup_every=1)}
SETTLE = 5  # iterations left out of a run's median (start-up, first backups)
GOAL = 0.05


class Pace:
    """When each iteration's loss appears in the run's store (``loss/<device>/<i>``), seen by a
    client of its own: started from the launcher's first log line, which names the store."""

    def __init__(self, iterations: int):
        self.iterations, self.stamps, self.thread = iterations, [], None

    def log(self, message: str) -> None:
        found = re.match(r"coordinator on (\S+):(\d+); \d+ workers \(([^,)]+)", message)
        if found and self.thread is None:
            host, port, device = found.group(1), int(found.group(2)), found.group(3)
            self.thread = threading.Thread(target=self._watch, args=(host, port, device), daemon=True)
            self.thread.start()

    def _watch(self, host: str, port: int, device: str) -> None:
        import torch.distributed as dist

        store = dist.TCPStore(host, port, world_size=None, is_master=False, timeout=datetime.timedelta(seconds=120))
        for i in range(self.iterations):
            store.wait([f"loss/{device}/{i}"])
            self.stamps.append(time.perf_counter())

    def period(self) -> float:
        """Mean wall seconds per iteration after the first SETTLE."""
        self.thread.join(timeout=10)
        return (self.stamps[-1] - self.stamps[SETTLE]) / (len(self.stamps) - 1 - SETTLE)


def run(name: str, setting: str, work: Path) -> tuple[float, float]:
    """(median step seconds, mean period seconds) of one failure-free run."""
    n, spec, iterations = PLANS[name]
    spec = dataclasses.replace(spec, iterations=iterations, **SETTINGS[setting])
    pace = Pace(iterations)
    result = launch(spec, cluster_of(n), work / f"run{len(list(work.iterdir()))}", timeout_s=600,
                    log=pace.log)
    return statistics.median(result["seconds"][SETTLE:]), pace.period()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--plans", nargs="*", default=list(PLANS), help="plan names (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    load_start, started = os.getloadavg()[0], time.perf_counter()
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    order = list(SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for k in range(args.rounds):
            for name in args.plans:
                for setting in order if k % 2 == 0 else order[::-1]:
                    runs.setdefault((name, setting), []).append(run(name, setting, work))
                    step, period = runs[(name, setting)][-1]
                    print(f"round {k + 1}/{args.rounds}, {name}, {setting}: step {step * 1e3:.2f} ms, "
                          f"period {period * 1e3:.2f} ms", flush=True)
    load_end, took = os.getloadavg()[0], time.perf_counter() - started
    step = {key: statistics.median(s for s, _ in v) for key, v in runs.items()}
    period = {key: statistics.median(p for _, p in v) for key, v in runs.items()}
    command = "benchmarks/backups.py" + (f" --rounds {args.rounds}" if args.rounds != 4 else "") + \
        (" --plans " + " ".join(f"'{n}'" for n in args.plans) if args.plans != list(PLANS) else "")
    lines = [
        "## Backups: what recovery costs a failure-free run",
        "",
        f"Written by `.venv/bin/python {command}` in {took / 60:.0f} min. Machine: {machine()}; load average "
        f"{load_start:.1f} at the start, {load_end:.1f} at the end (other jobs share the cores). Worker processes "
        "on loopback (gloo), clusters of laptop-i7 devices (`recovery.cluster_of`), batch 48, 2 micro-batches, "
        "Adam. Settings: recovery off; recovery on without backups (heartbeats, interruptible waits, rollback "
        "points; only iteration 0 backs up); backups every 10 iterations; backups every iteration. "
        f"{args.rounds} runs of each, interleaved (A B C D D C B A ...); "
        "each value is the median over the runs. A backup is one message of the stage's packed state, "
        "received into a buffer the holder posted when the iteration started.",
        "",
        "**Throughput**: mean wall time per iteration (from one iteration's loss in the store to the next), "
        "against recovery off, and [the backups' own cost] against recovery on without backups:",
        "",
        "| plan | iterations per run | recovery off | no backups | every 10 iterations | every iteration |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cells(t: dict, name: str) -> str:
        off, bare = t[(name, "off")], t[(name, "no backups")]
        return " | ".join([f"{off * 1e3:.2f} ms", f"{bare * 1e3:.2f} ms ({bare / off - 1:+.1%})"] + [
            f"{t[(name, s)] * 1e3:.2f} ms ({t[(name, s)] / off - 1:+.1%}) [{t[(name, s)] / bare - 1:+.1%}]"
            for s in ("every 10", "every 1")])

    for name in args.plans:
        lines.append(f"| {name} | {PLANS[name][2]} | {cells(period, name)} |")
    lines += ["", "Median step time (barrier to the slowest device's last action; the measure benchmarks/recovery.py "
              "reported), same layout:", "",
              "| plan | recovery off | no backups | every 10 iterations | every iteration |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name in args.plans:
        lines.append(f"| {name} | {cells(step, name)} |")
    spread = {name: max(p for _, p in runs[(name, "off")]) / min(p for _, p in runs[(name, "off")]) - 1
              for name in args.plans}
    lines += ["", "Noise: the recovery-off runs of one plan differ in throughput by up to "
              + ", ".join(f"{spread[n]:.0%}" for n in args.plans) + " (plans in table order)."]
    verdict = []
    for against, label in (("no backups", "the backups' own cost"), ("off", "against recovery off")):
        missed = [f"{name}, {s} ({period[(name, s)] / period[(name, against)] - 1:+.1%})"
                  for name in args.plans for s in ("every 10", "every 1")
                  if period[(name, s)] / period[(name, against)] - 1 > GOAL]
        verdict.append(f"{label}: " + (f"over {GOAL:.0%} for {'; '.join(missed)}" if missed else
                                        f"within {GOAL:.0%} everywhere"))
    lines += ["", f"Goal, at most {GOAL:.0%} on throughput: " + "; ".join(verdict) + "."]
    body = "\n".join(lines)
    if not args.no_write:
        write_section("backups", body)
    print(body)


if __name__ == "__main__":
    main()
