"""Compile time of the full-size ResNet-50 and GPT-style models with analytic costs, and the
layer count before and after coarsening. Writes the "compile" section of RESULTS.md.

    .venv/bin/python benchmarks/compile.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

import asteroid_fx as asteroid  # noqa: E402
from asteroid_fx import models  # noqa: E402
from asteroid_fx.passes.linearize import linearize  # noqa: E402

CASES = (("resnet50", 32), ("gpt", 8))
CLUSTER = "edge-6-300m"
GOAL_S = 10.0


def measure(name: str, batch: int, repeats: int) -> dict:
    entry = models.get(name)
    torch.manual_seed(0)
    model = entry.build(small=False)
    example = entry.example(batch, False)
    times, cpu, compiled = [], [], None
    for i in range(repeats):
        print(f"  {name}: compile {i + 1}/{repeats} ...", file=sys.stderr, flush=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        compiled = asteroid.compile(model, CLUSTER, example=example, loss=entry.loss, microbatches=4)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    uncoarsened = linearize(compiled.captured, max_layers=None)
    params = sum(p.numel() for p in model.parameters())
    return {"name": name, "batch": batch, "params": params, "median": statistics.median(times),
            "best": min(times), "cpu": statistics.median(cpu), "nodes": sum(len(layer.nodes) for layer in uncoarsened.layers),
            "before": len(uncoarsened), "after": len(compiled.layer_graph),
            "stages": len(compiled.plan.stages)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    load_start = os.getloadavg()[0]
    rows = [measure(name, batch, args.repeats) for name, batch in CASES]
    lines = [
        "## Compile time (benchmarks/compile.py)",
        "",
        f"Machine: {machine()}. Cluster preset `{CLUSTER}`, analytic costs, 4 micro-batches, "
        f"median of {args.repeats} compiles (capture, annotate, linearize, plan, split, schedule, lower, verify). "
        f"Goal: under {GOAL_S:.0f} s each (wall median). Load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; CPU: the process's own, both torch threads (on a loaded machine two "
        "threads wait for each other, so wall time there is far above an idle machine's).",
        "",
        "| model | params | example batch | fx compute nodes | layers before coarsening | after | stages | compile median (s) | best (s) | CPU median (s) | goal met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['nodes']} | {r['before']} | "
                     f"{r['after']} | {r['stages']} | {r['median']:.2f} | {r['best']:.2f} | {r['cpu']:.2f} | "
                     f"{'yes' if r['median'] < GOAL_S else 'no'} |")
    lines.append("")
    lines.append("Layers before coarsening are the runs of nodes between allowed cuts (a cut is allowed when "
                 "only batch-first tensors cross it and no weight is used on both sides).")
    write_section("compile", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
