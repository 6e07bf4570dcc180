"""The compiler on third-party models: the zoo's models at their small configs, Hugging Face
transformers models built from tiny configs, and GPT-2 small and BERT-base at full size (random
weights, never from a hub). Per model: the fx compute nodes, the fine layers (runs of nodes
between allowed cuts), the allowed cuts, the most stages that each compute, the transformer or
residual blocks, the asteroid plan and its simulated throughput on two presets against data
parallel's, and the compile time. Writes the "models" section of RESULTS.md.

    .venv/bin/python benchmarks/models.py [--models hf-gpt2-tiny,hf-bert] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_zoo  # noqa: E402
from results import machine, write_section  # noqa: E402

import asteroid_fx as asteroid  # noqa: E402
from asteroid_fx import models as zoo  # noqa: E402
from asteroid_fx.ir.plan import NoPlanError  # noqa: E402
from asteroid_fx.passes.linearize import linearize  # noqa: E402
from asteroid_fx.passes.planners.stage_count import blocked_note, most_stages  # noqa: E402

PRESETS = ("edge-4-1g", "edge-6-laptop-300m")
ZOO_MODELS = ("mlp", "resnet18", "resnet50", "vgg16", "mobilenetv2", "bert", "gpt")
TINY_BATCH, FULL_BATCH = 32, 8
TINY_GOAL_S, FULL_GOAL_S = 10.0, 30.0
# the module classes that are one transformer or residual block, zoo's and transformers'
BLOCK_CLASSES = frozenset({
    "BasicBlock", "Bottleneck", "InvertedResidual",  # zoo ResNets, MobileNetV2
    "EncoderLayer", "Block",  # zoo BERT, GPT
    "BertLayer", "GPT2Block", "LlamaDecoderLayer", "ViTLayer",  # transformers
})


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    source: str  # "zoo" or "transformers"
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], tuple[tuple, dict]]  # inputs(batch) -> (args, kwargs)
    loss: Callable
    batch: int
    goal_s: float
    config: str  # what the config is


def _zoo_case(name: str) -> Case:
    entry = zoo.get(name)
    return Case(name, "zoo", lambda: entry.build(small=True), lambda b: (entry.example(b, True), {}),
                entry.loss, TINY_BATCH, TINY_GOAL_S, "small config")


def _hf_case(m: hf_zoo.HFModel, batch: int, goal_s: float) -> Case:
    return Case(m.name, "transformers", m.build, m.inputs, m.loss, batch, goal_s, m.note)


CASES: dict[str, Case] = {c.name: c for c in (
    *(_zoo_case(n) for n in ZOO_MODELS),
    *(_hf_case(m, TINY_BATCH, TINY_GOAL_S) for m in hf_zoo.TINY_MODELS.values()),
    *(_hf_case(m, FULL_BATCH, FULL_GOAL_S) for m in hf_zoo.FULL_MODELS.values()),
)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def count_blocks(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ in BLOCK_CLASSES for m in model.modules())


def _plan_shape(plan) -> str:
    return (f"{len(plan.stages)} stages {'/'.join(str(len(st.devices)) for st in plan.stages)}, "
            f"{plan.microbatches}x{plan.microbatch_rows}")


def row(case: Case, presets=PRESETS, repeats: int = 3) -> dict:
    """Compile ``case`` ``repeats`` times on ``presets[0]`` (the compile time is their median),
    once on every other preset, and once with the data-parallel planner on each; returns the
    row's fields. A failure is kept in ``error`` and ``notes``, never raised."""
    torch.manual_seed(0)
    model = case.build()
    args, kwargs = case.inputs(case.batch)
    out = {"name": case.name, "source": case.source, "config": case.config, "batch": case.batch,
           "goal_s": case.goal_s, "params": sum(p.numel() for p in model.parameters()),
           "blocks": count_blocks(model), "times": [], "plans": {}, "notes": [], "error": None}

    def compile_on(preset: str, planner: str = "asteroid"):
        return asteroid.compile(model, preset, example=args, kwargs=kwargs, loss=case.loss, planner=planner)

    try:
        compiled = None
        for i in range(repeats):
            log(f"  {case.name}: compile {i + 1}/{repeats} on {presets[0]} ...")
            started = time.perf_counter()
            compiled = compile_on(presets[0])
            out["times"].append(time.perf_counter() - started)
        fine = linearize(compiled.captured, max_layers=None)
        out.update(nodes=sum(len(layer.nodes) for layer in fine.layers), fine_layers=len(fine),
                   cuts=len(fine.allowed_cuts()), most_stages=most_stages(fine))
        if out["most_stages"] <= 1:  # the model runs as one stage whatever the cluster: say why
            out["notes"].append(f"no pipeline stages: {blocked_note(fine) or 'no allowed cut computes'}")
        for preset in presets:
            ours = compiled if preset == presets[0] else compile_on(preset)
            log(f"  {case.name}: data parallel on {preset} ...")
            try:
                dp = compile_on(preset, "dp").plan.prediction.throughput
            except NoPlanError:
                dp = None
                out["notes"].append(f"data parallel does not fit {preset}")
            out["plans"][preset] = {"asteroid": ours.plan.prediction.throughput, "dp": dp,
                                    "stages": len(ours.plan.stages), "shape": _plan_shape(ours.plan)}
    except Exception as e:  # noqa: BLE001 - a model that fails is a row of the table, not a crash
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        out["error"] = f"{type(e).__name__}: {first[:300]}"
        out["notes"].append(f"failed: {out['error']}")
        log(f"  {case.name}: FAILED {out['error']}")
    out["median"] = statistics.median(out["times"]) if out["times"] else None
    out["goal_met"] = out["median"] is not None and out["error"] is None and out["median"] <= case.goal_s
    return out


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table(rows: list[dict], presets) -> list[str]:
    per_preset = [f"{p}: asteroid plan | asteroid | dp | asteroid / dp" for p in presets]
    head = ("| model | from | params | batch | fx compute nodes | fine layers | allowed cuts | most stages | blocks | "
            + " | ".join(per_preset) + " | compile median (s) | goal (s) | goal met | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["name"], r["source"], f"{r['params'] / 1e6:.2f}M", str(r["batch"]),
                 *(str(r.get(k, "-")) for k in ("nodes", "fine_layers", "cuts", "most_stages")), str(r["blocks"])]
        for p in presets:
            plan = r["plans"].get(p)
            if plan is None:
                cells += ["-"] * 4
                continue
            ratio = f"{plan['asteroid'] / plan['dp']:.2f}x" if plan["dp"] else "-"
            cells += [plan["shape"], _num(plan["asteroid"]), _num(plan["dp"]) if plan["dp"] else "OOM", ratio]
        median = "-" if r["median"] is None else f"{r['median']:.2f}"
        cells += [median, f"{r['goal_s']:.0f}", "yes" if r["goal_met"] else "no",
                  "; ".join(r["notes"]).replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for name in names:
        log(f"{name} ...")
        rows.append(row(CASES[name], PRESETS, args.repeats))
    failed = [r["name"] for r in rows if r["error"]]
    body = [
        "## Third-party models (benchmarks/models.py)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`. "
        "The zoo's models at their small configs; transformers models built from configs with random weights "
        f"(tiny ones at batch {TINY_BATCH}, and GPT-2 small (124M) and BERT-base at batch {FULL_BATCH}, "
        f"{hf_zoo.FULL_SEQ} tokens). Analytic costs, Adam, the planner chooses the micro-batching. "
        "Fine layers: the runs of fx compute nodes between allowed cuts (a cut is allowed when only batch-first "
        "tensors cross it and no weight is used on both sides; values built from sizes and buffers are recomputed). "
        "Most stages: the most stages the model splits into at allowed cuts, each computing at least 1% of the "
        "model's FLOPs. Blocks: the model's transformer or residual block modules. Throughput: simulated "
        "samples/s of the plan's program (`plan.prediction.throughput`); dp is the data-parallel planner. "
        "Asteroid plan: its stages, the devices of each stage, micro-batches x rows (`1 stages 1`: the whole "
        "model on the one device the planner found fastest alone). "
        f"Compile time: median of {args.repeats} `asteroid.compile` calls on {PRESETS[0]} (capture, annotate, "
        f"linearize, plan, split, schedule, lower, verify); goal {TINY_GOAL_S:.0f} s at the small configs, "
        f"{FULL_GOAL_S:.0f} s at full size.",
        "",
        *table(rows, PRESETS),
        "",
        f"Goal met: {sum(r['goal_met'] for r in rows)} of {len(rows)} models. "
        + (f"Failed to compile: {', '.join(failed)} (see notes)." if failed else "Every model compiled."),
        "",
        f"Whole benchmark: {time.perf_counter() - started:.0f} s; load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other jobs share the cores, so times are upper bounds).",
    ]
    write_section("models", "\n".join(body))
    print("\n".join(body))
    log("wrote the models section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
