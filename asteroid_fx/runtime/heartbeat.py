"""heartbeat: find the devices that died or left, and agree on them, through the run's store.

Every device runs a ``Heartbeat``: a thread that bumps ``ft/hb/<device>`` every ``interval_s`` and
reads its peers' counters. A peer whose counter has not moved for ``timeout_s`` (measured on this
device's own clock, so hosts need no synchronized clocks), or whose key says "dead" (the launcher
saw its process end) or "left" (it announced its departure), is declared failed for the current
membership epoch: ``ft/fail/<epoch>`` is set by compare-and-set, so the first declaration wins and
every survivor reads the same record. Declaring, or seeing the record, sets ``interrupt``, which
makes the device's pending waits raise (backends/torch_dist.Comm) so it can take part in recovery.

Devices can fail at the same moment; one declaration interrupts everybody, and the rest are found
during recovery. The thread keeps observing every peer after the declaration, so ``silent`` can
tell at once, or within one timeout, which of the peers that have not reported for recovery are
dead or silent; ``agree_failed`` waits for every peer's report or its failure and agrees on the
whole set (``ft/failed/<epoch>``, compare-and-set again: the first complete answer is everyone's).

The detection bound is ``timeout_s + interval_s`` for a silent death, one ``interval_s`` when the
launcher or the device itself reports it. The thread only sleeps, sets and reads small keys, so it
keeps its pace under a full compute load (torch releases the GIL while it computes); the default
timeout leaves a wide margin over the interval against false alarms.

A beat that fails the store's check (runtime/auth.py: not signed with the run's secret, or not a
count, "dead" or "left") is ignored with a warning, as if the peer's key had not changed: the peer
overwrites its key every interval, so a stranger's "dead" cannot make a live device leave, and
failing the run instead would let any writer end it. A peer whose key holds only such values for
``timeout_s`` is silent, as one that stopped beating. Every other value the thread reads (the
failure records) is a clear error naming its key.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, Sequence

import torch.distributed as dist

from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime.errors import RunFailed, RunTimedOut, StoreValueRejected
from asteroid_fx.runtime.store import DEAD, LEFT, agreed_failure, beat_key, failure_key, failures_key

log = logging.getLogger(__name__)

REPORT_POLL_S = 0.002  # how often recovery looks for the survivors' reports
SUSPECT_POLL_S = 0.005  # how often peers are read after a connection to one broke
# how long a device the others gave up gives its training loop to leave (it reads the same record
# in recovery and leaves in milliseconds) before ``on_given_up`` ends the process
GIVEN_UP_GRACE_S = 1.0


class Heartbeat:
    """This device's heartbeat and its watch over ``peers`` in membership ``epoch``. ``store`` must be
    a connection of its own (the thread uses it concurrently with the training loop)."""

    def __init__(self, store: dist.Store, device: str, *, interval_s: float = 0.1, timeout_s: float = 1.5):
        if not 0 < interval_s < timeout_s:
            raise InputError(f"the heartbeat interval ({interval_s}s) must be positive and below its timeout "
                             f"({timeout_s}s)")
        self.store, self.device = store, device
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.interrupt = threading.Event()
        # called once per epoch just before ``interrupt`` is set (backends/torch_dist.cut_connections:
        # it wakes waits blocked on the epoch's connections)
        self.on_interrupt: Callable[[], None] | None = None
        # called once, from the thread and with its store connection, when the others have given
        # this device up (declared it failed) and its training loop has not left GIVEN_UP_GRACE_S
        # later: a device frozen past its timeout and then resumed may be blocked in a wait of the
        # abandoned epoch that nothing wakes; it must leave on its own (runtime/worker.py ends it)
        self.on_given_up: Callable[[dist.Store], None] | None = None
        self._fate: tuple[int, bool | None] = (0, None)  # (epoch, given up in it; None: not known yet)
        self._given_up_at: float | None = None
        self._lock = threading.Lock()
        self._observed = threading.Condition(self._lock)  # notified after every round of reads
        self._epoch, self._peers = 0, ()
        # peer -> (its key's value, when this device first saw that value, the round of reads that saw
        # it change; -1: not yet)
        self._seen: dict[str, tuple[str, float, int]] = {}
        self._round, self._read_at = 0, 0.0  # rounds of reads so far, when the last one read
        self._stop = threading.Event()
        self._wake = threading.Event()  # stop() and suspect() cut the wait short
        self._hurry_until = 0.0
        self._count = 0
        self._refused: set[str] = set()  # beat keys whose refused value was warned about
        self.rejected: StoreValueRejected | None = None  # what stopped the thread, if a value did
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
            self._seen = {p: ("", now, -1) for p in self._peers}
            self.interrupt.clear()

    def declare(self, device: str, reason: str) -> dict:
        """Declare ``device`` failed in the current epoch; returns the record that won."""
        return self._declare(self._epoch, device, reason)

    def silent(self, peers: Sequence[str], within_s: float | None = None) -> dict[str, str]:
        """Which of ``peers`` (watched in this epoch) have failed: {device: reason} for each whose key
        says "dead" or "left" or whose counter has not moved for ``timeout_s`` (counted from when the
        thread last saw it move, often before the call). Returns once every peer has failed or shown it is alive (its
        counter moved during the call, seen within three rounds of reads), or after ``within_s``
        (default ``timeout_s + 3 * interval_s``, which decides every peer); a peer not decided by then
        counts as alive, so a live peer is never reported."""
        bound = self.timeout_s + 3 * self.interval_s if within_s is None else within_s
        peers = [p for p in peers if p != self.device]
        with self._observed:
            unknown = [p for p in peers if p not in self._seen]
            if unknown:
                raise InputError(f"{', '.join(unknown)} not watched in epoch {self._epoch} (watching "
                                 f"{', '.join(self._peers) or 'nobody'}); watch() the devices to ask about")
            # the next round's reads may predate the call, so a change seen by the round after it may
            # be a beat from before the call; one seen by the third round is a beat during the call
            alive_from = self._round + 3
            deadline = time.monotonic() + bound
            while True:
                if not self._thread.is_alive():
                    if self.rejected is not None:
                        raise StoreValueRejected(str(self.rejected))
                    raise RunFailed(f"{self.device}'s heartbeat has stopped (stop() was called or the store is "
                                       "gone), so it cannot tell whether its peers are alive")
                # silence is measured up to this device's last read: were its own thread held up, the
                # peers would only look silent
                failed = {p: reason for p in peers if (reason := self._failure(p, self._read_at))}
                now = time.monotonic()
                if now >= deadline or all(p in failed or self._seen[p][2] >= alive_from for p in peers):
                    return failed
                self._observed.wait(min(deadline - now, self.interval_s))

    def agree_failed(self, peers: Sequence[str], report_key: Callable[[str], str], *,
                     deadline_s: float = 60.0) -> list[dict]:
        """Every device that failed in the current epoch, as all survivors agree; call it during
        recovery once this device has written ``report_key(self.device)`` (its report for recovery)
        and the epoch's first failure is declared. ``peers``: the epoch's devices. Waits until every
        peer has reported (it is alive) or has failed (``silent``), or another survivor's answer is
        in the store; the first answer written to ``failures_key(epoch)`` is everyone's. Returns
        records like ``agreed_failure``'s, the declared one first; a device that finds itself in the
        list was given up by the others and must leave. Raises TimeoutError naming the peers that
        neither reported nor failed within ``deadline_s``."""
        epoch = self._epoch
        first = agreed_failure(self.store, epoch)
        found = {first["device"]: first}
        end = time.monotonic() + deadline_s
        while not self.store.check([failures_key(epoch)]):
            missing = [p for p in peers
                       if p != self.device and p not in found and not self.store.check([report_key(p)])]
            if not missing:
                break
            if time.monotonic() > end:
                raise RunTimedOut(f"{', '.join(missing)} neither reported for recovery nor failed within "
                                   f"{deadline_s:.0f}s of epoch {epoch}'s failure; their logs say why")
            # what the heartbeat thread already knows, without waiting for proof of life: a live
            # survivor's report usually comes within milliseconds, and recovery waits for it
            for p, reason in self.silent(missing, within_s=0.0).items():
                found[p] = {"device": p, "reason": reason, "by": self.device, "at": time.time()}
            time.sleep(REPORT_POLL_S)
        return json.loads(self.store.compare_set(failures_key(epoch), "", json.dumps(list(found.values()))))

    def leave(self) -> None:
        """Announce this device's departure: its peers recover at once, without waiting for a timeout."""
        self.store.set(beat_key(self.device), LEFT)
        self._stop.set()
        self.declare(self.device, "left the run (announced)")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s + 1.0)

    def _declare(self, epoch: int, device: str, reason: str) -> dict:
        record = json.dumps({"device": device, "reason": reason, "by": self.device, "at": time.time()})
        won = self.store.compare_set(failure_key(epoch), "", record)
        self._interrupt(epoch)
        return json.loads(won)

    def _interrupt(self, epoch: int) -> None:
        with self._lock:
            # a failure of an epoch that recovery has left behind interrupts nothing
            if self._epoch == epoch and not self.interrupt.is_set():
                if self.on_interrupt is not None:
                    self.on_interrupt()
                self.interrupt.set()

    def suspect(self) -> None:
        """A connection to a peer broke (it died, most likely): read the peers every few
        milliseconds for the next timeout instead of every interval, so the launcher's or another
        survivor's report of the death is seen at once. Costs a few store reads; declares nothing."""
        self._hurry_until = time.monotonic() + self.timeout_s
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            hurry = time.monotonic() < self._hurry_until
            self._wake.wait(SUSPECT_POLL_S if hurry else self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._count += 1
            try:
                self.store.set(beat_key(self.device), str(self._count))
                self._check()
            except StoreValueRejected as e:  # a failure record nobody of the run wrote: say so, stop
                self.rejected = e
                log.error("[%s] heartbeat stopped: %s", self.device, e)
                return
            except (RuntimeError, OSError):  # the coordinator is gone: the run is over
                return

    def _check(self) -> None:
        with self._lock:
            epoch, peers = self._epoch, self._peers
        if not peers:
            return
        declared = self.store.check([failure_key(epoch)])
        values = self._beats(peers)
        now = time.monotonic()
        with self._observed:
            if self._epoch != epoch:  # watch() began another epoch meanwhile
                return
            self._round, self._read_at = self._round + 1, now
            for peer, value in zip(peers, values):
                last, since, moved = self._seen[peer]
                if value is not None and value != last:  # the first value seen is no change: it may be a dead peer's last beat
                    self._seen[peer] = (value, now, self._round if last else moved)
            failed = next(((p, reason) for p in peers if (reason := self._failure(p, now))), None)
            self._observed.notify_all()
        if declared:
            self._interrupt(epoch)
            self._leave_if_given_up(epoch, now)
        elif failed:  # one declaration per epoch; the others are found by silent() during recovery
            self._declare(epoch, *failed)

    def _beats(self, peers: Sequence[str]) -> list[str | None]:
        """The peers' beat values; None for one the store's check refuses (warned about once)."""
        keys = [beat_key(p) for p in peers]
        if not hasattr(self.store, "open"):  # a bare store (tests of the protocol alone)
            return [v.decode() for v in self.store.multi_get(keys)]
        values: list[str | None] = []
        for key, blob in zip(keys, self.store.raw.multi_get(keys)):
            try:
                values.append(self.store.open(key, blob).decode())
            except StoreValueRejected as e:
                if key not in self._refused:
                    self._refused.add(key)
                    log.warning("[%s] %s; ignored: that device's next beat replaces it", self.device, e)
                values.append(None)
        return values

    def _leave_if_given_up(self, epoch: int, now: float) -> None:
        """After ``epoch``'s failure is declared: whether the others gave this device up (the
        declared failure, by another, or one of the failures they agreed on), and if its training
        loop has not left within GIVEN_UP_GRACE_S, ``on_given_up``."""
        seen, given_up = self._fate
        if seen != epoch or given_up is None:
            given_up = self._given_up_in(epoch)
            self._fate = (epoch, given_up)
        if not given_up or self.on_given_up is None:
            return
        if self._given_up_at is None:
            self._given_up_at = now
        elif now - self._given_up_at >= GIVEN_UP_GRACE_S:
            leave, self.on_given_up = self.on_given_up, None
            leave(self.store)

    def _given_up_in(self, epoch: int) -> bool | None:
        """True: the others gave this device up in ``epoch``; False: they did not; None: they have
        not agreed on every failure yet."""
        first = agreed_failure(self.store, epoch)
        if first["device"] == self.device:
            return first["by"] != self.device  # by itself: it announced its departure, and is leaving
        if not self.store.check([failures_key(epoch)]):
            return None
        return self.device in [r["device"] for r in json.loads(self.store.get(failures_key(epoch)))]

    def _failure(self, peer: str, now: float) -> str | None:
        """Why ``peer`` has failed, or None (call with the lock held)."""
        value, since, _ = self._seen[peer]
        if value == DEAD:
            return "its process ended"
        if value == LEFT:
            return "left the run (announced)"
        if value and now - since > self.timeout_s:
            return f"no heartbeat for {now - since:.1f}s"
        return None
