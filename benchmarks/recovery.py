"""Live pipeline replay against checkpoint-and-restart, on worker processes of this machine (gloo on
loopback), over several models and kinds of failure. Writes the "recovery" section of RESULTS.md.

The N worker processes of a run are described to the planner as N laptop-i7 CPUs named host0..,
on links like the host-N presets' loopback (10 Gbit/s, 20 us): catalog costs are the same in
every process, so every process builds the same plan. (The host-N presets' "host-cpu" kind is
measured in each process, and under load two processes can plan differently.)

  trials     each trial injects its faults through ``RunSpec.faults`` (runtime/faults.py), its
             device, iteration and action drawn from the seed, on a pinned plan of 3-5 devices:
               single kill      one device dies before a drawn action of a drawn iteration
               kill in redo     a second device dies inside an iteration the first recovery redoes
               2 cascading      a second device dies as the survivors of the first failure regroup
               3 cascading      as "2 cascading", and a third dies inside a redone iteration
               joiner dies      a device asks to join a running run (the planner takes it in) and
                                dies before its first hand-over action
               re-planned       a single kill on 3 devices with re-planning after the failure: its
                                gap is reported, not held to 1e-6 (a new plan's row split changes
                                BatchNorm's batches and the summation order of later iterations)
             The victims of the cascades leave every stage at least one device. A trial is
             recovered when its run ends with every fault recorded as a failure and no victim in
             the last program; exact when its weights are within 1e-6 (relative, per tensor) of
             the failure-free run of the same plan and iterations (the horizon) on worker
             processes. (On the pinned plans the gap to the failure-free local run is shown too:
             the failure-free run on worker processes differs from it by float32 rounding, which
             Adam can amplify past 1e-6 in parameters of near-zero gradient.) Recovery time of a
             failure: from the device's death to the end of the interrupted iteration redone by
             the survivors (detection, agreement, rewrite, regroup, rollback, redo).
  baseline   checkpoint and restart, what torchrun elastic gives: every worker stops, a new run
             starts on the survivors (processes, imports, a fresh plan, process groups), loads
             the latest checkpoint and redoes the lost iterations. Measured per failure as the
             same detection time plus a real `launch` of one iteration of the same model on the
             same survivors plus a checkpoint load of the same model; lost iterations are counted
             as zero (a checkpoint every iteration), the baseline's best case.

    .venv/bin/python benchmarks/recovery.py [--rounds 3] [--restarts 1] [--seed 0] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

import torch  # noqa: E402

from asteroid_fx.ir.cluster import Cluster, Device, resolve_cluster  # noqa: E402
from asteroid_fx.runtime.faults import FAULT_INJECTION_ENV  # noqa: E402
from asteroid_fx.runtime.errors import RunFailed, RunTimedOut  # noqa: E402
from asteroid_fx.runtime.launcher import launch, load_weights  # noqa: E402
from asteroid_fx.runtime.spec import RunSpec, batches, compile_spec, iterations_of, optimizer_of  # noqa: E402

# model -> rows per iteration (2 micro-batches): resnet18:small has BatchNorm, gpt:small is GPT-style
MODELS = {"mlp:small": 48, "digits": 48, "resnet18:small": 16, "gpt:small": 12}
HORIZON = 20  # iterations of a trial on a pinned plan
# iterations of a "joiner dies" trial: the run must outlast the newcomer's start (imports, compile)
JOIN_HORIZON = {"mlp:small": 6000, "digits": 300, "resnet18:small": 400, "gpt:small": 1500}
JOIN_CLUSTER = "raspberry-pi-5,raspberry-pi-5,jetson-agx-orin"  # the run starts on the boards, agx0 joins
JOINER = "agx0"
AIMED_BACKUPS = 3  # backups after iterations 0, 3, 6, ...: the iterations a recovery redoes are known
TRIAL_TIMEOUT_S = 240.0


def cluster_of(n: int) -> Cluster:
    return Cluster.uniform([Device(f"host{i}", "laptop-i7") for i in range(n)], bandwidth="10Gbps", latency=20e-6,
                           name=f"laptop-i7 x{n}")


def halves(rows: int, parts: int) -> tuple[int, ...]:
    """``rows`` split into ``parts`` near-equal slots."""
    return tuple(rows // parts + (1 if k < rows % parts else 0) for k in range(parts))


# devices -> (name, groups): the pinned plans of the trials (a stage of one, so its loss
# merges; groups, whose members take over a lost one's rows)
PLANS = {
    3: ("1 + group of 2", (("host0",), ("host1", "host2"))),
    4: ("2 groups of 2", (("host0", "host1"), ("host2", "host3"))),
    5: ("group of 2 + group of 3", (("host0", "host1"), ("host2", "host3", "host4"))),
}


def plan_spec(model: str, n: int, **changes) -> RunSpec:
    """``model`` on the pinned plan of ``n`` devices, for HORIZON iterations, with recovery."""
    batch = MODELS[model]
    _, groups = PLANS[n]
    rows = tuple(halves(batch // 2, len(g)) for g in groups)
    spec = RunSpec(model=model, batch=batch, microbatches=2, groups=groups, rows=rows, iterations=HORIZON,
                   optimizer="adam", lr=1e-3, recovery=True)
    return dataclasses.replace(spec, **changes)


@functools.lru_cache(maxsize=None)
def actions_of(model: str, n: int) -> dict[str, int]:
    """How many actions each device runs per iteration of the pinned plan (where a fault can aim)."""
    return {d: len(a) for d, a in compile_spec(plan_spec(model, n), cluster_of(n)).program.actions}


class Setup(NamedTuple):
    """One trial as drawn: what runs, the faults in its spec, and whom they kill, in order."""

    kind: str
    model: str
    plan: str
    cluster: Cluster
    spec: RunSpec
    joins: tuple[tuple[str, float], ...]
    victims: tuple[str, ...]


def aimed_iteration(rng: random.Random) -> tuple[int, int]:
    """(a failed iteration i, an iteration r < i that the recovery from i redoes) with backups every
    AIMED_BACKUPS iterations: a failure in i rolls back to the iteration after the last backup before i."""
    b = AIMED_BACKUPS
    i = rng.choice([i for i in range(2, HORIZON - 3) if (i - 1) % b >= 1])
    return i, rng.randint(1 + b * ((i - 1) // b), i - 1)


def one_per_stage_victims(rng: random.Random, n: int, count: int) -> list[str]:
    """``count`` distinct devices of the n-device plan, leaving every stage at least one device, in
    a drawn order."""
    _, groups = PLANS[n]
    while True:
        victims = rng.sample([d for g in groups for d in g], count)
        if all(set(g) - set(victims) for g in groups):
            return victims


def single_kill(rng: random.Random, model: str, n: int, replan: bool = False) -> Setup:
    victim = rng.choice([f"host{k}" for k in range(n)])
    i, k = rng.randint(1, HORIZON - 3), rng.randrange(actions_of(model, n)[victim])
    # the default backups (paced by their measured cost); re-planning after the failure only in
    # the "re-planned" kind: a new plan trains the later iterations with its own row split
    spec = plan_spec(model, n, faults=((victim, i, k, "kill"),), replan=replan)
    kind = "re-planned" if replan else "single kill"
    return Setup(kind, model, f"{n} devices, {PLANS[n][0]}", cluster_of(n), spec, (), (victim,))


def kill_in_redo(rng: random.Random, model: str) -> Setup:
    a, b = one_per_stage_victims(rng, 4, 2)
    i, r = aimed_iteration(rng)
    counts = actions_of(model, 4)
    faults = ((a, i, rng.randrange(counts[a]), "kill"), (b, r, rng.randrange(counts[b] // 2), "kill-redo"))
    spec = plan_spec(model, 4, faults=faults, backup_every=AIMED_BACKUPS, replan=False)
    return Setup("kill in redo", model, f"4 devices, {PLANS[4][0]}", cluster_of(4), spec, (), (a, b))


def two_cascading(rng: random.Random, model: str) -> Setup:
    a, b = one_per_stage_victims(rng, 4, 2)
    i = rng.randint(1, HORIZON - 3)
    faults = ((a, i, rng.randrange(actions_of(model, 4)[a]), "kill"), (b, i, 0, "kill-regroup"))
    spec = plan_spec(model, 4, faults=faults, backup_every=AIMED_BACKUPS, replan=False)
    return Setup("2 cascading", model, f"4 devices, {PLANS[4][0]}", cluster_of(4), spec, (), (a, b))


def three_cascading(rng: random.Random, model: str) -> Setup:
    a, b, c = one_per_stage_victims(rng, 5, 3)
    i, r = aimed_iteration(rng)
    counts = actions_of(model, 5)
    faults = ((a, i, rng.randrange(counts[a]), "kill"), (b, i, 0, "kill-regroup"),
              (c, r, rng.randrange(counts[c] // 2), "kill-redo"))
    spec = plan_spec(model, 5, faults=faults, backup_every=AIMED_BACKUPS, replan=False)
    return Setup("3 cascading", model, f"5 devices, {PLANS[5][0]}", cluster_of(5), spec, (), (a, b, c))


def joiner_dies(rng: random.Random, model: str) -> Setup:
    spec = RunSpec(model=model, batch=MODELS[model], microbatches=None, iterations=JOIN_HORIZON[model],
                   optimizer="adam", lr=1e-3, recovery=True, faults=((JOINER, -1, 0, "kill-handover"),))
    return Setup("joiner dies", model, "2 boards + a joining agx", resolve_cluster(JOIN_CLUSTER), spec,
                 ((JOINER, rng.uniform(0.0, 0.5)),), (JOINER,))


# kind -> how a trial of it is drawn; "single kill" runs on the 3- and on the 4-device plan
KINDS: dict[str, Callable[[random.Random, str], Setup]] = {
    "single kill, 3 devices": lambda rng, model: single_kill(rng, model, 3),
    "single kill, 4 devices": lambda rng, model: single_kill(rng, model, 4),
    "kill in redo": kill_in_redo,
    "2 cascading": two_cascading,
    "3 cascading": three_cascading,
    "joiner dies": joiner_dies,
    "re-planned": lambda rng, model: single_kill(rng, model, 3, replan=True),
}
# kinds whose weights are not held to the failure-free run's: after the redone iteration a new
# plan trains with its own row split, which changes BatchNorm's batch statistics and the float
# summation order (docs/replay.md); their gap is reported on its own
REPORTED_ONLY = frozenset({"re-planned"})
ONCE = frozenset({"joiner dies", "re-planned"})  # the longest kinds, and the one not held to 1e-6: first round only
QUICK = (("resnet18:small", "single kill, 3 devices"), ("resnet18:small", "kill in redo"),
         ("mlp:small", "3 cascading"), ("gpt:small", "joiner dies"))


def quiet(_m: str) -> None:
    pass


def relative_gap(got: dict, want: dict) -> float:
    """The largest relative difference of a tensor (norm of the difference over the norm), in
    float64 (BatchNorm's step count is an integer)."""
    if got.keys() != want.keys():
        return float("inf")
    return max(float((got[k].double() - want[k].double()).norm() / max(float(want[k].double().norm()), 1e-30))
               for k in want)


def without_joiners(setup: Setup) -> Cluster:
    """The devices the trial's run starts on."""
    joining = {d for d, _ in setup.joins}
    return setup.cluster.subset([d for d in setup.cluster.names if d not in joining]) if joining else setup.cluster


def failure_free_of(setup: Setup, work: Path, cache: dict) -> tuple[dict, list[float]]:
    """The failure-free run of the trial's plan and iterations on worker processes, as the trial
    starts (no faults, nobody joins; backups and re-planning change no number): (weights, losses)."""
    spec = dataclasses.replace(setup.spec, faults=(), backup_every=None, replan=True)
    cluster = without_joiners(setup)
    key = ("workers", spec, cluster.names)
    if key not in cache:
        out = work / f"failure-free-{len(cache)}"
        result = launch(spec, cluster, out, timeout_s=TRIAL_TIMEOUT_S * 2, log=quiet)
        cache[key] = (load_weights(out, result["program"].devices), result["losses"])
    return cache[key]


def local_of(setup: Setup, cache: dict) -> dict:
    """The weights of the failure-free local run of the trial's model and iterations (the
    Program's meaning; the workers' kernels, one thread each, round otherwise than one process
    running every device: 5e-7 after three iterations of resnet18:small, which Adam amplifies in
    parameters of near-zero gradient, BatchNorm biases first)."""
    spec = dataclasses.replace(setup.spec, faults=(), backup_every=None, replan=True)
    cluster = without_joiners(setup)
    key = ("local", spec, cluster.names)
    if key not in cache:
        runner, _ = compile_spec(spec, cluster).run(batches(spec), iterations_of(spec),
                                                    optimizer=optimizer_of(spec))
        cache[key] = runner.state_dict()
    return cache[key]


def trial(setup: Setup, out: Path, cache: dict) -> dict:
    started = time.perf_counter()
    row = {"setup": setup, "recovered": False, "gap": None, "loss_gap": None, "local_gap": None, "failures": [],
           "error": None}
    try:
        result = launch(setup.spec, setup.cluster, out, timeout_s=TRIAL_TIMEOUT_S * (2 if setup.joins else 1),
                        log=quiet, joins=list(setup.joins))
    except (RunFailed, RunTimedOut) as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        row["wall_s"] = time.perf_counter() - started
        return row
    row["wall_s"] = time.perf_counter() - started
    failures = result["failures"]
    dead = [d for f in failures for d in (f["device"], *f["also"])]
    running = list(dict.fromkeys(d for st in result["plan"].stages for d in st.devices))  # the first plan's
    survivors, gone = [], set()
    for f in failures:
        gone |= {f["device"], *f["also"]}
        survivors.append([d for d in running if d not in gone])
    row["failures"] = [{**f, "survivors": s} for f, s in zip(failures, survivors)]
    missing = [v for v in setup.victims if v not in dead]
    if missing:
        row["error"] = f"no failure recorded for {', '.join(missing)} (its fault did not strike)"
    elif sorted(dead) != sorted(setup.victims):
        row["error"] = f"failures recorded for {', '.join(dead)}, faults for {', '.join(setup.victims)}"
    elif set(dead) & set(result["program"].devices):
        row["error"] = f"a failed device is in the last program ({', '.join(result['program'].devices)})"
    else:
        row["recovered"] = True
    want, losses = failure_free_of(setup, out.parent, cache)
    got = load_weights(out, result["program"].devices)
    row["gap"] = relative_gap(got, want)
    if not setup.joins:  # a joiner's run is thousands of iterations, too many for the local backend here
        row["local_gap"] = relative_gap(got, local_of(setup, cache))
        row["free_local_gap"] = relative_gap(want, local_of(setup, cache))
    row["loss_gap"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(result["losses"], losses))
    return row


def restart_on_survivors(model: str, survivors: Cluster, work: Path, repeats: int) -> float:
    """Wall seconds of a one-iteration restart of ``model`` on ``survivors``: a new run with a fresh
    plan (the planner free to choose the micro-batching, as a re-plan is), median of ``repeats``."""
    fresh = RunSpec(model=model, batch=MODELS[model], microbatches=None, optimizer="adam", lr=1e-3, iterations=1,
                    recovery=True)
    restarts = []
    for k in range(repeats):
        started = time.perf_counter()
        launch(fresh, survivors, work / f"restart-{len(list(work.iterdir()))}", timeout_s=TRIAL_TIMEOUT_S, log=quiet)
        restarts.append(time.perf_counter() - started)
    return statistics.median(restarts)


def checkpoint_load_s(model: str, work: Path) -> float:
    """Seconds to load a checkpoint of ``model``'s weights and Adam state (three copies of the
    weights) from this machine's disk."""
    spec = plan_spec(model, 3)
    module = compile_spec(spec, cluster_of(3)).captured.module
    state = {"model": module.state_dict(),
             "optimizer": {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in module.state_dict().items()}}
    path = work / f"checkpoint-{model.replace(':', '-')}.pt"
    torch.save(state, path)
    started = time.perf_counter()
    torch.load(path, weights_only=True)
    return time.perf_counter() - started


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def summary_row(label: str, rows: list[dict], baseline: Callable[[dict], float]) -> str:
    recovered = [r for r in rows if r["recovered"]]
    ours = [f["recovery_s"] for r in recovered for f in r["failures"]]
    theirs = [baseline(f) for r in recovered for f in r["failures"]]
    times = (f"{statistics.median(ours) * 1e3:.0f} ms | {p90(ours) * 1e3:.0f} ms | {statistics.median(theirs):.2f} s "
             f"| {p90(theirs):.2f} s | **{statistics.median(theirs) / statistics.median(ours):.0f}x**"
             if ours else "- | - | - | - | -")
    kept = held(rows)
    if kept:
        within = f"{sum(exact(r) for r in kept) / len(kept):.0%}" + ("" if len(kept) == len(rows) else f" of {len(kept)}")
    else:
        gaps = [r["gap"] for r in rows if r["gap"] is not None]
        within = f"not held (gap up to {max(gaps):.1e})" if gaps else "not held"
    return f"| {label} | {len(rows)} | {len(ours)} | {len(recovered) / len(rows):.0%} | {within} | {times} |"


def faults_text(setup: Setup) -> str:
    parts = [f"{d} {kind} it {i}" + ("" if kind in ("kill-regroup", "kill-handover") else f" act {k}")
             for d, i, k, kind in setup.spec.faults]
    return "; ".join(p.replace(" it -1", "") for p in parts)


def trial_line(r: dict) -> str:
    s = r["setup"]
    fs = r["failures"]
    times = ", ".join(f"{f['recovery_s'] * 1e3:.0f}" for f in fs) or "-"
    rolled = ", ".join(f"{f['iteration']}->{f['rollback_to']}" for f in fs) or "-"
    gap = "-" if r["gap"] is None else f"{r['gap']:.1e}"
    loss = "-" if r["loss_gap"] is None else f"{r['loss_gap']:.1e}"
    local = "-" if r["local_gap"] is None else f"{r['local_gap']:.1e}"
    verdict = "yes" if r["recovered"] else f"**no**: {r['error']}"
    return (f"| {s.model} | {s.kind} | {s.plan} | {faults_text(s)} | {s.spec.iterations} | {verdict} | {rolled} | "
            f"{times} | {gap} | {loss} | {local} | {r['wall_s']:.0f} s |")


def free_local_text(rows: list[dict]) -> str:
    gaps: dict[str, float] = {}
    for r in rows:
        if "free_local_gap" in r:
            gaps[r["setup"].model] = max(gaps.get(r["setup"].model, 0.0), r["free_local_gap"])
    return ", ".join(f"{m} {g:.1e}" for m, g in gaps.items())


def recovery_text(row: dict) -> str:
    return ", ".join(f"{f['recovery_s']:.3f}" for f in row["failures"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="trials of every kind on every model (\"joiner dies\" and \"re-planned\": in the first only)")
    parser.add_argument("--restarts", type=int, default=1, help="one-iteration restarts per baseline measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK)} trials and one restart each; no write")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args(argv)
    # every trial injects its failures through RunSpec.faults, which a launcher runs only when told
    os.environ[FAULT_INJECTION_ENV] = "1"
    for name in ("rounds", "restarts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: give 1 or more")
    rng = random.Random(args.seed)
    plan = list(QUICK) if args.quick else [(m, k) for n in range(args.rounds) for m in MODELS for k in KINDS
                                           if k not in ONCE or n == 0]
    run = Sweep(command=" ".join([".venv/bin/python", "benchmarks/recovery.py",
                                  *(argv if argv is not None else sys.argv[1:])]),
                seed=args.seed, planned=len(plan), repeats=1 if args.quick else args.restarts)
    write = not (args.no_write or args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "restarts").mkdir()
        cache: dict = {}
        for n, (model, kind) in enumerate(plan):
            setup = KINDS[kind](rng, model)
            row = trial(setup, work / f"trial{n}", cache)
            run.rows.append(row)
            print(f"trial {n + 1}/{len(plan)}: {model}, {kind} ({faults_text(setup)}): "
                  + ("recovered" if row["recovered"] else f"NOT RECOVERED ({row['error']})")
                  + (f", recovery {recovery_text(row)} s" if row["failures"] else "")
                  + ("" if row["gap"] is None else f", weights within {row['gap']:.1e}")
                  + f" [{row['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f}]", flush=True)
            run.measure_baselines(row, work)
            if write:  # after every trial: a sweep cut short still leaves what it measured
                write_section("recovery", run.report())
    body = run.report()
    print(body)
    if write:
        write_section("recovery", body)
    return {"trials": len(run.rows), "recovered": sum(r["recovered"] for r in run.rows),
            "exact": sum(exact(r) for r in held(run.rows)), "held": len(held(run.rows)), "rows": run.rows}


def exact(row: dict) -> bool:
    return row["recovered"] and row["gap"] is not None and row["gap"] <= 1e-6


def held(rows: list[dict]) -> list[dict]:
    """The trials held to the failure-free run's weights (every kind but the re-planned)."""
    return [r for r in rows if r["setup"].kind not in REPORTED_ONLY]


@dataclasses.dataclass
class Sweep:
    """The trials so far, the baselines they need, and the section they make."""

    command: str
    seed: int
    planned: int
    repeats: int
    rows: list = dataclasses.field(default_factory=list)
    restart: dict = dataclasses.field(default_factory=dict)  # (model, survivors' kinds) -> seconds
    load: dict = dataclasses.field(default_factory=dict)  # model -> checkpoint load seconds
    load_start: float = dataclasses.field(default_factory=lambda: os.getloadavg()[0])
    began: float = dataclasses.field(default_factory=time.perf_counter)

    def measure_baselines(self, row: dict, work: Path) -> None:
        """The baseline on the same model and the same survivors as each of the row's failures
        (survivors of the same kinds restart alike: one measurement per model and kinds)."""
        model, cluster = row["setup"].model, row["setup"].cluster
        for f in row["failures"]:
            f["baseline_key"] = (model, tuple(sorted(cluster.device(d).kind for d in f["survivors"])))
            if f["baseline_key"] not in self.restart:
                self.restart[f["baseline_key"]] = restart_on_survivors(model, cluster.subset(f["survivors"]),
                                                                       work / "restarts", self.repeats)
        if model not in self.load:
            self.load[model] = checkpoint_load_s(model, work)

    def baseline(self, f: dict) -> float:
        return f["detected_s"] + self.restart[f["baseline_key"]] + self.load[f["baseline_key"][0]]

    def report(self) -> str:
        rows, restart, load, repeats, baseline = self.rows, self.restart, self.load, self.repeats, self.baseline
        seconds = time.perf_counter() - self.began
        recovered = [r for r in rows if r["recovered"]]
        kept = held(rows)
        exacts = [r for r in kept if exact(r)]
        replanned = [r for r in rows if r["setup"].kind in REPORTED_ONLY]
        ours = [f["recovery_s"] for r in recovered for f in r["failures"]]
        theirs = [baseline(f) for r in recovered for f in r["failures"]]
        lines = [
            "## Recovery: live pipeline replay vs checkpoint and restart",
            "",
            f"Written by `{self.command}` in {seconds / 60:.0f} min. Machine: {machine()}; load average "
            f"{self.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other work shared the "
            f"machine). Worker processes on loopback (gloo), models {', '.join(MODELS)} (rows per iteration "
            f"{', '.join(str(b) for b in MODELS.values())}), Adam; pinned plans of 2 micro-batches on laptop-i7 "
            f"clusters of 3-5 devices for {HORIZON} iterations (the horizon), the \"joiner dies\" runs on the "
            f"planner's plans for {JOIN_CLUSTER} for {', '.join(str(JOIN_HORIZON[m]) for m in MODELS)} iterations. "
            f"Faults are drawn from seed {self.seed} (device, iteration, action; the cascades' victims leave every "
            "stage a device). Single kills back up as paced by the measured cost (the default) and keep the "
            f"survivors' rewritten plan; the aimed kinds back up every {AIMED_BACKUPS} iterations, so that the "
            "iterations a recovery redoes are known; \"re-planned\" trials are single kills on 3 devices with "
            "re-planning after the failure (the default of `asteroid launch --recover`). Exact: weights within 1e-6 "
            "(relative, per tensor) of "
            "the failure-free run of the same plan and iterations on worker processes. Recovery time: a failure's "
            "death to the end of its interrupted iteration, redone; the baseline for the same failure: its "
            "detection time + a one-iteration restart of the same model on the same survivors ("
            + ("one run" if repeats == 1 else f"median of {repeats}") + ") + a checkpoint load of the same model, "
            "lost iterations counted as zero (its best case).",
            "",
            f"- recovered: **{len(recovered)}/{len(rows)}** trials; weights within 1e-6 of the failure-free run: "
            f"**{len(exacts)}/{len(kept)}** of the trials held to it (all but the re-planned)"
            + ("" if len(rows) == self.planned else f" (so far: {len(rows)} of {self.planned} planned trials)"),
            (f"- recovery time over all {len(ours)} failures, median: **{statistics.median(ours) * 1e3:.0f} ms**, p90 "
             f"{p90(ours) * 1e3:.0f} ms (live replay) vs **{statistics.median(theirs):.2f} s**, p90 "
             f"{p90(theirs):.2f} s "
             f"(checkpoint and restart, best case) = **{statistics.median(theirs) / statistics.median(ours):.0f}x** "
             "faster" if ours else "- no trial recovered"),
        ]
        if replanned:
            gaps = ", ".join(f"{r['setup'].model} {r['gap']:.1e}" for r in replanned if r["gap"] is not None)
            lines.append(f"- re-planned trials, not held to 1e-6: after the redone iteration the new plan trains "
                         "with its own row split, so BatchNorm sees other batches and float32 sums run in another "
                         f"order (docs/replay.md); their weights gap to the failure-free run: {gaps or '-'}")
        lines += [
            "",
            "| model / kind | trials | failures | recovered | within 1e-6 | recovery median | p90 | restart baseline "
            "median | p90 | baseline / replay |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for model in MODELS:
            of = [r for r in rows if r["setup"].model == model]
            if of:
                lines.append(summary_row(f"**{model}**", of, baseline))
        for kind in dict.fromkeys(r["setup"].kind for r in rows):
            lines.append(summary_row(f"{kind}", [r for r in rows if r["setup"].kind == kind], baseline))
        lines += ["", "The failure-free runs on worker processes against the failure-free local runs (the "
                  f"Program's meaning), largest relative gap of a tensor: {free_local_text(rows)}."]
        lines += ["", "Restart of one iteration on the survivors (the baseline's part that is not detection):", "",
                  "| model | survivors | restart + one iteration | checkpoint load |", "| --- | --- | ---: | ---: |"]
        for (model, kinds), s in sorted(restart.items()):
            lines.append(f"| {model} | {len(kinds)} x {', '.join(sorted(set(kinds)))} | {s:.2f} s | "
                         f"{load[model] * 1e3:.1f} ms |")
        lines += ["", "Every trial (\"rolled back\": failed iteration -> the iteration redone from; recovery times "
                  "in ms, one per failure; gaps: the largest relative difference of a tensor, or of an iteration's "
                  "loss, to the failure-free run of the same plan on worker processes):", "",
                  "| model | kind | plan | faults | horizon | recovered | rolled back | recovery (ms) | weights gap | "
                  "loss gap | weights gap to the local run | wall |",
                  "| --- | --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [trial_line(r) for r in rows]
        lines += ["", "What backups cost failure-free runs is in the \"backups\" section (benchmarks/backups.py)."]
        return "\n".join(lines)


if __name__ == "__main__":
    main()
