"""The Asteroid planner against every baseline, in one run, in the simulator.

For VGG-16, ResNet-50, MobileNetV2, the zoo's BERT- and GPT-style models and transformers'
GPT-2 small (tied head) and BERT-base (full-size configurations, random weights, analytic costs
from the catalog's spec sheets) x every heterogeneous edge preset x two global
batch sizes: the simulated throughput of the plan of every planner (asteroid, dp, pp, pipedream,
hetpipe, metis, and "asteroid (paper)": the paper's single memory ordering, no local search), and
the ratio of asteroid to each, and how much the best single move (passes/planners/polish.py,
every one simulated) would still speed up asteroid's plan of each case, and whether a pinned
micro-batch count or, for a few models, the graph with every layer kept beats it. Then the gap to the exhaustive oracle on graphs coarsened to 12
layers and clusters of up to 5 devices, and the planning time against layers and devices.
Writes the "planner" section of RESULTS.md; a run of transformers models only (``--models
hf-gpt2,hf-bert``) writes its own section, "planner-transformers", and leaves the zoo's as it is.
``--scale-only``: only the planning time of ResNet-50 at every layer (228) on mixed clusters of 16
to 128 devices, with its slope in devices; writes the "planner-scale" section.

    .venv/bin/python benchmarks/planner.py [--models vgg16,resnet50] [--quick] [--scale-only]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_zoo  # noqa: E402
from results import machine, write_section  # noqa: E402

from asteroid_fx.ir import catalog  # noqa: E402

from asteroid_fx import models
from asteroid_fx.ir.cluster import Cluster  # noqa: E402
from asteroid_fx.cost.estimate import ADAM_STATE_FACTOR, CostTable  # noqa: E402
from asteroid_fx.passes.planners import baselines, hpp, polish  # noqa: E402
from asteroid_fx.passes.planners.candidates import Candidate, microbatch_choices  # noqa: E402
from asteroid_fx.passes.annotate_costs import annotate_costs  # noqa: E402
from asteroid_fx.passes.capture import capture  # noqa: E402
from asteroid_fx.passes.linearize import linearize  # noqa: E402
from asteroid_fx.ir.plan import NoPlanError, StagePlan  # noqa: E402

HF_MODELS = tuple(hf_zoo.FULL_MODELS)  # "hf-gpt2", "hf-bert"
MODELS = ("vgg16", "resnet50", "mobilenetv2", "bert", "gpt", *HF_MODELS)
# the section a run writes: one of transformers models only keeps the zoo's grid, which takes long
SECTIONS = {"zoo": ("planner", "Planner against baselines"),
            "transformers": ("planner-transformers", "Planner against baselines: transformers models")}
PRESETS = ("edge-4-1g", "edge-5-mixed-1g", "edge-6-300m", "edge-6-laptop-300m", "edge-8-100m", "edge-7-laptop-100m")
BATCHES = (32, 128)
MAX_LAYERS = 48
FINE_MODELS = ("resnet50", "mobilenetv2", "gpt")  # also planned with every layer kept (more than 48)
HYBRID = ("pipedream", "hetpipe", "metis")
PLANNERS = {
    "asteroid": hpp.plan,
    "asteroid (paper)": lambda lg, c, **kw: hpp.plan(lg, c, orders="memory", local=False, **kw),
    "dp": baselines.dp,
    "pp": baselines.pp,
    "pipedream": baselines.pipedream,
    "hetpipe": baselines.hetpipe,
    "metis": baselines.metis,
}
ORACLE_CLUSTERS = {
    "4 Jetsons, 1 Gbit/s": ("jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano"),
    "3 Jetsons + laptop, 300 Mbit/s": ("jetson-nano", "jetson-tx2", "jetson-orin-nano", "laptop-i7"),
    "5 boards, 100 Mbit/s": ("jetson-nano", "jetson-nano", "jetson-tx2", "jetson-xavier-nx", "raspberry-pi-5"),
}
ORACLE_LINKS = {"4 Jetsons, 1 Gbit/s": "gigabit-ethernet", "3 Jetsons + laptop, 300 Mbit/s": "wifi-300m",
                "5 boards, 100 Mbit/s": "fast-ethernet"}
ORACLE_BATCH, ORACLE_MICROBATCHES = 32, 8
TIMING_LAYERS = (50, 100, 200)
TIMING_DEVICES = (4, 8, 16)
SCALE_DEVICES = (16, 32, 64, 128)
SCALE_BATCHES = (32, 128)
SCALE_KINDS = ("jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano", "raspberry-pi-5", "laptop-i7")
LOCAL_GOAL = 0.005  # the best single move may speed a plan up by at most this
SCALE_GOALS = {16: 2, 32: 5, 64: 10}  # seconds for the whole search
SCALE_LINKS = {"gigabit-ethernet": SCALE_DEVICES, "fast-ethernet": (16, 64)}  # 100 Mbit/s on a few sizes


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def captured_models(names) -> dict:
    kinds = set(catalog.KINDS)
    out = {}
    for name in names:
        torch.manual_seed(0)
        log(f"  capturing {name} (full size) ...")
        if name in hf_zoo.FULL_MODELS:
            hf = hf_zoo.FULL_MODELS[name]
            args, kwargs = hf.inputs(4)
            out[name] = annotate_costs(capture(hf.build(), args, kwargs), kinds)
            continue
        entry = models.get(name)
        out[name] = annotate_costs(capture(entry.build(small=False), entry.example(4, False)), kinds)
    return out


def run_planner(fn, lg, cluster, **kw):
    started = time.perf_counter()
    try:
        plan = fn(lg, cluster, **kw)
    except NoPlanError:
        return None, time.perf_counter() - started
    return plan, time.perf_counter() - started


def fmt(x: float | None) -> str:
    if x is None:
        return "OOM"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def grid(captured: dict, presets, batches) -> tuple[list[str], dict]:
    rows, stats = [], {"ratios": {p: [] for p in PLANNERS if p != "asteroid"}, "best_hybrid": [], "cases": [],
                       "moves": [], "pinned": [], "fine": []}
    head = ("| model | cluster | batch | " + " | ".join(PLANNERS) + " | asteroid / best hybrid | asteroid plan |")
    rows += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, cap in captured.items():
        lg = linearize(cap, max_layers=MAX_LAYERS)
        fine = linearize(cap, max_layers=None) if name in FINE_MODELS else None
        for preset in presets:
            cluster = catalog.preset(preset)
            for batch in batches:
                thr, plans, secs = {}, {}, {}
                for pname, fn in PLANNERS.items():
                    plan, s = run_planner(fn, lg, cluster, batch=batch)
                    plans[pname], secs[pname] = plan, s
                    thr[pname] = plan.prediction.throughput if plan else None
                a = thr["asteroid"]
                hybrid = [thr[h] for h in HYBRID if thr[h] is not None]
                best_h = max(hybrid) if hybrid else None
                for pname, t in thr.items():
                    if pname != "asteroid" and t is not None and a is not None:
                        stats["ratios"][pname].append((a / t, name, preset, batch))
                if a is not None and best_h:
                    stats["best_hybrid"].append((a / best_h, name, preset, batch))
                p = plans["asteroid"]
                shape = ("-" if p is None else
                         f"{len(p.stages)} stages {'/'.join(str(len(st.devices)) for st in p.stages)}, "
                         f"{p.microbatches}x{p.microbatch_rows}, {p.schedule}")
                cells = " | ".join(fmt(thr[k]) for k in PLANNERS)
                ratio = f"{a / best_h:.2f}x" if a and best_h else "-"
                rows.append(f"| {name} | {preset} | {batch} | {cells} | {ratio} | {shape} |")
                log(f"  {name} {preset} {batch}: " + ", ".join(f"{k} {fmt(v)}" for k, v in thr.items())
                    + f"  (asteroid planned in {secs['asteroid']:.2f}s)")
                stats["cases"].append((name, preset, batch, thr, secs))
                if p is not None:
                    gain, what, n = best_single_move(lg, cluster, batch, p)
                    stats["moves"].append((gain, name, preset, batch, what, n))
                    stats["pinned"].append((best_pinned_gain(lg, cluster, batch, p), name, preset, batch))
                if fine is not None:
                    stats["fine"].append((coarse_gain(p, lg, fine, cluster, batch), name, preset, batch, len(fine)))
    return rows, stats


def best_pinned_gain(lg, cluster, batch: int, p) -> tuple[float, int]:
    """How much faster than plan ``p`` the planner's plan with the micro-batch count pinned
    simulates, at the best count (a fraction; <= 0: none is faster), and that count."""
    best, at = 0.0, 0
    for M, _ in microbatch_choices(batch, None, None):
        q, _s = run_planner(hpp.plan, lg, cluster, batch=batch, microbatches=M)
        if q is not None and p.prediction.iteration_s / q.prediction.iteration_s - 1.0 > best:
            best, at = p.prediction.iteration_s / q.prediction.iteration_s - 1.0, M
    return best, at


def coarse_gain(p, lg, fine, cluster, batch: int) -> float:
    """How much faster ``p``, the plan of the coarsened graph ``lg`` (None: it had none), simulates
    on the uncoarsened ``fine`` (its stages mapped onto fine layers) than the plan of ``fine``
    itself (<= 0: not faster)."""
    f, _ = run_planner(hpp.plan, fine, cluster, batch=batch)
    if p is None or f is None:
        return 0.0 if f is not None or p is None else float("inf")
    at = {layer.nodes[0]: layer.index for layer in fine.layers}

    def mapped(st):
        hi = len(fine) if st.layers[1] == len(lg) else at[lg.layers[st.layers[1]].nodes[0]]
        return StagePlan((at[lg.layers[st.layers[0]].nodes[0]], hi), st.devices, st.rows)

    c = Candidate(tuple(mapped(st) for st in p.stages), p.microbatches, p.microbatch_rows, 0.0, p.schedule)
    return f.prediction.iteration_s / hpp._simulated_s(c, fine, cluster, ADAM_STATE_FACTOR, "asteroid", False) - 1.0


def never_loses(stats) -> list[str]:
    """The distribution of the pinned and coarse searches' gains over the unpinned, fine plan."""
    lines = ["| comparison | cases | plan at least as fast | worst gain of the other (where) |", "|---|---:|---:|---|"]
    for label, rows in (("every micro-batch count pinned, best of them, vs unpinned (48 layers)",
                         [(g, f"{n} on {pr}, batch {b}, {m} micro-batches") for (g, m), n, pr, b in stats["pinned"]]),
                        ("48-layer plan mapped onto every layer vs the plan of every layer",
                         [(g, f"{n} ({L} layers) on {pr}, batch {b}") for g, n, pr, b, L in stats["fine"]])):
        if rows:
            worst = max(rows)
            lines.append(f"| {label} | {len(rows)} | {sum(g <= 1e-9 for g, _ in rows)} | "
                         f"{worst[0]:+.2%} ({worst[1] if worst[0] > 1e-9 else '-'}) |")
    return lines


def best_single_move(lg, cluster, batch: int, p) -> tuple[float, str, int]:
    """The most any single move of polish.moves (every one, simulated) speeds up plan ``p``'s
    simulated iteration (a fraction; <= 0 when none does), that move, and how many there were."""
    tables = {}

    def table_for(R):
        if R not in tables:
            tables[R] = CostTable(lg, cluster, R, ADAM_STATE_FACTOR, False)
        return tables[R]

    c = Candidate(p.stages, p.microbatches, p.microbatch_rows, 0.0, p.schedule)
    base = hpp._simulated_s(c, lg, cluster, ADAM_STATE_FACTOR, "asteroid", False)
    best, what, n = 0.0, "-", 0
    for label, m in polish.moves(c, table_for, cluster.names, polish.Pins(batch)):
        n += 1
        gain = base / hpp._simulated_s(m, lg, cluster, ADAM_STATE_FACTOR, "asteroid", False) - 1.0
        if gain > best:
            best, what = gain, label
    return best, what, n


def local_optimality(moves) -> list[str]:
    """The distribution of the best single move's gain over the grid's plans."""
    if not moves:
        return []
    gains = sorted(m[0] for m in moves)
    top = max(moves)
    within = sum(g <= LOCAL_GOAL for g in gains)
    q = lambda f: gains[min(len(gains) - 1, int(f * len(gains)))]  # noqa: E731
    return ["| plans | moves tried per plan (median) | no move faster | best move <= 0.5% | median | p90 | max (where, move) |",
            "|---:|---:|---:|---:|---:|---:|---|",
            f"| {len(gains)} | {statistics.median(m[5] for m in moves):.0f} | {sum(g <= 0 for g in gains)} | "
            f"{within} | {q(0.5):+.2%} | {q(0.9):+.2%} | {top[0]:+.2%} ({top[1]} on {top[2]}, batch {top[3]}: {top[4]}) |"]


def geomean(xs) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary(stats) -> list[str]:
    out = ["| against | cases | min ratio (where) | geometric mean | max ratio | where the max is |",
           "|---|---:|---|---:|---:|---|"]
    for pname, rs in list(stats["ratios"].items()) + [("best hybrid (max of pipedream, hetpipe, metis)",
                                                        stats["best_hybrid"])]:
        if not rs:
            continue
        lo = min(rs)
        hi = max(rs)
        out.append(f"| {pname} | {len(rs)} | {lo[0]:.3f}x ({lo[1]} on {lo[2]}, batch {lo[3]}) | "
                   f"{geomean([r[0] for r in rs]):.2f}x | {hi[0]:.2f}x | {hi[1]} on {hi[2]}, batch {hi[3]} |")
    return out


def beats_every_baseline(cases) -> str:
    """How many cases asteroid's throughput is at least every other planner's, and which are not."""
    below = []
    for name, preset, batch, thr, _ in cases:
        best = max((t for p, t in thr.items() if p != "asteroid" and t is not None), default=None)
        a = thr["asteroid"]
        if best is not None and (a is None or a < best):
            below.append(f"{name} on {preset}, batch {batch} ({fmt(a)} < {fmt(best)})")
    return (f"Asteroid at least every other planner in {len(cases) - len(below)} of {len(cases)} cases"
            + (f"; below one in: {'; '.join(below)}." if below else "."))


def optimality(captured: dict) -> tuple[list[str], list[float]]:
    rows = ["| model | cluster | asteroid (samples/s) | oracle (samples/s) | gap | oracle plans scored | oracle time (s) | asteroid time (s) |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    gaps = []
    for name, cap in captured.items():
        lg = linearize(cap, max_layers=12)
        for cname, kinds in ORACLE_CLUSTERS.items():
            link = catalog.LINKS[ORACLE_LINKS[cname]]
            cluster = Cluster.from_kinds(kinds, link.bandwidth, link.latency, name=cname)
            kw = dict(batch=ORACLE_BATCH, microbatches=ORACLE_MICROBATCHES)
            a, ta = run_planner(hpp.plan, lg, cluster, deepen=False, **kw)  # the oracle's schedule space
            o, to = run_planner(baselines.oracle, lg, cluster, **kw)
            if a is None or o is None:
                rows.append(f"| {name} | {cname} | {fmt(a and a.prediction.throughput)} | "
                            f"{fmt(o and o.prediction.throughput)} | - | | | |")
                continue
            gap = 1.0 - a.prediction.throughput / o.prediction.throughput
            gaps.append(gap)
            rows.append(f"| {name} ({len(lg)} layers) | {cname} | {a.prediction.throughput:.3g} | "
                        f"{o.prediction.throughput:.3g} | {gap:+.1%} | {baselines.oracle_size(lg, cluster)} | "
                        f"{to:.1f} | {ta:.2f} |")
            log(f"  oracle {name} {cname}: gap {gap:+.2%} ({to:.1f}s)")
    return rows, gaps


def timing(cap) -> list[str]:
    kinds = ("jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-orin-nano")
    lines = ["| layers | devices | one micro-batching (s) | whole search, batch 32: 6 micro-batchings (s) |",
             "|---:|---:|---:|---:|"]
    worst = 0.0
    for L in TIMING_LAYERS:
        lg = linearize(cap, max_layers=L)
        for D in TIMING_DEVICES:
            cluster = Cluster.from_kinds((kinds * 4)[:D], "1Gbps", "0.5ms")
            one = min(run_planner(hpp.plan, lg, cluster, batch=32, microbatches=8)[1] for _ in range(2))
            whole = min(run_planner(hpp.plan, lg, cluster, batch=32)[1] for _ in range(2))
            worst = max(worst, whole) if (len(lg), D) == (max(TIMING_LAYERS), max(TIMING_DEVICES)) else worst
            lines.append(f"| {len(lg)} | {D} | {one:.2f} | {whole:.2f} |")
            log(f"  timing {len(lg)} layers x {D} devices: {one:.2f}s / {whole:.2f}s")
    return lines


def scale() -> str:
    """Whole-search planning time of ResNet-50 with every layer kept, on clusters of mixed kinds."""
    entry = models.get("resnet50")
    torch.manual_seed(0)
    log("  capturing resnet50 (full size) ...")
    cap = annotate_costs(capture(entry.build(small=False), entry.example(4, False)), set(catalog.KINDS))
    lg = linearize(cap, max_layers=10_000)
    load_start = os.getloadavg()[0]
    lines = ["| link | batch | devices | whole search, wall (s) | whole search, CPU (s) | goal (s) | plan | "
             "simulated samples/s | best pinned count: gain |", "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    slopes, pinned = [], []
    for link_name, sizes in SCALE_LINKS.items():
        link = catalog.LINKS[link_name]
        for batch in SCALE_BATCHES:
            secs = []
            for D in sizes:
                cluster = Cluster.from_kinds((SCALE_KINDS * D)[:D], link.bandwidth, link.latency)
                cpu = time.process_time()
                p, s = run_planner(hpp.plan, lg, cluster, batch=batch)
                cpu = time.process_time() - cpu
                secs.append(cpu)
                shape = "OOM" if p is None else (f"{len(p.stages)} stages {'/'.join(str(len(st.devices)) for st in p.stages)}, "
                                                 f"{p.microbatches}x{p.microbatch_rows}, {p.schedule}")
                thr = fmt(p and p.prediction.throughput)
                goal = SCALE_GOALS.get(D)
                # beyond hpp.EVERY_MICROBATCHING_UP_TO devices the plan is not also searched with
                # every count pinned: how much faster the best pinned one is (128 devices: not tried,
                # its seven pinned searches would take minutes)
                gain = best_pinned_gain(lg, cluster, batch, p) if p is not None and goal is not None else None
                if gain is not None:
                    pinned.append(gain[0])
                said = "-" if gain is None else "none faster" if gain[0] <= 0 else f"{gain[0]:+.1%} at M={gain[1]}"
                lines.append(f"| {link_name} | {batch} | {D} | {s:.2f} | {cpu:.2f} | "
                             f"{'-' if goal is None else goal} | {shape} | {thr} | {said} |")
                log(f"  scale {link_name} batch {batch} x {D} devices: {s:.2f}s wall, {cpu:.2f}s CPU ({shape})")
            xs, ys = [math.log(d) for d in sizes], [math.log(t) for t in secs]
            mx, my = statistics.mean(xs), statistics.mean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            slopes.append(f"{link_name}, batch {batch}: {slope:.2f}")
    return "\n".join([
        "## Planner at scale (benchmarks/planner.py --scale-only)", "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/planner.py --scale-only`. ResNet-50 "
        f"(full size, analytic costs) linearized with every layer kept ({len(lg)} layers); clusters cycle "
        f"through {', '.join(SCALE_KINDS)}; every device pair on one link kind. Time: the whole search "
        "(every micro-batching of the batch, every device order, local search, simulation of the best few, the simulated polish).",
        "", *lines, "",
        "Slope of log CPU time against log devices (1 = linear): " + "; ".join(slopes) + ".", "",
        f"Best pinned count: the plan of each micro-batch count pinned in turn, simulated against the plan "
        f"above (up to {max(SCALE_GOALS)} devices). Beyond {hpp.EVERY_MICROBATCHING_UP_TO} devices the planner "
        f"does not search every count pinned, so a pinned count can plan faster: here in "
        f"{sum(g > 0 for g in pinned)} of {len(pinned)} cases, by up to {max(pinned, default=0.0):.1%}.", "",
        "CPU time is the planner process's own (one thread); wall time is what a user waits and "
        "equals it on an idle core, so under load the CPU column is the one to hold against the goals.", "",
        f"Load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other jobs share "
        f"the {os.cpu_count()} cores, so times are upper bounds).",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true",
                    help="two presets, one batch, no oracle or timing; printed, not written to RESULTS.md")
    ap.add_argument("--scale-only", action="store_true",
                    help="only the planning time at 16 to 128 devices; writes the planner-scale section")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.scale_only:
        write_section("planner-scale", scale())
        log("wrote the planner-scale section of benchmarks/RESULTS.md")
        return
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    names = [m for m in args.models.split(",") if m]
    section, title = SECTIONS["transformers" if set(names) <= set(HF_MODELS) else "zoo"]
    captured = captured_models(names)
    presets = PRESETS[:2] if args.quick else PRESETS
    batches = BATCHES[:1] if args.quick else BATCHES
    log("grid ...")
    table, stats = grid(captured, presets, batches)
    body = [
        f"## {title} (benchmarks/planner.py)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`. "
        "Costs: analytic (catalog "
        "spec sheets through the roofline; no device was measured), full-size models coarsened to "
        f"{MAX_LAYERS} layers, Adam (weights x 4 of static memory), 1F1B. Every number is the simulated "
        "throughput (samples/s, `sim.predict` of the plan's program) of the plan each planner chose; every "
        "planner searched the same micro-batchings of the batch and had its best few candidates simulated. "
        "OOM: no plan of that planner fits the devices' memory.",
        "",
        *table,
        "",
        "Ratio of asteroid's throughput to each planner's (cases where both found a plan):",
        "",
        *summary(stats),
    ]
    body += ["", beats_every_baseline(stats["cases"])]
    paper = stats["ratios"].get("asteroid (paper)", [])
    if paper:
        body += ["", f"What the search beyond the paper (more device orders, cut polishing and local search, "
                     f"a deeper 1F1B warm-up where it pays) gains over the paper's single memory order: geometric mean {geomean([r[0] for r in paper]):.3f}x, at most "
                     f"{max(paper)[0]:.2f}x ({max(paper)[1]} on {max(paper)[2]}, batch {max(paper)[3]})."]
    if stats["moves"]:
        body += ["", "### Local optimality", "",
                 "Every single move of `polish.moves` (a cut by 1-3 allowed cuts, a device into the next or "
                 "previous group, dropped or added, two devices of different groups trading places, the next "
                 "micro-batch count either way, 1 row or an eighth "
                 "of a member's rows to another member, another 1F1B warm-up depth) applied to asteroid's plan "
                 "of each case above and simulated; gain = how much faster the best of them simulates "
                 f"(goal: at most {LOCAL_GOAL:.1%} anywhere).", "", *local_optimality(stats["moves"])]
    if stats["pinned"] or stats["fine"]:
        body += ["", "### Never losing to itself", "",
                 "For each case above: asteroid's plan against the best of its own plans with every micro-batch "
                 "count pinned in turn; and, for " + ", ".join(FINE_MODELS) + ", the plan of the graph with every "
                 f"allowed cut kept against the {MAX_LAYERS}-layer plan mapped onto it, both simulated on the fine "
                 "graph. Gain: how much faster the other simulates (<= 0: not faster).", "", *never_loses(stats)]
    secs = [c[4]["asteroid"] for c in stats["cases"]]
    if secs:
        body += ["", f"Asteroid planning time over the grid: median {statistics.median(secs):.2f} s, "
                     f"max {max(secs):.2f} s."]
    if not args.quick:
        log("oracle ...")
        orows, gaps = optimality({k: captured[k] for k in names})
        body += ["", "### Gap to the exhaustive oracle",
                 "",
                 f"Graphs coarsened to 12 layers, clusters of 4-5 devices, batch {ORACLE_BATCH} pinned to "
                 f"{ORACLE_MICROBATCHES} micro-batches and plain 1F1B for both (asteroid without its deeper "
                 "warm-ups, which the oracle does not search). The oracle scores every set of cuts and every "
                 "assignment of devices (or none) to ordered groups with optimal rows in the closed form and "
                 "simulates its best 16; gap = 1 - asteroid / oracle (negative: asteroid's simulated plan is "
                 "faster than the oracle's best by the closed form).",
                 "", *orows, ""]
        if gaps:
            body.append(f"Gap: mean {statistics.mean(gaps):+.2%}, worst {max(gaps):+.2%} over {len(gaps)} instances.")
        log("timing ...")
        timing_model = "resnet50" if "resnet50" in captured else names[0]
        body += ["", f"### Planning time ({timing_model}, Jetson clusters at 1 Gbit/s)", "",
                 *timing(captured[timing_model])]
    body += ["", f"Whole benchmark: {time.perf_counter() - started:.0f} s; load average {load_start:.1f} at the start, "
                 f"{os.getloadavg()[0]:.1f} at the end (other jobs share the 2 cores, so times are upper bounds)."]
    if args.quick:  # a smoke run: shown, never recorded
        print("\n".join(body))
        return
    write_section(section, "\n".join(body))
    log(f"wrote the {section} section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
