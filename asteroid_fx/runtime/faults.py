"""Fault injection (``RunSpec.faults``): a device kills itself, or leaves announced, just before a
given action of a given iteration (the first time it runs it, or when a recovery redoes it) or of
a switch's hand-over, or as the survivors of a failure regroup. For tests and benchmarks of recovery:
a failure at an exact point of the program, which a kill from outside (``launch(kills=...)``)
cannot aim at.

Faults never travel through the run's store, which other machines can reach: the launcher runs a
spec with faults only when its own environment says so (``FAULT_INJECTION_ENV`` = 1, set by a test
or benchmark, never by a store writer), publishes the spec without them, and hands them to its local
workers in their environment (``FAULTS_ENV``). A worker honours only that; a spec in the store that
carries faults is refused (runtime/auth.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Callable

from asteroid_fx.backends.torch_dist import Interrupted
from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime.store import killed_at_key

log = logging.getLogger(__name__)

FAULT_INJECTION_ENV = "ASTEROID_FAULT_INJECTION"  # "1" in the launcher's environment: run RunSpec.faults
FAULTS_ENV = "ASTEROID_FAULTS"  # the faults, as JSON, in a local worker's environment (the launcher's)


def require_injection(faults, environ=os.environ) -> None:
    """Refuse ``faults`` unless the launcher's environment turns fault injection on."""
    if faults and environ.get(FAULT_INJECTION_ENV) != "1":
        raise InputError(f"RunSpec.faults makes workers kill themselves: it is for tests and benchmarks, and runs "
                         f"only with {FAULT_INJECTION_ENV}=1 in the launcher's environment; leave faults out of a "
                         "production run")


def worker_env(faults) -> dict[str, str]:
    """What a local worker's environment carries for ``faults`` (nothing without any)."""
    return {FAULTS_ENV: json.dumps([list(f) for f in faults])} if faults else {}


def injected(environ=os.environ) -> tuple[tuple[str, int, int, str], ...]:
    """The faults the launcher handed this worker (``worker_env``), or none."""
    text = environ.get(FAULTS_ENV)
    if not text:
        return ()
    try:
        faults = tuple((str(d), int(i), int(k), str(kind)) for d, i, k, kind in json.loads(text))
    except (ValueError, TypeError) as e:
        raise InputError(f"{FAULTS_ENV}={text[:80]!r} is not a list of [device, iteration, action, kind] ({e}); "
                         "it is set by the launcher for fault-injection tests only: unset it") from None
    return faults


class Faults:
    """The faults of ``faults`` (RunSpec.faults) that strike ``device``; ``leave`` announces its
    departure (the heartbeat's) before a "leave" fault interrupts the iteration."""

    def __init__(self, faults, device: str, store, leave: Callable[[], None]):
        self.faults, self.device, self.store, self.leave = tuple(faults), device, store, leave
        self.runs: dict[int, int] = {}  # iteration -> how many times this device has started it

    def before_action(self, iteration: int, k: int) -> None:
        """Called by the worker before its k-th action of ``iteration`` (DistWorker's ``fault``).
        "kill" and "leave" strike the first time the device runs the iteration, "kill-redo" only
        when a recovery has it run the iteration again."""
        if k == 0:
            self.runs[iteration] = self.runs.get(iteration, 0) + 1
        for device, at, action, kind in self.faults:
            if (device, at, action) != (self.device, iteration, k) or kind in ("kill-handover", "kill-regroup"):
                continue
            if (kind == "kill-redo") != (self.runs.get(iteration, 0) > 1):
                continue
            if kind == "leave":
                log.info("[%s] leaving in iteration %d before action %d", self.device, iteration, k)
                self.leave()
                raise Interrupted()
            self._die()

    def before_regroup(self, iteration: int) -> None:
        """A "kill-regroup" fault: the device dies as the survivors of a failure in ``iteration``
        come to build their new process groups (the fault's action index is not read)."""
        for device, at, _, kind in self.faults:
            if kind == "kill-regroup" and device == self.device and at == iteration:
                self._die()

    def before_handover_action(self, iteration: int, k: int) -> None:
        """A "kill-handover" fault: the device dies before its k-th hand-over action (k = its
        number of actions: before the commit) at the switch before ``iteration`` (-1: any switch)."""
        for device, at, action, kind in self.faults:
            if kind == "kill-handover" and device == self.device and at in (iteration, -1) and action == k:
                self._die()

    def _die(self) -> None:
        # when it died, for the launcher's report: nothing else sees a SIGKILL's moment
        self.store.set(killed_at_key(self.device), repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
