"""Live pipeline replay against checkpoint-and-restart, on worker processes of this machine (gloo on
loopback). Writes the "recovery" section of RESULTS.md.

The N worker processes of a run are described to the planner as N laptop-i7 CPUs named host0..,
on links like the host-N presets' loopback (10 Gbit/s, 20 us): catalog costs are the same in
every process, so the leader's re-plan and the fresh plan of the baseline are the same plan. (The
host-N presets' "host-cpu" kind is measured in each process, and under load two processes can
plan differently.)

  trials     a worker is SIGKILLed from outside at a random moment, on several plans; every run
             must recover and end with the weights of the failure-free local run of the same
             iterations. Recovery time: from the kill to the end of the interrupted iteration
             redone by the survivors (detection, agreement, rewrite, regroup, rollback, redo).
  baseline   checkpoint and restart, what torchrun elastic gives: every worker stops, a new run
             starts on the survivors (processes, imports, a fresh plan, process groups), loads
             the latest checkpoint and redoes the lost iterations. Measured as the same detection
             time plus a real `launch` of one iteration on the survivors plus a checkpoint load;
             lost iterations are counted as zero (a checkpoint every iteration), the baseline's
             best case.
  throughput after recovery against a fresh plan on the survivors (median iteration times): replay's
             rewrite runs at once; the planner runs in the background on the survivors and the run
             switches to its plan at an iteration boundary (passes/replan.py) when it predicts a gain.
             The cost of backups on failure-free runs is measured by benchmarks/backups.py.

    .venv/bin/python benchmarks/recovery.py [--trials 21] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

import torch  # noqa: E402

from asteroid_fx.ir.cluster import Cluster, Device  # noqa: E402
from asteroid_fx.runtime.launcher import launch, load_weights  # noqa: E402
from asteroid_fx.runtime.spec import RunSpec, batches, compile_spec, iterations_of, optimizer_of  # noqa: E402

BASE = dict(model="mlp:small", batch=48, microbatches=2, optimizer="adam", lr=1e-3, recovery=True)
PLANS = {
    "3 devices, 1 + group of 2": (3, RunSpec(groups=(("host0",), ("host1", "host2")), rows=((24,), (12, 12)),
                                                    **BASE)),
    "3 devices, 3 stages": (3, RunSpec(groups=(("host0",), ("host1",), ("host2",)), rows=((24,), (24,), (24,)),
                                              **BASE)),
    "4 devices, 2 groups of 2": (4, RunSpec(groups=(("host0", "host1"), ("host2", "host3")),
                                                   rows=((12, 12), (12, 12)), **BASE)),
}
ITERATIONS = 300
SETTLE = 5  # iterations left out of a median after a start or a recovery


def cluster_of(n: int) -> Cluster:
    return Cluster.uniform([Device(f"host{i}", "laptop-i7") for i in range(n)], bandwidth="10Gbps", latency=20e-6,
                           name=f"laptop-i7 x{n}")


def quiet(_m: str) -> None:
    pass


def relative_gap(got: dict, want: dict) -> float:
    return max(float((got[k] - want[k]).norm() / max(float(want[k].norm()), 1e-30)) for k in want)


def trial(name: str, rng: random.Random, work: Path, reference: dict) -> dict:
    n, spec = PLANS[name]
    spec = dataclasses.replace(spec, iterations=ITERATIONS)
    cluster = cluster_of(n)
    victim = rng.choice([d.name for d in cluster.devices])
    moment = rng.uniform(0.05, 0.6)
    out = work / f"trial{len(list(work.iterdir()))}"
    result = launch(spec, cluster, out, timeout_s=300, log=quiet, kills=[(victim, moment)])
    if name not in reference:
        runner, losses = compile_spec(spec, cluster).run(batches(spec), iterations_of(spec), optimizer=optimizer_of(spec))
        reference[name] = (runner.state_dict(), losses)
    want, losses = reference[name]
    gap = relative_gap(load_weights(out, result["program"].devices), want)
    (failure,) = result["failures"] or [None]
    switch = next(iter(result["switches"]), None)
    seconds = result["seconds"]
    # replay's rewrite runs from the failure to the switch (if any), the planner's plan after it
    first = switch["iteration"] if switch else failure["iteration"] if failure else None
    after = seconds[first + SETTLE:] if failure else []
    rewrite = seconds[failure["iteration"] + 1:switch["iteration"]] if failure and switch else []
    return {"plan": name, "victim": victim, "moment": moment, "failure": failure, "switch": switch, "gap": gap,
            "loss_gap": max(abs(a - b) / abs(b) for a, b in zip(result["losses"], losses)),
            "after_s": statistics.median(after) if after else None,
            "rewrite_s": statistics.median(rewrite) if rewrite else None,
            "survivors": len(set(failure_survivors(result, failure))) if failure else None, "batch": spec.batch}


def failure_survivors(result: dict, failure: dict) -> list[str]:
    """The devices alive after the failure (the run may later leave some out)."""
    return [d for d, r in result["workers"].items() if d != failure["device"]]


def fresh_on_survivors(n: int, spec: RunSpec, work: Path) -> tuple[float, float]:
    """(median iteration seconds of a fresh plan on n devices, wall seconds of a one-iteration restart)."""
    cluster = cluster_of(n)
    # the planner's plan from scratch, free to choose the micro-batching (as the re-plan is)
    fresh = RunSpec(model=spec.model, batch=spec.batch, microbatches=None, optimizer=spec.optimizer,
                    lr=spec.lr, iterations=60, recovery=True)
    result = launch(fresh, cluster, work / f"fresh{n}", timeout_s=300, log=quiet)
    median = statistics.median(result["seconds"][SETTLE:])
    restarts = []
    for k in range(3):
        started = time.perf_counter()
        launch(dataclasses.replace(fresh, iterations=1), cluster, work / f"restart{n}-{k}", timeout_s=300, log=quiet)
        restarts.append(time.perf_counter() - started)
    return median, statistics.median(restarts)


def checkpoint_load_s(spec: RunSpec, cluster, work: Path) -> float:
    state = compile_spec(spec, cluster).captured.module.state_dict()
    path = work / "checkpoint.pt"
    torch.save(state, path)
    started = time.perf_counter()
    torch.load(path, weights_only=True)
    return time.perf_counter() - started


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def switched_text(r: dict) -> str:
    s = r["switch"]
    if not s:
        return "no"
    return (f"iteration {s['iteration']}, +{(s['switched_at'] - r['failure']['failed_at']) * 1e3:.0f} ms, on "
            f"{len(s['devices'])} device{'s' if len(s['devices']) > 1 else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    names = list(PLANS)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "trials").mkdir()
        reference: dict = {}
        rows = []
        for k in range(args.trials):
            row = trial(names[k % len(names)], rng, work / "trials", reference)
            rows.append(row)
            f = row["failure"]
            print(f"trial {k + 1}/{args.trials}: {row['plan']}, {row['victim']} killed at +{row['moment']:.2f}s: "
                  + (f"recovered in {f['recovery_s']:.3f}s, weights within {row['gap']:.1e}" if f else
                     "the run ended before the kill"), flush=True)
        fresh = {}
        for n in sorted({r["survivors"] for r in rows if r["survivors"]}):
            spec = PLANS[names[0]][1]
            fresh[n] = fresh_on_survivors(n, spec, work)
        load_s = checkpoint_load_s(PLANS[names[0]][1], cluster_of(3), work)
    failed = [r for r in rows if r["failure"] is not None]
    exact = [r for r in failed if r["gap"] <= 1e-6]
    ours = statistics.median(r["failure"]["recovery_s"] for r in failed)
    baseline = statistics.median(r["failure"]["detected_s"] + fresh[r["survivors"]][1] + load_s for r in failed)
    kept = [fresh[r["survivors"]][0] / r["after_s"] for r in failed if r["after_s"]]
    kept_rewrite = [fresh[r["survivors"]][0] / r["rewrite_s"] for r in failed if r["rewrite_s"]]
    switched = [r for r in failed if r["switch"]]
    to_fresh = [r["switch"]["switched_at"] - r["failure"]["failed_at"] for r in switched]
    lines = [
        "## Recovery: live pipeline replay vs checkpoint and restart",
        "",
        f"Written by `benchmarks/recovery.py` (seed {args.seed}). Machine: {machine()}; load average "
        f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. Worker processes on loopback (gloo), "
        f"{BASE['model']}, batch {BASE['batch']}, {BASE['microbatches']} micro-batches, Adam, {ITERATIONS} "
        "iterations per trial; a worker is SIGKILLed from outside at a random moment 0.05-0.6 s after the first "
        "iteration. Backups are paced by their measured cost (the default, budget 2% of the run's time), so a "
        "recovery rolls back to the last backed-up iteration and redoes from there (\"rolled back to\" below). "
        "Recovery time: kill to the end of the interrupted iteration, redone.",
        "",
        f"- recovered: **{len(exact)}/{len(failed)}** runs with weights within 1e-6 of the failure-free run "
        f"({len(rows) - len(failed)} of {len(rows)} runs ended before their kill)",
        f"- recovery time, median: **{ours * 1e3:.0f} ms** (live replay) vs **{baseline:.2f} s** (checkpoint and "
        f"restart, best case) = **{baseline / ours:.0f}x** faster",
        f"- throughput after recovery / fresh plan on the survivors: median **{statistics.median(kept):.2f}**, "
        f"worst {min(kept):.2f} (from {SETTLE} iterations after the switch to the planner's plan, or after the "
        "failure where the run did not switch)",
        f"- switched to the planner's plan for the survivors in {len(switched)} of {len(failed)} runs, a median "
        f"{statistics.median(to_fresh) * 1e3:.0f} ms after the kill" if switched else
        f"- switched to the planner's plan in 0 of {len(failed)} runs",
        f"- before the switch, replay's local rewrite ran at a median {statistics.median(kept_rewrite):.2f} of the "
        "fresh plan's throughput" if kept_rewrite else "- (no iteration ran on the rewrite before the switch)",
        "",
        "| plan | killed | at | agreed after | regroup | recovered in | rolled back to | weights gap | "
        "switched to the fresh plan | iteration: rewrite / after / fresh plan |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        f = r["failure"]
        if f is None:
            lines.append(f"| {r['plan']} | {r['victim']} | +{r['moment']:.2f} s | (the run ended first) | | | | | | |")
            continue
        lines.append(f"| {r['plan']} | {r['victim']} | +{r['moment']:.2f} s | {f['detected_s'] * 1e3:.0f} ms | "
                     f"{f['regroup_s'] * 1e3:.0f} ms | {f['recovery_s'] * 1e3:.0f} ms | iteration {f['rollback_to']} "
                     f"of {f['iteration']} | {r['gap']:.1e} | {switched_text(r)} | {ms(r['rewrite_s'])} / "
                     f"{ms(r['after_s'])} / {fresh[r['survivors']][0] * 1e3:.1f} ms |")
    lines += ["", "Checkpoint-and-restart baseline per survivor count: a one-iteration `launch` on the survivors "
              f"(median of 3, fresh plan) plus loading the checkpoint ({load_s * 1e3:.1f} ms):", "",
              "| survivors | restart + one iteration | fresh plan's iteration |", "| ---: | ---: | ---: |"]
    for n, (median, restart) in sorted(fresh.items()):
        lines.append(f"| {n} | {restart:.2f} s | {median * 1e3:.1f} ms |")
    lines += ["", "What backups cost failure-free runs is in the \"backups\" section (benchmarks/backups.py)."]
    body = "\n".join(lines)
    if args.no_write:
        print(body)
    else:
        write_section("recovery", body)
        print(body)


if __name__ == "__main__":
    main()
