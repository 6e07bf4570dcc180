"""Links shaped by the kernel against links paced in process: the payload rate a shaped link gives
at a few rates, then for the plans of three planners the measured iteration time with shaped links
(`asteroid launch --emulate --shape-links`: compute paced in process, bytes paced by tc in network
namespaces) and with in-process emulation (`--emulate`), against the simulator's prediction with
the cluster's latencies and without them (shaped links carry none: asteroid_fx/netns.py shapes
bandwidth only).
Writes the "netns" section of RESULTS.md. Root only (asteroid_fx/netns.py).

    .venv/bin/python benchmarks/netns.py [--iterations 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section  # noqa: E402

from asteroid_fx.ir import catalog  # noqa: E402

from asteroid_fx.runtime import netns
from asteroid_fx.ir.cluster import Cluster, Device  # noqa: E402
from asteroid_fx.runtime.launcher import launch  # noqa: E402
from asteroid_fx.runtime.spec import RunSpec, compile_spec, pinned  # noqa: E402
from asteroid_fx.sim import simulate  # noqa: E402

MODEL, PRESET, BATCH = "digits", "edge-4-pi-1g", 64
PLANNERS = ("asteroid", "dp", "pp")
RATES_MBIT = (4, 16, 100, 1000)
BULK_S = 1.0  # seconds of transfer per measured rate
MAX_DILATION = 400

RECEIVE = """
import socket, sys, time
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
c, _ = s.accept()
n, got, first = int(sys.argv[3]), 0, None
while got < n:
    b = c.recv(1 << 20)
    if not b:
        break
    first = first or time.perf_counter()
    got += len(b)
print(got / (time.perf_counter() - first), flush=True)
"""
SEND = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2]))).sendall(bytes(int(sys.argv[3])))"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def payload_rate(mbit: float) -> float:
    """Bytes/s of payload one TCP connection moves over a link shaped to ``mbit`` Mbit/s."""
    rate = mbit * 1e6 / 8
    pair = Cluster.uniform([Device("a", "host-cpu"), Device("b", "host-cpu")], bandwidth=rate)
    nbytes = int(rate * BULK_S)
    with netns.ShapedNetwork(pair, ["a", "b"]) as net:
        receiver = subprocess.Popen(net.command("b", [sys.executable, "-c", RECEIVE, net.address["b"], "5201",
                                                      str(nbytes)]), stdout=subprocess.PIPE, text=True)
        try:
            receiver.stdout.readline()
            subprocess.run(net.command("a", [sys.executable, "-c", SEND, net.address["b"], "5201", str(nbytes)]),
                           check=True)
            return float(receiver.stdout.readline())
        finally:
            receiver.kill()
            receiver.wait()


def seconds(spec: RunSpec, cluster, shape_links: bool = False) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        return launch(spec, cluster, out, timeout_s=900, log=lambda m: None, shape_links=shape_links)["seconds"]


def run(planner: str, iterations: int) -> dict:
    """One plan, emulated in process and with shaped links at the same time dilation (chosen as
    benchmarks/emulation.py does: the emulated time four times this machine's own)."""
    cluster = catalog.preset(PRESET)
    spec = RunSpec(model=MODEL, batch=BATCH, microbatches=None, iterations=iterations, optimizer="adam", lr=1e-3,
                   emulate=True, planner=planner)
    compiled = compile_spec(spec, cluster)
    plan, spec = compiled.plan, pinned(spec, compiled.plan)
    host = statistics.median(seconds(dataclasses.replace(spec, iterations=4), cluster)[1:])
    dilation = float(min(MAX_DILATION, max(1, math.ceil(4 * host / plan.prediction.iteration_s))))
    spec = dataclasses.replace(spec, dilation=dilation)
    measured = {}
    for mode, shaped in (("emulated", False), ("shaped", True)):
        got = [s / dilation for s in seconds(spec, cluster, shaped)[2:]]
        measured[mode] = (statistics.median(got), min(got), max(got))
    no_latency = dataclasses.replace(cluster, latency=tuple(tuple(0.0 for _ in row) for row in cluster.latency))
    return {"shape": (f"{len(plan.stages)} stages {'/'.join(str(len(s.devices)) for s in plan.stages)}, "
                      f"{plan.microbatches}x{plan.microbatch_rows}, {plan.schedule}"),
            "dilation": dilation, "measured": measured,
            "simulated": simulate(compiled.program, compiled.layer_graph, cluster).iteration_s,
            "no_latency": simulate(compiled.program, compiled.layer_graph, no_latency).iteration_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=12)
    args = ap.parse_args()
    netns.require()
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    rate_rows = ["| shaped to (Mbit/s) | payload measured (Mbit/s) | payload / rate |", "|---:|---:|---:|"]
    for mbit in RATES_MBIT:
        log(f"  bulk transfer over a link shaped to {mbit} Mbit/s ...")
        got = payload_rate(mbit) * 8 / 1e6
        rate_rows.append(f"| {mbit} | {got:.1f} | {got / mbit:.1%} |")
    rows = ["| planner | plan | dilation | simulated (ms) | simulated, no latency (ms) | in-process emulation (ms) "
            "| shaped links (ms) | shaped vs no-latency simulation |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for planner in PLANNERS:
        log(f"  {MODEL} on {PRESET}, planner {planner} ...")
        r = run(planner, args.iterations)
        (emulated, emin, emax), (shaped, smin, smax) = r["measured"]["emulated"], r["measured"]["shaped"]
        rows.append(f"| {planner} | {r['shape']} | {r['dilation']:g} | {r['simulated'] * 1e3:.1f} | "
                    f"{r['no_latency'] * 1e3:.1f} | {emulated * 1e3:.1f} ({emin * 1e3:.1f}-{emax * 1e3:.1f}) | "
                    f"{shaped * 1e3:.1f} ({smin * 1e3:.1f}-{smax * 1e3:.1f}) | {shaped / r['no_latency'] - 1:+.1%} |")
        log(f"    emulated {emulated * 1e3:.1f} ms, shaped {shaped * 1e3:.1f} ms, simulated {r['simulated'] * 1e3:.1f} "
            f"ms ({r['no_latency'] * 1e3:.1f} ms without latency)")
    body = [
        "## Shaped links in network namespaces (benchmarks/netns.py)",
        "",
        f"Machine: {machine()}; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. "
        f"Command: `.venv/bin/python benchmarks/netns.py --iterations {args.iterations}` (as root). "
        "`--shape-links` runs every worker in a network namespace of its own, joined by a bridge, with htb "
        "shaping each device's way out (one class per peer at the pair's bandwidth, under the device's fastest "
        "link) and its way in (through an ifb device) to the cluster's bandwidths divided by the dilation; "
        "compute is still paced in process (`--emulate`). Latency is not shaped (that takes the netem or fq "
        "qdisc, which the shaping does not use), so shaped links carry none of the cluster's latencies: the "
        "last column compares them with the simulator on latency-free links.",
        "",
        f"### One TCP connection over a shaped link ({BULK_S:g} s of bytes at the rate)",
        "",
        *rate_rows,
        "",
        f"### {MODEL} on {PRESET}, batch {BATCH}: iteration time of three planners' plans",
        "",
        "Both runs of a plan use the same time dilation (chosen as in benchmarks/emulation.py); measured: "
        "median (min-max) over iterations 3 onwards, divided by the dilation. Analytic costs (catalog), Adam.",
        "",
        *rows,
        "",
        f"Whole benchmark: {time.perf_counter() - started:.0f} s.",
    ]
    write_section("netns", "\n".join(body))
    log("wrote the netns section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
