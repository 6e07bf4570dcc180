"""`asteroid launch`: N local worker processes that emulate a cluster, around one TCPStore.

The launcher compiles once, serves the rendezvous store, and hands every worker the plan and the
cluster as JSON text through the store (never pickles; the cluster's JSON carries the figures
of a measured kind such as host-cpu, so no worker measures its own); each worker
(runtime/worker.py) checks that it compiles the same program from the same build (the
fingerprint the launcher publishes, runtime/build.py), trains its device's share and reports. A
worker that fails or refuses the run takes the run down at once: the others are stopped and its
error or reason is shown. On Linux the local workers end with the launcher's thread, however it
ends (``_ends_with_this_thread``).

With ``RunSpec.recovery`` the run survives devices that die (SIGKILL, a lost machine) or leave
(runtime/recovery.py), and switches to re-planned programs (runtime/switch.py). The launcher then
treats a worker killed by a signal as a failed device, not as an error, and reports when it
failed, when the failure was agreed and when training was back where it had been (docs/replay.md,
"Live").
"""

from __future__ import annotations

import dataclasses
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
from asteroid_fx.runtime import checkpoint, netns
from asteroid_fx.runtime.auth import SECRET_ENV, SECRET_FILE_ENV, SignedStore, new_secret, write_secret
from asteroid_fx.runtime.build import build_of
from asteroid_fx.runtime.errors import RunFailed, RunTimedOut
from asteroid_fx.runtime.evaluate import Validation
from asteroid_fx.runtime.faults import FAULTS_ENV, require_injection, worker_env
from asteroid_fx.runtime.job import import_root
from asteroid_fx.runtime.metrics import Metrics, Progress, read_metrics
from asteroid_fx.runtime.spec import (RunSpec, check_job, check_last_batch, compile_spec, iterations_of, job_of,
                                      log_path, pinned, smaller_program, weights_path)
from asteroid_fx.runtime.store import (BUILD, CLUSTER, DEAD, PROGRAM, REFUSED, SPEC, admit_key, beat_key, epoch_of,
                                       failure_key, failures_key, get_float, get_json, has, killed_at_key, loss_key,
                                       result_key, seconds_key, serve_store)

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
           kills: Sequence[tuple] = (), joins: Sequence[tuple[str, float]] = (),
           resume: str | os.PathLike | None = None, new_cluster: bool = False, progress: bool = False) -> dict:
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
    up, as the device that ran longest counted them) and "backed_up" (which, the last 10000)}.
    ``resume``: a run folder (or one of its checkpoint folders) to continue from its newest
    checkpoint: the run starts at that iteration with its weights and optimizer state, on this
    cluster's plan; a checkpoint made on other devices needs ``new_cluster`` (a re-plan onto
    these). ``losses`` and ``seconds`` are then those of the iterations run here. Every run
    writes a checkpoint into ``out`` at its end (and every ``spec.checkpoint_every`` iterations),
    and ``out/metrics.jsonl`` (runtime/metrics.py) as iterations complete, rewritten from the
    workers' exact records when the run ends; ``progress`` draws a progress bar on stderr."""
    report = _Report(log)
    require_injection(spec.faults)  # a test's or benchmark's, never a production run's
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
    check_last_batch(spec, job_of(spec))
    compiled = compile_spec(spec, cluster.subset([d for d in cluster.names if d not in joining]) if joining else cluster)
    check_job(job_of(spec), compiled)  # here, where no device runs: a bad job stops before any worker starts
    smaller_program(job_of(spec), compiled)  # a partial batch the groups cannot share stops here too
    spec = pinned(spec, compiled.plan)
    if resume is not None:
        spec = _resumed(spec, compiled, cluster, resume, new_cluster, report)
    devices = compiled.program.devices
    unknown = sorted(set(remote) - set(devices))
    if unknown:
        raise InputError(f"remote devices {unknown} are not in the plan (its devices: {', '.join(devices)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    secret = new_secret()  # keys the HMAC over every value in the store (runtime/auth.py)
    secret_file = write_secret(out, secret)
    network = None
    if shape_links:  # workers reach the store through the namespaces' bridge, at its address here
        network = netns.ShapedNetwork(cluster, cluster.names, dilation=spec.dilation if spec.emulate else 1.0)
        network.open()
        host = network.coordinator
        report.info(network.describe())
    try:
        store = SignedStore(serve_store(host, port), secret, "launcher")
    except BaseException:
        if network is not None:
            network.close()
        raise
    store.set(SPEC, dataclasses.replace(spec, faults=()).to_json())  # faults go by environment (runtime/faults.py)
    store.set(CLUSTER, json.dumps(cluster.to_json()))  # the whole cluster: devices that join are in it
    store.set(BUILD, json.dumps(build_of(compiled)))  # before the program: a worker that reads one finds both
    store.set(PROGRAM, format_program(compiled.program))
    report.info(f"coordinator on {host}:{store.port}; {len(devices)} workers ({', '.join(devices)})"
                + (f"; recovery on (heartbeat timeout {spec.heartbeat_timeout_s:g}s, backups {spec.backups_text()})"
                   if spec.recovery else ""))
    if remote and _is_loopback(host):
        report.warning(f"  the store listens on {host} only: devices on other machines cannot reach it (launch "
                       f"--listen 0.0.0.0:{store.port}, or an address of this machine they can reach, lets them)")
    if remote:
        report.info(f"  the remote workers need the run's secret: copy {secret_file} (mode 0600) to their machines "
                    f"and set {SECRET_FILE_ENV} to the copy")
    for d in remote:
        report.info(f"  waiting for {d}: {SECRET_FILE_ENV}=store.secret asteroid worker --coordinator "
                    f"{host}:{store.port} --device {d} --out DIR")
    workers = _Workers(f"{host}:{store.port}", out, network, import_root(spec.model), secret, spec.faults)
    finished_run = False
    try:
        for device in devices:
            if device not in remote:
                workers.start(device)
        deadline = time.monotonic() + timeout_s
        job = job_of(spec)
        validation = Validation(job, out, report.warning) if job.validation is not None else None
        live = _Live(spec, job, store, compiled.program, out, progress, resume is not None and _same(out, resume))

        def watch() -> None:
            live.poll()
            if validation is not None:
                validation.poll()

        ended, declared = _supervise(spec, store, workers, devices, joining, kills, joins, deadline, timeout_s, out,
                                     report, watch)
        for d, p in workers.procs.items():
            if d not in declared:  # a device declared failed may still hang (frozen): it is killed below
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finished_run = True
    finally:
        workers.stop()
        if network is not None and not finished_run:
            network.close()
    try:  # the results are read while the launcher can still reach the store (a shaped run's address)
        result = results_of(spec, store, compiled, (*devices, *joining), ended, out, report)
        result["validation"] = validation.finish() if validation is not None else []
        live.finish(result)
        for v in result["validation"]:
            report.info(f"validation after {v['iteration']} iterations: loss {v['val_loss']:.4f}"
                        + (f", accuracy {v['val_accuracy']:.1%}" if v["val_accuracy"] is not None else ""))
        return result
    finally:
        if network is not None:
            network.close()


class _Workers:
    """The local worker processes, each in a session of its own (a kill takes its children too),
    its output in ``worker_<device>.log``. Each is given the run's ``secret`` and the spec's
    ``faults`` in its environment, never on its command line (which ``ps`` shows to everyone)."""

    def __init__(self, coordinator: str, out: Path, network, root: str | None = None, secret: str = "",
                 faults=()):
        self.coordinator, self.out, self.network = coordinator, out, network
        self.root = root  # where the job's module is imported from: on every local worker's path
        self.secret, self.faults = secret, faults
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._tether = _ends_with_this_thread()

    def start(self, device: str, *extra: str) -> None:
        cmd = [sys.executable, "-m", "asteroid_fx.cli", "worker", "--coordinator", self.coordinator,
               "--device", device, "--out", str(self.out), *extra]
        err = open(log_path(self.out, device), "w")
        self._logs.append(err)
        env = {k: v for k, v in os.environ.items() if k not in (SECRET_FILE_ENV, FAULTS_ENV)}
        env.update({SECRET_ENV: self.secret, **worker_env(self.faults)})
        if self.root is not None:
            env["PYTHONPATH"] = os.pathsep.join([self.root, *filter(None, [env.get("PYTHONPATH")])])
        if self.network is not None:  # in the device's namespace, gloo on its interface
            cmd, env = self.network.command(device, cmd), {**env, **self.network.env(device)}
        self.procs[device] = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, start_new_session=True,
                                              env=env, preexec_fn=self._tether)

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


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _ends_with_this_thread() -> Callable[[], None] | None:
    """What a worker runs between fork and exec so that the kernel SIGKILLs it when the thread that
    started it ends (Linux's parent-death signal): a launcher killed or crashed at any moment, even
    while its workers still import torch, leaves none behind. ``launch`` starts every worker from
    the thread it runs in and stops them before it returns, so that thread lives as long as they
    should. None where the kernel has no such signal."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    launcher, kill = os.getpid(), int(signal.SIGKILL)

    def tether() -> None:
        prctl(_PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != launcher:  # the launcher died before the signal was asked for
            os.kill(os.getpid(), kill)

    return tether


def _supervise(spec: RunSpec, store, workers: _Workers, devices: Sequence[str], joining: Sequence[str],
               kills: Sequence[tuple], joins: Sequence[tuple[str, float]], deadline: float, timeout_s: float,
               out: Path, report: _Report, watch: Callable[[], None] | None = None
               ) -> tuple[dict[str, tuple[float, int]], list[str]]:
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
        if has(store, REFUSED):  # a worker of another build: nothing the others do can succeed
            refusal = get_json(store, REFUSED)
            raise RunFailed(f"worker {refusal['device']} refused the run: {refusal['reason']}")
        for d, p in workers.procs.items():
            if d in ended or p.poll() is None:
                continue
            ended[d] = (time.time(), p.returncode)
            if p.returncode > 0 or (p.returncode < 0 and not spec.recovery):
                raise RunFailed(f"worker {d} exited with code {p.returncode}:\n{_tail(log_path(out, d))}")
            if p.returncode < 0:  # killed: a failed device, which the survivors replace
                store.set(beat_key(d), DEAD)
                report.warning(f"worker {d} ended by signal {-p.returncode}; the survivors recover")
        if started_at is None and has(store, loss_key(devices[0], spec.start)):
            started_at = time.monotonic()
        while pending_kills and started_at is not None and time.monotonic() - started_at >= pending_kills[0][1]:
            victim, _, *how = pending_kills.pop(0)
            signum = getattr(signal, how[0] if how else "SIGKILL")
            if victim in workers.procs and workers.procs[victim].poll() is None:
                if signum != signal.SIGCONT:  # a frozen device resumed: it failed when it froze
                    store.set(killed_at_key(victim), repr(time.time()))
                workers.signal(victim, signum)
        while pending_joins and started_at is not None and time.monotonic() - started_at >= pending_joins[0][1]:
            device, _ = pending_joins.pop(0)
            report.info(f"{device} starts and asks to join")
            workers.start(device, "--join")
        if time.monotonic() > deadline:
            missing = [d for d in everyone if d not in finished and d not in ended]
            raise RunTimedOut(f"the run did not finish in {timeout_s:.0f}s (no result from {', '.join(missing)}); "
                              f"worker logs are in {out}/")
        if watch is not None:
            watch()
        time.sleep(0.02)
    return ended, declared


def results_of(spec: RunSpec, store, compiled, everyone: Sequence[str], ended: dict[str, tuple[float, int]],
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
    for i in range(spec.start, spec.iterations):
        members = [ds for first, ds in history if first <= i][-1]
        losses.append(sum(get_float(store, loss_key(d, i)) for d in members))
        seconds.append(max(get_float(store, seconds_key(d, i)) for d in members))
    failures = []
    for event in ref["recoveries"]:
        x = event["device"]
        failed_at = (get_float(store, killed_at_key(x)) if has(store, killed_at_key(x))
                     else min(ended[x][0], event["declared_at"]) if x in ended else event["declared_at"])
        # the same recovery on every device that trained to the end, matched by the epoch it ended
        # (a device that joined later holds fewer records): each one regrouped and trained past it
        same = [e for r in trained for e in r["recoveries"] if e["epoch"] == event["epoch"]]
        resumed = max(e["resumed_at"] for e in same)
        failures.append({**{key: event[key] for key in ("device", "reason", "iteration", "rollback_to", "changes")},
                         "also": event.get("also", []),
                         "failed_at": failed_at, "detected_s": event["declared_at"] - failed_at,
                         "regroup_s": max(e["regrouped_at"] for e in same) - event["declared_at"],
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
    return {"losses": losses, "seconds": seconds, "start": spec.start, "workers": results, "program": final,
            "plan": compiled.plan, "ended": {d: {"at": at, "code": code} for d, (at, code) in ended.items()},
            "failures": failures, "switches": switches, "backups": ref["backups"], "backed_up": ref["backed_up"]}


class _Live:
    """The run as it goes, from the store: an iteration is complete once every device of the last
    stage of the first program has written its loss for it (their sum is the loss), or, after a
    failure or a switch changed who that is, once any device has started a later one (its loss is
    then known only at the end). Each complete iteration goes to the progress bar and to
    metrics.jsonl; ``finish`` rewrites metrics.jsonl and validation.jsonl from the exact results."""

    def __init__(self, spec: RunSpec, job, store, program, out: Path, progress: bool, continuing: bool):
        self.spec, self.job, self.store, self.out = spec, job, store, out
        self.last = program.stages[-1].devices
        self.devices = program.devices
        self.next = spec.start
        self.total = iterations_of(spec)
        self.at = time.monotonic()
        # a resumed run's own folder: its records of the iterations before the resumed one stay
        self.earlier, self.earlier_validation = self._earlier() if continuing else ([], [])
        self.metrics = Metrics(out)
        for record in self.earlier:
            self.metrics.iteration(record["iteration"], record["epoch"], record["loss"], record["lr"],
                                   record["seconds"], record["samples"])
        self.bar = Progress(self.total - spec.start) if progress and self.total > spec.start else None

    def _earlier(self) -> tuple[list[dict], list[dict]]:
        try:
            iterations, validation = read_metrics(self.out)
        except InputError:
            return [], []
        return ([r for r in iterations if r["iteration"] < self.spec.start],
                [v for v in validation if v["iteration"] <= self.spec.start])

    def poll(self) -> None:
        while self.next < self.total:
            i = self.next
            keys = [loss_key(d, i) for d in self.last]
            if self.store.check(keys):
                loss = sum(get_float(self.store, k) for k in keys)
            elif self.store.check([loss_key(d, i + 1) for d in self.devices]) or has(self.store, result_key(self.devices[0])):
                loss = None
            else:
                return
            now = time.monotonic()
            seconds, self.at = now - self.at, now
            self.next += 1
            self.record(i, loss, seconds)

    def record(self, i: int, loss: float | None, seconds: float) -> None:
        batch = self.job.rows_at(i)
        if loss is not None:
            self.metrics.iteration(i, i // self.job.steps_per_epoch, loss, list(self.job.settings.lr_at(i)[:self._groups()]),
                                   seconds, batch)
        if self.bar is not None:
            self.bar.update(i - self.spec.start, loss, batch / seconds if seconds > 0 else None)

    def _groups(self) -> int:
        return 2 if self.job.no_decay else 1

    def finish(self, result: dict) -> None:
        """metrics.jsonl and validation.jsonl from the run's records: every iteration's loss as the
        workers summed it and its step time (as ``result["seconds"]``)."""
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        metrics = Metrics(self.out)
        for record in self.earlier:
            metrics.iteration(record["iteration"], record["epoch"], record["loss"], record["lr"], record["seconds"],
                              record["samples"])
        for k, (loss, seconds) in enumerate(zip(result["losses"], result["seconds"])):
            i = self.spec.start + k
            metrics.iteration(i, i // self.job.steps_per_epoch, loss, list(self.job.settings.lr_at(i)[:self._groups()]),
                              seconds, self.job.rows_at(i))
        for v in self.earlier_validation:
            metrics.validation(v["iteration"], v["epoch"], v["val_loss"], v["val_accuracy"], v["samples"])
        for v in result.get("validation", []):
            metrics.validation(v["iteration"], max(0, v["iteration"] - 1) // self.job.steps_per_epoch, v["val_loss"],
                               v["val_accuracy"], v["samples"])
        metrics.close()


def _same(out, resume) -> bool:
    try:
        return Path(out).resolve() == Path(resume).resolve()
    except OSError:
        return False


def _resumed(spec: RunSpec, compiled, cluster, resume: str | os.PathLike, new_cluster: bool, report: _Report) -> RunSpec:
    """``spec`` starting from ``resume``'s newest checkpoint, once it is known to be of this model."""
    manifest = checkpoint.find(resume)
    checkpoint.check_model(manifest, spec.model, compiled.captured.module.state_dict())
    checkpoint.check_devices(manifest, list(cluster.names), new_cluster)
    iterations = iterations_of(spec)
    if manifest["iteration"] >= iterations:
        raise InputError(f"checkpoint {manifest['folder']} is after {manifest['iteration']} iterations: the run of "
                         f"{iterations} is done; give more iterations (or epochs) to train on")
    report.info(f"resuming from {manifest['folder']} at iteration {manifest['iteration'] + 1}")
    return dataclasses.replace(spec, start=manifest["iteration"], resume=str(Path(manifest["folder"]).resolve()))


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
