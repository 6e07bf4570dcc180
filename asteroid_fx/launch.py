"""`asteroid launch`: N local worker processes that emulate a cluster, around one TCPStore.

The launcher compiles once, serves the rendezvous store, and hands every worker the plan and the
cluster as JSON text through the store (never pickles). Each worker re-runs the compiler with that
plan pinned, checks that its program is byte-for-byte the launcher's, trains its device's share
with the torch_dist backend, and writes its losses and weights into the run folder. A worker that
fails takes the run down: the others are stopped and its error is shown.

With ``RunSpec.recovery`` the run survives devices that die (SIGKILL, a lost machine) or leave: the
program carries backups (every ``backup_every`` iterations), every worker runs a heartbeat
(asteroid_fx/heartbeat.py), and after an agreed failure the survivors roll back to the last
backed-up iteration, rewrite the program with passes/replay.py (each computes the same rewrite
from the same inputs), build the process groups of a new membership epoch in place and redo the
lost iterations from the same batches: no process restart, no checkpoint. The launcher then treats
a worker killed by a signal as a failed device, not as an error, and reports when it failed, when
the failure was agreed and when training was back where it had been (docs/replay.md, "Live").
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from asteroid_fx.atomic import torch_save
from asteroid_fx.program import Op
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
    dilation: float = 1.0  # with emulate: every emulated duration this many times longer
    recovery: bool = False  # survive failed and departing devices by pipeline replay
    backup_every: int = 1  # iterations between backups (a failure redoes up to this many)
    heartbeat_s: float = 0.1  # heartbeat interval
    heartbeat_timeout_s: float = 1.5  # a device silent this long has failed
    # (device, iteration, action index, "kill" | "leave"): the device SIGKILLs itself, or leaves
    # announced, just before that action (for tests and benchmarks)
    faults: tuple[tuple[str, int, int, str], ...] = ()

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
        d["faults"] = tuple(tuple(f) for f in d.get("faults", ()))
        return cls(**d)


def zoo_entry(model: str):
    from asteroid_fx import models

    name, _, variant = model.partition(":")
    if variant not in ("", "small"):
        raise ValueError(f"model {model!r}: the only variant is ':small'")
    return models.get(name), variant == "small"


def batches(spec: RunSpec) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """The run's synthetic data: the same on every process, iteration by iteration."""
    for i in range(spec.iterations):
        yield batch_at(spec, i)


def batch_at(spec: RunSpec, i: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Iteration ``i``'s batch (a recovery redoes iterations from the same batches)."""
    entry, small = zoo_entry(spec.model)
    torch.manual_seed(spec.seed * 100_003 + i + 1)
    return entry.example(spec.batch, small), entry.labels(spec.batch, small)


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
           shape_links: bool = False,
           host: str = "127.0.0.1", port: int = 0, remote: Sequence[str] = (),
           kills: Sequence[tuple] = ()) -> dict:
    """Run ``spec`` with one process per device: local processes for every device not in
    ``remote``; the ``remote`` ones join with `asteroid worker --coordinator HOST:PORT --device D`
    from their own machines. The store listens on ``host`` (the interface the user names).
    With ``shape_links`` every local worker runs in a network namespace of its own whose links the
    kernel shapes to the cluster's bandwidths, not latencies (asteroid_fx/netns.py; root only), and
    reaches the store at the namespaces' coordinator address; with ``spec.emulate`` the workers
    then pace only their compute.
    ``kills`` (device, seconds[, signal name]) SIGKILLs (or sends that signal: SIGSTOP freezes it,
    a silent failure only heartbeats find) that local worker so long after the first iteration
    ends: a failure from outside, for tests and benchmarks (``spec.recovery`` survives it).
    Returns {"losses", "seconds", "workers", "program" (the one that ran last), "plan",
    "failures" (with ``spec.recovery``: device, reason, iteration, rollback_to, failed_at,
    detected_s, recovery_s)}."""
    import torch.distributed as dist

    from asteroid_fx import netns
    from asteroid_fx.heartbeat import DEAD, beat_key, failure_key
    from asteroid_fx.program_text import parse_program

    if shape_links:
        netns.require()  # before compiling: say at once what this machine lacks
        if remote:
            raise ValueError("shaped links are for local workers: leave out the remote devices, whose links are "
                             "real ones")
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
    network = None
    if shape_links:  # the store listens on every interface: workers reach it through the namespaces' bridge
        network = netns.ShapedNetwork(cluster, cluster.names, dilation=spec.dilation if spec.emulate else 1.0)
        network.open()
        host = network.coordinator
        log(network.describe())
    store.set("spec", spec.to_json())
    store.set("cluster", json.dumps(compiled.cluster.to_json()))
    store.set("program", format_program(compiled.program))
    log(f"coordinator on {host}:{store.port}; {len(devices)} workers ({', '.join(devices)})"
        + (f"; recovery on (heartbeat timeout {spec.heartbeat_timeout_s:g}s, backups every "
           f"{spec.backup_every} iteration{'s' if spec.backup_every > 1 else ''})" if spec.recovery else ""))
    for d in remote:
        log(f"  waiting for {d}: asteroid worker --coordinator {host}:{store.port} --device {d} --out DIR")
    procs = []
    for device in devices:
        if device in remote:
            continue
        cmd = [sys.executable, "-m", "asteroid_fx.cli", "worker", "--coordinator", f"{host}:{store.port}",
               "--device", device, "--out", str(out)]
        err = open(out / f"worker_{device}.log", "w")
        env = None
        if network is not None:  # in the device's namespace, gloo on its interface
            cmd, env = network.command(device, cmd), {**os.environ, **network.env(device)}
        procs.append((device, subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, start_new_session=True,
                                               env=env), err))
    deadline = time.monotonic() + timeout_s
    pending_kills = sorted(kills, key=lambda k: k[1])
    started_at = None  # when the first iteration ended: the origin of ``kills``
    ended: dict[str, tuple[float, int]] = {}  # device -> (when its process was seen gone, code)
    declared: list[str] = []  # the devices the survivors agreed failed, epoch by epoch
    try:
        while True:
            finished = {d for d in devices if store.check([f"result/{d}"])}
            while spec.recovery and store.check([failure_key(len(declared))]):
                declared.append(json.loads(store.get(failure_key(len(declared))).decode())["device"])
            if finished and finished | set(ended) | set(declared) >= set(devices):
                break
            for d, p, _ in procs:
                if d in ended or p.poll() is None:
                    continue
                ended[d] = (time.time(), p.returncode)
                if p.returncode > 0 or (p.returncode < 0 and not spec.recovery):
                    raise RuntimeError(f"worker {d} exited with code {p.returncode}:\n{_tail(out / f'worker_{d}.log')}")
                if p.returncode < 0:  # killed: a failed device, which the survivors replace
                    store.set(beat_key(d), DEAD)
                    log(f"worker {d} ended by signal {-p.returncode}; the survivors recover")
            if started_at is None and store.check([f"loss/{devices[0]}/0"]):
                started_at = time.monotonic()
            while pending_kills and started_at is not None and time.monotonic() - started_at >= pending_kills[0][1]:
                victim, _, *how = pending_kills.pop(0)
                for d, p, _ in procs:
                    if d == victim and p.poll() is None:
                        store.set(f"ft/killed_at/{d}", repr(time.time()))
                        os.killpg(p.pid, getattr(signal, how[0] if how else "SIGKILL"))
            if time.monotonic() > deadline:
                missing = [d for d in devices if d not in finished and d not in ended]
                raise TimeoutError(f"the run did not finish in {timeout_s:.0f}s (no result from {', '.join(missing)}); "
                                   f"worker logs are in {out}/")
            time.sleep(0.02)
        for d, p, _ in procs:
            if d not in declared:  # a device declared failed may still hang (frozen): it is killed below
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for _, p, err in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            err.close()
        if network is not None:
            network.close()
    results = {d: json.loads(store.get(f"result/{d}").decode()) for d in devices if store.check([f"result/{d}"])}
    trained = [r for r in results.values() if not r.get("left")]
    if not trained:
        raise RuntimeError(f"no worker finished training; worker logs are in {out}/")
    history = trained[0]["epochs"]  # every survivor holds the same: [(first iteration, devices)]
    final = parse_program(trained[0]["program"])
    losses, seconds = [], []
    for i in range(spec.iterations):
        members = [ds for first, ds in history if first <= i][-1]
        losses.append(sum(float(store.get(f"loss/{d}/{i}")) for d in members))
        seconds.append(max(float(store.get(f"seconds/{d}/{i}")) for d in members))
    failures = []
    for k, event in enumerate(trained[0]["recoveries"]):
        x = event["device"]
        failed_at = (float(store.get(f"ft/killed_at/{x}")) if store.check([f"ft/killed_at/{x}"])
                     else min(ended[x][0], event["declared_at"]) if x in ended else event["declared_at"])
        resumed = max(r["recoveries"][k]["resumed_at"] for r in trained)
        failures.append({**{key: event[key] for key in ("device", "reason", "iteration", "rollback_to", "changes")},
                         "failed_at": failed_at, "detected_s": event["declared_at"] - failed_at,
                         "regroup_s": max(r["recoveries"][k]["regrouped_at"] for r in trained) - event["declared_at"],
                         "recovery_s": resumed - failed_at})
        log(f"{x} failed in iteration {event['iteration'] + 1} ({event['reason']}): agreed after "
            f"{failures[-1]['detected_s']:.2f}s, iteration {event['iteration'] + 1} done again after "
            f"{failures[-1]['recovery_s']:.2f}s (rolled back to the start of iteration {event['rollback_to'] + 1})")
    return {"losses": losses, "seconds": seconds, "workers": results, "program": final, "plan": compiled.plan,
            "failures": failures}


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
    from asteroid_fx.backends.torch_dist import Interrupted
    from asteroid_fx.cluster import Cluster
    from asteroid_fx.heartbeat import Heartbeat
    from asteroid_fx.program_text import parse_program

    torch.set_num_threads(1)
    if coordinator is None:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("give --coordinator HOST:PORT (or set MASTER_ADDR and MASTER_PORT, as torchrun does)")
        coordinator = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    store = connect(coordinator, connect_timeout_s)
    program_text = store.get("program").decode()
    devices = parse_program(program_text).devices
    if device is None:
        if "RANK" not in os.environ:
            raise ValueError("give --device NAME (or set RANK, as torchrun does)")
        device = devices[int(os.environ["RANK"])]
    if device not in devices:
        raise ValueError(f"device {device!r} is not in this run's program (devices: {', '.join(devices)})")
    spec = RunSpec.from_json(store.get("spec").decode())
    heartbeat = None
    if spec.recovery:
        heartbeat = Heartbeat(connect(coordinator, connect_timeout_s), device, interval_s=spec.heartbeat_s,
                              timeout_s=spec.heartbeat_timeout_s)
        heartbeat.start()
    cluster = Cluster.from_json(json.loads(store.get("cluster").decode()))
    compiled = compile_spec(spec, cluster)
    if format_program(compiled.program) != program_text:
        raise RuntimeError(f"device {device}: the program compiled here differs from the launcher's; "
                           "every process must run the same torch and asteroid_fx versions")
    try:
        training = Training(spec, compiled, store, device, heartbeat)
        training.run()
        keys = set(compiled.captured.module.state_dict().keys())
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"device": device, "rank": devices.index(device), "left": training.left,
                  "lag_s": training.worker.lag_s, "program": format_program(training.full),
                  "epochs": training.epochs, "recoveries": training.recoveries}
        if not training.left:
            _atomic_torch_save(training.worker.state_dict(keys), out / f"worker_{device}.pt")
        store.set(f"result/{device}", json.dumps(result))
        if not training.left:
            try:
                training.comm.barrier()  # nobody leaves while a peer may still wait on its messages
            except Interrupted:
                pass  # a device failed after the last iteration: nothing is left to recover
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    if spec.recovery:
        # waits abandoned in a failure stay blocked in gloo, and tearing down groups with a dead
        # member can abort the interpreter at exit; the results are written, so leave at once
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


class Training:
    """One device's training loop. With ``spec.recovery`` it runs the program with backups every
    ``backup_every`` iterations, and after an agreed failure it rewrites the program for the
    survivors, regroups and redoes the lost iterations (the module docstring; docs/replay.md)."""

    def __init__(self, spec: RunSpec, compiled, store, device: str, heartbeat=None):
        from asteroid_fx.backends.local import StateCopy
        from asteroid_fx.backends.torch_dist import Comm
        from asteroid_fx.passes.replay import add_backups

        self.spec, self.compiled, self.store, self.device, self.heartbeat = spec, compiled, store, device, heartbeat
        self.plain = compiled.program
        self.full = add_backups(compiled.program) if spec.recovery and len(compiled.program.stages) > 1 else self.plain
        self.epoch, self.base, self.redo = 0, 0, None  # redo: the recovery program's actions, for iteration base
        self.epochs: list[tuple[int, tuple[str, ...]]] = [(0, self.full.devices)]
        self.recoveries: list[dict] = []
        self.retired: list = []  # the groups and workers of past epochs
        self.left = False
        self.comm = Comm(store, self.full, device, timeout_s=STORE_TIMEOUT_S,
                         interrupt=heartbeat.interrupt if heartbeat else None)
        if heartbeat is not None:
            heartbeat.watch(0, self.full.devices)
        self.worker = self._worker(self.full, compiled.stages, {})
        for a in self.full.of(device):  # a holder starts out holding the initial state of what it backs up
            if a.op == Op.RESTORE:
                self.worker.copies.setdefault(0, StateCopy()).update(StateCopy.of(compiled.stages[a.stage].module, None))

    def _worker(self, program, stages, copies):
        from asteroid_fx.backends.torch_dist import DistWorker, Emulation

        c = self.compiled
        return DistWorker(program, stages, self.device, loss=c.loss, unflatten=c.captured.unflatten_outputs,
                          input_names=[n.name for n in c.captured.module.graph.nodes if n.op == "placeholder"],
                          optimizer=self.spec.optimizer, lr=self.spec.lr, comm=self.comm, copies=copies,
                          emulation=Emulation(c.layer_graph, c.cluster, self.spec.dilation) if self.spec.emulate else None,
                          fault=self._fault if self.spec.faults else None)

    # which iterations back up, and which iteration starts a rollback can return to (a "tag")
    def backs_up(self, i: int) -> bool:
        return self.full is not self.plain and (i - self.base) % self.spec.backup_every == 0

    def is_tag(self, i: int) -> bool:
        return i == self.base or (i > self.base and self.backs_up(i - 1))

    def tag_at_or_before(self, i: int) -> int:
        return max(t for t in range(self.base, i + 1) if self.is_tag(t))

    def run(self) -> None:
        from asteroid_fx.backends.torch_dist import Interrupted

        i, self.completed = 0, 0
        while i < self.spec.iterations:
            try:
                # the point is taken before the barrier: a failure agreed in the barrier rolls back here
                if self.spec.recovery and self.is_tag(i) and not (self.redo is not None and i == self.base):
                    self.worker.take_point(i)  # a redone iteration keeps the point it rolls back to
                self.comm.barrier()  # iterations start together, so their times compare
                if self.spec.recovery:  # past the barrier every survivor has finished iteration i - 1
                    self.worker.drop_copies_before(self.tag_at_or_before(i))
                actions = self.redo if self.redo is not None and i == self.base else \
                    (self.full if self.backs_up(i) else self.plain).of(self.device)
                inputs, labels = batch_at(self.spec, i)
                started = time.perf_counter()
                loss = self.worker.step(inputs, labels, actions=actions, iteration=i)
                took = time.perf_counter() - started
            except Interrupted:
                if self.left:
                    return
                i = self._recover()
                if self.left:
                    return
                continue
            self.store.set(f"loss/{self.device}/{i}", repr(loss))
            self.store.set(f"seconds/{self.device}/{i}", repr(took))
            print(f"[{self.device}] iteration {i + 1}/{self.spec.iterations}: {took * 1e3:.1f} ms", flush=True)
            i += 1
            self.completed = i
            if self.recoveries and "resumed_at" not in self.recoveries[-1] and i > self.recoveries[-1]["iteration"]:
                self.recoveries[-1]["resumed_at"] = time.time()
            if i == self.base + 1:
                self.redo = None

    def _fault(self, iteration: int, k: int) -> None:
        for device, at, action, kind in self.spec.faults:
            if (device, at, action) != (self.device, iteration, k):
                continue
            if kind == "leave":
                print(f"[{self.device}] leaving in iteration {iteration} before action {k}", flush=True)
                self.left = True
                self.heartbeat.leave()
                from asteroid_fx.backends.torch_dist import Interrupted

                raise Interrupted()
            self.store.set(f"ft/killed_at/{self.device}", repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    def _recover(self) -> int:
        """Agree on the failure and the iteration to return to, rewrite, regroup; returns the
        iteration to run next."""
        from asteroid_fx.backends.torch_dist import Comm
        from asteroid_fx.heartbeat import agreed_failure
        from asteroid_fx.passes.replay import Failure, replay, split_stages

        if self.heartbeat is None:
            raise RuntimeError("interrupted without recovery")
        record = agreed_failure(self.store, self.epoch)
        x = record["device"]
        if x == self.device:  # declared failed by the others (it fell silent): it cannot rejoin
            print(f"[{self.device}] the others declared this device failed ({record['reason']}); leaving", flush=True)
            self.left = True
            return self.spec.iterations
        print(f"[{self.device}] {x} failed ({record['reason']}) during iteration {self.completed}; recovering",
              flush=True)
        survivors = [d for d in self.full.devices if d != x]
        prefix = f"ft/{self.epoch}/done"
        self.store.set(f"{prefix}/{self.device}", json.dumps([self.completed, self.worker.done]))
        self.store.wait([f"{prefix}/{d}" for d in survivors],
                        datetime.timedelta(seconds=self.spec.heartbeat_timeout_s * 4 + 10))
        reports = {d: json.loads(self.store.get(f"{prefix}/{d}")) for d in survivors}
        r = min(done for done, _ in reports.values())  # the iteration some survivor has not finished
        # an iteration counts only once every device published its loss (before its next barrier,
        # so nobody has dropped the copies of an iteration the dead device did not publish)
        while r > self.base and not self.store.check([f"loss/{x}/{r - 1}"]):
            r -= 1
        t = self.tag_at_or_before(r)  # the last iteration start every copy exists for
        progress = tuple((d, k if done == r else 0) for d, (done, k) in reports.items())
        c = self.compiled
        rewrite = replay(self.full, Failure(x, r, progress), c.layer_graph, c.cluster)
        after = rewrite.after
        event = {"device": x, "reason": record["reason"], "declared_at": record["at"], "iteration": r,
                 "rollback_to": t, "changes": list(rewrite.changes)}
        self.recoveries.append(event)
        self.epoch += 1
        if self.device not in after.devices:  # left out by the rewrite: too slow to help
            print(f"[{self.device}] the rewrite leaves this device out; leaving", flush=True)
            self.left = True
            return self.spec.iterations
        self.heartbeat.watch(self.epoch, after.devices)
        # the broken groups are kept, never destroyed: gloo's destructor joins threads that may be
        # blocked on the dead peer until the group's timeout
        self.retired.append((self.comm, self.worker))
        self.comm = Comm(self.store, after, self.device, epoch=self.epoch, timeout_s=STORE_TIMEOUT_S,
                         interrupt=self.heartbeat.interrupt)
        stages = split_stages(after, c.captured, c.layer_graph)
        self.worker = self._worker(after, stages, self.worker.copies)
        self.full, self.plain = after, _without_backups(after)
        self.base, self.redo = t, rewrite.recovery.of(self.device)
        self.epochs.append((t, after.devices))
        event["regrouped_at"] = time.time()
        print(f"[{self.device}] epoch {self.epoch}: {'; '.join(rewrite.changes)}; redoing from iteration {t}",
              flush=True)
        return t


def _without_backups(program):
    return dataclasses.replace(program, actions=tuple(
        (d, tuple(a for a in acts if a.op not in (Op.BACKUP, Op.RESTORE))) for d, acts in program.actions))


def _atomic_torch_save(obj, path: Path) -> None:
    torch_save(obj, path)


def load_weights(out: str | os.PathLike, devices: Sequence[str]) -> dict[str, torch.Tensor]:
    """The trained model's weights from a run folder (each stage's first device)."""
    state: dict[str, torch.Tensor] = {}
    for d in devices:
        for k, v in torch.load(Path(out) / f"worker_{d}.pt", weights_only=True).items():
            state.setdefault(k, v)
    return state
