"""Runtime overhead of the torch_dist backend, measured side by side on this machine. Writes the
"runtime" section of RESULTS.md.

1. Two-stage pipeline, 1F1B, gloo, two processes: asteroid's DistWorker against
   torch.distributed.pipelining (PipelineStage + Schedule1F1B) on literally the same split (both
   run asteroid's compiled stage modules; the worker calls them through passes/direct_calls, and
   pipelining runs once on them as compiled and once on the same direct calls, which separates the
   runtimes from the graphs), the same micro-batches, batches and optimizer, each from its own copy
   of the same initial weights, so their losses must agree.
2. One stage on one worker process (DistWorker on a one-rank group) against plain eager training
   of the same model (micro-batches as gradient accumulation), and against the captured fx graph
   trained the same way, which separates the runtime's overhead from the graph's.

The machine may be shared: all runtimes of a comparison live in the same processes and alternate
iteration by iteration (A B, B A, ...). Each ratio is reported two ways, the median of the per-round
ratios and the ratio of the median times; a goal counts as met only when both meet it.
Progress goes to stderr; the table to stdout and RESULTS.md.

    .venv/bin/python benchmarks/runtime.py [--models resnet18:small,gpt:small,mlp:small] [--seconds 30]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

from asteroid_fx.ir.cluster import Cluster, Device  # noqa: E402
from asteroid_fx.runtime.spec import RunSpec, batches, compile_spec, zoo_entry  # noqa: E402

# two equal devices: the benchmark measures the runtimes, not the planner (the split is pinned)
CLUSTER = Cluster.uniform([Device("a", "jetson-agx-orin"), Device("b", "jetson-agx-orin")], bandwidth=1e9,
                          latency=1e-4)
ONE_DEVICE = Cluster.uniform([Device("a", "jetson-agx-orin")], bandwidth=1e9, latency=1e-4)
MODELS = ("resnet18:small", "gpt:small", "mlp:small")
BATCH, MICROBATCHES = 64, 4
OPTIMIZER, LR = "adam", 1e-3
GOAL_RATIO, GOAL_OVERHEAD = 1.10, 0.05
WORKER_TIMEOUT_S = 300.0
POOL = 16  # distinct batches, cycled: every runtime sees the same sequence
DIRECT_PIPELINING = "pipelining, direct calls"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    batch: int
    microbatches: int
    warmup: int  # untimed iterations per runtime
    seconds: float  # timed budget of one comparison: sets the number of rounds
    min_rounds: int
    max_rounds: int

    def spec(self, stages: int) -> RunSpec:
        groups = (("a",), ("b",))[:stages]
        return RunSpec(model=self.model, batch=self.batch, microbatches=self.microbatches, schedule="1f1b",
                       iterations=POOL, optimizer=OPTIMIZER, lr=LR, groups=groups,
                       rows=tuple((self.batch // self.microbatches,) for _ in groups))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


# --- the two pipeline runtimes, one step each ---------------------------------------------------


class PipeliningStage(torch.nn.Module):
    """A compiled stage as torch.distributed.pipelining wants it: a tuple of tensors out, or the
    one tensor the loss takes on the last stage."""

    def __init__(self, module: torch.fx.GraphModule, last: bool):
        super().__init__()
        self.module, self.last = module, last

    def forward(self, *inputs):
        outputs = tuple(self.module(*inputs))
        return outputs[0] if self.last and len(outputs) == 1 else outputs


class DirectStage(torch.nn.Module):
    """A compiled stage called as the asteroid worker calls it (passes/direct_calls): its
    parameters stay in ``module``, where the optimizer finds them."""

    def __init__(self, module: torch.fx.GraphModule):
        from asteroid_fx.passes.direct_calls import direct_calls

        super().__init__()
        self.module = module
        self.direct = direct_calls(module)
        self.bound = self.direct.bind(module)

    def forward(self, *inputs):
        return self.direct.module(*self.bound, *inputs)


def asteroid_runtime(compiled, device: str) -> Callable:
    from asteroid_fx.backends.torch_dist import DistWorker

    names = [n.name for n in compiled.captured.module.graph.nodes if n.op == "placeholder"]
    worker = DistWorker(compiled.program, compiled.stages, device, loss=compiled.loss,
                        unflatten=compiled.captured.unflatten_outputs, input_names=names, optimizer=OPTIMIZER, lr=LR)
    return worker.step


def pipelining_runtime(compiled, rank: int, direct: bool = False) -> Callable:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from asteroid_fx.backends.local import make_optimizer

    stages, m = compiled.stages, compiled.program.microbatches
    last = rank == len(stages) - 1
    own = copy.deepcopy(stages[rank].module)
    module = PipeliningStage(DirectStage(own) if direct else own, last).train()
    stage = PipelineStage(module, rank, len(stages), torch.device("cpu"))
    unflatten = compiled.captured.unflatten_outputs

    # the loss scaled by 1/M, as asteroid scales it (rows / batch), so no separate gradient
    # rescaling pass is needed (scale_grads=False is the cheaper of pipelining's two options)
    def loss_fn(output, target):
        return compiled.loss(unflatten([output]), target) / m

    schedule = Schedule1F1B(stage, m, loss_fn=loss_fn, scale_grads=False)
    optimizer = make_optimizer(OPTIMIZER, [p for p in module.parameters() if p.requires_grad], LR)

    def step(inputs, labels) -> float:
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(*inputs, return_outputs=False)
        else:
            schedule.step(target=labels, losses=losses, return_outputs=False)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(sum(l.detach() for l in losses)) if losses else 0.0

    return step


def interleaved(case: Case, runtimes: dict[str, Callable], data: list, barrier: Callable[[], None],
                agree: Callable[[int], int], say: Callable[[str], None], label: str) -> dict:
    """Warm every runtime up, then run rounds of one iteration each, the runtimes in alternating
    order (A B, B A, ...) so load from anything else on the machine falls on all of them alike.
    Each iteration is timed from a common barrier to the end of this rank's step."""
    losses = {name: [] for name in runtimes}
    seconds = {name: [] for name in runtimes}
    per_round = 0.0
    for name, step in runtimes.items():
        for i in range(case.warmup):
            started = time.perf_counter()
            losses[name].append(step(*data[i % len(data)]))
        per_round += time.perf_counter() - started  # the last warm-up iteration
    rounds = agree(max(case.min_rounds, min(case.max_rounds, int(case.seconds / per_round))))
    say(f"    {label}: {rounds} rounds of {', '.join(runtimes)}, one iteration each")
    names = list(runtimes)
    for r in range(rounds):
        i = case.warmup + r
        for name in (names if r % 2 == 0 else names[::-1]):
            barrier()
            started = time.perf_counter()
            losses[name].append(runtimes[name](*data[i % len(data)]))
            seconds[name].append(time.perf_counter() - started)
        if (r + 1) % max(1, rounds // 4) == 0:
            say(f"    {label}: round {r + 1}/{rounds}, median so far: " + ", ".join(
                f"{name} {statistics.median(seconds[name]) * 1e3:.1f} ms" for name in names))
    return {"losses": losses, "seconds": seconds}


def pipeline_worker(case: Case, coordinator: str, rank: int, out: Path) -> None:
    import torch.distributed as dist

    from asteroid_fx.backends.torch_dist import init_process_group

    host, _, port = coordinator.rpartition(":")
    init_process_group(host, int(port), rank, 2, timeout_s=120.0)
    try:
        spec = case.spec(stages=2)
        compiled = compile_spec(spec, CLUSTER)
        device = compiled.program.devices[rank]
        data = [(tuple(inputs), labels) for inputs, labels in batches(spec)]
        runtimes = {"asteroid": asteroid_runtime(compiled, device), "pipelining": pipelining_runtime(compiled, rank),
                    DIRECT_PIPELINING: pipelining_runtime(compiled, rank, direct=True)}

        def agree(rounds: int) -> int:  # rank 0's count, so both ranks run the same rounds
            t = torch.tensor([rounds])
            dist.broadcast(t, 0)
            return int(t)

        result = interleaved(case, runtimes, data, dist.barrier, agree, log if rank == 0 else lambda m: None,
                             f"{case.model}, two stages")
        _write_json(out, {"rank": rank, **result})
    finally:
        dist.destroy_process_group()


# --- one stage on one worker against eager --------------------------------------------------


def eager_runtime(model: torch.nn.Module, loss: Callable, unflatten: Callable | None, microbatches: int) -> Callable:
    """Plain training with gradient accumulation: the micro-batch losses scaled by rows / batch."""
    from asteroid_fx.backends.local import make_optimizer

    model.train()
    optimizer = make_optimizer(OPTIMIZER, [p for p in model.parameters() if p.requires_grad], LR)

    def step(inputs, labels) -> float:
        batch, total = labels.shape[0], 0.0
        for chunk, target in zip(zip(*(t.chunk(microbatches) for t in inputs)), labels.chunk(microbatches)):
            outputs = model(*chunk)
            value = loss(unflatten(list(outputs)) if unflatten else outputs, target) * (target.shape[0] / batch)
            value.backward()
            total += float(value.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def single_worker(case: Case, coordinator: str, out: Path) -> None:
    import torch.distributed as dist

    from asteroid_fx.backends.torch_dist import init_process_group

    host, _, port = coordinator.rpartition(":")
    init_process_group(host, int(port), 0, 1, timeout_s=120.0)
    try:
        spec = case.spec(stages=1)
        compiled = compile_spec(spec, ONE_DEVICE)
        data = [(tuple(inputs), labels) for inputs, labels in batches(spec)]
        entry, small = zoo_entry(spec.model)
        torch.manual_seed(spec.seed)
        model = entry.build(small=small)  # the same initial weights compile_spec captured
        runtimes = {
            "eager": eager_runtime(model, entry.loss, None, spec.microbatches),
            "fx graph": eager_runtime(copy.deepcopy(compiled.captured.module), entry.loss,
                                      compiled.captured.unflatten_outputs, spec.microbatches),
            "asteroid": asteroid_runtime(compiled, compiled.program.devices[0]),
        }
        result = interleaved(case, runtimes, data, lambda: None, lambda rounds: rounds, log,
                             f"{case.model}, one stage")
        _write_json(out, {"rank": 0, **result})
    finally:
        dist.destroy_process_group()


# --- the parent: processes, timeouts, the table ---------------------------------------------


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def run_processes(case: Case, mode: str, world: int, folder: Path) -> list[dict]:
    """Start ``world`` copies of this script as workers around one TCPStore; bounded by a timeout,
    and every process is gone when this returns."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True,
                          timeout=datetime.timedelta(seconds=120), wait_for_workers=False)
    outs = [folder / f"{mode}_{rank}.json" for rank in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", mode, "--case", case.to_json(),
                               "--coordinator", f"127.0.0.1:{store.port}", "--rank", str(rank),
                               "--out", str(out)]) for rank, out in enumerate(outs)]
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mode} workers for {case.model} did not finish in {WORKER_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            raise RuntimeError(f"{mode} worker rank {failed[0][0]} for {case.model} exited with code "
                               f"{failed[0][1]} (its traceback is above)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads(out.read_text()) for out in outs]


def iteration_seconds(results: list[dict], name: str) -> list[float]:
    """Per iteration, the slowest rank's time: both started at the same barrier."""
    return [max(ranks) for ranks in zip(*(r["seconds"][name] for r in results))]


def loss_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def speedup(ours: list[float], theirs: list[float]) -> dict:
    """theirs / ours per round (both halves of a round saw the same load): median and quartiles;
    and the ratio of the median times, which a skewed distribution of rounds can pull away from
    the median ratio (the worse of the two is what a goal is judged on)."""
    ratios = [t / o for o, t in zip(ours, theirs)]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    of_medians = statistics.median(theirs) / statistics.median(ours)
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "rounds": len(ratios),
            "wins": sum(r > 1 for r in ratios) / len(ratios), "of_medians": of_medians,
            "low": min(statistics.median(ratios), of_medians), "high": max(statistics.median(ratios), of_medians)}


def measure(case: Case, folder: Path) -> dict:
    log(f"  {case.model}: two stages, asteroid vs torch.distributed.pipelining ...")
    pp = run_processes(case, "pipeline", 2, folder)
    log(f"  {case.model}: one stage on one worker vs eager ...")
    (single,) = run_processes(case, "single", 1, folder)
    two = {name: iteration_seconds(pp, name) for name in ("asteroid", "pipelining", DIRECT_PIPELINING)}
    one = {name: single["seconds"][name] for name in ("eager", "fx graph", "asteroid")}
    losses = pp[-1]["losses"]  # the last stage's: the losses
    return {
        "case": case,
        "two": {name: case.batch / statistics.median(t) for name, t in two.items()},
        "ratio": speedup(two["asteroid"], two["pipelining"]),
        "ratio_direct": speedup(two["asteroid"], two[DIRECT_PIPELINING]),
        "two_loss_gap": max(loss_gap(losses["asteroid"], losses[name]) for name in ("pipelining", DIRECT_PIPELINING)),
        "one": {name: case.batch / statistics.median(t) for name, t in one.items()},
        "vs_eager": speedup(one["eager"], one["asteroid"]),  # asteroid time / eager time
        "graph_vs_eager": speedup(one["eager"], one["fx graph"]),
        "vs_graph": speedup(one["fx graph"], one["asteroid"]),
        "one_loss_gap": max(loss_gap(single["losses"]["asteroid"], single["losses"]["eager"]),
                            loss_gap(single["losses"]["fx graph"], single["losses"]["eager"])),
    }


def _spread(s: dict) -> str:
    return f"{s['q1']:.2f}–{s['q3']:.2f}"


def _overhead(s: dict) -> str:
    return f"{s['median'] - 1:+.1%} ({s['q1'] - 1:+.1%} to {s['q3'] - 1:+.1%})"


def _overhead_of_medians(s: dict) -> str:
    return f"{s['of_medians'] - 1:+.1%}"


def report(rows: list[dict], note: str) -> str:
    lines = [
        "## Runtime overhead (benchmarks/runtime.py)",
        "",
        f"Machine: {machine()}; every process runs 1 intra-op thread; the machine is shared, so every "
        f"comparison interleaves the runtimes iteration by iteration (A B, B A, ...). {note}",
        "",
        "### Two stages, 1F1B, gloo, two processes: asteroid vs torch.distributed.pipelining",
        "",
        "Both runtimes run asteroid's compiled stage modules (the same split, the same cut tensors), the same "
        f"micro-batches, batches and optimizer ({OPTIMIZER}, lr {LR}), in the same two processes, each from its own "
        "copy of the same initial weights. The asteroid worker calls its stage through passes/direct_calls (tensors "
        "bound once, ops through torch's own bindings); pipelining runs the stages as compiled (what its own "
        "export-based frontend hands it), and, in the last ratio column, on the same direct calls, which leaves "
        "the runtimes alone to compare. An iteration is timed from a common barrier to the end of the slower "
        "rank's step. pipelining runs Schedule1F1B with the loss scaled by 1/M inside loss_fn and "
        f"scale_grads=False (its cheaper option). Goal: ratio >= {GOAL_RATIO:.2f}, never below 1, met only when "
        "both the median of the per-round ratios and the ratio of the median times (the throughput columns) "
        "reach it.",
        "",
        "| model | batch | micro-batches | asteroid (samples/s) | pipelining (samples/s) | ratio asteroid / pipelining "
        "(median per round) | quartiles | ratio of medians | rounds asteroid faster | rounds | goal met | "
        "ratio vs pipelining on direct calls (median per round / of medians) | max loss difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        c, q, d = r["case"], r["ratio"], r["ratio_direct"]
        lines.append(f"| {c.model} | {c.batch} | {c.microbatches} | {r['two']['asteroid']:.0f} | "
                     f"{r['two']['pipelining']:.0f} | {q['median']:.2f} | {_spread(q)} | {q['of_medians']:.2f} | "
                     f"{q['wins']:.0%} | {q['rounds']} | {'yes' if q['low'] >= GOAL_RATIO else 'no'} | "
                     f"{d['median']:.2f} / {d['of_medians']:.2f} | {r['two_loss_gap']:.1e} |")
    lines += [
        "",
        "### One stage on one worker process vs eager training in one process",
        "",
        "eager: the model as written, micro-batches as gradient accumulation (loss x rows / batch). fx graph: the "
        "captured graph trained the same way, so fx graph vs eager is the graph's cost and asteroid vs fx graph "
        "the runtime's own, net of what its direct calls of the stage save over calling the graph. Overheads are "
        "medians per round of time / eager time - 1 (quartiles in brackets); the last overhead column is the ratio "
        "of the median times instead. "
        f"Goal: asteroid's overhead over eager <= {GOAL_OVERHEAD:.0%}, both ways.",
        "",
        "| model | eager (samples/s) | fx graph (samples/s) | asteroid worker (samples/s) | fx graph vs eager | "
        "asteroid vs fx graph | asteroid vs eager | asteroid vs eager, of medians | goal met | max loss difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        one, e = r["one"], r["vs_eager"]
        lines.append(f"| {r['case'].model} | {one['eager']:.0f} | {one['fx graph']:.0f} | {one['asteroid']:.0f} | "
                     f"{_overhead(r['graph_vs_eager'])} | {_overhead(r['vs_graph'])} | {_overhead(e)} | "
                     f"{_overhead_of_medians(e)} | {'yes' if e['high'] - 1 <= GOAL_OVERHEAD else 'no'} | "
                     f"{r['one_loss_gap']:.1e} |")
    lines += [
        "",
        "Throughputs are the batch over the median iteration time. Loss differences are relative, over every "
        "iteration, between runtimes trained from the same weights on the same batches.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--microbatches", type=int, default=MICROBATCHES)
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per runtime")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="timed seconds per comparison (sets the rounds, within --min-rounds/--max-rounds)")
    parser.add_argument("--min-rounds", type=int, default=20)
    parser.add_argument("--max-rounds", type=int, default=10000)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    # worker side (this script started by itself)
    parser.add_argument("--worker", choices=("pipeline", "single"), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        case = Case(**json.loads(args.case))
        if args.worker == "pipeline":
            pipeline_worker(case, args.coordinator, args.rank, Path(args.out))
        else:
            single_worker(case, args.coordinator, Path(args.out))
        return 0
    cases = [Case(model, args.batch, args.microbatches, args.warmup, args.seconds, args.min_rounds, args.max_rounds)
             for model in args.models.split(",")]
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="asteroid-runtime-") as folder:
        rows = [measure(case, Path(folder)) for case in cases]
    # the ratios move with the machine's load (other users' processes compete for the 2 cores)
    note = (f"Per comparison: {args.warmup} untimed warm-up iterations per runtime, then about "
            f"{args.seconds:.0f} s of rounds; the whole benchmark took {time.perf_counter() - started:.0f} s, "
            f"with a 1-minute load average of {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end.")
    text = report(rows, note)
    if not args.no_write:
        write_section("runtime", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
