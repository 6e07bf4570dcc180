"""Emulated clusters on this machine: measured iteration time of real worker processes (each
paced like the device it emulates: `asteroid launch --emulate`) against the simulator's
prediction for the same program, over several (model, preset) pairs; and, on one preset, the
measured throughput of the Asteroid plan against the data-parallel and even-split pipeline plans.
Writes the "emulation" section of RESULTS.md.

    .venv/bin/python benchmarks/emulation.py [--iterations 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

from asteroid_fx.ir import catalog  # noqa: E402
from asteroid_fx.runtime.launcher import launch  # noqa: E402
from asteroid_fx.runtime.spec import RunSpec, compile_spec, pinned  # noqa: E402

# (model, preset, batch): small models on slow devices and links, where the emulated device's time,
# not this machine's, sets the pace (the emulation can only slow a worker down)
PAIRS = (
    ("digits", "edge-4-pi-1g", 64),
    ("digits", "edge-8-100m", 64),
    ("digits", "edge-6-300m", 64),
    ("resnet18:small", "edge-4-pi-1g", 32),
    ("resnet18:small", "edge-8-100m", 32),
    ("gpt:small", "edge-4-pi-1g", 32),
    ("gpt:small", "edge-7-laptop-100m", 32),
    ("mlp:small", "edge-6-laptop-300m", 64),
)
COMPARE = ("digits", "edge-4-pi-1g", 64)
PLANNERS = ("asteroid", "dp", "pp")
GOAL = 0.10
MAX_DILATION = 400


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def launch_once(spec: RunSpec, cluster) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        return launch(spec, cluster, out, timeout_s=900, log=lambda m: None)["seconds"]


def run(model: str, preset: str, batch: int, iterations: int, planner: str = "asteroid") -> dict:
    """The plan's iteration time, emulated with a time dilation large enough that the emulated
    devices, not this machine, set the pace: a short undilated run measures this machine's own
    time, and the dilation makes the emulated time four times that."""
    cluster = catalog.preset(preset)
    spec = RunSpec(model=model, batch=batch, microbatches=None, iterations=iterations, optimizer="adam", lr=1e-3,
                   emulate=True, planner=planner)
    compiled = compile_spec(spec, cluster)
    plan = compiled.plan
    spec = pinned(spec, plan)
    host = statistics.median(launch_once(dataclasses.replace(spec, iterations=4), cluster)[1:])
    dilation = float(min(MAX_DILATION, max(1, math.ceil(4 * host / plan.prediction.iteration_s))))
    seconds = [s / dilation for s in launch_once(dataclasses.replace(spec, dilation=dilation), cluster)[2:]]
    shape = (f"{len(plan.stages)} stages {'/'.join(str(len(s.devices)) for s in plan.stages)}, "
             f"{plan.microbatches}x{plan.microbatch_rows}, {plan.schedule}")
    return {"measured": statistics.median(seconds), "predicted": plan.prediction.iteration_s, "shape": shape,
            "spread": (min(seconds), max(seconds)), "dilation": dilation}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=12)
    args = ap.parse_args()
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    rows = ["| model | preset | batch | plan | dilation | simulated (ms) | measured median (ms) | min-max (ms) | error |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    errors = []
    for model, preset, batch in PAIRS:
        log(f"  {model} on {preset} ...")
        r = run(model, preset, batch, args.iterations)
        err = r["measured"] / r["predicted"] - 1
        errors.append(abs(err))
        rows.append(f"| {model} | {preset} | {batch} | {r['shape']} | {r['dilation']:g} | {r['predicted'] * 1e3:.1f} | "
                    f"{r['measured'] * 1e3:.1f} | {r['spread'][0] * 1e3:.0f}-{r['spread'][1] * 1e3:.0f} | {err:+.1%} |")
        log(f"    simulated {r['predicted'] * 1e3:.1f} ms, measured {r['measured'] * 1e3:.1f} ms ({err:+.1%})")
    med = statistics.median(errors)
    model, preset, batch = COMPARE
    cmp_rows = ["| planner | plan | simulated (samples/s) | measured (samples/s) | measured vs asteroid |",
                "|---|---|---:|---:|---:|"]
    got = {}
    for planner in PLANNERS:
        log(f"  {model} on {preset} with planner {planner} ...")
        got[planner] = run(model, preset, batch, args.iterations, planner)
    for planner in PLANNERS:
        r = got[planner]
        ratio = got["asteroid"]["measured"] and r["measured"] / got["asteroid"]["measured"]
        cmp_rows.append(f"| {planner} | {r['shape']} | {batch / r['predicted']:.0f} | {batch / r['measured']:.0f} | "
                        f"asteroid {ratio:.2f}x faster |" if planner != "asteroid" else
                        f"| {planner} | {r['shape']} | {batch / r['predicted']:.0f} | {batch / r['measured']:.0f} | - |")
    body = [
        "## Emulated clusters (benchmarks/emulation.py)",
        "",
        f"Machine: {machine()}; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. "
        f"Command: `.venv/bin/python benchmarks/emulation.py --iterations {args.iterations}`. Each run starts one "
        "worker process per device of the preset (torch.distributed, gloo on loopback) with `--emulate`: a worker "
        "pads every forward and backward to its device's time in the cost model and holds every message for its "
        "link's latency and bandwidth. This 2-core machine is slower than the emulated boards, so each pair runs "
        "with a time dilation (`--dilation`: every emulated duration that many times longer, chosen so the "
        "emulated time is four times this machine's own, measured by a short undilated run) and the measured "
        "times are divided by it. Measured: the median over iterations 3 onwards; simulated: the plan's "
        "prediction (`sim.predict` of the same program). Analytic costs (catalog), Adam, the planner choosing "
        "the micro-batching and schedule.",
        "",
        *rows,
        "",
        f"Median |error| over {len(errors)} pairs: {med:.1%} (goal <= {GOAL:.0%}: {'met' if med <= GOAL else 'not met'}).",
        "",
        f"### {model} on {preset}, batch {batch}: the plans of three planners, measured",
        "",
        *cmp_rows,
        "",
        f"Whole benchmark: {time.perf_counter() - started:.0f} s.",
    ]
    write_section("emulation", "\n".join(body))
    log("wrote the emulation section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
