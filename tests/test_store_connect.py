"""Connecting to a run's store: a clear error within the timeout, whatever is (not) at the address."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime.auth import SECRET_ENV, SECRET_FILE_ENV
from asteroid_fx.runtime.errors import CoordinatorUnreachable
from asteroid_fx.runtime.store import connect, serve_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_reaches_a_store():
    server = serve_store("127.0.0.1")
    client = connect(f"127.0.0.1:{server.port}", 5)
    client.set("k", "v")
    assert server.get("k") == b"v"


def test_a_store_that_starts_late_is_reached_before_the_deadline():
    port = _free_port()
    started = []
    timer = threading.Timer(1.0, lambda: started.append(serve_store("127.0.0.1", port)))
    timer.start()
    try:
        client = connect(f"127.0.0.1:{port}", 10)
        client.set("k", "v")
        assert started and started[0].get("k") == b"v"
    finally:
        timer.cancel()


def test_a_closed_port_fails_within_the_timeout():
    port = _free_port()
    t = time.monotonic()
    with pytest.raises(CoordinatorUnreachable, match="within 1s.*refused"):
        connect(f"127.0.0.1:{port}", 1)
    assert time.monotonic() - t < 2.5  # torch's own client takes more than twice its timeout


def test_a_silent_listener_fails_within_the_timeout():
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    t = time.monotonic()
    try:
        with pytest.raises(CoordinatorUnreachable, match="accepted the connection but did not answer"):
            connect(f"127.0.0.1:{listener.getsockname()[1]}", 1)
        assert time.monotonic() - t < 3.5
    finally:
        listener.close()


@pytest.mark.parametrize("address", ["nohost", "host:", ":80", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:x"])
def test_a_bad_address_is_an_input_error(address):
    with pytest.raises(InputError, match="HOST:PORT"):
        connect(address, 1)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_a_bad_timeout_is_an_input_error(timeout):
    with pytest.raises(InputError, match="connect timeout"):
        connect("127.0.0.1:80", timeout)


def _worker(*extra: str, secret: str | None = "s" * 64) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, SECRET_FILE_ENV)}
    if secret is not None:
        env[SECRET_ENV] = secret
    return subprocess.run([sys.executable, "-m", "asteroid_fx.cli", "worker", "--device", "d0", *extra],
                          capture_output=True, text=True, timeout=120, env=env)


def test_the_worker_command_without_the_run_secret_fails_in_one_line_before_connecting():
    r = _worker("--coordinator", f"127.0.0.1:{_free_port()}", "--connect-timeout", "30", secret=None)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert SECRET_ENV in lines[0] and SECRET_FILE_ENV in lines[0] and "store.secret" in lines[0]


def test_the_worker_command_fails_in_one_line_within_its_timeout():
    t = time.monotonic()
    r = _worker("--coordinator", f"127.0.0.1:{_free_port()}", "--connect-timeout", "1")
    took = time.monotonic() - t
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the coordinator" in lines[0], r.stderr  # no C++ stacks
    assert took < 60  # interpreter start and imports, plus the 1 s


@pytest.mark.parametrize("value", ["-1", "0", "nan", "1e9"])
def test_the_worker_command_refuses_a_bad_connect_timeout(value):
    r = _worker("--coordinator", "127.0.0.1:80", "--connect-timeout", value)
    assert r.returncode == 2 and "--connect-timeout" in r.stderr, r.stderr
