"""`asteroid launch`: N local worker processes that emulate a cluster, around one TCPStore.

The launcher compiles once, serves the rendezvous store, and hands every worker the plan and the
cluster as JSON text through the store (never pickles). Each worker re-runs the compiler with that
plan pinned, checks that its program is byte-for-byte the launcher's, trains its device's share
with the torch_dist backend, and writes its losses and weights into the run folder. A worker that
fails takes the run down: the others are stopped and its error is shown.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from asteroid_fx.program_text import format_program

STORE_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What every process needs to build the same program: travels as JSON."""

    model: str  # zoo name, with ":small" for the test configuration
    batch: int
    microbatches: int | None  # None: the planner chooses
    schedule: str = "1f1b"
    iterations: int = 3
    optimizer: str = "sgd"
    lr: float = 0.05
    seed: int = 0
    stages: int | None = None
    groups: tuple[tuple[str, ...], ...] | None = None
    rows: tuple[tuple[int, ...], ...] | None = None
    layers: tuple[int, ...] | None = None
    planner: str = "asteroid"
    emulate: bool = False  # pace every worker like its device in the cluster (backends/torch_dist.Emulation)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        d = json.loads(text)
        for k in ("groups", "rows"):
            if d[k] is not None:
                d[k] = tuple(tuple(x) for x in d[k])
        if d["layers"] is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)


def zoo_entry(model: str):
    from asteroid_fx import models

    name, _, variant = model.partition(":")
    if variant not in ("", "small"):
        raise ValueError(f"model {model!r}: the only variant is ':small'")
    return models.get(name), variant == "small"


def batches(spec: RunSpec) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """The run's synthetic data: the same on every process, iteration by iteration."""
    entry, small = zoo_entry(spec.model)
    for i in range(spec.iterations):
        torch.manual_seed(spec.seed * 100_003 + i + 1)
        yield entry.example(spec.batch, small), entry.labels(spec.batch, small)


def compile_spec(spec: RunSpec, cluster):
    import asteroid_fx as asteroid

    entry, small = zoo_entry(spec.model)
    torch.manual_seed(spec.seed)
    model = entry.build(small=small)
    torch.manual_seed(spec.seed)
    example = entry.example(spec.batch, small)
    return asteroid.compile(model, cluster, example=example, loss=entry.loss, microbatches=spec.microbatches,
                            planner=spec.planner, schedule_kind=spec.schedule, stages=spec.stages, groups=spec.groups, rows=spec.rows,
                            layers=spec.layers)


def pinned(spec: RunSpec, plan) -> RunSpec:
    """The spec with the plan's micro-batching, stages, groups, rows and layer bounds fixed."""
    return dataclasses.replace(spec, microbatches=plan.microbatches, schedule=plan.schedule,
                               groups=tuple(st.devices for st in plan.stages),
                               rows=tuple(st.rows for st in plan.stages),
                               layers=tuple([st.layers[0] for st in plan.stages] + [plan.stages[-1].layers[1]]))


def launch(spec: RunSpec, cluster, out: str | os.PathLike, *, timeout_s: float = 300.0, log=print,
           host: str = "127.0.0.1", port: int = 0, remote: Sequence[str] = ()) -> dict:
    """Run ``spec`` with one process per device: local processes for every device not in
    ``remote``; the ``remote`` ones join with `asteroid worker --coordinator HOST:PORT --device D`
    from their own machines. The store listens on ``host`` (the interface the user names).
    Returns {"losses", "seconds", "workers", "program", "plan"}."""
    import torch.distributed as dist

    compiled = compile_spec(spec, cluster)
    spec = pinned(spec, compiled.plan)
    devices = compiled.program.devices
    unknown = sorted(set(remote) - set(devices))
    if unknown:
        raise ValueError(f"remote devices {unknown} are not in the plan (its devices: {', '.join(devices)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore(host, port, world_size=None, is_master=True,
                          timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False)
    store.set("spec", spec.to_json())
    store.set("cluster", json.dumps(compiled.cluster.to_json()))
    store.set("program", format_program(compiled.program))
    log(f"coordinator on {host}:{store.port}; {len(devices)} workers ({', '.join(devices)})")
    for d in remote:
        log(f"  waiting for {d}: asteroid worker --coordinator {host}:{store.port} --device {d} --out DIR")
    procs = []
    for device in devices:
        if device in remote:
            continue
        cmd = [sys.executable, "-m", "asteroid_fx.cli", "worker", "--coordinator", f"{host}:{store.port}",
               "--device", device, "--out", str(out)]
        err = open(out / f"worker_{device}.log", "w")
        procs.append((device, subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT), err))
    deadline = time.monotonic() + timeout_s
    keys = [f"result/{d}" for d in devices]
    try:
        while not store.check(keys):
            failed = [(d, p) for d, p, _ in procs if p.poll() not in (None, 0)]
            if failed:
                d, p = failed[0]
                raise RuntimeError(f"worker {d} exited with code {p.returncode}:\n{_tail(out / f'worker_{d}.log')}")
            if time.monotonic() > deadline:
                missing = [d for d in devices if not store.check([f"result/{d}"])]
                raise TimeoutError(f"the run did not finish in {timeout_s:.0f}s (no result from {', '.join(missing)}); "
                                   f"worker logs are in {out}/")
            time.sleep(0.05)
        for _, p, _ in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for _, p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    results = {d: json.loads(store.get(f"result/{d}").decode()) for d in devices}
    losses = [sum(r["losses"][i] for r in results.values()) for i in range(spec.iterations)]
    seconds = [max(r["seconds"][i] for r in results.values()) for i in range(spec.iterations)]
    return {"losses": losses, "seconds": seconds, "workers": results, "program": compiled.program,
            "plan": compiled.plan}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def connect(coordinator: str, timeout_s: float = STORE_TIMEOUT_S):
    """A client of the run's store, or a clear error within ``timeout_s``."""
    import torch.distributed as dist

    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator {coordinator!r} is not HOST:PORT")
    try:
        return dist.TCPStore(host, int(port), world_size=None, is_master=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as e:  # c10d raises DistNetworkError (a RuntimeError) on timeout
        raise ConnectionError(f"cannot reach the coordinator at {coordinator} within {timeout_s:.0f}s: is "
                              "`asteroid launch` running there, and is the port open from this machine?") from e


def run_worker(coordinator: str | None, device: str | None, out: str | os.PathLike, *,
               connect_timeout_s: float = STORE_TIMEOUT_S) -> int:
    """One worker: join, rebuild the program with the launcher's plan, check it, train, report.
    Without --coordinator/--device, torchrun's MASTER_ADDR, MASTER_PORT and RANK are used (the
    rank picks the program's device in order)."""
    import torch.distributed as dist

    from asteroid_fx.backends.torch_dist import DistWorker, Emulation
    from asteroid_fx.cluster import Cluster

    torch.set_num_threads(1)
    if coordinator is None:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("give --coordinator HOST:PORT (or set MASTER_ADDR and MASTER_PORT, as torchrun does)")
        coordinator = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    store = connect(coordinator, connect_timeout_s)
    program_text = store.get("program").decode()
    from asteroid_fx.program_text import parse_program

    devices = parse_program(program_text).devices
    if device is None:
        if "RANK" not in os.environ:
            raise ValueError("give --device NAME (or set RANK, as torchrun does)")
        device = devices[int(os.environ["RANK"])]
    if device not in devices:
        raise ValueError(f"device {device!r} is not in this run's program (devices: {', '.join(devices)})")
    rank, world = devices.index(device), len(devices)
    timeout = datetime.timedelta(seconds=STORE_TIMEOUT_S)
    dist.init_process_group("gloo", store=dist.PrefixStore("asteroid", store), rank=rank, world_size=world,
                            timeout=timeout)
    try:
        spec = RunSpec.from_json(store.get("spec").decode())
        cluster = Cluster.from_json(json.loads(store.get("cluster").decode()))
        compiled = compile_spec(spec, cluster)
        if format_program(compiled.program) != program_text:
            raise RuntimeError(f"device {device}: the program compiled here differs from the launcher's; "
                               "every process must run the same torch and asteroid_fx versions")
        names = [n.name for n in compiled.captured.module.graph.nodes if n.op == "placeholder"]
        worker = DistWorker(compiled.program, compiled.stages, device, loss=compiled.loss,
                            unflatten=compiled.captured.unflatten_outputs, input_names=names,
                            optimizer=spec.optimizer, lr=spec.lr,
                            emulation=Emulation(compiled.layer_graph, cluster) if spec.emulate else None)
        losses, seconds = [], []
        for i, (inputs, labels) in enumerate(batches(spec)):
            dist.barrier()  # iterations start together, so their times compare
            started = time.perf_counter()
            losses.append(worker.step(inputs, labels))
            seconds.append(time.perf_counter() - started)
            print(f"[{device}] iteration {i + 1}/{spec.iterations}: {seconds[-1] * 1e3:.1f} ms", flush=True)
        keys = set(compiled.captured.module.state_dict().keys())
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(worker.state_dict(keys), out / f"worker_{device}.pt")
        store.set(f"result/{device}", json.dumps({"device": device, "rank": rank, "losses": losses,
                                                   "seconds": seconds, "lag_s": worker.lag_s}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_weights(out: str | os.PathLike, devices: Sequence[str]) -> dict[str, torch.Tensor]:
    """The trained model's weights from a run folder (each stage's first device)."""
    state: dict[str, torch.Tensor] = {}
    for d in devices:
        for k, v in torch.load(Path(out) / f"worker_{d}.pt", weights_only=True).items():
            state.setdefault(k, v)
    return state
