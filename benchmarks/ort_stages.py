"""Per-stage ONNX Runtime vs PyTorch latency of the full-size ResNet-50 and BERT-style models, and
how closely ORT agrees with PyTorch, from ``compiled.check(backend="onnxruntime")``. Writes the
"onnxruntime" section of RESULTS.md.

    .venv/bin/python benchmarks/ort_stages.py [--repeats 5] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

# No script in benchmarks/ may be named after a package it imports: the folder goes first on
# sys.path (here and in the tests that import these scripts) and would shadow that package.
HERE = Path(__file__).resolve().parent
import torch  # noqa: E402

sys.path.insert(0, str(HERE))
from results import machine, write_section  # noqa: E402

import asteroid_fx as asteroid  # noqa: E402
from asteroid_fx import models  # noqa: E402
from asteroid_fx.backends.onnxruntime import ATOL, OPSET, ROUNDING, RTOL  # noqa: E402

CASES = ("resnet50", "bert")
CLUSTER = "edge-6-300m"
MICROBATCHES = 2
STAGES = 4  # pinned: the planner puts a batch this small on one board, and a check of
            # one stage chains nothing


def float32_error(model: torch.nn.Module, example: tuple) -> float:
    """PyTorch's own float32 error on the model's outputs: eager float32 against eager float64."""
    wide = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        ref = wide(*(t.double() if t.is_floating_point() else t for t in example))
        got = model.eval()(*example)
    return float((got.double() - ref).abs().max())


def eager_seconds(model: torch.nn.Module, example: tuple, repeats: int) -> float:
    model = model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            started = time.perf_counter()
            model(*example)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name: str, batch: int, repeats: int) -> dict:
    entry = models.get(name)
    torch.manual_seed(0)
    model = entry.build(small=False)
    example = entry.example(batch, False)
    print(f"  {name}: compile ...", file=sys.stderr, flush=True)
    compiled = asteroid.compile(model, CLUSTER, example=example, loss=entry.loss, microbatches=MICROBATCHES,
                                stages=STAGES)
    print(f"  {name}: check ({len(compiled.stages)} stages) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    report = compiled.check(backend="onnxruntime", model=model, repeats=repeats, strict=False)
    seconds = time.perf_counter() - started
    print(report, file=sys.stderr, flush=True)
    return {"name": name, "report": report, "seconds": seconds, "eager": eager_seconds(model, example, repeats),
            "float32": float32_error(model, example)}


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _err(agreement) -> str:
    return "-" if agreement.float32_error is None else f"{agreement.float32_error:.1e}"


def _alone(agreement) -> str:
    """Whether the element-wise rule without the float32 error term passes: atol_to_pass is the
    atol that rule needs."""
    return _yes(agreement.atol_to_pass <= ATOL)


def section(results: list[dict], batch: int, repeats: int) -> str:
    lines = [
        "## ONNX Runtime vs PyTorch per stage (benchmarks/ort_stages.py)",
        "",
        f"Machine: {machine()}. Full-size models (ResNet-50 on 224x224 images, BERT-base on 128 tokens), "
        f"random weights, eval mode; cluster preset `{CLUSTER}`, {STAGES} stages (pinned; the planner puts so small a "
        f"batch on one board), batch {batch} in {MICROBATCHES} micro-batches. "
        f"ONNX opset {OPSET}, ORT CPU provider with as many intra-op threads as torch. A stage's time is its F "
        "actions over one global batch (every micro-batch and every device of its group, one after another on this "
        f"machine), median of {repeats} forward passes after a warm-up. Errors are ORT against PyTorch, both running "
        "the program's forward, as torch.testing measures them (max |ort - torch|, and max |ort - torch| / |torch|, "
        f"which is large where |torch| is near 0). **f32 err** is PyTorch's own float32 error on the stage's outputs: "
        "max |torch - torch in float64|, the program run with every stage and input widened. By the check's defaults an "
        f"element agrees when |ort - torch| <= {ATOL:g} + {RTOL:g} |torch| + {ROUNDING:g} f32 err (**agrees**); "
        f"**atol alone** is the rule without the f32 err term, which the check applied before.",
        "",
        "| model | stage | devices (rows) | PyTorch ms | ORT ms | ORT / PyTorch | max abs err | max rel err | "
        "f32 err | export s | agrees | atol alone |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        name, report = r["name"], r["report"]
        for s in report.stages:
            devices = ", ".join(f"{d} ({n})" for d, n in zip(s.devices, s.rows))
            lines.append(f"| {name} | {s.index} | {devices} | {s.torch_s * 1e3:.1f} | {s.ort_s * 1e3:.1f} | "
                         f"{s.ort_s / s.torch_s:.2f} | {s.agreement.max_abs:.1e} | {s.agreement.max_rel:.1e} | "
                         f"{_err(s.agreement)} | {s.export_s:.1f} | {_yes(s.agreement.ok)} | {_alone(s.agreement)} |")
        total_torch = sum(s.torch_s for s in report.stages)
        total_ort = sum(s.ort_s for s in report.stages)
        lines.append(f"| {name} | all | | {total_torch * 1e3:.1f} | {total_ort * 1e3:.1f} | "
                     f"{total_ort / total_torch:.2f} | {report.ort_vs_eager.max_abs:.1e} | "
                     f"{report.ort_vs_eager.max_rel:.1e} | {_err(report.ort_vs_eager)} | "
                     f"{sum(s.export_s for s in report.stages):.1f} | {_yes(report.ok)} | "
                     f"{_yes(all(_alone(a) == 'yes' for a in (*(s.agreement for s in report.stages), report.ort_vs_eager)))} |")
    lines += ["", "The \"all\" rows compare the model's outputs through ORT with the eager model in eval mode on the "
              "whole batch. For scale:", ""]
    for r in results:
        report = r["report"]
        needed = max(a.atol_to_pass for a in (*(s.agreement for s in report.stages), report.ort_vs_eager))
        lines.append(
            f"- {r['name']}: the eager model takes {r['eager'] * 1e3:.1f} ms on the whole batch; PyTorch's own float32 "
            f"error on its outputs (against float64) is {r['float32']:.1e}, ORT's difference from PyTorch "
            f"{report.ort_vs_eager.max_abs:.1e}; without the f32 err term every element agrees from atol {needed:.1e} "
            f"(rtol {RTOL:g}); "
            f"the whole check (export, sessions, forward passes) took {r['seconds']:.0f} s.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    results = [measure(name, args.batch, args.repeats) for name in CASES]
    write_section("onnxruntime", section(results, args.batch, args.repeats))
    print(f"wrote the onnxruntime section of {Path(__file__).with_name('RESULTS.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
