"""What being recoverable costs a failure-free run: iteration time with recovery off against
recovery on without backups, with backups paced by their measured cost (the default) and with
backups every iteration, on worker processes of this machine (gloo on loopback, clusters of
laptop-i7 devices as in benchmarks/recovery.py). Writes the "backups" section of RESULTS.md.

  plans      three of mlp:small (a stage of one and a group of two, three stages, two groups of two;
             2-7 ms iterations, where a backup's fixed costs show most), and resnet18:small and gpt:small on three devices with a group,
             whose longer iterations carry 0.2-1 MB of state per backup.
  settings   "off": no recovery; "no backups": recovery on (heartbeats, interruptible waits,
             rollback points) with backup_every larger than the run, so only iteration 0 backs up;
             "paced": the default, backup_every=None (the leader backs up as often as keeps the
             measured cost within backup_budget, 2%); "every 1": a backup every iteration. The
             backups' own cost is a setting against "no backups".
  order      runs are interleaved: round k runs the settings in order, round k+1 in reverse (A B C
             D D C B A ...), so load that drifts on this shared machine falls on every setting alike.
  period     a run's mean wall time per iteration, from when the iterations' losses appear in the
             run's store (the first SETTLE left out): throughput, with everything recovery adds.
  ratios     each round's runs of one plan ran back to back: a setting's cost is the median over
             rounds of its period divided by the same round's "no backups" (or "off") period.
  within     a paced run alone: its iterations that back up and those right after them against its
             other iterations, as a fraction of its time (``own_cost``): a paired measure that drift
             between runs cannot move.
  step       a run's median over its iterations of the step time (barrier to the slowest device's
             last action); the median of the runs.

    .venv/bin/python benchmarks/backups.py [--rounds 6]
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
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import cluster_of  # noqa: E402
from results import machine, write_section  # noqa: E402

from asteroid_fx.runtime.launcher import launch  # noqa: E402
from asteroid_fx.runtime.spec import RunSpec  # noqa: E402

HYBRID = dict(batch=48, microbatches=2, optimizer="adam", lr=1e-3, groups=(("host0",), ("host1", "host2")),
              rows=((24,), (12, 12)))
MLP = dict(model="mlp:small", batch=48, microbatches=2, optimizer="adam", lr=1e-3)
# plan -> (devices, spec without recovery, iterations per run); clusters as benchmarks/recovery.py's
PLANS = {
    "3 devices, 1 + group of 2": (3, RunSpec(groups=(("host0",), ("host1", "host2")), rows=((24,), (12, 12)), **MLP),
                                  300),
    "3 devices, 3 stages": (3, RunSpec(groups=(("host0",), ("host1",), ("host2",)), rows=((24,), (24,), (24,)),
                                       **MLP), 300),
    "4 devices, 2 groups of 2": (4, RunSpec(groups=(("host0", "host1"), ("host2", "host3")), rows=((12, 12), (12, 12)),
                                            **MLP), 300),
}
PLANS["resnet18:small, 1 + group of 2"] = (3, RunSpec(model="resnet18:small", **HYBRID), 100)
PLANS["gpt:small, 1 + group of 2"] = (3, RunSpec(model="gpt:small", **HYBRID), 160)
SETTINGS = {"off": dict(recovery=False), "no backups": dict(recovery=True, backup_every=10**6),
            "paced": dict(recovery=True, backup_every=None), "every 1": dict(recovery=True, backup_every=1)}
BACKED = ("paced", "every 1")
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


class Run(NamedTuple):
    step: float  # median step seconds
    period: float  # mean wall seconds per iteration
    backups: int  # iterations that backed up
    own: float | None  # with backups between plain iterations: their cost measured within the run


def own_cost(stamps: list[float], backed_up: list[int]) -> float | None:
    """What the backups of one run cost it, measured within the run: the iterations that back up
    and those right after them against the others (mean wall times), as a fraction of the run's
    time from SETTLE on. Both kinds ran in the same processes at the same moments, so load that
    drifts between runs cancels; what a backup costs every iteration alike does not show here."""
    periods = {i: stamps[i] - stamps[i - 1] for i in range(SETTLE + 1, len(stamps))}
    affected = {i for b in backed_up for i in (b, b + 1)} & periods.keys()
    plain = [p for i, p in periods.items() if i not in affected]
    if not affected or len(plain) < 10:
        return None
    extra = sum(periods[i] for i in affected) - len(affected) * statistics.fmean(plain)
    return extra / sum(periods.values())


def run(name: str, setting: str, work: Path) -> Run:
    """One failure-free run."""
    n, spec, iterations = PLANS[name]
    spec = dataclasses.replace(spec, iterations=iterations, **SETTINGS[setting])
    pace = Pace(iterations)
    result = launch(spec, cluster_of(n), work / f"run{len(list(work.iterdir()))}", timeout_s=600,
                    log=pace.log)
    own = own_cost(pace.stamps, result["backed_up"]) if setting == "paced" else None
    return Run(statistics.median(result["seconds"][SETTLE:]), pace.period(), result["backups"], own)


def own_text(runs: list[Run]) -> str:
    own = sorted(r.own for r in runs if r.own is not None)
    return f"{statistics.median(own):+.1%} ({own[0]:+.1%} to {own[-1]:+.1%})" if own else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--plans", nargs="*", default=list(PLANS), help="plan names (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    load_start, started = os.getloadavg()[0], time.perf_counter()
    runs: dict[tuple[str, str], list[Run]] = {}
    order = list(SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for k in range(args.rounds):
            for name in args.plans:
                for setting in order if k % 2 == 0 else order[::-1]:
                    r = run(name, setting, work)
                    runs.setdefault((name, setting), []).append(r)
                    print(f"round {k + 1}/{args.rounds}, {name}, {setting}: step {r.step * 1e3:.2f} ms, "
                          f"period {r.period * 1e3:.2f} ms, {r.backups} backups"
                          + (f", own cost {r.own:+.1%}" if r.own is not None else ""), flush=True)
    load_end, took = os.getloadavg()[0], time.perf_counter() - started

    def cost(name: str, setting: str, against: str) -> float:
        """The median over rounds of the setting's period over the same round's ``against``."""
        return statistics.median(a.period / b.period - 1 for a, b in zip(runs[(name, setting)], runs[(name, against)]))

    period = {key: statistics.median(r.period for r in v) for key, v in runs.items()}
    step = {key: statistics.median(r.step for r in v) for key, v in runs.items()}
    command = "benchmarks/backups.py" + (f" --rounds {args.rounds}" if args.rounds != 6 else "") + \
        (" --plans " + " ".join(f"'{n}'" for n in args.plans) if args.plans != list(PLANS) else "")
    lines = [
        "## Backups: what recovery costs a failure-free run",
        "",
        f"Written by `.venv/bin/python {command}` in {took / 60:.0f} min. Machine: {machine()}; load average "
        f"{load_start:.1f} at the start, {load_end:.1f} at the end. Worker processes on loopback (gloo), "
        "clusters of laptop-i7 devices (`recovery.cluster_of`), batch 48, 2 micro-batches, Adam. Settings: "
        "recovery off; recovery on without backups (heartbeats, interruptible waits, rollback points; only "
        "iteration 0 backs up); backups paced by their measured cost (the default: `backup_every=None`, "
        "budget 2%); backups every iteration. A backup is one message, a copy of the stage's state kept "
        f"as one buffer. {args.rounds} rounds; in each, a plan's four runs ran back to back, in an order "
        "reversed every other round.",
        "",
        "**Throughput**: median over the runs of the mean wall time per iteration (from one iteration's loss "
        "in the store to the next); in parentheses the median over rounds of the run's time against the same "
        "round's recovery-off run, in brackets against its no-backups run (the backups' own cost):",
        "",
        "| plan | iterations per run | recovery off | no backups | paced backups | every iteration "
        "| paced: backups per run | paced: cost within the run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in args.plans:
        cells = [f"{period[(name, 'off')] * 1e3:.2f} ms",
                 f"{period[(name, 'no backups')] * 1e3:.2f} ms ({cost(name, 'no backups', 'off'):+.1%})"]
        cells += [f"{period[(name, s)] * 1e3:.2f} ms ({cost(name, s, 'off'):+.1%}) [{cost(name, s, 'no backups'):+.1%}]"
                  for s in BACKED]
        paced = sorted(r.backups for r in runs[(name, "paced")])
        cells.append(f"{statistics.median(paced):g} ({paced[0]}-{paced[-1]})")
        cells.append(own_text(runs[(name, "paced")]))
        lines.append(f"| {name} | {PLANS[name][2]} | " + " | ".join(cells) + " |")
    lines += ["", "Median step time (barrier to the slowest device's last action; the measure "
              "benchmarks/recovery.py reports), median over the runs:", "",
              "| plan | recovery off | no backups | paced backups | every iteration |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name in args.plans:
        lines.append(f"| {name} | " + " | ".join(f"{step[(name, s)] * 1e3:.2f} ms" for s in SETTINGS) + " |")
    spread = {name: max(r.period for r in runs[(name, "off")]) / min(r.period for r in runs[(name, "off")]) - 1
              for name in args.plans}
    lines += ["", "Noise: the recovery-off runs of one plan differ in throughput by up to "
              + ", ".join(f"{spread[n]:.0%}" for n in args.plans) + " (plans in table order)."]
    lines += ["", "The last column takes each paced run alone: its iterations that backed up and those right after "
              "them against its other iterations (mean wall times), as a fraction of the run's time; median over "
              "the runs (min-max). Drift between runs cancels there, which the comparison with the no-backups runs, "
              "whose noise is above, cannot offer; a cost spread over every iteration would show only in the latter."]
    over = [n for n in args.plans if own_text(runs[(n, "paced")]) == "-"
            or statistics.median(r.own for r in runs[(n, "paced")] if r.own is not None) > GOAL]
    verdict = ["paced, within the run: " + (f"over {GOAL:.0%} (or not measured) for {'; '.join(over)}" if over
                                             else f"within {GOAL:.0%} on every plan")]
    for setting in BACKED:
        missed = [f"{name} ({cost(name, setting, 'no backups'):+.1%})" for name in args.plans
                  if cost(name, setting, "no backups") > GOAL]
        verdict.append(f"{setting}, against the no-backups runs: " + (
            f"over {GOAL:.0%} for {'; '.join(missed)}" if missed else f"within {GOAL:.0%} on every plan"))
    lines += ["", f"Goal, the backups' own cost at most {GOAL:.0%} of throughput: " + "; ".join(verdict) + "."]
    body = "\n".join(lines)
    if not args.no_write:
        write_section("backups", body)
    print(body)


if __name__ == "__main__":
    main()
