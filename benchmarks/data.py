"""Data loading in a pipeline run: what it costs on the demo's plan with the real data set.

Runs the demo's job (examples/digits_job.py: scikit-learn's UCI digits, each device reading only
its rows, the next iteration's in the background) on the demo's emulated cluster, and the same
model, plan and rows with a dataset that reads nothing (every sample one preallocated tensor, the
labels one constant: the cheapest read a job can have), side by side, alternating, ``--rounds``
times. Reports data loading's share of each device's training time (the time it waited for its
rows, which prefetch did not hide) and the throughput of the real job against the reading-free one.
Writes the "data" section of RESULTS.md.

    .venv/bin/python benchmarks/data.py [--iterations 44] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/, benchmarks/ for the workers
from results import machine, write_section  # noqa: E402

from asteroid_fx.ir import catalog  # noqa: E402
from asteroid_fx.runtime.launcher import launch  # noqa: E402
from asteroid_fx.runtime.spec import RunSpec, compile_spec, pinned  # noqa: E402

PRESET = "edge-4-pi-1g"
DILATION = 4.0
REAL = "examples.digits_job:build"
FREE = "benchmarks.data:reading_free"
SHARE_GOAL, RATIO_GOAL = 0.03, 0.98


class Constant(torch.utils.data.Dataset):
    """``n`` samples that are all one preallocated value: reading one costs a call, nothing more."""

    def __init__(self, value, n: int):
        self.value, self.n = value, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.value


def reading_free():
    """The demo's job with datasets that read nothing (same model, batch, optimizer and length)."""
    from examples.digits_job import build

    job = build()
    return dataclasses.replace(job, dataset=Constant(job.dataset[0], len(job.dataset)),
                               labels=Constant(job.labels[0], len(job.labels)), validation=None,
                               validation_labels=None, name="reading-free")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_once(spec: RunSpec, cluster) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = launch(spec, cluster, out, timeout_s=900, log=lambda m: None)
    workers = [w for w in result["workers"].values() if not w.get("left")]
    train_s = max(w["train_s"] for w in workers)
    return {"share": max(w["data_s"] / w["train_s"] for w in workers),
            "throughput": len(result["losses"]) * spec_batch(spec) / train_s * DILATION}


def spec_batch(spec: RunSpec) -> int:
    from asteroid_fx.runtime.spec import job_of

    return job_of(spec).batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=44, help="iterations per run (44: 4 epochs)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    args = parser.parse_args()
    cluster = catalog.preset(PRESET)
    base = RunSpec(model=REAL, iterations=args.iterations, emulate=True, dilation=DILATION)
    compiled = compile_spec(base, cluster)
    real = pinned(base, compiled.plan)
    free = dataclasses.replace(real, model=FREE)
    got: dict[str, list[dict]] = {"real": [], "free": []}
    for r in range(args.rounds):
        for name, spec in (("real", real), ("free", free)):
            got[name].append(run_once(spec, cluster))
            log(f"round {r + 1}/{args.rounds} {name}: {got[name][-1]['throughput']:.1f} samples/s, "
                f"data {got[name][-1]['share']:.2%} of the time")
    share = statistics.median(g["share"] for g in got["real"])
    ratios = [a["throughput"] / b["throughput"] for a, b in zip(got["real"], got["free"])]
    ratio = statistics.median(ratios)
    plan = compiled.plan
    body = "\n".join([
        "## Data loading (benchmarks/data.py)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/data.py --iterations {args.iterations} "
        f"--rounds {args.rounds}`.",
        "",
        f"The demo's job ({REAL}: scikit-learn's UCI digits, batch {spec_batch(real)}) on `{PRESET}` emulated "
        f"with time dilation {DILATION:g} (throughputs per emulated second), its plan: "
        f"{len(plan.stages)} stages, {', '.join('+'.join(st.devices) for st in plan.stages)}; each device "
        "reads only its rows, the next iteration's in a background thread. Beside it, alternating, the same "
        "plan with datasets that read nothing (every sample one preallocated tensor). Data share: the time "
        "a device waited for its rows over its training loop's wall time, the worst device, median of the "
        "rounds.",
        "",
        "| run | samples/s (median) | data share (median, worst device) |",
        "| --- | ---: | ---: |",
        f"| real data | {statistics.median(g['throughput'] for g in got['real']):.1f} | {share:.2%} |",
        f"| reading-free data | {statistics.median(g['throughput'] for g in got['free']):.1f} | "
        f"{statistics.median(g['share'] for g in got['free']):.2%} |",
        "",
        f"Throughput of the real job over the reading-free one: {ratio:.3f} (per round: "
        f"{', '.join(f'{x:.3f}' for x in ratios)}; goal >= {RATIO_GOAL}: {'met' if ratio >= RATIO_GOAL else 'missed'}). "
        f"Data loading's share: {share:.2%} (goal < {SHARE_GOAL:.0%}: {'met' if share < SHARE_GOAL else 'missed'}).",
    ])
    write_section("data", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
