"""Hostile inputs: seeded mutations of every file a user hands asteroid, each through the readers
and the commands that take it. Writes the "hostile" section of RESULTS.md.

A plan folder of the small MLP is compiled once (two stages, the first a group of two with an
uneven split) and saved as `asteroid compile --out` writes it; a device profile of a small MLP is
measured once. Each case mutates one file of one category (a JSON value deleted, given another
type, an odd number, nested, lists swapped, the text cut short; program text: lines deleted,
duplicated, swapped, a number or a word changed) and runs what reads it:

  program text   parse, `asteroid show DIR` (reads program.txt), verify against the model (layer
                 count, the stages' real cut tensors), and a verified program trains one
                 iteration on the local backend
  program JSON   `asteroid simulate DIR` (reads program.json), then as program text
  plan JSON      `asteroid show DIR plan` and `asteroid simulate DIR`
  costs JSON     `asteroid simulate DIR`
  cluster        the cluster reader, then the planner on the MLP's layer graph
  profile        the profile reader, then its costs on the profiled graph and the planner

Outcomes: a clean error (an AsteroidError, the project's user-error base class; its message is
what the command line prints as one line), accepted and the same (a program that verifies trains
to the weights of the original program within rel 1e-5; a cluster or profile whose numbers are
finite where they must be; a plan or costs file that `show` and `simulate` take), a traceback
(any other exception), a hang (a case over its time limit), or a wrong result (accepted, and then different: a verified program that trains to other
weights, a profile or cluster the readers take that gives a non-finite or negative cost).

    .venv/bin/python benchmarks/hostile.py [--cases 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

import torch  # noqa: E402

CATEGORIES = ("program text", "program JSON", "plan JSON", "costs JSON", "cluster", "profile")
OUTCOMES = ("clean", "same", "traceback", "hang", "wrong")
CASE_LIMIT_S = 10.0


class Hang(Exception):
    """A case ran past its time limit."""


class Wrong(Exception):
    """Accepted, then different from what the input means."""


@dataclasses.dataclass
class Setup:
    folder: Path  # the saved plan folder, never changed
    compiled: Any
    cut_specs: Any
    batch: tuple[torch.Tensor, torch.Tensor]
    reference: dict[str, torch.Tensor]  # the original program's weights after one iteration
    cluster_text: str
    profile_text: str
    profile_lg: Any  # the layer graph the profile was measured on
    work: Path  # a scratch copy of the folder, restored before each case
    what: str = ""  # the running case's mutation


def setup(tmp: Path) -> Setup:
    import asteroid_fx as asteroid
    from asteroid_fx import models
    from asteroid_fx.ir import profile as P
    from asteroid_fx.ir.cluster import Cluster, Device
    from asteroid_fx.passes.lower import stage_cut_specs
    from asteroid_fx.runtime import profiler as measure

    entry = models.get("mlp")
    torch.manual_seed(0)
    cluster = Cluster.uniform([Device(n, "laptop-i7") for n in ("a", "b", "c")], bandwidth="1Gbps", latency=1e-4)
    compiled = asteroid.compile(entry.build(small=True), cluster, example=entry.example(24, True), loss=entry.loss,
                                microbatches=3, groups=[["a", "b"], ["c"]], rows=[[5, 3], [8]])
    folder = tmp / "plan"
    compiled.save(folder)
    torch.manual_seed(1)
    batch = (entry.example(24, True), entry.labels(24, True))
    reference = _train(compiled, compiled.program, batch)

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    captured, lg = measure.prepare(mlp, (torch.randn(4, 8),), "host-cpu", 48)
    profile = measure.measure(captured, lg, (2, 4), model="mlp", kind="host-cpu", max_layers=48,
                              method=P.Method(min_repeats=2, max_repeats=3, budget_s=0.0))
    return Setup(folder, compiled, stage_cut_specs(compiled.stages), batch, reference,
                 json.dumps(cluster.to_json(), indent=1), P.dumps(profile), lg, tmp / "work")


def _train(compiled: Any, program: Any, batch: tuple) -> dict[str, torch.Tensor]:
    runner = dataclasses.replace(compiled, program=program).runner(optimizer="sgd", lr=0.05)
    inputs, labels = batch
    runner.step(compiled.captured.call_inputs(inputs), labels)
    return runner.state_dict()


# --- mutations ------------------------------------------------------------------------------------

_ODD_NUMBERS = (-1, -1e9, 0, 10**30, 1e308, float("nan"), float("inf"), float("-inf"), 0.5, 2**63, 1e-300)
_ODD_VALUES = (None, True, "x", "", [], {}, [1, 2], {"x": 1}, -3, 1.5, "\u202e")


def json_places(doc: Any, path: tuple = ()) -> list[tuple]:
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out += [(*path, k), *json_places(v, (*path, k))]
    return out


def json_parent(doc: Any, path: tuple) -> Any:
    for p in path[:-1]:
        doc = doc[p]
    return doc


def mutate_json(text: str, rng: random.Random | None) -> tuple[str, str, Any]:
    """One seeded mutation of a JSON document: (new text, what was done, the key it touched, or
    None when it touched no one key); none without ``rng``."""
    if rng is None:
        return text, "unchanged", None
    doc = json.loads(text)
    kind = rng.choice(["delete", "type", "number", "number", "nest", "truncate", "swap"])
    places = json_places(doc)
    if kind == "truncate" or not places:
        cut = rng.randrange(0, max(1, len(text) - 1))
        return text[:cut], f"cut at byte {cut}", None
    if kind == "number":
        numeric = [p for p in places if type(json_parent(doc, p)[p[-1]]) in (int, float)]
        places = numeric or places
    if kind == "swap":
        lists = [p for p in places
                 if isinstance(json_parent(doc, p)[p[-1]], list) and len(json_parent(doc, p)[p[-1]]) > 1]
        if lists:
            path = rng.choice(lists)
            items = json_parent(doc, path)[path[-1]]
            i, j = rng.sample(range(len(items)), 2)
            items[i], items[j] = items[j], items[i]
            return json.dumps(doc), f"swapped {list(path)}[{i}] and [{j}]", None
        kind = "type"
    path = rng.choice(places)
    parent, key = json_parent(doc, path), path[-1]
    if kind == "delete":
        del parent[key]
        return json.dumps(doc), f"deleted {list(path)}", key
    if kind == "type":
        parent[key] = rng.choice(_ODD_VALUES)
    elif kind == "number":
        parent[key] = rng.choice(_ODD_NUMBERS)
    else:
        parent[key] = rng.choice([[parent[key]], {"value": parent[key]}])
    return json.dumps(doc), f"{kind} {list(path)} -> {json.dumps(parent[key])[:50]}", key


_WORDS = ("F", "B", "SEND", "RECV", "STEP", "ALLREDUCE", "act", "grad", "s0", "s1", "s9", "mb0", "mb7", "r0:2",
          "r3:1", "->", "<-", ":", "f32(4)", "i64(2,2)", "[a b]", "[a]", "a", "b", "c", "zz", "#", "0:1", "-1",
          "99999999999", "nan", "inf", "\u202e", "", "microbatches", "stage", "device")


def mutate_text(text: str, rng: random.Random | None) -> tuple[str, str]:
    """One seeded mutation of a program text: lines deleted, duplicated or swapped, a token
    changed, the text cut short; none without ``rng``."""
    if rng is None:
        return text, "unchanged"
    lines = text.splitlines()
    kind = rng.choice(["delete", "duplicate", "swap", "token", "token", "number", "truncate"])
    i = rng.randrange(len(lines))
    if kind == "truncate":
        cut = rng.randrange(0, len(text) - 1)
        return text[:cut], f"cut at byte {cut}"
    if kind == "delete":
        del lines[i]
        return "\n".join(lines) + "\n", f"deleted line {i + 1}"
    if kind == "duplicate":
        lines.insert(rng.randrange(len(lines) + 1), lines[i])
        return "\n".join(lines) + "\n", f"line {i + 1} duplicated"
    if kind == "swap":
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines) + "\n", f"lines {i + 1} and {j + 1} swapped"
    tokens = lines[i].split(" ")
    t = rng.randrange(len(tokens))
    if kind == "number":
        digits = [k for k, tok in enumerate(tokens) if any(ch.isdigit() for ch in tok)]
        if digits:
            t = rng.choice(digits)
            tokens[t] = "".join(str(rng.choice([0, 1, 2, 3, 7, 9])) if ch.isdigit() and rng.random() < 0.5 else ch
                                for ch in tokens[t])
            lines[i] = " ".join(tokens)
            return "\n".join(lines) + "\n", f"line {i + 1}: a number changed: {lines[i].strip()[:60]}"
    tokens[t] = rng.choice(_WORDS)
    lines[i] = " ".join(tokens)
    return "\n".join(lines) + "\n", f"line {i + 1}: a word changed: {lines[i].strip()[:60]}"


# --- what reads each category -------------------------------------------------------------------------

def _cli(argv: list[str]) -> None:
    """Run a command as `asteroid` does, without its catch-all: an AsteroidError is the clean error."""
    from asteroid_fx.cli import build_parser

    args = build_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = args.func(args)
    if rc not in (0, None):
        raise Wrong(f"{' '.join(argv[:2])} returned {rc} without an error")


def _check_program(s: Setup, program: Any) -> None:
    """Verify against the model; a verified program must train like the original."""
    from asteroid_fx.ir.verify import verify

    verify(program, layers=len(s.compiled.layer_graph), cut_specs=s.cut_specs)
    got = _train(s.compiled, program, s.batch)
    if got.keys() != s.reference.keys():
        raise Wrong(f"trains other weights: {sorted(set(got) ^ set(s.reference))[:3]}")
    for k, want in s.reference.items():
        if not torch.allclose(got[k], want, rtol=1e-5, atol=1e-6):
            raise Wrong(f"verified, then trained {k} to other values")


def _program_text(s: Setup, rng: random.Random | None) -> None:
    from asteroid_fx.ir.program_text import parse_program

    text, s.what = mutate_text((s.folder / "program.txt").read_text(), rng)
    (s.work / "program.txt").write_text(text)
    _cli(["show", str(s.work)])
    _check_program(s, parse_program(text))


def _program_json(s: Setup, rng: random.Random | None) -> None:
    from asteroid_fx.ir.program_text import read_program_json

    text, s.what, _ = mutate_json((s.folder / "program.json").read_text(), rng)
    (s.work / "program.json").write_text(text)
    _cli(["simulate", str(s.work)])
    _check_program(s, read_program_json(s.work / "program.json"))


def _plan_json(s: Setup, rng: random.Random | None) -> None:
    text, s.what, _ = mutate_json((s.folder / "plan.json").read_text(), rng)
    (s.work / "plan.json").write_text(text)
    _cli(["show", str(s.work), "plan"])
    _cli(["simulate", str(s.work)])


def _costs_json(s: Setup, rng: random.Random | None) -> None:
    text, s.what, _ = mutate_json((s.folder / "costs.json").read_text(), rng)
    (s.work / "costs.json").write_text(text)
    _cli(["simulate", str(s.work)])


def _finite_plan(plan: Any) -> None:
    p = plan.prediction
    if not (math.isfinite(p.iteration_s) and p.iteration_s > 0):
        raise Wrong(f"accepted, and the plan predicts {p.iteration_s} s per iteration")


def _cluster(s: Setup, rng: random.Random | None) -> None:
    from asteroid_fx.ir.cluster import Cluster
    from asteroid_fx.passes.planners.hpp import plan

    text, s.what, _ = mutate_json(s.cluster_text, rng)
    path = s.work / "cluster.json"
    path.write_text(text)
    cluster = Cluster.load(path)
    for i, d in enumerate(cluster.devices):
        kind = cluster.kind(d.kind)
        memory = d.memory_bytes if d.memory_bytes is not None else kind.memory_bytes
        if not (memory > 0 and kind.peak_flops > 0 and math.isfinite(kind.peak_flops)):
            raise Wrong(f"accepted device {d.name!r} with memory {memory}, {kind.peak_flops} FLOP/s")
        for j in range(len(cluster.devices)):
            bandwidth, latency = cluster.bandwidth[i][j], cluster.latency[i][j]
            # an infinite bandwidth is taken on purpose: a link no transfer waits on
            if i != j and not (bandwidth > 0 and math.isfinite(latency) and latency >= 0):
                raise Wrong(f"accepted the link {d.name} -> {cluster.devices[j].name}: {bandwidth} B/s, {latency} s")
    _finite_plan(plan(s.compiled.layer_graph, cluster, batch=24))


def _profile(s: Setup, rng: random.Random | None) -> None:
    from asteroid_fx.ir import profile as P
    from asteroid_fx.ir.cluster import Cluster, Device
    from asteroid_fx.passes.planners.hpp import plan
    from asteroid_fx.passes.profile_costs import profile_costs

    doc = json.loads(s.profile_text)
    if rng is None or rng.random() < 0.7:  # as the checksum error invites, an edited file without it is read field by field
        doc.pop("checksum", None)
    text, s.what, _ = mutate_json(json.dumps(doc), rng)
    path = s.work / "profile.json"
    path.write_text(text)
    profile = P.load(path, lg=s.profile_lg, max_layers=48, model="mlp")
    lg = profile_costs(s.profile_lg, [profile], max_layers=48, model="mlp")
    for layer in lg.layers:
        for rows in (1, 4, 64):
            for t in (layer.cost("host-cpu").fwd(rows), layer.cost("host-cpu").bwd(rows)):
                if not (math.isfinite(t) and t >= 0):
                    raise Wrong(f"accepted, and layer {layer.index} costs {t} s at {rows} rows")
    cluster = Cluster.uniform([Device("h0", "host-cpu"), Device("h1", "host-cpu")], bandwidth="1Gbps", latency=1e-4)
    _finite_plan(plan(lg, cluster, batch=8))


CASES: dict[str, Callable[[Setup, random.Random | None], None]] = {
    "program text": _program_text, "program JSON": _program_json, "plan JSON": _plan_json,
    "costs JSON": _costs_json, "cluster": _cluster, "profile": _profile,
}


def _alarm(signum, frame):
    raise Hang(f"over {CASE_LIMIT_S:.0f} s")


def run_case(s: Setup, category: str, rng: random.Random | None) -> tuple[str, str, str]:
    """(outcome, what was mutated, the message or exception); the file unchanged without ``rng``."""
    from asteroid_fx.ir.errors import AsteroidError

    shutil.rmtree(s.work, ignore_errors=True)
    shutil.copytree(s.folder, s.work)
    s.what = "(no mutation made)"
    case_rng = random.Random(rng.random()) if rng is not None else None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    try:
        CASES[category](s, case_rng)
        return "same", s.what, ""
    except Hang as e:
        return "hang", s.what, str(e)
    except Wrong as e:
        return "wrong", s.what, str(e)
    except AsteroidError as e:
        return "clean", s.what, str(e).splitlines()[0] if str(e) else type(e).__name__
    except SystemExit as e:  # argparse's own refusal of an argument: one line, rc 2
        return ("clean" if e.code == 2 else "traceback"), s.what, f"SystemExit({e.code})"
    except Exception as e:  # noqa: BLE001 - what is counted here is exactly what leaked
        return "traceback", s.what, f"{type(e).__name__}: {e}"[:200]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(s: Setup, category: str, cases: int, seed: int) -> tuple[Counter, list[tuple[str, str, str]]]:
    """Counts per outcome, and the cases that were not clean or the same."""
    # a case's mutation depends only on the category, the seed and its number
    outcome, _, detail = run_case(s, category, None)
    if outcome != "same":  # what each case changes must be all that fails
        raise RuntimeError(f"{category}: the unchanged input does not pass: {outcome}: {detail}")
    rng = random.Random(f"{category} {seed}")
    counts, bad = Counter(), []
    for _ in range(cases):
        outcome, what, detail = run_case(s, category, rng)
        counts[outcome] += 1
        if outcome not in ("clean", "same"):
            bad.append((outcome, what, detail))
    return counts, bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000, help="cases per category")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        s = setup(Path(tmp))
        for category in CATEGORIES:
            start = time.perf_counter()
            counts, bad = run(s, category, args.cases, args.seed)
            took = time.perf_counter() - start
            print(f"{category}: {dict(counts)} in {took:.0f} s", flush=True)
            rows.append(f"| {category} | {args.cases} | {counts['clean']} | {counts['same']} | {counts['traceback']} "
                        f"| {counts['hang']} | {counts['wrong']} | {took / args.cases * 1e3:.0f} |")
            notes += [f"- {category}, {o}: {w}: {d}" for o, w, d in bad[:5]]
    body = "\n".join([
        "## Hostile inputs (benchmarks/hostile.py)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/hostile.py --cases {args.cases} "
        f"--seed {args.seed}`. Each case is one seeded mutation of one file of the small MLP's plan folder "
        "(or of a cluster file, or of a measured device profile), run through the readers and commands that "
        f"take it, each case limited to {CASE_LIMIT_S:.0f} s. A clean error is the project's user error "
        "(one line on the command line); \"accepted, same\" is a mutation that changes nothing the input "
        "means (a verified program trains to the original's weights within rel 1e-5; a cluster or profile "
        "gives finite costs and a plan) or that the commands take as a valid file (plan and costs: `show` "
        "and `simulate` succeed). The last three columns must be 0.",
        "",
        "| category | cases | clean errors | accepted, same | tracebacks | hangs | wrong results | ms/case |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        *(["Cases that were neither (first five per category):", "", *notes] if notes else
          ["Every case was a clean error or accepted with the same meaning."]),
    ])
    write_section("hostile", body)
    print(body)


if __name__ == "__main__":
    main()
