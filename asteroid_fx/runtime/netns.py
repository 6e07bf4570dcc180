"""A shaped network for a local run: every device's worker in a network namespace of its own, its
links paced by the kernel (tc) at the cluster's bandwidths instead of in process.

Layout, with names unique to the run (``asteroid-<launcher pid>-<tag>-...``)::

    root namespace               hub namespace                device namespaces
    ast<tag> 10.213.N.1 ──veth── coord ─┐
                                       br0 ─ d0 ──veth── nic0 10.213.N.2   (device 0)
                                           ─ d1 ──veth── nic0 10.213.N.3   (device 1) ...

Workers reach the coordinator (the launcher's store, in the root namespace) at 10.213.N.1, and each
other, through the hub's bridge. Only the veth end ``ast<tag>`` appears in the root
namespace, on a /24 that no route there uses, so runs side by side never collide.

Shaped, per device (rates divided by the run's time dilation):
  out  htb on ``nic0``: one class per peer at the pair's bandwidth (``Cluster.link(device, peer)``,
       matched by destination address), all under one class at the device's NIC rate (its fastest
       outgoing link), so transfers to different peers share the NIC as the simulator has them;
  in   an ifb device fed from ``nic0``'s ingress, the same by source address, under the fastest
       incoming link (the simulator's "in" channel).
Traffic to and from the coordinator (store, heartbeats) is not shaped. Without htb, tbf at the NIC
rate shapes each direction as a whole (the coordinator's traffic with it).

Not shaped: latency. Delaying packets takes the netem qdisc (or fq with departure times), and a
kernel without them cannot: ``Cluster.link``'s latency is not applied (``LATENCY_NOT_SHAPED``).
Rates are line rates, as the cluster's are: frame and TCP/IP headers count against them, as over a
real link (benchmarks/netns.py measures the bulk payload rate a shaped link gives). A shaper lets a
packet out while its class has credit and charges it after, so a message sent over an idle link
arrives one packet's time early. Packets are kept small enough (``packet_frames``) that this is at
most EARLY_S or one frame's time (1514 B / rate: 1.5 ms at 8 Mbit/s), and no smaller: every packet
costs the host CPU time, and one-frame packets on a fast link leave a 2-core host unable to forward
four devices' traffic at the rates it shapes (an all-reduce then takes twice the link's time).
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import math
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from asteroid_fx.backends.torch_dist import SHAPED_LINKS_ENV  # the emulation then leaves links to the kernel
from asteroid_fx.ir.errors import AsteroidError, InputError

INTERFACE = "nic0"  # the device side of its veth, the same name in every device namespace
INGRESS = "ifb0"
PREFIX = "asteroid-"
LOCK = Path("/run/asteroid-netns.lock")
SUBNETS = ipaddress.ip_network("10.213.0.0/16")
MTU_FRAME = 1514  # bytes of one full Ethernet frame: the smallest htb quantum
MAX_FRAMES = 43  # frames in the largest GSO packet (64 KiB)
EARLY_S = 5e-4  # how early a message may arrive over an idle link, where one frame takes less
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
NO_NEED = "`asteroid launch --emulate` paces links in process and needs none of this"
LATENCY_NOT_SHAPED = ("latency is not shaped: delaying packets takes the netem qdisc (or fq with departure "
                      "times), which this module does not use")


class Unavailable(AsteroidError, RuntimeError):
    """Shaped links cannot be set up on this machine; the message says what is missing."""


class ShapingFailed(AsteroidError, RuntimeError):
    """An `ip` or `tc` command failed, or no subnet is free; the message shows the command's error."""


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
                                      None)


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing() -> list[str]:
    """What this machine lacks for shaped links (empty: nothing)."""
    if not Path("/proc/self/status").exists():
        return ["Linux (network namespaces and tc)"]
    lacking = [f"iproute2's `{t}` (not on PATH, /usr/sbin or /sbin)" for t in ("ip", "tc") if _tool(t) is None]
    caps = _capabilities()
    for bit, name, why in ((CAP_NET_ADMIN, "CAP_NET_ADMIN", "to create links and qdiscs"),
                           (CAP_SYS_ADMIN, "CAP_SYS_ADMIN", "to create network namespaces")):
        if not caps >> bit & 1:
            lacking.append(f"{name} {why} (run as root)")
    return lacking


def require() -> None:
    """Raise Unavailable, saying what is missing, unless shaped links can be set up here."""
    lacking = missing()
    if lacking:
        raise Unavailable(f"shaped links need {'; '.join(lacking)}. {NO_NEED}.")


@dataclasses.dataclass(frozen=True)
class Rates:
    """One direction of a device's NIC, in bytes/s: the NIC (its fastest link that way) and the link
    of every peer. A link of infinite bandwidth is left out (not shaped); no link at all: nic = inf."""

    nic: float
    links: tuple[tuple[str, float], ...]  # (peer device, bytes/s)


def link_rates(cluster, devices: Sequence[str], dilation: float = 1.0) -> dict[str, tuple[Rates, Rates]]:
    """device -> (out, in) Rates from ``cluster``'s bandwidth matrix among ``devices``, every rate
    divided by ``dilation`` (an emulated run stretched that many times)."""
    out = {}
    for d in devices:
        ways = []
        for pairs in ([(p, cluster.link(d, p)[0]) for p in devices if p != d],
                      [(p, cluster.link(p, d)[0]) for p in devices if p != d]):
            links = tuple((p, bw / dilation) for p, bw in pairs if math.isfinite(bw))
            ways.append(Rates(max((bw for _, bw in links), default=math.inf), links))
        out[d] = (ways[0], ways[1])
    return out


def packet_frames(rate: float) -> int:
    """Frames per packet (GSO segments) on a device whose slowest shaped link sends ``rate``
    bytes/s: as many as that link sends in EARLY_S, at least 1, at most MAX_FRAMES."""
    return max(1, min(MAX_FRAMES, int(rate * EARLY_S / MTU_FRAME))) if math.isfinite(rate) else MAX_FRAMES


def _bits(rate: float) -> str:
    return f"{max(8, round(rate * 8))}bit"


def tc_rules(dev: str, rates: Rates, address: dict[str, str], match: str, discipline: str) -> list[list[str]]:
    """The tc commands (without ``tc -n NS``) that shape ``dev`` to ``rates``: with htb one class
    per peer (``match``: "dst" or "src" address) under one at the NIC rate, the rest unshaped; with
    tbf the whole device at the NIC rate."""
    if not rates.links:
        return []
    if discipline == "tbf":
        burst = max(2 * MTU_FRAME, round(rates.nic * 1e-3))
        return [["qdisc", "add", "dev", dev, "root", "tbf", "rate", _bits(rates.nic), "burst", str(burst),
                 "latency", "1s"]]

    def quantum(rate: float) -> str:  # rate / r2q, kept where htb does not warn
        return str(min(200_000, max(MTU_FRAME, round(rate / 10))))

    # no default class: unmatched packets (the coordinator's, ARP) go straight out, unshaped
    rules = [["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb"],
             ["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", _bits(rates.nic),
              "ceil", _bits(rates.nic), "quantum", quantum(rates.nic)]]
    share = rates.nic / len(rates.links)  # what each peer is guaranteed; beyond it, it borrows up to its link
    for k, (peer, bw) in enumerate(rates.links):
        classid = f"1:{k + 10:x}"
        rules.append(["class", "add", "dev", dev, "parent", "1:1", "classid", classid, "htb", "rate",
                      _bits(min(bw, share)), "ceil", _bits(bw), "quantum", quantum(bw)])
        rules.append(["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                      "match", "ip", match, f"{address[peer]}/32", "flowid", classid])
    return rules


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ShapingFailed(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def namespaces() -> list[str]:
    """The names of this machine's network namespaces."""
    return [line.split()[0] for line in _run([_tool("ip"), "netns", "list"]).stdout.splitlines() if line.strip()]


def remove_stale() -> list[str]:
    """Delete the namespaces of shaped networks whose launcher is gone (a crashed run's); returns
    their names. Their veths go with them."""
    removed = []
    for name in namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-[0-9a-f]+-\w+", name)
        if m is None or _alive(int(m.group(1))):
            continue
        _run([_tool("ip"), "netns", "del", name], check=False)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.213.0.0/16 that no address or route of the root namespace overlaps."""
    ip = _tool("ip")
    taken = [ipaddress.ip_interface(m).network
             for m in re.findall(r"inet (\S+)", _run([ip, "-o", "-4", "addr", "show"]).stdout)]
    taken += [ipaddress.ip_network(line.split()[0], strict=False)
              for line in _run([ip, "-4", "route", "show", "table", "all"]).stdout.splitlines()
              if line.split() and line.split()[0][0].isdigit()]
    for subnet in SUBNETS.subnets(new_prefix=24):
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise ShapingFailed(f"every /24 of {SUBNETS} is in use in this namespace; remove stale links (`ip link`)")


class ShapedNetwork:
    """A network namespace per device of ``devices``, joined by a bridge, with every device's links
    shaped to ``cluster``'s bandwidths (divided by ``dilation``). A context manager: ``open`` builds
    it (removing stale networks of crashed runs first), ``close`` removes everything it made, also
    after a failure half-way. ``command``/``env`` run a process on a device's side."""

    def __init__(self, cluster, devices: Sequence[str], *, dilation: float = 1.0, discipline: str | None = None):
        if len(devices) > 250:
            raise InputError(f"a shaped network holds at most 250 devices, got {len(devices)}")
        self.cluster, self.devices, self.dilation = cluster, tuple(devices), dilation
        self.discipline = discipline  # "htb" or "tbf"; None: htb where the kernel has it
        self.tag = secrets.token_hex(3)
        base = f"{PREFIX}{os.getpid()}-{self.tag}"
        self.hub = f"{base}-hub"
        self.namespace = {d: f"{base}-{i}" for i, d in enumerate(self.devices)}
        self.root_link = f"ast{self.tag}"
        self.address: dict[str, str] = {}
        self.coordinator = ""
        self.rates = link_rates(cluster, self.devices, dilation)
        self._made: list[str] = []  # namespaces created, for close

    def __enter__(self) -> "ShapedNetwork":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        require()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        ip, tc = _tool("ip"), _tool("tc")
        # one run at a time picks a subnet and claims it with the root end's address
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_stale()
            subnet = _free_subnet()
            hosts = list(subnet.hosts())
            self.coordinator = str(hosts[0])
            self.address = {d: str(hosts[i + 1]) for i, d in enumerate(self.devices)}
            self._add_namespace(self.hub)
            _run([ip, "link", "add", self.root_link, "type", "veth", "peer", "name", "coord", "netns", self.hub])
            _run([ip, "addr", "add", f"{self.coordinator}/{subnet.prefixlen}", "dev", self.root_link])
            _run([ip, "link", "set", self.root_link, "up"])
        hub = [ip, "-n", self.hub]
        _run(hub + ["link", "add", "br0", "type", "bridge"])
        _run(hub + ["link", "set", "br0", "up"])
        _run(hub + ["link", "set", "coord", "master", "br0", "up"])
        for i, d in enumerate(self.devices):
            ns = self.namespace[d]
            self._add_namespace(ns)
            dev = [ip, "-n", ns]
            _run(dev + ["link", "add", INTERFACE, "type", "veth", "peer", "name", f"d{i}", "netns", self.hub])
            _run(hub + ["link", "set", f"d{i}", "master", "br0", "up"])
            _run(dev + ["addr", "add", f"{self.address[d]}/{subnet.prefixlen}", "dev", INTERFACE])
            # the shaper lets a packet out whole and charges it after: small packets on slow links
            slowest = min((bw for _, bw in self.rates[d][0].links), default=math.inf)
            _run(dev + ["link", "set", INTERFACE, "gso_max_segs", str(packet_frames(slowest))])
            _run(dev + ["link", "set", INTERFACE, "up"])
            _run(dev + ["link", "set", "lo", "up"])
        if self.discipline is None:
            self.discipline = "htb" if self._has_htb() else "tbf"
        for d in self.devices:
            ns, (out, in_) = self.namespace[d], self.rates[d]
            rules = tc_rules(INTERFACE, out, self.address, "dst", self.discipline)
            if in_.links:  # the way in: nic0's ingress redirected to an ifb device, shaped on its way out
                _run([ip, "-n", ns, "link", "add", INGRESS, "type", "ifb"])
                _run([ip, "-n", ns, "link", "set", INGRESS, "up"])
                rules += [["qdisc", "add", "dev", INTERFACE, "handle", "ffff:", "ingress"],
                          ["filter", "add", "dev", INTERFACE, "parent", "ffff:", "protocol", "ip", "u32", "match",
                           "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", INGRESS]]
                rules += tc_rules(INGRESS, in_, self.address, "src", self.discipline)
            for rule in rules:
                _run([tc, "-n", ns, *rule])

    def _add_namespace(self, name: str) -> None:
        _run([_tool("ip"), "netns", "add", name])
        self._made.append(name)

    def _has_htb(self) -> bool:
        ns = self.namespace[self.devices[0]]
        tc = _tool("tc")
        probe = _run([tc, "-n", ns, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"], check=False)
        _run([tc, "-n", ns, "qdisc", "del", "dev", "lo", "root"], check=False)
        return probe.returncode == 0

    def close(self) -> None:
        """Remove the namespaces and links of this network (each veth pair first, so the links are gone
        when this returns, not when the kernel gets round to the namespaces); safe to call twice."""
        ip = _tool("ip")
        _run([ip, "link", "del", self.root_link], check=False)
        for name in self._made:
            if name != self.hub:
                _run([ip, "-n", name, "link", "del", INTERFACE], check=False)
            _run([ip, "netns", "del", name], check=False)
        left = set(self._made) & set(namespaces())
        self._made = []
        if left:
            raise ShapingFailed(f"could not remove network namespaces {', '.join(sorted(left))}; "
                               f"remove them with `ip netns del NAME`")

    def command(self, device: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``device``'s namespace."""
        return [_tool("ip"), "netns", "exec", self.namespace[device], *argv]

    def env(self, device: str) -> dict[str, str]:
        """What a worker of ``device`` needs in its environment: gloo on the device's interface, and
        the word that its links are shaped (so it does not pace them again)."""
        return {"GLOO_SOCKET_IFNAME": INTERFACE, SHAPED_LINKS_ENV: "1"}

    def describe(self) -> str:
        """One line per device: its address and what its links are shaped to (Mbit/s)."""
        def mbit(rate: float) -> str:
            return "unshaped" if math.isinf(rate) else f"{rate * 8 / 1e6:g} Mbit/s"

        dilated = f", rates divided by the dilation {self.dilation:g}" if self.dilation != 1 else ""
        lines = [f"links shaped by {self.discipline} in network namespaces, coordinator on {self.coordinator}"
                 f"{dilated} ({LATENCY_NOT_SHAPED}):"]
        for d in self.devices:
            out, in_ = self.rates[d]
            lines.append(f"  {d} {self.address.get(d, '?')} (netns {self.namespace[d]}): out {mbit(out.nic)}, "
                         f"in {mbit(in_.nic)}"
                         + (f", per peer {', '.join(f'{p} {mbit(bw)}' for p, bw in out.links)}"
                            if self.discipline == "htb" and len({bw for _, bw in out.links}) > 1 else ""))
        return "\n".join(lines)
