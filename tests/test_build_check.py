"""Workers prove they run the launcher's build (runtime/build.py): one of another build refuses the
run and the launcher stops at once with its reason; a second worker for a device is refused; local
workers end with the launcher, however it ends. Every process is bounded by a timeout and ended by
the test if it is still there."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from asteroid_fx.ir.cluster import resolve_cluster
from asteroid_fx.ir.program_text import format_program
from asteroid_fx.runtime.auth import SECRET_ENV, SECRET_FILE_ENV
from asteroid_fx.runtime.build import build_of, difference
from asteroid_fx.runtime.errors import RunFailed
from asteroid_fx.runtime.launcher import launch
from asteroid_fx.runtime.spec import RunSpec, compile_spec
from tests.jobs import HIDDEN_ENV

ROOT = Path(__file__).resolve().parents[1]
HOST3 = resolve_cluster("host-3")
# stage 1 holds fc2 and the head: their hidden width is inside it, so the program does not show it
SPEC = RunSpec(model="tests.jobs:hidden_from_env", microbatches=1, groups=(("host0",), ("host1", "host2")),
               rows=((16,), (8, 8)), layers=(0, 2, 5))
TIMEOUT_S = 120


@pytest.fixture
def width(monkeypatch):
    """Compile ``SPEC`` with the hidden width set for this process only."""
    from asteroid_fx.runtime import spec as spec_module

    def compiled(hidden: int):
        monkeypatch.setenv(HIDDEN_ENV, str(hidden))
        spec_module._job.cache_clear()  # the job is imported once per process
        try:
            return compile_spec(SPEC, HOST3)
        finally:
            monkeypatch.delenv(HIDDEN_ENV)
            spec_module._job.cache_clear()
    return compiled


def test_a_width_inside_a_stage_changes_the_build_not_the_program(width):
    narrow, wide = width(32), width(64)
    assert format_program(narrow.program) == format_program(wide.program)
    assert difference(build_of(narrow), build_of(width(32))) is None
    assert difference(build_of(wide), build_of(narrow)) == (
        "stage 1's fc2.weight is float32 of shape (64, 32) here, float32 of shape (32, 32) at the launcher")


def test_the_versions_and_the_graph_code_are_in_the_build(width):
    here = build_of(width(32))
    older = {**here, "torch": "1.0.0", "digest": "another"}
    assert difference(here, older) == f"torch {here['torch']} here, 1.0.0 at the launcher"
    # same tensors, another computation (an activation): only the code tells
    stages = [dict(s) for s in here["stages"]]
    stages[1]["code"] = "0" * 64
    assert difference(here, {**here, "stages": stages, "digest": "another"}) == (
        "stage 1's graph code differs from the launcher's (another definition of the model)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Launch:
    """``launch`` in a thread with host2 remote: the test starts host2's worker(s) itself."""

    def __init__(self, spec: RunSpec, out: Path):
        self.out, self.port = out, _free_port()
        self.result: dict = {}
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.started = 0  # remote workers started
        self.thread = threading.Thread(target=self._run, args=(spec,), daemon=True)
        self.thread.start()

    def _run(self, spec: RunSpec) -> None:
        try:
            self.result.update(launch(spec, HOST3, self.out, timeout_s=TIMEOUT_S, log=lambda m: None,
                                      port=self.port, remote=["host2"]))
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.error = e
        finally:
            self.ended_at = time.monotonic()

    def remote_worker(self, device: str, **env: str) -> subprocess.Popen:
        secret = self.out / "store.secret"
        deadline = time.monotonic() + TIMEOUT_S
        while not secret.exists() and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert secret.exists(), self.error
        environ = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, HIDDEN_ENV)}
        environ.update({SECRET_FILE_ENV: str(secret), "PYTHONPATH": str(ROOT), **env})
        self.started += 1
        with open(self.out / f"remote_{self.started}.log", "w") as log:  # the child holds its own copy
            proc = subprocess.Popen([sys.executable, "-m", "asteroid_fx.cli", "worker", "--coordinator",
                                     f"127.0.0.1:{self.port}", "--device", device, "--out",
                                     str(self.out / "remote")], env=environ, stdout=log, stderr=subprocess.STDOUT)
        proc.log = self.out / f"remote_{self.started}.log"
        return proc

    def join(self) -> None:
        self.thread.join(TIMEOUT_S + 30)
        assert not self.thread.is_alive(), "the launcher did not end within its timeout"


def _ended(*procs: subprocess.Popen) -> list[tuple[int, str, float]]:
    """(exit code, output, when it was seen gone) of each process, all watched together; a process
    still running after the timeout is killed."""
    gone: dict[int, float] = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(gone) < len(procs) and time.monotonic() < deadline:
            for k, p in enumerate(procs):
                if k not in gone and p.poll() is not None:
                    gone[k] = time.monotonic()
            time.sleep(0.01)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, p.log.read_text(), gone.get(k, math.inf)) for k, p in enumerate(procs)]


def test_a_worker_of_another_build_is_refused_and_the_launcher_says_why_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv(HIDDEN_ENV, raising=False)
    run = _Launch(SPEC, tmp_path)
    ((code, err, exited),) = _ended(run.remote_worker("host2", **{HIDDEN_ENV: "64"}))
    run.join()
    assert code != 0 and "device host2 refuses the run" in err, err
    assert isinstance(run.error, RunFailed), run.error
    message = str(run.error)
    assert message.startswith("worker host2 refused the run: stage 1's fc2.weight is float32 of shape (64, 32) "
                              "here, float32 of shape (32, 32) at the launcher"), message
    # at once, not when gloo gives up waiting for host2 (75 s and more)
    assert run.ended_at - exited < 5, run.ended_at - exited


@pytest.mark.slow  # a whole run with three workers and a fourth process: ~30 s on a loaded machine
def test_a_second_worker_for_a_device_is_refused_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.delenv(HIDDEN_ENV, raising=False)
    run = _Launch(dataclasses.replace(SPEC, iterations=2), tmp_path)
    both = [run.remote_worker("host2"), run.remote_worker("host2")]  # one claims host2 first
    ended = _ended(*both)
    run.join()
    assert run.error is None, run.error
    refused = [e for e in ended if e[0] != 0]
    assert len(refused) == 1, ended
    code, err, at = refused[0]
    assert code == 2 and "another worker already runs device 'host2' in this run" in err, err
    winner = next(e for e in ended if e[0] == 0)
    assert at < winner[2]  # refused while the other trained
    assert len(run.result["losses"]) == 2 and set(run.result["workers"]) == {"host0", "host1", "host2"}


# with recovery on, a worker that comes to build its process groups checks in (a count in the store)
_LAUNCHER = """
import dataclasses, sys
from asteroid_fx.ir.cluster import resolve_cluster
from asteroid_fx.runtime.launcher import launch
from tests.test_build_check import SPEC
launch(dataclasses.replace(SPEC, recovery=True, replan=False), resolve_cluster("host-3"), sys.argv[1],
       timeout_s=120, log=print, port=int(sys.argv[2]), remote=["host2"])
"""


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # a launcher in a process of its own per case: ~30 s each on a loaded machine
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("moment", ["importing", "waiting"])
def test_local_workers_end_within_2s_of_the_launcher_at_any_moment(tmp_path, moment):
    env = {k: v for k, v in os.environ.items() if k != HIDDEN_ENV}
    env["PYTHONPATH"] = str(ROOT)
    port = _free_port()
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(tmp_path), str(port)], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(workers) < 2 and launcher.poll() is None and time.monotonic() < deadline:
            workers = _children(launcher.pid)
            time.sleep(0.01)
        assert len(workers) == 2, launcher.poll()
        if moment == "waiting":  # both have compiled and wait for host2 to build the process groups
            store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=False,
                                  timeout=datetime.timedelta(seconds=30))
            while store.add("epoch0/check-in", 0) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert store.add("epoch0/check-in", 0) == 2
            del store
        launcher.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        launcher.wait(timeout=10)
        while any(_alive(w) for w in workers) and time.monotonic() - killed < 10:
            time.sleep(0.02)
        assert not any(_alive(w) for w in workers), "a worker outlived its launcher"
        assert time.monotonic() - killed < 2.0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
