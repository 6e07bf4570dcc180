"""Failures that compose with recovery itself, found by a kill sweep: a second failure in the
iterations a recovery redoes, a device that dies while it joins, a frozen device that comes back
after the others gave it up, and emulated pacing on a busy host. Every run injects its faults
through ``RunSpec.faults`` (or the launcher's signals) and ends with the weights of the
failure-free run within 1e-6."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch
import torch.distributed as dist

from asteroid_fx.backends.torch_dist.emulation import MAX_PAUSE_S, pad, pause_s, wait_until
from asteroid_fx.ir.cluster import resolve_cluster
from asteroid_fx.runtime.heartbeat import GIVEN_UP_GRACE_S, Heartbeat
from asteroid_fx.runtime.launcher import launch, load_weights
from asteroid_fx.runtime.spec import RunSpec, batches, compile_spec, iterations_of, optimizer_of
from asteroid_fx.runtime.store import agreed_failure, failures_key


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


# ---------------------------------------------------------------------------------------------
# a second failure while a recovery redoes its iterations

HOST4 = resolve_cluster("host-4")
TWO_GROUPS = RunSpec(model="mlp:small", batch=12, microbatches=2, groups=(("host0", "host1"), ("host2", "host3")),
                     rows=((3, 3), (2, 4)), iterations=10, optimizer="adam", lr=1e-3, recovery=True, replan=False,
                     backup_every=3)


def check_exact(result: dict, spec: RunSpec, cluster, out) -> None:
    """Weights and losses equal the failure-free local run of the same iterations, within 1e-6 (a
    group that re-splits its rows sums in another order: float32 rounding over thousands of steps)."""
    runner, losses = compile_spec(spec, cluster).run(batches(spec), iterations_of(spec), optimizer=optimizer_of(spec))
    assert result["losses"] == pytest.approx(losses, rel=1e-6)
    got, want = load_weights(out, result["program"].devices), runner.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_a_second_failure_in_the_first_redone_iteration_rolls_back_to_copies_that_exist(tmp_path):
    # backups after iterations 0, 3, 6: host1 dies in iteration 5, the survivors roll back to the
    # start of 4 and redo 4 and 5; host3 dies in the redone 4, after its barrier made 5 a backup
    # point whose copies only the end of 4 makes. The second rollback goes to 4 again.
    spec = dataclasses.replace(TWO_GROUPS, faults=(("host1", 5, 2, "kill"), ("host3", 4, 2, "kill-redo")))
    result = launch(spec, HOST4, tmp_path, timeout_s=90, log=lambda m: None)
    assert [(f["device"], f["iteration"], f["rollback_to"]) for f in result["failures"]] == [
        ("host1", 5, 4), ("host3", 4, 4)]
    assert result["program"].devices == ("host0", "host2")
    check_exact(result, spec, HOST4, tmp_path)


def test_failures_in_the_redone_iterations_and_while_regrouping_leave_complete_records(tmp_path):
    # host1 dies in iteration 6 (the survivors redo 4, 5, 6); host3 dies as they regroup, which
    # interrupts the first recovery before its groups exist; host2 dies in the redone 5. Every
    # record says when its survivors regrouped and when training was back past its iteration.
    spec = dataclasses.replace(TWO_GROUPS, faults=(("host1", 6, 2, "kill"), ("host3", 6, 0, "kill-regroup"),
                                                   ("host2", 5, 3, "kill-redo")))
    result = launch(spec, HOST4, tmp_path, timeout_s=90, log=lambda m: None)
    assert [(f["device"], f["iteration"], f["rollback_to"]) for f in result["failures"]] == [
        ("host1", 6, 4), ("host3", 4, 4), ("host2", 5, 5)]
    for f in result["failures"]:
        assert 0 <= f["regroup_s"] < 10 and 0 < f["recovery_s"] < 20, f
    assert result["program"].devices == ("host0",)
    check_exact(result, spec, HOST4, tmp_path)


# ---------------------------------------------------------------------------------------------
# a device that dies while it joins

JOIN_CLUSTER = resolve_cluster("raspberry-pi-5,raspberry-pi-5,jetson-agx-orin")


@pytest.mark.slow  # about 30 s: the newcomer's start, and the reference run of 1500 iterations
def test_a_device_that_dies_in_its_joins_hand_over_is_as_if_it_never_joined(tmp_path):
    # the run starts on one board; the fast one asks to join, the planner moves the run there,
    # and the newcomer dies before its first hand-over action. It never ran an iteration of the
    # program (nor published a loss): the running device goes on in the program it ran, from the
    # iteration the switch was to start, not from the run's first.
    spec = RunSpec(model="gpt:small", batch=12, microbatches=None, iterations=1500, optimizer="adam", lr=1e-3,
                   recovery=True, faults=(("agx0", -1, 0, "kill-handover"),))
    result = launch(spec, JOIN_CLUSTER, tmp_path, timeout_s=120, log=lambda m: None, joins=[("agx0", 0.0)])
    (switch,) = result["switches"]
    assert switch["joining"] == ["agx0"] and switch.get("abandoned"), "the join never came: the run ended first"
    (failure,) = result["failures"]
    assert failure["device"] == "agx0" and "failed while joining" in failure["changes"][0]
    assert failure["iteration"] == failure["rollback_to"] == switch["iteration"]
    assert result["program"].devices == ("pi5-0",)
    check_exact(result, spec, JOIN_CLUSTER, tmp_path)


# ---------------------------------------------------------------------------------------------
# a frozen device that comes back after the others gave it up

HOST3 = resolve_cluster("host-3")
# 3000 iterations of a few ms: the run outlasts the 3 s freeze and the 5 s allowed after it
HYBRID = RunSpec(model="mlp:small", batch=12, microbatches=2, groups=(("host0",), ("host1", "host2")),
                 rows=((6,), (4, 2)), iterations=3000, optimizer="adam", lr=1e-3, recovery=True, replan=False,
                 backup_every=1, heartbeat_timeout_s=1.0)


def test_a_device_the_others_gave_up_leaves_on_its_own_when_its_training_does_not():
    # the heartbeat is all of a resumed device that runs for sure (its training loop may sit in a
    # wait of the abandoned epoch): it reads that it was given up and ends the process in bounded
    # time; a device that was not given up never does
    server = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
    beats = {d: Heartbeat(dist.TCPStore("127.0.0.1", server.port, world_size=None, is_master=False), d,
                          interval_s=0.05, timeout_s=1.0) for d in "abc"}
    left: dict[str, float] = {}
    for d, hb in beats.items():
        hb.on_given_up = lambda store, d=d: left.setdefault(d, time.monotonic())
        hb.start()
    for hb in beats.values():
        hb.watch(0, "abc")
    try:
        declared = time.monotonic()
        assert beats["b"].declare("a", "no heartbeat for 1.0s")["device"] == "a"
        assert beats["c"].interrupt.wait(1.0) and beats["a"].interrupt.wait(1.0)
        server.set(failures_key(0), json.dumps([agreed_failure(server, 0)]))  # b and c agree: a alone
        deadline = time.monotonic() + GIVEN_UP_GRACE_S + 2.0
        while "a" not in left and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "a" in left and GIVEN_UP_GRACE_S <= left["a"] - declared <= GIVEN_UP_GRACE_S + 1.0
        time.sleep(0.3)
        assert set(left) == {"a"}  # b and c were not given up
    finally:
        for hb in beats.values():
            hb.stop()


@pytest.mark.slow  # about 30 s on an idle host, a few times that on a busy one
@pytest.mark.parametrize("victim", ["host0", "host1"])  # a stage of its own (it merges), a group member
def test_a_frozen_device_that_resumes_after_it_was_given_up_leaves_on_its_own(tmp_path, victim):
    # SIGSTOP: the others find it silent and go on without it; 3 s later SIGCONT: it must see that
    # it was given up and end within 5 s, not wait in the abandoned epoch until the launcher kills it
    resumed_after = 3.0
    result = launch(HYBRID, HOST3, tmp_path, timeout_s=150, log=lambda m: None,
                    kills=[(victim, 0.3, "SIGSTOP"), (victim, 0.3 + resumed_after, "SIGCONT")])
    (failure,) = result["failures"]
    assert failure["device"] == victim and failure["reason"].startswith("no heartbeat")
    ended = result["ended"].get(victim)
    assert ended is not None, f"{victim} was still running when the run ended"
    assert ended["code"] == 0 and ended["at"] - failure["failed_at"] - resumed_after < 5.0, ended
    assert result["workers"][victim]["left"]
    check_exact(result, HYBRID, HOST3, tmp_path)
