"""Failures that compose with recovery itself, found by a kill sweep: a second failure in the
iterations a recovery redoes, a device that dies while it joins, a frozen device that comes back
after the others gave it up, and emulated pacing on a busy host. Every run injects its faults
through ``RunSpec.faults`` (or the launcher's signals) and ends with the weights of the
failure-free run within 1e-6."""

from __future__ import annotations

import math

import pytest

from asteroid_fx.backends.torch_dist.emulation import MAX_PAUSE_S, pad, pause_s, wait_until


# ---------------------------------------------------------------------------------------------
# emulated pacing never ends a run


class BusyClock:
    """A wall clock that moves on by ``step`` seconds at every read, as on a host whose other
    processes take the core between two reads."""

    def __init__(self, now: float, step: float):
        self.now, self.step = now, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_pacing_waits_are_never_negative_nan_or_unbounded():
    slept: list[float] = []
    # the arrival is 1 ms ahead at the first read; a second read, 5 ms later, would be 4 ms late
    clock = BusyClock(1000.0, 0.005)
    assert wait_until(1000.006, clock=clock, sleep=slept.append) == pytest.approx(0.001)
    assert wait_until(1000.0, clock=clock, sleep=slept.append) == 0.0  # already past: no sleep at all
    assert wait_until(math.nan, clock=clock, sleep=slept.append) == 0.0
    assert wait_until(math.inf, clock=clock, sleep=slept.append) == MAX_PAUSE_S
    assert slept == [pytest.approx(0.001), MAX_PAUSE_S]
    assert [pause_s(s) for s in (-1.0, 0.0, math.nan, -math.inf, 0.25, 1e300)] == [0, 0, 0, 0, 0.25, MAX_PAUSE_S]


def test_compute_pacing_pads_to_the_target_and_counts_the_lag():
    slept: list[float] = []
    assert pad(0.002, 0.005, sleep=slept.append) == 0.0 and slept == [pytest.approx(0.003)]
    assert pad(0.007, 0.005, sleep=slept.append) == pytest.approx(0.002) and len(slept) == 1  # late: no sleep
    assert pad(0.001, math.nan, sleep=slept.append) == 0.0 and len(slept) == 1
