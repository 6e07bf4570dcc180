"""`asteroid launch`: N local worker processes that emulate a cluster, around one TCPStore.

The launcher compiles once, serves the rendezvous store, and hands every worker the plan and the
cluster as JSON text through the store (never pickles). Each worker re-runs the compiler with that
plan pinned, checks that its program is byte-for-byte the launcher's, trains its device's share
with the torch_dist backend, and writes its losses and weights into the run folder. A worker that
fails takes the run down: the others are stopped and its error is shown.

With ``RunSpec.recovery`` the run survives devices that die (SIGKILL, a lost machine) or leave: the
program carries backups (paced by their measured cost, or every ``backup_every`` iterations),
every worker runs a heartbeat (asteroid_fx/heartbeat.py), and after an agreed failure the
survivors roll back to the last backed-up iteration, rewrite the program with passes/replay.py
(each computes the same rewrite from the same inputs), build the process groups of a new
membership epoch in place and redo the lost iterations from the same batches: no process
restart, no checkpoint. A failure during a switch to a re-planned program (passes/replan.py) is
recovered too (``Training._switch``). The launcher then treats
a worker killed by a signal as a failed device, not as an error, and reports when it failed, when
the failure was agreed and when training was back where it had been (docs/replay.md, "Live").
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from asteroid_fx.ir.atomic import torch_save
from asteroid_fx.ir.program import Op
from asteroid_fx.ir.program_text import format_program

STORE_TIMEOUT_S = 60.0
JOIN_POLL_S = 0.25  # how often the leader looks for devices asking to join
JOIN_TIMEOUT_S = 600.0  # how long a device that asked to join waits for an answer
MIN_GAIN = 0.05  # a re-plan is switched to when predicted at least this much faster


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
    # iterations between backups (a failure redoes up to this many); None: as few as keep the
    # backups' measured cost within backup_budget of the run's time (``BackupPace``)
    backup_every: int | None = None
    backup_budget: float = 0.02
    # with recovery: after a failure, and when a device asks to join, run the planner in the
    # background and switch to its plan at an iteration boundary when it predicts a gain
    replan: bool = True
    heartbeat_s: float = 0.1  # heartbeat interval
    heartbeat_timeout_s: float = 1.5  # a device silent this long has failed
    # (device, iteration, action index, "kill" | "leave" | "kill-handover"): the device SIGKILLs
    # itself, or leaves announced, just before that action; "kill-handover": before that action of
    # a switch's hand-over before that iteration (-1: the first switch), the count of its actions
    # meaning just before the hand-over commits (for tests and benchmarks)
    faults: tuple[tuple[str, int, int, str], ...] = ()

    def __post_init__(self):
        if self.backup_every is not None and self.backup_every < 1:
            raise ValueError(f"backup_every={self.backup_every}: give a number of iterations (1 or more), or None "
                             "to pace backups by their measured cost")
        if not 0 < self.backup_budget < 1:
            raise ValueError(f"backup_budget={self.backup_budget} is not a fraction of the run's time; give one "
                             "in (0, 1), for example 0.02")

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
                            layers=spec.layers, recovery=spec.recovery)


def _backups_text(spec: RunSpec) -> str:
    if spec.backup_every is None:
        return f"as often as {spec.backup_budget:.0%} of the run's time allows"
    return f"every {spec.backup_every} iteration{'s' if spec.backup_every > 1 else ''}"


class BackupPace:
    """How often to back up when ``backup_every`` is None. A backup adds time to the iteration that
    makes it (the copy's bytes on the links, the holder's wait for them) and some to the next (the
    copy filed, the next receive posted); a failure redoes the iterations since the last backup.
    The leader times every iteration, barrier to barrier, and backs up again once ``every()``
    iterations have passed: the fewest whose backups cost at most ``budget`` of the time,
    ``extra / (every * plain) <= budget``, where ``plain`` is the median time of recent iterations
    neither backing up nor following one, and ``extra`` the median of what recent backups added to
    their iteration and the next (medians: one iteration held up by something else must not move
    the pace). At least ``least`` (plain iterations must go on being measured), at most ``most``
    (what a failure may redo); ``first`` until both are measured."""

    def __init__(self, budget: float, first: int = 10, least: int = 3, most: int = 50):
        self.budget, self.first, self.least, self.most = budget, first, least, most
        self.plain: collections.deque[float] = collections.deque(maxlen=32)
        self.extra: collections.deque[float] = collections.deque(maxlen=8)
        self._backup_s: float | None = None  # the last backup's iteration, until the next one is timed

    def observe(self, seconds: float, kind: str) -> None:
        """One iteration's time; ``kind``: "plain", "backup" (it backed up) or "after" (it followed one)."""
        if kind == "plain":
            self.plain.append(seconds)
        elif kind == "backup":
            self._backup_s = seconds
        elif self._backup_s is not None and len(self.plain) >= 4:
            base = statistics.median(self.plain)
            self.extra.append(self._backup_s + seconds - 2 * base)
            self._backup_s = None

    def every(self) -> int:
        if len(self.plain) < 4 or len(self.extra) < 2:
            return self.first
        base = statistics.median(self.plain)
        extra = max(statistics.median(self.extra), 0.0)
        return min(self.most, max(self.least, math.ceil(extra / (self.budget * base))))


def pinned(spec: RunSpec, plan) -> RunSpec:
    """The spec with the plan's micro-batching, stages, groups, rows and layer bounds fixed."""
    return dataclasses.replace(spec, microbatches=plan.microbatches, schedule=plan.schedule,
                               groups=tuple(st.devices for st in plan.stages),
                               rows=tuple(st.rows for st in plan.stages),
                               layers=tuple([st.layers[0] for st in plan.stages] + [plan.stages[-1].layers[1]]))


def launch(spec: RunSpec, cluster, out: str | os.PathLike, *, timeout_s: float = 300.0, log=print,
           shape_links: bool = False,
           host: str = "127.0.0.1", port: int = 0, remote: Sequence[str] = (),
           kills: Sequence[tuple] = (), joins: Sequence[tuple[str, float]] = ()) -> dict:
    """Run ``spec`` with one process per device: local processes for every device not in
    ``remote``; the ``remote`` ones join with `asteroid worker --coordinator HOST:PORT --device D`
    from their own machines. The store listens on ``host`` only (``serve_store``).
    With ``shape_links`` every local worker runs in a network namespace of its own whose links the
    kernel shapes to the cluster's bandwidths, not latencies (asteroid_fx/netns.py; root only), and
    reaches the store at the namespaces' coordinator address; with ``spec.emulate`` the workers
    then pace only their compute.
    ``kills`` (device, seconds[, signal name]) SIGKILLs (or sends that signal: SIGSTOP freezes it,
    a silent failure only heartbeats find) that local worker so long after the first iteration
    ends: a failure from outside, for tests and benchmarks (``spec.recovery`` survives it).
    ``joins`` (device, seconds): devices of ``cluster`` the first plan leaves out, started as local
    workers that ask to join so long after the first iteration ends (``spec.recovery`` and
    ``spec.replan`` take them in at an iteration boundary with a plan that includes them).
    Returns {"losses", "seconds", "workers", "program" (the one that ran last), "plan",
    "failures" (with ``spec.recovery``: device, reason, iteration, rollback_to, failed_at,
    detected_s, recovery_s), "switches" (plans switched to), "backups" (how many iterations backed
    up, as the device that ran longest counted them) and "backed_up" (which, the last 10000)}."""
    from asteroid_fx.runtime import netns
    from asteroid_fx.runtime.heartbeat import DEAD, beat_key, failure_key, failures_key
    from asteroid_fx.ir.program_text import parse_program

    if shape_links:
        netns.require()  # before compiling: say at once what this machine lacks
        if remote:
            raise ValueError("shaped links are for local workers: leave out the remote devices, whose links are "
                             "real ones")
    joining = [d for d, _ in joins]
    unknown = sorted(set(joining) - set(cluster.names))
    if unknown:
        raise ValueError(f"devices {unknown} cannot join: they are not in the cluster ({', '.join(cluster.names)})")
    if joining and not (spec.recovery and spec.replan):
        raise ValueError("devices can join only a run with recovery and re-planning on (RunSpec.recovery, .replan)")
    compiled = compile_spec(spec, cluster.subset([d for d in cluster.names if d not in joining]) if joining else cluster)
    spec = pinned(spec, compiled.plan)
    devices = compiled.program.devices
    unknown = sorted(set(remote) - set(devices))
    if unknown:
        raise ValueError(f"remote devices {unknown} are not in the plan (its devices: {', '.join(devices)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    network = None
    if shape_links:  # workers reach the store through the namespaces' bridge, at its address here
        network = netns.ShapedNetwork(cluster, cluster.names, dilation=spec.dilation if spec.emulate else 1.0)
        network.open()
        host = network.coordinator
        log(network.describe())
    try:
        store = serve_store(host, port)
    except BaseException:
        if network is not None:
            network.close()
        raise
    store.set("spec", spec.to_json())
    store.set("cluster", json.dumps(cluster.to_json()))  # the whole cluster: devices that join are in it
    store.set("program", format_program(compiled.program))
    log(f"coordinator on {host}:{store.port}; {len(devices)} workers ({', '.join(devices)})"
        + (f"; recovery on (heartbeat timeout {spec.heartbeat_timeout_s:g}s, backups {_backups_text(spec)})"
           if spec.recovery else ""))
    if remote and _is_loopback(host):
        log(f"  the store listens on {host} only: devices on other machines cannot reach it (launch --listen "
            f"0.0.0.0:{store.port}, or an address of this machine they can reach, lets them)")
    for d in remote:
        log(f"  waiting for {d}: asteroid worker --coordinator {host}:{store.port} --device {d} --out DIR")
    procs = []
    finished_run = False

    def start(device: str, *extra: str) -> None:
        cmd = [sys.executable, "-m", "asteroid_fx.cli", "worker", "--coordinator", f"{host}:{store.port}",
               "--device", device, "--out", str(out), *extra]
        err = open(out / f"worker_{device}.log", "w")
        env = None
        if network is not None:  # in the device's namespace, gloo on its interface
            cmd, env = network.command(device, cmd), {**os.environ, **network.env(device)}
        procs.append((device, subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, start_new_session=True,
                                               env=env), err))

    for device in devices:
        if device not in remote:
            start(device)
    pending_joins = sorted(joins, key=lambda j: j[1])
    everyone = (*devices, *joining)
    deadline = time.monotonic() + timeout_s
    pending_kills = sorted(kills, key=lambda k: k[1])
    started_at = None  # when the first iteration ended: the origin of ``kills``
    ended: dict[str, tuple[float, int]] = {}  # device -> (when its process was seen gone, code)
    declared: list[str] = []  # the devices the survivors agreed failed, epoch by epoch
    failed_epochs: set[int] = set()
    try:
        while True:
            finished = {d for d in everyone if store.check([f"result/{d}"])}
            top = int(store.get("ft/epoch")) if spec.recovery and store.check(["ft/epoch"]) else 0
            for k in range(top + 1):  # an epoch ends by a failure or by a switch to a new plan
                if k not in failed_epochs and spec.recovery and store.check([failure_key(k)]):
                    failed_epochs.add(k)
                    declared.append(json.loads(store.get(failure_key(k)).decode())["device"])
                if spec.recovery and store.check([failures_key(k)]):  # devices that failed together
                    together = [r["device"] for r in json.loads(store.get(failures_key(k)).decode())]
                    declared += [d for d in together if d not in declared]
            if finished and finished | set(ended) | set(declared) >= set(everyone):
                break
            if finished and finished | set(ended) | set(declared) >= set(devices):
                for d in joining:  # the run is over: a device still waiting to join is told so
                    if d not in finished and not store.check([f"admit/{d}"]):
                        store.set(f"admit/{d}", json.dumps({"declined": "the run ended before it could be taken in"}))
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
            while pending_joins and started_at is not None and time.monotonic() - started_at >= pending_joins[0][1]:
                device, _ = pending_joins.pop(0)
                log(f"{device} starts and asks to join")
                start(device, "--join")
            if time.monotonic() > deadline:
                missing = [d for d in everyone if d not in finished and d not in ended]
                raise TimeoutError(f"the run did not finish in {timeout_s:.0f}s (no result from {', '.join(missing)}); "
                                   f"worker logs are in {out}/")
            time.sleep(0.02)
        for d, p, _ in procs:
            if d not in declared:  # a device declared failed may still hang (frozen): it is killed below
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finished_run = True
    finally:
        for _, p, err in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            err.close()
        if network is not None and not finished_run:
            network.close()
    try:  # the results are read while the launcher can still reach the store (a shaped run's address)
        results = {d: json.loads(store.get(f"result/{d}").decode()) for d in everyone if store.check([f"result/{d}"])}
        trained = [r for r in results.values() if not r.get("left")]
        if not trained:
            raise RuntimeError(f"no worker finished training; worker logs are in {out}/")
        # every survivor holds the same history, [(first iteration, devices)], since it took part
        ref = max(trained, key=lambda r: (len(r["epochs"]), len(r["recoveries"])))
        history = ref["epochs"]
        final = parse_program(ref["program"])
        losses, seconds = [], []
        for i in range(spec.iterations):
            members = [ds for first, ds in history if first <= i][-1]
            losses.append(sum(float(store.get(f"loss/{d}/{i}")) for d in members))
            seconds.append(max(float(store.get(f"seconds/{d}/{i}")) for d in members))
        failures = []
        for k, event in enumerate(ref["recoveries"]):
            x = event["device"]
            failed_at = (float(store.get(f"ft/killed_at/{x}")) if store.check([f"ft/killed_at/{x}"])
                         else min(ended[x][0], event["declared_at"]) if x in ended else event["declared_at"])
            took_part = [r for r in trained if len(r["recoveries"]) > k]
            resumed = max(r["recoveries"][k]["resumed_at"] for r in took_part)
            failures.append({**{key: event[key] for key in ("device", "reason", "iteration", "rollback_to", "changes")},
                             "also": event.get("also", []),
                             "failed_at": failed_at, "detected_s": event["declared_at"] - failed_at,
                             "regroup_s": max(r["recoveries"][k]["regrouped_at"] for r in took_part) - event["declared_at"],
                             "recovery_s": resumed - failed_at})
            log(f"{', '.join([x, *event.get('also', [])])} failed in iteration {event['iteration'] + 1} ({event['reason']}): agreed after "
                f"{failures[-1]['detected_s']:.2f}s, iteration {event['iteration'] + 1} done again after "
                f"{failures[-1]['recovery_s']:.2f}s (rolled back to the start of iteration {event['rollback_to'] + 1})")
        switches = []
        for event in ref["switches"]:
            done = [s["switched_at"] for r in trained for s in r["switches"]
                    if s["iteration"] == event["iteration"] and "switched_at" in s]
            switches.append({**event, "switch_s": max(done) - event["started_at"] if done else None})
            log(f"switched to a new plan at iteration {event['iteration'] + 1} ({event['reason']})"
                + (f" in {switches[-1]['switch_s'] * 1e3:.0f} ms" if done else ""))
        return {"losses": losses, "seconds": seconds, "workers": results, "program": final, "plan": compiled.plan,
                "failures": failures, "switches": switches, "backups": ref["backups"], "backed_up": ref["backed_up"]}
    finally:
        if network is not None:
            network.close()


def _is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def serve_store(host: str, port: int = 0, timeout_s: float = STORE_TIMEOUT_S):
    """The run's store (a TCPStore server) listening on ``host``:``port`` only (0: a free port).
    Given a host, torch's TCPStore listens on every interface of the machine; it is handed a
    socket bound to ``host`` instead, so a run told to listen on the loopback is not reachable
    from the network."""
    import socket

    import torch.distributed as dist

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}): name an address of this machine and a "
                      "free port (--listen HOST:PORT; port 0 picks one)") from None
    with listener:  # the store takes a duplicate of the socket and closes it when it goes
        return dist.TCPStore(host, listener.getsockname()[1], world_size=None, is_master=True,
                             timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                             master_listen_fd=os.dup(listener.fileno()))


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
               connect_timeout_s: float = STORE_TIMEOUT_S, join: bool = False) -> int:
    """One worker: join, rebuild the program with the launcher's plan, check it, train, report.
    Without --coordinator/--device, torchrun's MASTER_ADDR, MASTER_PORT and RANK are used (the
    rank picks the program's device in order). With ``join`` the device is one of the cluster's
    that the running program does not use: it asks to be taken in, and starts training at the
    iteration boundary where the run switches to a plan that includes it (passes/replan.py)."""
    from asteroid_fx.backends.torch_dist import Interrupted
    from asteroid_fx.ir.cluster import Cluster
    from asteroid_fx.runtime.heartbeat import Heartbeat
    from asteroid_fx.ir.program_text import parse_program

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
    spec = RunSpec.from_json(store.get("spec").decode())
    cluster = Cluster.from_json(json.loads(store.get("cluster").decode()))
    if join:
        if device in devices:
            raise ValueError(f"device {device!r} already runs in this program; --join is for a device that does not")
        if device not in cluster.names:
            raise ValueError(f"device {device!r} is not in the run's cluster (devices: {', '.join(cluster.names)}); "
                             "a device that joins must be described in the cluster the run was launched with")
        if not (spec.recovery and spec.replan):
            raise ValueError("this run does not take devices in: launch it with --recover (and re-planning on)")
    elif device not in devices:
        raise ValueError(f"device {device!r} is not in this run's program (devices: {', '.join(devices)})")
    heartbeat = None
    if spec.recovery:
        heartbeat = Heartbeat(connect(coordinator, connect_timeout_s), device, interval_s=spec.heartbeat_s,
                              timeout_s=spec.heartbeat_timeout_s)
        from asteroid_fx.backends.torch_dist import CAN_CUT, cut_connections

        if CAN_CUT:  # waits blocked on the failed epoch's connections fail at once (Comm.wait_all)
            heartbeat.on_interrupt = lambda: cut_connections(keep_port=store.port)
        heartbeat.start()
    compiled = compile_spec(spec, cluster)
    if format_program(compiled.program) != program_text:
        raise RuntimeError(f"device {device}: the program compiled here differs from the launcher's; "
                           "every process must run the same torch and asteroid_fx versions")
    try:
        training = Training(spec, compiled, store, device, heartbeat, join=join)
        training.run()
        keys = set(compiled.captured.module.state_dict().keys())
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"device": device, "left": training.left,
                  "lag_s": training.worker.lag_s if training.worker is not None else 0.0,
                  "program": format_program(training.full), "epochs": training.epochs,
                  "recoveries": training.recoveries, "switches": training.switches, "backups": training.backups,
                  "backed_up": training.backed_up}
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
    """One device's training loop. With ``spec.recovery`` it runs the program with backups (every
    ``backup_every`` iterations, or as the leader's ``BackupPace`` decides), and after an agreed failure it rewrites the program for the
    survivors, regroups and redoes the lost iterations (the module docstring; docs/replay.md).
    With ``spec.replan`` too, the first device of the program (the "leader") runs the planner in
    the background after a recovery and when a device asks to join, and the run switches to the
    new plan at an iteration boundary (``_switch``; passes/replan.py). ``join``: this device is
    not in the program yet and waits to be taken in."""

    def __init__(self, spec: RunSpec, compiled, store, device: str, heartbeat=None, join: bool = False):
        from asteroid_fx.backends.local import StateCopy
        from asteroid_fx.backends.torch_dist import Comm
        from asteroid_fx.passes.replay import add_backups

        self.spec, self.compiled, self.store, self.device, self.heartbeat = spec, compiled, store, device, heartbeat
        self.plain = compiled.program
        self.full = add_backups(compiled.program) if spec.recovery and len(compiled.program.stages) > 1 else self.plain
        self.epoch, self.base, self.redo = 0, 0, None  # redo: the recovery program's actions, for iteration base
        # the iterations since base that back up (decided at their barrier), and the recent
        # iteration starts every copy exists for ("tags"): where a rollback can return to
        self.backed: set[int] = set()
        self.tags: list[int] = [0]
        self.last_backup = 0
        self.backups = 0  # iterations run with the program's backups (redone ones too)
        self.backed_up: list[int] = []  # which, the last 10000
        self.pace = BackupPace(spec.backup_budget) if spec.recovery and spec.backup_every is None else None
        self._barrier_at: float | None = None  # when the leader left the last barrier
        self.epochs: list[tuple[int, tuple[str, ...]]] = [(0, self.full.devices)]
        self.recoveries: list[dict] = []
        self.switches: list[dict] = []
        self.retired: list = []  # the groups and workers of past epochs
        self.left = False
        self.start = 0  # the first iteration this device runs
        self._planned = None  # (epoch, reason, program, joining): a plan ready to switch to
        self._planning = False  # a background planner is running
        self._joins_seen, self._joins_polled = 0, 0.0
        self._admitted: dict | None = None
        self._replan_after: tuple[int, str] | None = None  # (iteration, reason): re-plan once it is done
        self.comm, self.worker = None, None
        if join:
            self._join()
            return
        self.comm = Comm(store, self.full, device, timeout_s=STORE_TIMEOUT_S,
                         interrupt=heartbeat.interrupt if heartbeat else None,
                         suspect=heartbeat.suspect if heartbeat else None)
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
        return i in self.backed

    def is_tag(self, i: int) -> bool:
        return i == self.base or (i > self.base and self.backs_up(i - 1))

    def tag_at_or_before(self, i: int) -> int:
        return next(t for t in reversed(self.tags) if t <= i)

    def _restart_tags(self, base: int) -> None:
        """A new program runs from ``base`` (a recovery's rollback, a switch): it backs up there."""
        self.base, self.backed, self.tags, self.last_backup, self._barrier_at = base, set(), [base], base, None
        if self.pace is not None:
            self.pace = BackupPace(self.spec.backup_budget)

    def _backup_flag(self, i: int) -> float:
        """On the leader in a paced run: 2.0 if iteration ``i`` is to back up (its barrier carries it)."""
        if self.pace is None or not self.leader or self.full is self.plain:  # no backups to pace
            return 0.0
        now = time.perf_counter()
        if self._barrier_at is not None and i - 1 > self.base:  # the redone iteration is no sample
            kind = "backup" if self.backs_up(i - 1) else "after" if self.backs_up(i - 2) else "plain"
            self.pace.observe(now - self._barrier_at, kind)
        self._barrier_at = now
        return 2.0 if i - self.last_backup >= self.pace.every() else 0.0

    def _decide_backup(self, i: int, flags: float) -> None:
        """After the barrier of iteration ``i``: whether it backs up, the same on every device. A
        program without backups (one stage) needs none: every rollback point is on its device."""
        if self.full is self.plain or i == self.base:
            up = True
        elif self.pace is not None:
            up = flags >= 2.0
        else:
            up = (i - self.base) % self.spec.backup_every == 0
        if up:  # only the last few matter: a failure returns at most two iterations back
            self.backed = {j for j in self.backed if j >= i - 2} | {i}
            self.tags = self.tags[-3:] + [i + 1]
            self.last_backup = i
            if self.full is not self.plain:
                self.backups += 1
                self.backed_up = self.backed_up[-9999:] + [i]

    def run(self) -> None:
        from asteroid_fx.backends.torch_dist import Interrupted

        i, self.completed = self.start, self.start
        while i < self.spec.iterations and not self.left:
            try:
                if self._admitted is not None:  # a device that joins: the switch that takes it in
                    record, self._admitted = self._admitted, None
                    self._switch(i, record)
                    continue
                # the point is taken before the barrier: a failure agreed in the barrier rolls back here
                if self.spec.recovery and self.is_tag(i) and not (self.redo is not None and i == self.base):
                    self.worker.take_point(i)  # a redone iteration keeps the point it rolls back to
                # iterations start together, so their times compare; the leader's flag says that a
                # switch to a new plan is published: every device makes it here, before iteration i
                flags = self.comm.barrier(self._offer(i) + self._backup_flag(i))
                if flags % 2 >= 1:
                    self._switch(i)
                    continue
                if self.spec.recovery:
                    self._decide_backup(i, flags)
                if self.spec.recovery:  # past the barrier every survivor has finished iteration i - 1
                    self.worker.drop_copies_before(self.tag_at_or_before(i))
                actions = self.redo if self.redo is not None and i == self.base else \
                    (self.full if self.backs_up(i) else self.plain).of(self.device)
                inputs, labels = batch_at(self.spec, i)
                started = time.perf_counter()
                loss = self.worker.step(inputs, labels, actions={self.device: actions}, iteration=i)
                took = time.perf_counter() - started
            except Interrupted:
                if self.left:
                    return
                while True:  # another failure while regrouping is recovered from the new program
                    try:
                        i = self._recover()
                        break
                    except Interrupted:
                        continue
                if self.left:
                    return
                continue
            # the loss last: it marks the iteration done (a recovery counts it), and a device killed
            # between the two must not leave a done iteration without its time
            self.store.set(f"seconds/{self.device}/{i}", repr(took))
            self.store.set(f"loss/{self.device}/{i}", repr(loss))
            print(f"[{self.device}] iteration {i + 1}/{self.spec.iterations}: {took * 1e3:.1f} ms", flush=True)
            i += 1
            self.completed = i
            if self.recoveries and "resumed_at" not in self.recoveries[-1] and i > self.recoveries[-1]["iteration"]:
                self.recoveries[-1]["resumed_at"] = time.time()
            if self._replan_after is not None and i > self._replan_after[0]:
                reason, self._replan_after = self._replan_after[1], None
                if self.leader:
                    self._plan_in_background(list(self.full.devices), reason)
            if i == self.base + 1:
                self.redo = None

    # --- re-planning: a better plan for the survivors, or one that takes a new device in -----------

    @property
    def leader(self) -> bool:
        return self.full.devices[0] == self.device

    def _offer(self, i: int) -> float:
        """On the leader at the boundary before iteration ``i``: publish a plan the background
        planner has ready (1.0: switch now), or 0.0. Also notices devices that ask to join."""
        if not (self.spec.recovery and self.spec.replan and self.leader) or self.redo is not None:
            return 0.0
        if time.monotonic() - self._joins_polled > JOIN_POLL_S:  # a store round trip, a few times a second
            self._joins_polled = time.monotonic()
            asked = self.store.add("join/n", 0)
            if asked > self._joins_seen and not self._planning and self._planned is None:
                joining = [self.store.get(f"join/{k}").decode() for k in range(self._joins_seen + 1, asked + 1)]
                self._joins_seen = asked
                self._plan_in_background(list(self.full.devices) + joining, f"{', '.join(joining)} asked to join",
                                         tuple(joining))
        if self._planned is None or self._planned[0] != self.epoch:
            self._planned = None  # planned for a membership that has changed since
            return 0.0
        _, reason, program, joining = self._planned
        self._planned = None
        record = {"epoch": self.epoch + 1, "iteration": i, "reason": reason, "before": format_program(self.full),
                  "after": format_program(program), "joining": list(joining), "history": self.epochs,
                  "joins_seen": self._joins_seen}
        self.store.set(f"switch/{self.epoch}", json.dumps(record))
        for d in joining:
            self.store.set(f"admit/{d}", json.dumps(record))
        return 1.0

    def _plan_in_background(self, devices: list[str], reason: str, joining: tuple[str, ...] = ()) -> None:
        """Run the planner for ``devices`` in a thread; keep its plan if the simulator predicts it
        at least MIN_GAIN faster than the running one (a device that asked to join and is not in
        the plan is told so)."""
        import threading

        from asteroid_fx.passes.replan import replan
        from asteroid_fx.passes.replay import add_backups
        from asteroid_fx.sim import simulate

        epoch, c = self.epoch, self.compiled
        self._planning = True

        def work() -> None:
            verdict = ""
            try:
                started = time.perf_counter()
                _, program = replan(c, devices, planner=self.spec.planner, schedule="1f1b")
                now = simulate(self.plain, c.layer_graph, c.cluster).iteration_s
                new = simulate(program, c.layer_graph, c.cluster).iteration_s
                took = time.perf_counter() - started
                if joining and not set(joining) & set(program.devices):
                    verdict = "the planner's best plan leaves it out (too slow to help)"
                elif new < now * (1 - MIN_GAIN):
                    full = add_backups(program) if len(program.stages) > 1 else program
                    self._planned = (epoch, f"{reason}; re-planned in {took:.2f}s: predicted "
                                     f"{_ms(now)} -> {_ms(new)} per iteration", full, joining)
                else:
                    verdict = f"no gain predicted ({_ms(now)} -> {_ms(new)} per iteration)"
                print(f"[{self.device}] re-plan for {', '.join(devices)}: {verdict or 'switching'}", flush=True)
            except Exception as e:  # a failed re-plan leaves the running program as it is
                verdict = f"re-planning failed: {e}"
                print(f"[{self.device}] {verdict}", flush=True)
            finally:
                for d in joining if verdict else ():
                    self.store.set(f"admit/{d}", json.dumps({"declined": verdict}))
                self._planning = False

        threading.Thread(target=work, name="replan", daemon=True).start()

    def _join(self) -> None:
        """Ask to be taken in and wait for the switch that does (or for the answer that it won't)."""
        k = self.store.add("join/n", 1)
        self.store.set(f"join/{k}", self.device)
        print(f"[{self.device}] asked to join; waiting for a plan that takes it in", flush=True)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not self.store.check([f"admit/{self.device}"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.device} asked to join but was not taken in within {JOIN_TIMEOUT_S:.0f}s: "
                                   "is the run still going, with --recover?")
            time.sleep(0.05)
        record = json.loads(self.store.get(f"admit/{self.device}"))
        if "declined" in record:
            print(f"[{self.device}] not taken in: {record['declined']}", flush=True)
            self.left = True
            return
        self.epoch = record["epoch"] - 1
        self.epochs = [tuple(e) for e in record["history"]]
        self.start = record["iteration"]
        self._admitted = record  # run() starts with the switch that takes this device in

    def _switch(self, i: int, record: dict | None = None) -> None:
        """At the boundary before iteration ``i``, every device of the published switch (the
        running program's and those that join) hands its state over and moves to the new plan;
        a device the new plan leaves out leaves after handing over.

        A device that fails meanwhile: the hand-over commits once every device of it has done its
        part, which an all-reduce over all of them shows. Until then the switch is abandoned (its
        record in the store says which, first come first served, so every device does the same):
        the devices of the running program recover the failure in it, those that were joining
        leave. After, the failure is one in the new program's first iteration (Interrupted reaches
        run(), which recovers it there: the hand-over gave every holder of a backup its copy)."""
        from asteroid_fx.backends.torch_dist import Comm, Interrupted
        from asteroid_fx.passes.replan import switch
        from asteroid_fx.passes.replay import split_stages
        from asteroid_fx.ir.program import Action
        from asteroid_fx.ir.program_text import parse_program

        record = record or json.loads(self.store.get(f"switch/{self.epoch}"))
        sw = switch(parse_program(record["before"]), parse_program(record["after"]), reason=record["reason"])
        after, e, c = sw.after, record["epoch"], self.compiled
        self._joins_seen = record["joins_seen"]  # a new leader must not take the same requests again
        started = time.time()
        interrupt = self.heartbeat.interrupt if self.heartbeat else None
        suspect = self.heartbeat.suspect if self.heartbeat else None
        if self.heartbeat is not None:  # a failure of any device of the hand-over interrupts every one
            self.heartbeat.watch(self.epoch, sw.world)
        event = {"iteration": i, "reason": sw.reason, "devices": list(after.devices), "joining": list(sw.joining),
                 "leaving": list(sw.leaving), "started_at": started}
        self.switches.append(event)
        running_comm, running = self.comm, self.worker
        stages = split_stages(after, c.captured, c.layer_graph) if self.device in after.devices else None
        sender = running
        try:
            handover = Comm(self.store, after, self.device, epoch=e, timeout_s=STORE_TIMEOUT_S, interrupt=interrupt,
                            suspect=suspect, world=sw.world, name="handover")
            self.retired.append((handover,))
            if running is not None:  # a device of the running program: its stage's state at the boundary
                running.take_point(i)
            else:  # a device that joins holds nothing; it receives on a worker of its new stage
                self.comm = handover
                sender = self._worker(after, stages, {})
            sender.comm, sender.fault = handover, self._handover_fault if self.spec.faults else None
            actions = sw.of(self.device)
            sender.step((), None, actions={self.device: actions}, iteration=i)
            if sender.fault is not None:
                sender.fault(i, len(actions))
            handover.barrier()  # completes only once every device of the hand-over has done its part
            outcome = "committed"
        except Interrupted:
            outcome = "abandoned"
        outcome = self.store.compare_set(f"switch/{self.epoch}/outcome", "", outcome).decode()
        if outcome == "abandoned":
            event["abandoned"] = True
            if running is None:
                print(f"[{self.device}] a device failed during the hand-over; the switch is abandoned and this "
                      "device not taken in; leaving", flush=True)
                self.left = True
                return
            print(f"[{self.device}] a device failed during the hand-over before iteration {i}; the switch is "
                  "abandoned, recovering in the running program", flush=True)
            self.comm, self.worker = running_comm, running
            running.comm, running.fault, running.done = running_comm, self._fault if self.spec.faults else None, 0
            raise Interrupted()
        if self.device not in after.devices:
            print(f"[{self.device}] the new plan leaves this device out; leaving after handing over", flush=True)
            self.left = True
            return
        # committed: from here a failure is recovered in the new program, from what the devices hold
        self.epoch = e
        self.store.set("ft/epoch", str(e))
        if self.heartbeat is not None:
            self.heartbeat.watch(e, after.devices)
        self.full, self.plain = after, _without_backups(after)
        self._restart_tags(i)
        self.epochs.append((i, after.devices))
        self.worker, sender.done = sender, 0  # what a recovery needs of a worker until the new one: its copies
        self.comm = Comm(self.store, after, self.device, epoch=e, timeout_s=STORE_TIMEOUT_S, interrupt=interrupt,
                         suspect=suspect)
        self.worker = self._worker(after, stages, sender.copies)
        # the first iteration loads the new stage from what the device holds, then runs the new plan
        self.redo = (Action(Op.ROLLBACK, after.stage_of(self.device).index), *after.of(self.device))
        event["switched_at"] = time.time()
        print(f"[{self.device}] epoch {e}: switched to a new plan ({sw.reason}) at iteration {i}", flush=True)

    def _handover_fault(self, iteration: int, k: int) -> None:
        """A "kill-handover" fault: the device dies before its k-th hand-over action (k = its
        number of actions: before the commit) at the switch before ``iteration`` (-1: any switch)."""
        for device, at, action, kind in self.spec.faults:
            if kind == "kill-handover" and device == self.device and at in (iteration, -1) and action == k:
                self.store.set(f"ft/killed_at/{self.device}", repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)

    def _fault(self, iteration: int, k: int) -> None:
        for device, at, action, kind in self.spec.faults:
            if (device, at, action) != (self.device, iteration, k) or kind == "kill-handover":
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
        from asteroid_fx.runtime.heartbeat import agreed_failure
        from asteroid_fx.passes.replay import Failure, replay, split_stages
        from asteroid_fx.ir.program import Action

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
        prefix = f"ft/{self.epoch}/done"
        self.store.set(f"{prefix}/{self.device}", json.dumps([self.completed, self.worker.done]))
        # every device reports how far it got, or is found failed too (devices can die together)
        records = self.heartbeat.agree_failed(self.full.devices, lambda d: f"{prefix}/{d}",
                                              deadline_s=self.spec.heartbeat_timeout_s * 4 + 10)
        failed = [rec["device"] for rec in records]
        if self.device in failed:  # the others gave this device up (it was silent too long): it cannot rejoin
            print(f"[{self.device}] the others declared this device failed; leaving", flush=True)
            self.left = True
            return self.spec.iterations
        also = failed[1:]
        if also:
            together = ", ".join(f"{rec['device']} ({rec['reason']})" for rec in records[1:])
            print(f"[{self.device}] failed at the same time: {together}", flush=True)
        survivors = [d for d in self.full.devices if d not in failed]
        reports = {d: json.loads(self.store.get(f"{prefix}/{d}")) for d in survivors}
        r = min(done for done, _ in reports.values())  # the iteration some survivor has not finished
        # an iteration counts only once every device published its loss (before its next barrier,
        # so nobody has dropped the copies of an iteration a dead device did not publish)
        while r > self.base and not self.store.check([f"loss/{d}/{r - 1}" for d in failed]):
            r -= 1
        t = self.tag_at_or_before(r)  # the last iteration start every copy exists for
        progress = tuple((d, k if done == r else 0) for d, (done, k) in reports.items())
        c = self.compiled
        lost = [d for d in failed if d in self.full.devices]  # the others were joining (a switch's hand-over)
        if lost:
            rewrite = replay(self.full, Failure(lost[0], r, progress, tuple(lost[1:])), c.layer_graph, c.cluster)
            after, redo, changes = rewrite.after, rewrite.recovery.of(self.device), list(rewrite.changes)
        else:  # the program stays; its groups, which the failure broke, are built again
            after = self.full
            redo = (Action(Op.ROLLBACK, after.stage_of(self.device).index), *after.of(self.device))
            changes = [f"{', '.join(failed)} failed while joining; the program is unchanged"]
        event = {"device": x, "also": also, "reason": record["reason"], "declared_at": record["at"], "iteration": r,
                 "rollback_to": t, "changes": changes}
        self.recoveries.append(event)
        self.epoch += 1
        self.store.set("ft/epoch", str(self.epoch))
        if self.device not in after.devices:  # left out by the rewrite: too slow to help
            print(f"[{self.device}] the rewrite leaves this device out; leaving", flush=True)
            self.left = True
            return self.spec.iterations
        self.heartbeat.watch(self.epoch, after.devices)
        # the new program is this device's before its groups are built: a failure meanwhile (the
        # groups wait for every member) is recovered from it, with the copies the worker holds
        self.full, self.plain = after, _without_backups(after)
        self._restart_tags(t)
        self.redo = redo
        self.epochs.append((t, after.devices))
        self.worker.done = 0
        # the broken groups are kept, never destroyed: gloo's destructor joins threads that may be
        # blocked on the dead peer until the group's timeout
        self.retired.append((self.comm, self.worker))
        self.comm = Comm(self.store, after, self.device, epoch=self.epoch, timeout_s=STORE_TIMEOUT_S,
                         interrupt=self.heartbeat.interrupt, suspect=self.heartbeat.suspect)
        stages = split_stages(after, c.captured, c.layer_graph)
        self.worker = self._worker(after, stages, self.worker.copies)
        event["regrouped_at"] = time.time()
        print(f"[{self.device}] epoch {self.epoch}: {'; '.join(changes)}; redoing from iteration {t}", flush=True)
        # the rewrite is local; the planner may know better. It runs once the interrupted iteration
        # is redone: a planner thread holds the interpreter lock for most of its run, and
        # alongside it the leader's redone iterations were several times slower
        self._replan_after = (r, f"{', '.join(failed)} failed") if self.spec.replan and self.leader else None
        return t


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


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
