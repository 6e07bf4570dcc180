"""`asteroid launch`: N local worker processes that emulate a cluster, around one TCPStore.

The launcher compiles once, serves the rendezvous store, and hands every worker the plan and the
cluster as JSON text through the store (never pickles; the cluster's JSON carries the figures
of a measured kind such as host-cpu, so no worker measures its own); each worker
(runtime/worker.py) checks that it compiles the same program, trains its device's share and
reports. A worker that fails
takes the run down: the others are stopped and its error is shown.

With ``RunSpec.recovery`` the run survives devices that die (SIGKILL, a lost machine) or leave
(runtime/recovery.py), and switches to re-planned programs (runtime/switch.py). The launcher then
treats a worker killed by a signal as a failed device, not as an error, and reports when it
failed, when the failure was agreed and when training was back where it had been (docs/replay.md,
"Live").
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program_text import format_program, parse_program
from asteroid_fx.runtime import netns
from asteroid_fx.runtime.errors import RunFailed, RunTimedOut
from asteroid_fx.runtime.spec import RunSpec, compile_spec, log_path, pinned, weights_path
from asteroid_fx.runtime.store import (CLUSTER, DEAD, PROGRAM, SPEC, admit_key, beat_key, epoch_of, failure_key,
                                       failures_key, get_float, get_json, has, killed_at_key, loss_key, result_key,
                                       seconds_key, serve_store)

log = logging.getLogger(__name__)


class _Report:
    """Where the launcher's messages go: this module's logger, or the caller's ``log`` callable
    (which then gets every message, whatever its level)."""

    def __init__(self, to: Callable[[str], None] | None):
        self.to = to

    def info(self, message: str) -> None:
        (self.to or log.info)(message)

    def warning(self, message: str) -> None:
        (self.to or log.warning)(message)


def launch(spec: RunSpec, cluster, out: str | os.PathLike, *, timeout_s: float = 300.0,
           log: Callable[[str], None] | None = None, shape_links: bool = False,
           host: str = "127.0.0.1", port: int = 0, remote: Sequence[str] = (),
           kills: Sequence[tuple] = (), joins: Sequence[tuple[str, float]] = ()) -> dict:
    """Run ``spec`` with one process per device: local processes for every device not in
    ``remote``; the ``remote`` ones join with `asteroid worker --coordinator HOST:PORT --device D`
    from their own machines. The store listens on ``host`` only (``serve_store``).
    With ``shape_links`` every local worker runs in a network namespace of its own whose links the
    kernel shapes to the cluster's bandwidths, not latencies (runtime/netns.py; root only), and
    reaches the store at the namespaces' coordinator address; with ``spec.emulate`` the workers
    then pace only their compute.
    ``kills`` (device, seconds[, signal name]) SIGKILLs (or sends that signal: SIGSTOP freezes it,
    a silent failure only heartbeats find) that local worker so long after the first iteration
    ends: a failure from outside, for tests and benchmarks (``spec.recovery`` survives it).
    ``joins`` (device, seconds): devices of ``cluster`` the first plan leaves out, started as local
    workers that ask to join so long after the first iteration ends (``spec.recovery`` and
    ``spec.replan`` take them in at an iteration boundary with a plan that includes them).
    ``log``: where the launcher's progress messages go instead of this module's logger (INFO,
    WARNING for failures); workers write theirs to ``worker_<device>.log`` in ``out``.
    Returns {"losses", "seconds", "workers", "program" (the one that ran last), "plan",
    "failures" (with ``spec.recovery``: device, reason, iteration, rollback_to, failed_at,
    detected_s, recovery_s), "switches" (plans switched to), "backups" (how many iterations backed
    up, as the device that ran longest counted them) and "backed_up" (which, the last 10000)}."""
    report = _Report(log)
    if shape_links:
        netns.require()  # before compiling: say at once what this machine lacks
        if remote:
            raise InputError("shaped links are for local workers: leave out the remote devices, whose links are "
                             "real ones")
    joining = [d for d, _ in joins]
    unknown = sorted(set(joining) - set(cluster.names))
    if unknown:
        raise InputError(f"devices {unknown} cannot join: they are not in the cluster ({', '.join(cluster.names)})")
    if joining and not (spec.recovery and spec.replan):
        raise InputError("devices can join only a run with recovery and re-planning on (RunSpec.recovery, .replan)")
    compiled = compile_spec(spec, cluster.subset([d for d in cluster.names if d not in joining]) if joining else cluster)
    spec = pinned(spec, compiled.plan)
    devices = compiled.program.devices
    unknown = sorted(set(remote) - set(devices))
    if unknown:
        raise InputError(f"remote devices {unknown} are not in the plan (its devices: {', '.join(devices)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    network = None
    if shape_links:  # workers reach the store through the namespaces' bridge, at its address here
        network = netns.ShapedNetwork(cluster, cluster.names, dilation=spec.dilation if spec.emulate else 1.0)
        network.open()
        host = network.coordinator
        report.info(network.describe())
    try:
        store = serve_store(host, port)
    except BaseException:
        if network is not None:
            network.close()
        raise
    store.set(SPEC, spec.to_json())
    store.set(CLUSTER, json.dumps(cluster.to_json()))  # the whole cluster: devices that join are in it
    store.set(PROGRAM, format_program(compiled.program))
    report.info(f"coordinator on {host}:{store.port}; {len(devices)} workers ({', '.join(devices)})"
                + (f"; recovery on (heartbeat timeout {spec.heartbeat_timeout_s:g}s, backups {spec.backups_text()})"
                   if spec.recovery else ""))
    if remote and _is_loopback(host):
        report.warning(f"  the store listens on {host} only: devices on other machines cannot reach it (launch "
                       f"--listen 0.0.0.0:{store.port}, or an address of this machine they can reach, lets them)")
    for d in remote:
        report.info(f"  waiting for {d}: asteroid worker --coordinator {host}:{store.port} --device {d} --out DIR")
    workers = _Workers(f"{host}:{store.port}", out, network)
    finished_run = False
    try:
        for device in devices:
            if device not in remote:
                workers.start(device)
        deadline = time.monotonic() + timeout_s
        ended, declared = _supervise(spec, store, workers, devices, joining, kills, joins, deadline, timeout_s, out,
                                     report)
        for d, p in workers.procs.items():
            if d not in declared:  # a device declared failed may still hang (frozen): it is killed below
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finished_run = True
    finally:
        workers.stop()
        if network is not None and not finished_run:
            network.close()
    try:  # the results are read while the launcher can still reach the store (a shaped run's address)
        return _results(spec, store, compiled, (*devices, *joining), ended, out, report)
    finally:
        if network is not None:
            network.close()


class _Workers:
    """The local worker processes, each in a session of its own (a kill takes its children too),
    its output in ``worker_<device>.log``."""

    def __init__(self, coordinator: str, out: Path, network):
        self.coordinator, self.out, self.network = coordinator, out, network
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def start(self, device: str, *extra: str) -> None:
        cmd = [sys.executable, "-m", "asteroid_fx.cli", "worker", "--coordinator", self.coordinator,
               "--device", device, "--out", str(self.out), *extra]
        err = open(log_path(self.out, device), "w")
        self._logs.append(err)
        env = None
        if self.network is not None:  # in the device's namespace, gloo on its interface
            cmd, env = self.network.command(device, cmd), {**os.environ, **self.network.env(device)}
        self.procs[device] = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, start_new_session=True,
                                              env=env)

    def signal(self, device: str, signum: int) -> bool:
        """Send ``signum`` to ``device``'s process group if it still runs; whether it did."""
        p = self.procs.get(device)
        if p is None or p.poll() is not None:
            return False
        os.killpg(p.pid, signum)
        return True

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for err in self._logs:
            err.close()


def _supervise(spec: RunSpec, store, workers: _Workers, devices: Sequence[str], joining: Sequence[str],
               kills: Sequence[tuple], joins: Sequence[tuple[str, float]], deadline: float, timeout_s: float,
               out: Path, report: _Report) -> tuple[dict[str, tuple[float, int]], list[str]]:
    """Watch the run until every device has a result, ended or was declared failed; fire the
    ``kills`` and start the ``joins`` on time. Returns {device: (when its process was seen gone,
    its exit code)} and the devices the survivors agreed failed, epoch by epoch."""
    everyone = (*devices, *joining)
    pending_joins = sorted(joins, key=lambda j: j[1])
    pending_kills = sorted(kills, key=lambda k: k[1])
    started_at = None  # when the first iteration ended: the origin of ``kills``
    ended: dict[str, tuple[float, int]] = {}
    declared: list[str] = []
    failed_epochs: set[int] = set()
    while True:
        finished = {d for d in everyone if has(store, result_key(d))}
        top = epoch_of(store) if spec.recovery else 0
        for k in range(top + 1):  # an epoch ends by a failure or by a switch to a new plan
            if k not in failed_epochs and spec.recovery and has(store, failure_key(k)):
                failed_epochs.add(k)
                declared.append(get_json(store, failure_key(k))["device"])
            if spec.recovery and has(store, failures_key(k)):  # devices that failed together
                together = [r["device"] for r in get_json(store, failures_key(k))]
                declared += [d for d in together if d not in declared]
        if finished and finished | set(ended) | set(declared) >= set(everyone):
            break
        if finished and finished | set(ended) | set(declared) >= set(devices):
            for d in joining:  # the run is over: a device still waiting to join is told so
                if d not in finished and not has(store, admit_key(d)):
                    store.set(admit_key(d), json.dumps({"declined": "the run ended before it could be taken in"}))
        for d, p in workers.procs.items():
            if d in ended or p.poll() is None:
                continue
            ended[d] = (time.time(), p.returncode)
            if p.returncode > 0 or (p.returncode < 0 and not spec.recovery):
                raise RunFailed(f"worker {d} exited with code {p.returncode}:\n{_tail(log_path(out, d))}")
            if p.returncode < 0:  # killed: a failed device, which the survivors replace
                store.set(beat_key(d), DEAD)
                report.warning(f"worker {d} ended by signal {-p.returncode}; the survivors recover")
        if started_at is None and has(store, loss_key(devices[0], 0)):
            started_at = time.monotonic()
        while pending_kills and started_at is not None and time.monotonic() - started_at >= pending_kills[0][1]:
            victim, _, *how = pending_kills.pop(0)
            if victim in workers.procs and workers.procs[victim].poll() is None:
                store.set(killed_at_key(victim), repr(time.time()))
                workers.signal(victim, getattr(signal, how[0] if how else "SIGKILL"))
        while pending_joins and started_at is not None and time.monotonic() - started_at >= pending_joins[0][1]:
            device, _ = pending_joins.pop(0)
            report.info(f"{device} starts and asks to join")
            workers.start(device, "--join")
        if time.monotonic() > deadline:
            missing = [d for d in everyone if d not in finished and d not in ended]
            raise RunTimedOut(f"the run did not finish in {timeout_s:.0f}s (no result from {', '.join(missing)}); "
                              f"worker logs are in {out}/")
        time.sleep(0.02)
    return ended, declared


def _results(spec: RunSpec, store, compiled, everyone: Sequence[str], ended: dict[str, tuple[float, int]],
             out: Path, report: _Report) -> dict:
    """The run's losses, times, failures and switches, from the store and the workers' results."""
    results = {d: get_json(store, result_key(d)) for d in everyone if has(store, result_key(d))}
    trained = [r for r in results.values() if not r.get("left")]
    if not trained:
        raise RunFailed(f"no worker finished training; worker logs are in {out}/")
    # every survivor holds the same history, [(first iteration, devices)], since it took part
    ref = max(trained, key=lambda r: (len(r["epochs"]), len(r["recoveries"])))
    history = ref["epochs"]
    final = parse_program(ref["program"])
    losses, seconds = [], []
    for i in range(spec.iterations):
        members = [ds for first, ds in history if first <= i][-1]
        losses.append(sum(get_float(store, loss_key(d, i)) for d in members))
        seconds.append(max(get_float(store, seconds_key(d, i)) for d in members))
    failures = []
    for k, event in enumerate(ref["recoveries"]):
        x = event["device"]
        failed_at = (get_float(store, killed_at_key(x)) if has(store, killed_at_key(x))
                     else min(ended[x][0], event["declared_at"]) if x in ended else event["declared_at"])
        took_part = [r for r in trained if len(r["recoveries"]) > k]
        resumed = max(r["recoveries"][k]["resumed_at"] for r in took_part)
        failures.append({**{key: event[key] for key in ("device", "reason", "iteration", "rollback_to", "changes")},
                         "also": event.get("also", []),
                         "failed_at": failed_at, "detected_s": event["declared_at"] - failed_at,
                         "regroup_s": max(r["recoveries"][k]["regrouped_at"] for r in took_part) - event["declared_at"],
                         "recovery_s": resumed - failed_at})
        report.warning(f"{', '.join([x, *event.get('also', [])])} failed in iteration {event['iteration'] + 1} "
                       f"({event['reason']}): agreed after {failures[-1]['detected_s']:.2f}s, iteration "
                       f"{event['iteration'] + 1} done again after {failures[-1]['recovery_s']:.2f}s (rolled back "
                       f"to the start of iteration {event['rollback_to'] + 1})")
    switches = []
    for event in ref["switches"]:
        done = [s["switched_at"] for r in trained for s in r["switches"]
                if s["iteration"] == event["iteration"] and "switched_at" in s]
        switches.append({**event, "switch_s": max(done) - event["started_at"] if done else None})
        report.info(f"switched to a new plan at iteration {event['iteration'] + 1} ({event['reason']})"
                    + (f" in {switches[-1]['switch_s'] * 1e3:.0f} ms" if done else ""))
    return {"losses": losses, "seconds": seconds, "workers": results, "program": final, "plan": compiled.plan,
            "failures": failures, "switches": switches, "backups": ref["backups"], "backed_up": ref["backed_up"]}


def load_weights(out: str | os.PathLike, devices: Sequence[str]) -> dict[str, torch.Tensor]:
    """The trained model's weights from a run folder (each stage's first device)."""
    state: dict[str, torch.Tensor] = {}
    for d in devices:
        for k, v in torch.load(weights_path(out, d), weights_only=True).items():
            state.setdefault(k, v)
    return state


def _is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"
