"""The run's store (a TCPStore the launcher serves) and every key the runtime reads or writes in it.

Keys are named here and nowhere else, so the protocol between launcher, workers and heartbeats can
be read in one place. Values are small strings: JSON for records, ``repr`` of a float for numbers.
Each is stored signed with the run's secret and checked against its key's schema when read
(runtime/auth.py: ``SignedStore``, ``SCHEMAS``); the counters (join/n, the check-ins) are ``add``
counts, which a store cannot sign, and nothing takes more from them than how many.

  spec, cluster, program          the run's RunSpec, Cluster and first program (launcher, once)
  build                           the launcher's build fingerprint (runtime/build.py), set before
                                  the program (launcher, once)
  claim/<device>                  the worker that runs that device, first come first served: a
                                  second worker for the device is refused (worker)
  refused                         the first worker that refused the run, and why (its build or
                                  program differs from the launcher's); the launcher stops the run
  result/<device>                 a worker's result record: it is done (worker)
  loss/<device>/<i>               iteration i's loss on that device; marks the iteration done
  seconds/<device>/<i>            iteration i's step time on that device
  ft/epoch                        the newest membership epoch (recovery, switch)
  ft/hb/<device>                  heartbeat counter, or DEAD / LEFT (heartbeat, launcher)
  ft/fail/<epoch>                 the epoch's first declared failure, compare-and-set (heartbeat)
  ft/failed/<epoch>               every device that failed in it, as agreed (heartbeat)
  ft/<epoch>/done/<device>        how far a survivor got when the epoch failed (recovery)
  ft/killed_at/<device>           when a fault or the launcher killed that device (faults, launcher)
  join/n, join/<k>                the count of join requests, and the k-th one's device (switch)
  admit/<device>                  the answer to a device that asked to join (switch, launcher)
  switch/<epoch>                  the switch from epoch to epoch + 1, published by the leader (switch)
  switch/<epoch>/outcome          "committed" or "abandoned", first come first served (switch)
  ckpt/<i>/<stage>                a stage's file of the checkpoint after i iterations is written (worker)
  epoch<k>[name]/check-in         how many devices came to build epoch k's process groups (a count)
  epoch<k>[name][/group]/...      gloo's rendezvous of those groups, signed like the rest
                                  (backends/torch_dist/gloo.py builds them over ``SignedStore.c10d``)

The secret itself is never in the store: the launcher writes it to ``store.secret`` in its run
folder (mode 0600) and gives it to its workers in their environment (runtime/auth.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time

import torch.distributed as dist

from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime.errors import CannotListen, CoordinatorUnreachable

STORE_TIMEOUT_S = 60.0

SPEC, CLUSTER, PROGRAM = "spec", "cluster", "program"
BUILD, REFUSED = "build", "refused"
EPOCH = "ft/epoch"
JOIN_COUNT = "join/n"
DEAD, LEFT = "dead", "left"  # heartbeat values: the launcher saw the process end; the device left


def result_key(device: str) -> str:
    return f"result/{device}"


def claim_key(device: str) -> str:
    return f"claim/{device}"


def loss_key(device: str, iteration: int) -> str:
    return f"loss/{device}/{iteration}"


def seconds_key(device: str, iteration: int) -> str:
    return f"seconds/{device}/{iteration}"


def checkpoint_key(done: int, stage: int) -> str:
    return f"ckpt/{done}/{stage}"


def beat_key(device: str) -> str:
    return f"ft/hb/{device}"


def failure_key(epoch: int) -> str:
    """The first failure declared in ``epoch`` (one record)."""
    return f"ft/fail/{epoch}"


def failures_key(epoch: int) -> str:
    """Every device that failed in ``epoch``, as the survivors agreed (a list of records)."""
    return f"ft/failed/{epoch}"


def done_key(epoch: int, device: str) -> str:
    """[iterations completed, actions done in the next] of a survivor of ``epoch``'s failure."""
    return f"ft/{epoch}/done/{device}"


def killed_at_key(device: str) -> str:
    return f"ft/killed_at/{device}"


def join_key(k: int) -> str:
    return f"join/{k}"


def admit_key(device: str) -> str:
    return f"admit/{device}"


def switch_key(epoch: int) -> str:
    return f"switch/{epoch}"


def switch_outcome_key(epoch: int) -> str:
    return f"switch/{epoch}/outcome"


def has(store: dist.Store, key: str) -> bool:
    return store.check([key])


def get_json(store: dist.Store, key: str):
    return json.loads(store.get(key).decode())


def get_float(store: dist.Store, key: str) -> float:
    return float(store.get(key))


def epoch_of(store: dist.Store) -> int:
    """The newest membership epoch (0 before any failure or switch)."""
    return int(store.get(EPOCH)) if has(store, EPOCH) else 0


def agreed_failure(store: dist.Store, epoch: int) -> dict:
    """The failure every survivor agreed on in ``epoch``: {"device", "reason", "by", "at"}."""
    return get_json(store, failure_key(epoch))


def agreed_failures(store: dist.Store, epoch: int) -> list[dict]:
    """Every failure the survivors agreed on in ``epoch`` (``Heartbeat.agree_failed``), the declared
    one first; only that one while the survivors have not agreed on the rest yet."""
    if has(store, failures_key(epoch)):
        return get_json(store, failures_key(epoch))
    return [agreed_failure(store, epoch)]


def serve_store(host: str, port: int = 0, timeout_s: float = STORE_TIMEOUT_S) -> dist.TCPStore:
    """The run's store (a TCPStore server) listening on ``host``:``port`` only (0: a free port).
    Given a host, torch's TCPStore listens on every interface of the machine; it is handed a
    socket bound to ``host`` instead, so a run told to listen on the loopback is not reachable
    from the network."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as e:
        raise CannotListen(f"cannot listen on {host}:{port} ({e.strerror or e}): name an address of this machine "
                           "and a free port (--listen HOST:PORT; port 0 picks one)") from None
    with listener:  # the store takes a duplicate of the socket and closes it when it goes
        return dist.TCPStore(host, listener.getsockname()[1], world_size=None, is_master=True,
                             timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                             master_listen_fd=os.dup(listener.fileno()))


def connect(coordinator: str, timeout_s: float = STORE_TIMEOUT_S) -> dist.TCPStore:
    """A client of the run's store, or a clear error within ``timeout_s`` (and a second or two).

    torch's own client retries with a back-off that can take more than twice its timeout, waits
    forever on a listener that accepts and never answers, and prints a C++ stack per retry. So the
    port is first reached with a plain socket until the deadline (a refused or unreachable port is
    retried, every 0.2 s), then the store's handshake runs in a thread that is given up on at the
    deadline; torch's retry messages go to a scratch file, not the terminal."""
    host, _, port = coordinator.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:port
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"coordinator {coordinator!r} is not HOST:PORT (a port 1 to 65535)")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise InputError(f"connect timeout {timeout_s!r}: give a number of seconds above 0")
    deadline = time.monotonic() + timeout_s
    unreachable = (f"cannot reach the coordinator at {coordinator} within {timeout_s:g}s: is `asteroid launch` "
                   "running there, and is the port open from this machine?")
    reason = _reach(host, int(port), deadline)
    if reason is not None:
        raise CoordinatorUnreachable(f"{unreachable} ({reason})")
    done: dict = {}

    def handshake() -> None:
        try:
            done["store"] = dist.TCPStore(host, int(port), world_size=None, is_master=False,
                                          timeout=datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())))
        except (RuntimeError, OSError) as e:  # c10d raises DistNetworkError (a RuntimeError) on timeout
            done["error"] = e

    thread = threading.Thread(target=handshake, name="asteroid-connect", daemon=True)
    with _cpp_log_aside():
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
    if "store" in done:
        return done["store"]
    if "error" in done:
        first = str(done["error"]).splitlines()[0] if str(done["error"]) else type(done["error"]).__name__
        raise CoordinatorUnreachable(f"{unreachable} ({first})")
    raise CoordinatorUnreachable(f"the coordinator at {coordinator} accepted the connection but did not answer as "
                                 f"a run's store within {timeout_s:g}s: is HOST:PORT the address `asteroid launch` "
                                 "printed, and not another service?")


def _reach(host: str, port: int, deadline: float) -> str | None:
    """None once a TCP connection to host:port opens before ``deadline``; else the last reason."""
    reason = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return reason
        try:
            with socket.create_connection((host, port), timeout=min(left, 5.0)):
                return None
        except socket.gaierror as e:
            return f"the host name does not resolve: {e.strerror or e}"
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


@contextlib.contextmanager
def _cpp_log_aside():
    """File descriptor 2 into a scratch file while torch's store client runs: its C++ retry and
    timeout messages (a stack each) are not the user's to read; the error raised says what failed."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
