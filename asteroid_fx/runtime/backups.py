"""Which iterations back up, and which iteration starts a rollback can return to.

A program with backups (passes/replay.add_backups) sends each stage's state to its holder; an
iteration runs it only when it backs up, and otherwise runs the program without them. Every device
decides alike at the iteration's barrier: every ``backup_every`` iterations, or when the leader's
``BackupPace`` says so (its flag rides on the barrier).
"""

from __future__ import annotations

import collections
import math
import statistics
import time


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


class BackupPoints:
    """One device's record of the running program's backups since ``base`` (the iteration it
    started from): which iterations back up (decided at their barrier), and the recent iteration
    starts every copy exists for ("tags"), where a rollback can return to. ``every``: iterations
    between backups, or None to pace them with ``BackupPace(budget)``."""

    def __init__(self, every: int | None, budget: float, paced: bool):
        self.every_n, self.budget = every, budget
        self.pace = BackupPace(budget) if paced else None
        self.count = 0  # iterations run with the program's backups (redone ones too)
        self.history: list[int] = []  # which, the last 10000
        self.restart(0)

    def restart(self, base: int) -> None:
        """A new program runs from ``base`` (a recovery's rollback, a switch): it backs up there."""
        self.base, self.backed, self.tags, self.last = base, set(), [base], base
        self._barrier_at: float | None = None  # when the leader left the last barrier
        if self.pace is not None:
            self.pace = BackupPace(self.budget)

    def backs_up(self, i: int) -> bool:
        return i in self.backed

    def is_tag(self, i: int) -> bool:
        return i == self.base or (i > self.base and self.backs_up(i - 1))

    def tag_at_or_before(self, i: int) -> int:
        return next(t for t in reversed(self.tags) if t <= i)

    def flag(self, i: int, pacing: bool) -> float:
        """On the leader in a paced run (``pacing``: it leads, and the program has backups): 2.0 if
        iteration ``i`` is to back up (its barrier carries it), else 0.0."""
        if self.pace is None or not pacing:
            return 0.0
        now = time.perf_counter()
        if self._barrier_at is not None and i - 1 > self.base:  # the redone iteration is no sample
            kind = "backup" if self.backs_up(i - 1) else "after" if self.backs_up(i - 2) else "plain"
            self.pace.observe(now - self._barrier_at, kind)
        self._barrier_at = now
        return 2.0 if i - self.last >= self.pace.every() else 0.0

    def decide(self, i: int, flags: float, has_backups: bool) -> None:
        """After the barrier of iteration ``i``: whether it backs up, the same on every device. A
        program without backups (one stage) needs none: every rollback point is on its device."""
        if not has_backups or i == self.base:
            up = True
        elif self.pace is not None:
            up = flags >= 2.0
        else:
            up = (i - self.base) % self.every_n == 0
        if up:  # only the last few matter: a failure returns at most two iterations back
            self.backed = {j for j in self.backed if j >= i - 2} | {i}
            self.tags = self.tags[-3:] + [i + 1]
            self.last = i
            if has_backups:
                self.count += 1
                self.history = self.history[-9999:] + [i]
