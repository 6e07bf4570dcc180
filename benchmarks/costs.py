"""Cost-model accuracy: predicted forward+backward time of random contiguous stages against the
time measured on this machine, for a measured DeviceProfile, the analytic roofline, and the roofline
calibrated from measured profiles; and how long `asteroid profile` takes for ResNet-50 at six row
counts. Writes the "costs" section of RESULTS.md.

    .venv/bin/python benchmarks/costs.py [--stages 20] [--seed 0] [--skip-resnet50]

Every stage is measured three times, once right after its model was profiled and twice after every
model was (minutes apart); the truth is the median of the three, and how far the three spread is
shown as the noise floor: no prediction can be checked more finely than the machine repeats itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

from asteroid_fx.cost import calibrate  # noqa: E402
from asteroid_fx.cost.stage import step_s  # noqa: E402

from asteroid_fx.ir import catalog
from asteroid_fx.runtime import profiler as measure  # noqa: E402
from asteroid_fx.passes.profile_costs import profile_costs  # noqa: E402
from asteroid_fx.ir.profile import Method  # noqa: E402

# the zoo's modules (``models.gpt`` and ``models.bert`` are the builder functions)
resnet_zoo, mobilenet_zoo, gpt_zoo, bert_zoo = (importlib.import_module(f"asteroid_fx.models.{m}")
                                                for m in ("resnet", "mobilenet", "gpt", "bert"))

ROWS = (1, 2, 4, 8, 16, 32)
MAX_LAYERS = 48
KIND = catalog.HOST_CPU
STAGE_METHOD = Method(min_repeats=5, max_repeats=40, budget_s=0.3)  # the reference gets more repeats
GOAL_MEDIAN, GOAL_MAX, GOAL_RESNET50_S = 0.10, 0.25, 120.0


@dataclass(frozen=True)
class Case:
    name: str
    config: str  # what differs from the zoo's full-size model, in words
    build: Callable[[], tuple[torch.nn.Module, tuple]]


def _resnet18():
    cfg = resnet_zoo.config18(cifar_stem=True, image_size=32, num_classes=10)
    return resnet_zoo.ResNet(cfg), resnet_zoo.example(cfg, 2)


def _mobilenet():
    cfg = mobilenet_zoo.config(cifar_stem=True, image_size=32, num_classes=10, dropout=0.0)
    return mobilenet_zoo.MobileNetV2(cfg), mobilenet_zoo.example(cfg, 2)


def _gpt():
    cfg = gpt_zoo.config(vocab_size=4096, n_ctx=64, d_model=256, layers=4, heads=4, dropout=0.0, seq_len=64)
    return gpt_zoo.GPT(cfg), gpt_zoo.example(cfg, 2)


def _bert():
    cfg = bert_zoo.config(vocab_size=4096, hidden=256, layers=4, heads=4, intermediate=1024, max_positions=64,
                          dropout=0.0, seq_len=64)
    return bert_zoo.Bert(cfg), bert_zoo.example(cfg, 2)


CASES = (
    Case("resnet18", "CIFAR stem, 32x32 inputs, 10 classes", _resnet18),
    Case("mobilenetv2", "CIFAR stem, 32x32 inputs, 10 classes", _mobilenet),
    Case("gpt", "4 blocks, d=256, 4 heads, 64 tokens, vocab 4096", _gpt),
    Case("bert", "4 blocks, d=256, 4 heads, 64 tokens, vocab 4096", _bert),
)


@dataclass
class Model:
    case: Case
    captured: Any
    lg: Any
    profile: Any
    profile_s: float
    stages: list[tuple[int, int, int]]
    runs: list[list[float]]  # stage times per measurement pass, the first right after profiling


def _stage_s(m: Model, lo: int, hi: int, rows: int) -> float:
    fwd, bwd = measure.time_stage(m.captured, m.lg, lo, hi, rows, method=STAGE_METHOD)
    return fwd.median + bwd.median


def profile_model(case: Case, n_stages: int, seed: int) -> Model:
    torch.manual_seed(seed)
    model, example = case.build()
    captured, lg = measure.prepare(model, example, KIND, MAX_LAYERS)
    print(f"{case.name}: {len(lg)} layers, profiling rows {ROWS} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    profile = measure.measure(captured, lg, ROWS, model=case.name, kind=KIND, max_layers=MAX_LAYERS)
    profile_s = time.perf_counter() - started
    rng = random.Random(f"{case.name}-{seed}")
    stages = []
    for _ in range(n_stages):
        lo = rng.randrange(len(lg))
        stages.append((lo, rng.randrange(lo + 1, len(lg) + 1), rng.randint(ROWS[0], ROWS[-1])))
    m = Model(case, captured, lg, profile, profile_s, stages, [])
    print(f"{case.name}: measuring {n_stages} stages ...", file=sys.stderr, flush=True)
    m.runs.append([_stage_s(m, *s) for s in stages])
    return m


def predictions(m: Model, others: list[Model]) -> dict[str, list[float]]:
    """Predicted stage seconds by each cost model, in stage order."""
    via_lg = profile_costs(m.lg, [m.profile], max_layers=MAX_LAYERS)
    same = calibrate.calibrated_profile(m.captured, m.lg, calibrate.fit([(m.captured, m.lg, m.profile)]), KIND,
                                        rows=ROWS, max_layers=MAX_LAYERS)
    other = calibrate.calibrated_profile(
        m.captured, m.lg, calibrate.fit([(o.captured, o.lg, o.profile) for o in others]), KIND,
        rows=ROWS, max_layers=MAX_LAYERS)
    out: dict[str, list[float]] = {k: [] for k in MODELS}
    for lo, hi, r in m.stages:
        out["profile"].append(m.profile.stage_time(lo, hi, r))
        out["profile, via LayerGraph"].append(step_s(via_lg, KIND, (lo, hi), r))
        out["analytic"].append(step_s(m.lg, KIND, (lo, hi), r))
        out["calibrated, same model"].append(same.stage_time(lo, hi, r))
        out["calibrated, other models"].append(other.stage_time(lo, hi, r))
    return out


MODELS = ("profile", "profile, via LayerGraph", "analytic", "calibrated, same model", "calibrated, other models")


def _errors(pred: list[float], truth: list[float]) -> list[float]:
    return [abs(p / t - 1.0) for p, t in zip(pred, truth)]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def profile_resnet50() -> tuple[float, int]:
    """Wall seconds of `asteroid profile --model resnet50 --rows 1,2,4,8,16,32` as a fresh process
    (imports, capture and the JSON write included), and its exit status."""
    out = Path(__file__).resolve().parent / ".resnet50_profile.json"
    out.unlink(missing_ok=True)
    code = ("import argparse, sys; from asteroid_fx.cli import profile; p = argparse.ArgumentParser(); "
            "profile.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    cmd = [sys.executable, "-c", code, "profile", "--model", "resnet50", "--rows", "1,2,4,8,16,32",
           "--out", str(out), "--threads", "1", "--device", "cpu"]
    print("resnet50: " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    out.unlink(missing_ok=True)
    return elapsed, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-resnet50", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    started = time.perf_counter()
    models = [profile_model(c, args.stages, args.seed) for c in CASES]
    for again in (2, 3):  # later measurements, minutes after the first
        for m in models:
            print(f"{m.case.name}: measuring the stages again ({again}/3) ...", file=sys.stderr, flush=True)
            m.runs.append([_stage_s(m, *s) for s in m.stages])
    resnet50 = None if args.skip_resnet50 else profile_resnet50()
    load_after = os.getloadavg()

    lines = [
        "## Cost model accuracy (benchmarks/costs.py)",
        "",
        f"Machine: {machine()}; load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at "
        f"the end (other jobs share the 2 cores). Each model is profiled at rows {', '.join(map(str, ROWS))} "
        f"(max_layers {MAX_LAYERS}), then {args.stages} random contiguous stages (random first and last "
        f"layer, random rows in 1..{ROWS[-1]}, so most fall between profiled row counts) are run forward "
        "and backward as one stage, the way the local backend runs it. Times are the measuring thread's "
        "CPU time (clock `cpu`: one torch thread, so it is all the work, and other processes cannot "
        "inflate it as they do wall time), the median of at least "
        f"{STAGE_METHOD.min_repeats} repeats after a warm-up. Each stage is measured three times, minutes "
        "apart; the truth is the median of the three and **re-measurement** is how far the farthest of them "
        "is from it: the noise floor.",
        "",
        "Error = |predicted / measured - 1|, median and max over the stages. Predictions: **profile** = "
        "the measured profile (`DeviceProfile.stage_time`: each layer's time between cache-warm and "
        "cache-flushed by the stage's working set, plus the per-stage overhead); **via "
        "LayerGraph** = the same profile through `profile_costs` (what the planner sums: cache-flushed "
        "layer times, no per-stage term); **analytic** = the uncalibrated roofline of the measured `host-cpu` "
        "kind; **calibrated, same model** = the roofline scaled per op class by a calibration fitted "
        "on this model's profile; **calibrated, other models** = fitted on the other models' profiles "
        "only (a model this device never ran).",
        "",
        "| model | config | layers | profile time (s) | re-measurement | profile | via LayerGraph | analytic | "
        "calibrated, same model | calibrated, other models | goal met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    all_errors: dict[str, list[float]] = {k: [] for k in MODELS}
    details = []
    for m in models:
        truth = [statistics.median(times) for times in zip(*m.runs)]
        noise = [max(abs(x / t - 1) for x in times) for times, t in zip(zip(*m.runs), truth)]
        preds = predictions(m, [o for o in models if o is not m])
        cells = []
        for k in MODELS:
            errs = _errors(preds[k], truth)
            all_errors[k] += errs
            cells.append(f"{_pct(statistics.median(errs))} / {_pct(max(errs))}")
        errs = _errors(preds["profile"], truth)
        ok = statistics.median(errs) <= GOAL_MEDIAN and max(errs) <= GOAL_MAX
        lines.append(f"| {m.case.name} | {m.case.config} | {len(m.lg)} | {m.profile_s:.1f} | "
                     f"{_pct(statistics.median(noise))} / {_pct(max(noise))} | " + " | ".join(cells)
                     + f" | {'yes' if ok else 'no'} |")
        for (lo, hi, r), t, n, p, a, c in zip(m.stages, truth, noise, preds["profile"], preds["analytic"],
                                              preds["calibrated, other models"]):
            details.append(f"| {m.case.name} | {lo}:{hi} | {r} | {t * 1e3:.3f} | {_pct(n)} | {p * 1e3:.3f} | "
                           f"{100 * (p / t - 1):+.1f}% | {100 * (a / t - 1):+.1f}% | {100 * (c / t - 1):+.1f}% |")
    total = [f"{_pct(statistics.median(all_errors[k]))} / {_pct(max(all_errors[k]))}" for k in MODELS]
    ok = statistics.median(all_errors["profile"]) <= GOAL_MEDIAN and max(all_errors["profile"]) <= GOAL_MAX
    lines.append("| **all** | | | | | " + " | ".join(total) + f" | {'yes' if ok else 'no'} |")
    lines += ["", f"Goal for the profile: median <= {_pct(GOAL_MEDIAN)}, max <= {_pct(GOAL_MAX)}.", ""]
    if resnet50 is not None:
        elapsed, code = resnet50
        lines.append(f"`asteroid profile --model resnet50 --rows 1,2,4,8,16,32 --threads 1` (full size, "
                     f"224x224, 48 layers, a fresh process: imports, capture and the JSON write included): "
                     f"**{elapsed:.1f} s** (goal: under {GOAL_RESNET50_S:.0f} s: "
                     f"{'met' if code == 0 and elapsed < GOAL_RESNET50_S else 'not met'}"
                     f"{'' if code == 0 else f', exit status {code}'}).")
        lines.append("")
    lines += ["<details><summary>Every stage: measured ms, re-measurement, profile prediction and the "
              "signed errors of profile, analytic and calibrated (other models)</summary>", "",
              "| model | layers | rows | measured (ms) | re-measurement | profile (ms) | profile | analytic | "
              "calibrated, other models |", "|---|---|---:|---:|---:|---:|---:|---:|---:|", *details, "",
              "</details>", "", f"Whole benchmark: {time.perf_counter() - started:.0f} s."]
    write_section("costs", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
