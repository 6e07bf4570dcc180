"""Live pipeline replay on torch_dist: workers (gloo on loopback) lose a device to SIGKILL, to a
freeze only heartbeats find, or to an announced departure, and the survivors regroup in place and
end with the weights of the failure-free run of the same iterations."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch
import torch.distributed as dist

from asteroid_fx.ir.cluster import Cluster, Device, resolve_cluster
from asteroid_fx.runtime.heartbeat import Heartbeat
from asteroid_fx.runtime.launcher import launch, load_weights
from asteroid_fx.runtime.spec import RunSpec, batches, compile_spec, iterations_of, optimizer_of
from asteroid_fx.runtime.store import agreed_failure

HOST3 = resolve_cluster("host-3")
HOST4 = resolve_cluster("host-4")

# stage 0 alone on host0 (on its loss stage 1 lends it host1), stage 1 a group of two (a survivor takes over a lost
# member's rows)
HYBRID = RunSpec(model="mlp:small", batch=12, microbatches=2, groups=(("host0",), ("host1", "host2")),
                 rows=((6,), (4, 2)), iterations=6, optimizer="adam", lr=1e-3, recovery=True, replan=False,
                 backup_every=1)


def check_exact(result: dict, spec: RunSpec, cluster, out) -> None:
    """Weights and losses equal the failure-free local run of the same iterations."""
    runner, losses = compile_spec(spec, cluster).run(batches(spec), iterations_of(spec), optimizer=optimizer_of(spec))
    assert result["losses"] == pytest.approx(losses, rel=1e-6)
    got, want = load_weights(out, result["program"].devices), runner.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_a_killed_single_device_stage_borrows_a_member_of_its_neighbouring_group(tmp_path):
    spec = dataclasses.replace(HYBRID, faults=(("host0", 2, 3, "kill"),))
    result = launch(spec, HOST3, tmp_path, timeout_s=120, log=lambda m: None)
    (failure,) = result["failures"]
    assert failure["device"] == "host0" and failure["iteration"] == 2 and failure["rollback_to"] == 2
    assert "host1 (stage 1, holds the backup) is lent to it" in failure["changes"][0]
    assert failure["detected_s"] < 2.0 and failure["recovery_s"] < 5.0
    assert [st.devices for st in result["program"].stages] == [("host1",), ("host2",)]
    check_exact(result, spec, HOST3, tmp_path)


@pytest.mark.slow
def test_a_lent_device_keeps_batchnorm_exact_on_workers(tmp_path):
    """resnet18 (BatchNorm) on "1 + group of 2": host0 dies, host1 runs stage 0 on its 8 rows as
    host0 did and host2 runs host1's rows as a chunk of its own; a merge would run stage 0 over
    4 + 4 rows, another update (docs/replay.md, "Chunks")."""
    spec = RunSpec(model="resnet18:small", batch=16, microbatches=2, groups=(("host0",), ("host1", "host2")),
                   rows=((8,), (4, 4)), iterations=6, optimizer="adam", lr=1e-3, recovery=True, replan=False,
                   backup_every=1, faults=(("host0", 3, 3, "kill"),))
    result = launch(spec, HOST3, tmp_path / "failed", timeout_s=240, log=lambda m: None)
    (failure,) = result["failures"]
    assert failure["rollback_to"] == 3 and "is lent to it" in failure["changes"][0]
    assert [st.devices for st in result["program"].stages] == [("host1",), ("host2",)]
    free = launch(dataclasses.replace(spec, faults=()), HOST3, tmp_path / "free", timeout_s=240, log=lambda m: None)
    assert result["losses"] == pytest.approx(free["losses"], rel=1e-6)
    got = load_weights(tmp_path / "failed", result["program"].devices)
    want = load_weights(tmp_path / "free", free["program"].devices)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_a_group_member_killed_at_a_random_moment_is_replaced_by_its_group(tmp_path):
    seed = random.randrange(1 << 30)
    moment = random.Random(seed).uniform(0.05, 0.5)  # the run lasts over a second
    spec = dataclasses.replace(HYBRID, iterations=150)
    result = launch(spec, HOST3, tmp_path, timeout_s=120, log=lambda m: None, kills=[("host2", moment)])
    (failure,) = result["failures"]
    assert failure["device"] == "host2", f"seed {seed}"
    assert result["program"].devices == ("host0", "host1")
    check_exact(result, spec, HOST3, tmp_path)


def test_a_frozen_device_is_found_by_heartbeats_alone(tmp_path):
    # SIGSTOP: the process stays, its sockets stay open, only its heartbeat stops
    spec = dataclasses.replace(HYBRID, iterations=200, heartbeat_timeout_s=1.0)
    result = launch(spec, HOST3, tmp_path, timeout_s=120, log=lambda m: None, kills=[("host1", 0.2, "SIGSTOP")])
    (failure,) = result["failures"]
    assert failure["device"] == "host1" and failure["reason"].startswith("no heartbeat")
    assert 1.0 - spec.heartbeat_s <= failure["detected_s"] <= 1.0 + 2 * spec.heartbeat_s + 0.5
    check_exact(result, spec, HOST3, tmp_path)


def test_an_announced_departure_and_then_a_kill(tmp_path):
    spec = dataclasses.replace(HYBRID, groups=(("host0", "host1"), ("host2", "host3")), rows=((3, 3), (2, 4)),
                               iterations=8, faults=(("host1", 2, 1, "leave"), ("host3", 5, 4, "kill")))
    result = launch(spec, HOST4, tmp_path, timeout_s=120, log=lambda m: None)
    assert [(f["device"], f["iteration"]) for f in result["failures"]] == [("host1", 2), ("host3", 5)]
    assert result["failures"][0]["reason"] == "left the run (announced)"
    assert result["program"].devices == ("host0", "host2")
    check_exact(result, spec, HOST4, tmp_path)


def test_backups_every_three_iterations_redo_from_the_last_backup(tmp_path):
    # backups after iterations 0, 3, 6: a failure in iteration 5 rolls back to the start of 4
    spec = dataclasses.replace(HYBRID, iterations=8, backup_every=3, faults=(("host0", 5, 2, "kill"),))
    result = launch(spec, HOST3, tmp_path, timeout_s=120, log=lambda m: None)
    (failure,) = result["failures"]
    assert (failure["iteration"], failure["rollback_to"]) == (5, 4)
    check_exact(result, spec, HOST3, tmp_path)


def test_paced_backups_agree_on_every_device_and_a_kill_redoes_from_the_last(tmp_path):
    # backup_every=None: the leader decides at each barrier which iterations back up; had two
    # devices decided differently, a BACKUP would wait for a RESTORE that never comes
    spec = dataclasses.replace(HYBRID, iterations=150, backup_every=None)
    result = launch(spec, HOST3, tmp_path, timeout_s=120, log=lambda m: None, kills=[("host2", 0.3)])
    (failure,) = result["failures"]
    assert failure["rollback_to"] <= failure["iteration"]
    check_exact(result, spec, HOST3, tmp_path)


def test_the_backup_pace_keeps_the_measured_cost_within_the_budget():
    from asteroid_fx.runtime.backups import BackupPace

    pace = BackupPace(0.02, first=10, least=3, most=50)
    assert pace.every() == 10  # nothing measured yet

    def cycle(plain_s: float, backup_s: float, after_s: float, plains: int = 6) -> None:
        for _ in range(plains):
            pace.observe(plain_s, "plain")
        pace.observe(backup_s, "backup")
        pace.observe(after_s, "after")

    for _ in range(8):  # a backup adds 2 ms to its iteration and 1 ms to the next, on 10 ms iterations
        cycle(0.010, 0.012, 0.011)
    assert pace.every() == 15 and 0.003 / (15 * 0.010) <= 0.02 < 0.003 / (14 * 0.010)
    for _ in range(8):
        cycle(0.010, 0.035, 0.010, plains=1)  # a slow plain iteration now and then does not move the baseline
        pace.observe(0.200, "plain")
    assert pace.every() == 50  # 25 ms per backup: capped, a failure redoes at most this many
    for _ in range(8):
        cycle(0.010, 0.009, 0.010)  # cheaper than a plain iteration (noise): as often as still measurable
    assert pace.every() == 3
    with pytest.raises(ValueError, match="backup_budget"):
        RunSpec(model="mlp:small", batch=4, microbatches=1, backup_budget=5)
    with pytest.raises(ValueError, match="backup_every"):
        RunSpec(model="mlp:small", batch=4, microbatches=1, backup_every=0)


def test_heartbeats_find_a_silent_device_in_bounded_time_and_raise_no_false_alarm():
    server = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)

    def client():
        return dist.TCPStore("127.0.0.1", server.port, world_size=None, is_master=False)

    beats = {d: Heartbeat(client(), d, interval_s=0.05, timeout_s=0.5) for d in "abc"}
    for hb in beats.values():
        hb.start()
    for hb in beats.values():
        hb.watch(0, "abc")
    try:
        busy = time.monotonic() + 1.5  # full load on this thread: nobody may be declared
        x = torch.randn(256, 256)
        while time.monotonic() < busy:
            x = torch.tanh(x @ x)
        assert not any(hb.interrupt.is_set() for hb in beats.values())
        beats["c"].stop()  # c falls silent
        silent = time.monotonic()
        assert beats["a"].interrupt.wait(2.0) and beats["b"].interrupt.wait(1.0)
        assert time.monotonic() - silent <= 0.5 + 3 * 0.05 + 0.2
        assert agreed_failure(server, 0)["device"] == "c"
    finally:
        for hb in beats.values():
            hb.stop()


def test_asteroid_launch_recovers_from_a_kill_drill(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "asteroid_fx.cli", "launch", "mlp:small", "--cluster", "host-3",
                           "--batch", "12", "--microbatches", "2", "--stages", "2", "--iterations", "150",
                           "--recover", "--kill", "host1@0.1", "--out", str(tmp_path), "--timeout", "120"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "host1 failed in iteration" in proc.stdout and "training back after" in proc.stdout


# ---------------------------------------------------------------------------------------------
# re-planning: a switch to the planner's plan after a failure, and a device taken in when it joins

# the processes described as laptop CPUs: catalog costs, so the plans the test compares with the
# leader's do not depend on this machine's measured "host-cpu" figures
LAPTOP3 = Cluster.uniform([Device(f"host{i}", "laptop-i7") for i in range(3)], bandwidth="10Gbps", latency=20e-6)


def test_after_a_failure_the_run_switches_to_the_planners_plan_for_the_survivors(tmp_path):
    # the rewrite merges stage 0 into the group; for this tiny model the planner's plan for the
    # survivors is one device, and the run moves there at an iteration boundary, exactly
    spec = dataclasses.replace(HYBRID, replan=True, iterations=30, faults=(("host0", 2, 3, "kill"),))
    result = launch(spec, LAPTOP3, tmp_path, timeout_s=120, log=lambda m: None)
    (failure,) = result["failures"]
    (switch,) = result["switches"]
    assert switch["iteration"] > failure["iteration"] and switch["reason"].startswith("host0 failed")
    fresh = compile_spec(dataclasses.replace(spec, groups=None, rows=None, microbatches=None),
                         LAPTOP3.subset(["host1", "host2"]))
    assert set(result["program"].devices) == set(fresh.program.devices)
    assert switch["leaving"] == [d for d in ("host1", "host2") if d not in fresh.program.devices]
    check_exact(result, spec, LAPTOP3, tmp_path)


@pytest.mark.parametrize("victim", ["host1", "host2"])  # the device the new plan keeps, and the one it leaves out
def test_a_failure_during_a_switch_abandons_it_and_is_recovered_in_the_running_program(tmp_path, victim):
    # as above, but a device dies in the switch's hand-over, before it commits: every device drops
    # the switch and recovers the failure in the program that ran, whose weights then go on exactly
    spec = dataclasses.replace(HYBRID, replan=True, iterations=40,
                               faults=(("host0", 2, 3, "kill"), (victim, -1, 0, "kill-handover")))
    result = launch(spec, LAPTOP3, tmp_path, timeout_s=120, log=lambda m: None)
    assert [f["device"] for f in result["failures"]] == ["host0", victim]
    first = result["switches"][0]
    assert first.get("abandoned") and first["switch_s"] is None
    assert result["failures"][1]["iteration"] == first["iteration"]
    assert victim not in result["program"].devices
    check_exact(result, spec, LAPTOP3, tmp_path)


JOIN_CLUSTER = resolve_cluster("raspberry-pi-5,raspberry-pi-5,jetson-agx-orin")


def test_a_device_that_joins_is_taken_in_by_a_replan_at_an_iteration_boundary(tmp_path):
    # the run starts on the two boards (the planner uses one); the much faster board joins, the
    # planner's plan with it runs there, and the weights are those of training without the switch.
    # Emulated at 3x dilation so the run outlasts the newcomer's start (imports, compile).
    spec = RunSpec(model="gpt:small", batch=12, microbatches=None, iterations=600, optimizer="adam", lr=1e-3,
                   recovery=True, emulate=True, dilation=3.0)
    result = launch(spec, JOIN_CLUSTER, tmp_path, timeout_s=180, log=lambda m: None, joins=[("agx0", 0.0)])
    (switch,) = result["switches"]
    assert switch["joining"] == ["agx0"] and "agx0" in result["program"].devices
    assert switch["switch_s"] < 2.0
    check_exact(result, spec, JOIN_CLUSTER, tmp_path)


def test_a_device_that_cannot_help_is_told_so_and_the_run_goes_on(tmp_path):
    # host2 joins a one-device run of a tiny model: the planner's best plan leaves it out
    spec = RunSpec(model="mlp:small", batch=12, microbatches=2, iterations=6000, optimizer="adam", lr=1e-3,
                   recovery=True)
    result = launch(spec, LAPTOP3, tmp_path, timeout_s=180, log=lambda m: None, joins=[("host2", 0.0)])
    assert result["switches"] == []
    assert result["workers"]["host2"]["left"]
    log = (tmp_path / "worker_host2.log").read_text()
    assert "not taken in: " in log


@pytest.mark.parametrize("victims, changes", [
    (("host1", "host2"), ("takes over its rows", "takes over its rows")),  # one member of each group
    # a whole stage: the other group lends it the holder of its backup, host0
    (("host2", "host3"), ("stage 0 lends host0 to stage 1", "is lent to it")),
])
def test_two_devices_killed_at_the_same_moment(tmp_path, victims, changes):
    spec = dataclasses.replace(HYBRID, groups=(("host0", "host1"), ("host2", "host3")), rows=((3, 3), (2, 4)),
                               iterations=300)
    result = launch(spec, HOST4, tmp_path, timeout_s=120, log=lambda m: None, kills=[(v, 0.2) for v in victims])
    (failure,) = result["failures"]
    assert sorted([failure["device"], *failure["also"]]) == sorted(victims)
    for text, change in zip(changes, failure["changes"]):
        assert text in change
    assert not set(victims) & set(result["program"].devices)
    check_exact(result, spec, HOST4, tmp_path)
