"""heartbeat: find a device that died or left, and agree on it, through the run's store.

Every device runs a ``Heartbeat``: a thread that bumps ``ft/hb/<device>`` every ``interval_s`` and
reads its peers' counters. A peer whose counter has not moved for ``timeout_s`` (measured on this
device's own clock, so hosts need no synchronized clocks), or whose key says "dead" (the launcher
saw its process end) or "left" (it announced its departure), is declared failed for the current
membership epoch: ``ft/fail/<epoch>`` is set by compare-and-set, so the first declaration wins and
every survivor reads the same record. Declaring, or seeing the record, sets ``interrupt``, which
makes the device's pending waits raise (backends/torch_dist.Comm) so it can take part in recovery.

The detection bound is ``timeout_s + interval_s`` for a silent death, one ``interval_s`` when the
launcher or the device itself reports it. The thread only sleeps, sets and reads small keys, so it
keeps its pace under a full compute load (torch releases the GIL while it computes); the default
timeout leaves a wide margin over the interval against false alarms.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Sequence

import torch.distributed as dist

DEAD, LEFT = "dead", "left"


def beat_key(device: str) -> str:
    return f"ft/hb/{device}"


def failure_key(epoch: int) -> str:
    return f"ft/fail/{epoch}"


class Heartbeat:
    """This device's heartbeat and its watch over ``peers`` in membership ``epoch``. ``store`` must be
    a connection of its own (the thread uses it concurrently with the training loop)."""

    def __init__(self, store: dist.Store, device: str, *, interval_s: float = 0.1, timeout_s: float = 1.5):
        if not 0 < interval_s < timeout_s:
            raise ValueError(f"the heartbeat interval ({interval_s}s) must be positive and below its timeout "
                             f"({timeout_s}s)")
        self.store, self.device = store, device
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.interrupt = threading.Event()
        self._lock = threading.Lock()
        self._epoch, self._peers = 0, ()
        self._seen: dict[str, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._count = 0
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{device}", daemon=True)

    def start(self) -> None:
        """Publish the first beat (peers read it before they watch) and start the thread."""
        self.store.set(beat_key(self.device), "0")
        self._thread.start()

    def watch(self, epoch: int, peers: Sequence[str]) -> None:
        """Watch ``peers`` in membership ``epoch`` (whose keys exist); clears ``interrupt``."""
        with self._lock:
            now = time.monotonic()
            self._epoch, self._peers = epoch, tuple(p for p in peers if p != self.device)
            self._seen = {p: ("", now) for p in self._peers}
            self.interrupt.clear()

    def declare(self, device: str, reason: str) -> dict:
        """Declare ``device`` failed in the current epoch; returns the record that won."""
        record = json.dumps({"device": device, "reason": reason, "by": self.device, "at": time.time()})
        won = self.store.compare_set(failure_key(self._epoch), "", record)
        self.interrupt.set()
        with self._lock:
            self._peers = ()  # one failure per epoch; the next epoch's watch starts afresh
        return json.loads(won)

    def leave(self) -> None:
        """Announce this device's departure: its peers recover at once, without waiting for a timeout."""
        self.store.set(beat_key(self.device), LEFT)
        self._stop.set()
        self.declare(self.device, "left the run (announced)")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s + 1.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._count += 1
            try:
                self.store.set(beat_key(self.device), str(self._count))
                self._check()
            except (RuntimeError, OSError):  # the coordinator is gone: the run is over
                return

    def _check(self) -> None:
        with self._lock:
            epoch, peers = self._epoch, self._peers
        if not peers:
            return
        if self.store.check([failure_key(epoch)]):
            self.interrupt.set()
            return
        now = time.monotonic()
        for peer, value in zip(peers, self.store.multi_get([beat_key(p) for p in peers])):
            value = value.decode()
            if value == DEAD:
                self.declare(peer, "its process ended")
                return
            if value == LEFT:
                self.declare(peer, "left the run (announced)")
                return
            last, since = self._seen[peer]
            if value != last:
                self._seen[peer] = (value, now)
            elif now - since > self.timeout_s:
                self.declare(peer, f"no heartbeat for {now - since:.1f}s")
                return


def agreed_failure(store: dist.Store, epoch: int) -> dict:
    """The failure every survivor agreed on in ``epoch``: {"device", "reason", "by", "at"}."""
    return json.loads(store.get(failure_key(epoch)).decode())
