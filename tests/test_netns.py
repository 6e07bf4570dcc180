"""asteroid_fx/netns.py: links shaped by tc in network namespaces. The rules are checked everywhere;
the network itself only as root with iproute2 (skipped elsewhere, with what is missing)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest

from asteroid_fx.runtime import netns
from asteroid_fx.ir.cluster import Cluster, Device

MISSING = netns.missing()
needs_root = pytest.mark.skipif(bool(MISSING), reason=f"shaped links need {'; '.join(MISSING)}")

# a sends to b at 16 Mbit/s and to c at 4 Mbit/s; every other link is 16 Mbit/s
MBIT = 1e6 / 8
THREE = Cluster([Device("a", "jetson-nano"), Device("b", "jetson-nano"), Device("c", "jetson-nano")],
                bandwidth=[[math.inf, 16 * MBIT, 4 * MBIT], [16 * MBIT, math.inf, 16 * MBIT],
                           [16 * MBIT, 16 * MBIT, math.inf]],
                latency=[[0, 1e-3, 1e-3], [1e-3, 0, 1e-3], [1e-3, 1e-3, 0]])

# receives N bytes on HOST:PORT, prints the payload rate from the first byte to the last (bytes/s)
RECEIVE = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_server((host, port))
print("listening", flush=True)
c, _ = s.accept()
got, first = 0, None
while got < n:
    b = c.recv(1 << 20)
    if not b:
        break
    first = first or time.perf_counter()
    got += len(b)
print(got / (time.perf_counter() - first), flush=True)
"""
SEND = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(bytes(int(sys.argv[3])))
"""


def test_rates_are_the_clusters_bandwidths_per_peer_under_the_fastest_link():
    rates = netns.link_rates(THREE, ["a", "b", "c"], dilation=2.0)
    out, in_ = rates["a"]
    assert out == netns.Rates(8 * MBIT, (("b", 8 * MBIT), ("c", 2 * MBIT)))
    assert in_ == netns.Rates(8 * MBIT, (("b", 8 * MBIT), ("c", 8 * MBIT)))
    assert rates["c"][1] == netns.Rates(8 * MBIT, (("a", 2 * MBIT), ("b", 8 * MBIT)))


def test_an_infinitely_fast_link_is_not_shaped():
    fast = Cluster.uniform([Device("a", "jetson-nano"), Device("b", "jetson-nano")], bandwidth=math.inf)
    assert netns.link_rates(fast, ["a", "b"])["a"] == (netns.Rates(math.inf, ()), netns.Rates(math.inf, ()))
    assert netns.tc_rules("nic0", netns.Rates(math.inf, ()), {}, "dst", "htb") == []


def test_packets_are_small_on_slow_links_and_large_on_fast_ones():
    # a packet passes an idle shaper at once: at most EARLY_S of bytes per packet, at least a frame
    assert netns.packet_frames(1e6) == 1  # 8 Mbit/s: one frame is 1.5 ms
    assert netns.packet_frames(12.5e6) == 4  # 100 Mbit/s: 4 frames are 0.48 ms
    assert netns.packet_frames(125e6) == 41  # 1 Gbit/s: 41 frames are 0.5 ms
    assert netns.packet_frames(1.25e9) == netns.packet_frames(math.inf) == netns.MAX_FRAMES


def test_htb_rules_one_class_per_peer_under_the_nic():
    out, _ = netns.link_rates(THREE, ["a", "b", "c"])["a"]
    rules = netns.tc_rules("nic0", out, {"b": "10.213.0.3", "c": "10.213.0.4"}, "dst", "htb")
    assert [" ".join(r) for r in rules] == [
        "qdisc add dev nic0 root handle 1: htb",
        "class add dev nic0 parent 1: classid 1:1 htb rate 16000000bit ceil 16000000bit quantum 200000",
        "class add dev nic0 parent 1:1 classid 1:a htb rate 8000000bit ceil 16000000bit quantum 200000",
        "filter add dev nic0 parent 1: protocol ip prio 1 u32 match ip dst 10.213.0.3/32 flowid 1:a",
        "class add dev nic0 parent 1:1 classid 1:b htb rate 4000000bit ceil 4000000bit quantum 50000",
        "filter add dev nic0 parent 1: protocol ip prio 1 u32 match ip dst 10.213.0.4/32 flowid 1:b",
    ]
    assert [" ".join(r) for r in netns.tc_rules("nic0", out, {}, "dst", "tbf")] == [
        "qdisc add dev nic0 root tbf rate 16000000bit burst 3028 latency 1s"]


def test_without_root_or_tools_the_error_says_what_is_missing_and_what_needs_none(monkeypatch):
    monkeypatch.setattr(netns, "_capabilities", lambda: 0)
    monkeypatch.setattr(netns, "_tool", lambda name: None if name == "tc" else "/usr/sbin/ip")
    with pytest.raises(netns.Unavailable) as e:
        netns.require()
    message = str(e.value)
    for word in ("`tc`", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "root", "--emulate"):
        assert word in message
    assert "`ip`" not in message


def test_launch_with_shaped_links_stops_with_that_error_before_compiling(monkeypatch, tmp_path):
    from asteroid_fx.runtime.launcher import launch
    from asteroid_fx.runtime.spec import RunSpec

    monkeypatch.setattr(netns, "missing", lambda: ["CAP_NET_ADMIN to create links and qdiscs (run as root)"])
    monkeypatch.setattr("asteroid_fx.runtime.launcher.compile_spec", lambda *a: pytest.fail("compiled before the check"))
    with pytest.raises(netns.Unavailable, match="--emulate"):
        launch(RunSpec(model="mlp:small", batch=8, microbatches=1), THREE, tmp_path, shape_links=True)


def payload_rate(net: netns.ShapedNetwork, src: str, dst: str, nbytes: int, port: int = 5201) -> float:
    receiver = subprocess.Popen(net.command(dst, [sys.executable, "-c", RECEIVE, net.address[dst], str(port),
                                                  str(nbytes)]), stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "listening"
        subprocess.run(net.command(src, [sys.executable, "-c", SEND, net.address[dst], str(port), str(nbytes)]),
                       check=True, timeout=30)
        return float(receiver.stdout.readline())
    finally:
        receiver.kill()
        receiver.wait()


@needs_root
def test_a_shaped_link_carries_its_configured_rate():
    with netns.ShapedNetwork(THREE, ["a", "b", "c"]) as net:
        assert net.discipline == "htb"
        # about half a second each: long enough that the start of a TCP connection does not count
        fast = payload_rate(net, "a", "b", 1_000_000)
        slow = payload_rate(net, "a", "c", 250_000)
        back = payload_rate(net, "c", "a", 1_000_000)
    assert fast == pytest.approx(16 * MBIT, rel=0.15)
    assert slow == pytest.approx(4 * MBIT, rel=0.15)
    assert back == pytest.approx(16 * MBIT, rel=0.15)


def ours(net: netns.ShapedNetwork) -> list[str]:
    left = [n for n in netns.namespaces() if net.tag in n]
    link = subprocess.run(["ip", "link", "show", net.root_link], capture_output=True)
    return left + ([net.root_link] if link.returncode == 0 else [])


@needs_root
def test_namespaces_and_links_are_gone_after_the_run_and_after_an_exception():
    with netns.ShapedNetwork(THREE, ["a", "b", "c"]) as net:
        assert len(ours(net)) == 5  # hub, three devices, the root end of the coordinator's veth
    assert ours(net) == []
    with pytest.raises(ZeroDivisionError):
        with netns.ShapedNetwork(THREE, ["a", "b"]) as net:
            1 / 0
    assert ours(net) == []


@needs_root
def test_a_failure_half_way_through_building_removes_what_was_made(monkeypatch):
    net = netns.ShapedNetwork(THREE, ["a", "b", "c"])
    monkeypatch.setattr(net, "_has_htb", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        net.open()
    assert ours(net) == []


@needs_root
def test_a_crashed_runs_namespaces_are_removed_by_the_next_run():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}{dead.pid}-0abc12-hub"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with netns.ShapedNetwork(THREE, ["a", "b"]):
            assert stale not in netns.namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


@needs_root
def test_two_networks_side_by_side_get_their_own_subnets():
    with netns.ShapedNetwork(THREE, ["a", "b"]) as one, netns.ShapedNetwork(THREE, ["a", "b"]) as two:
        assert one.coordinator != two.coordinator
        assert set(one.namespace.values()).isdisjoint(two.namespace.values())


@needs_root
def test_launch_through_shaped_links_trains_like_without_and_takes_the_links_time(tmp_path):
    from asteroid_fx.runtime.launcher import launch
    from asteroid_fx.runtime.spec import RunSpec, batches, compile_spec, iterations_of, optimizer_of
    from asteroid_fx.sim import simulate

    # a slow link (8 Mbit/s) and 64 KiB messages: the transfers, shaped by the kernel, set the
    # iteration time (a message over an idle link is early by one frame's time, 1.5 ms here)
    slow = Cluster.uniform([Device("a", "jetson-agx-orin"), Device("b", "jetson-agx-orin")],
                           bandwidth=1e6, latency=2e-3)
    spec = RunSpec(model="mlp:small", batch=512, microbatches=2, groups=(("a",), ("b",)), rows=((256,), (256,)),
                   iterations=3)
    ours = f"{netns.PREFIX}{os.getpid()}-"  # another process's run may come and go meanwhile
    shaped = launch(spec, slow, tmp_path, timeout_s=120, log=lambda m: None, shape_links=True)
    assert not [n for n in netns.namespaces() if n.startswith(ours)]
    # the same numbers as the local backend, which unshaped workers equal (tests/test_torch_dist.py)
    compiled = compile_spec(spec, slow)
    _, losses = compiled.run(batches(spec), iterations_of(spec), optimizer=optimizer_of(spec))
    assert shaped["losses"] == pytest.approx(losses, rel=1e-6)
    # latency is not shaped: compare with the simulator on links without it
    no_latency = dataclasses.replace(slow, latency=tuple(tuple(0.0 for _ in row) for row in slow.latency))
    predicted = simulate(compiled.program, compiled.layer_graph, no_latency).iteration_s
    measured = min(shaped["seconds"][1:])
    assert predicted > 0.15  # four 64 KiB transfers at 1e6 B/s, two on the critical path each way
    assert 0.8 * predicted <= measured <= 1.6 * predicted, (measured, predicted)
