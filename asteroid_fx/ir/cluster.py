"""The cluster a model is trained on: named devices of catalog kinds and the links between them.

A ``Cluster`` is an immutable value: devices in a fixed order plus two dense matrices,
``bandwidth[i][j]`` (bytes/s) and ``latency[i][j]`` (seconds) for sending from ``devices[i]`` to
``devices[j]``. Links may be asymmetric (e.g. a Wi-Fi uplink slower than its downlink). The
diagonal is never used for communication; the constructors put ``inf`` / ``0`` there.

On disk a cluster is JSON (``Cluster.save`` / ``Cluster.load``)::

    {"format": "asteroid-cluster", "version": 1, "name": "lab",
     "devices": [{"name": "nano0", "kind": "jetson-nano", "memory_bytes": 4294967296}, ...],
     "bandwidth": [[null, 125000000.0], [125000000.0, null]],   # null = infinity
     "latency": [[0.0, 0.0005], [0.0005, 0.0]]}

A cluster with devices of a kind measured on the machine that names it ("host-cpu") carries the
figures it was made with, measured once in the process that made it (``Cluster.measured``); its
JSON carries them too, so every process that reads it (the launcher's workers) plans with the
same figures instead of measuring its own::

     "measured": [{"name": "host-cpu", "short": "host", "peak_flops": 1.2e11, ...}],

Hand-written files may instead give memory as "4GiB" / "512MiB" / "8GB", matrix entries with
units ("1Gbps", "0.5ms"), and, for a uniform cluster, ``"links": {"bandwidth": "1Gbps",
"latency": "0.5ms"}`` in place of the matrices. ``save`` always writes the explicit form.

One module past 500 lines on purpose: the value, its constructors, its JSON form and the resolution
of a user's cluster argument all go through the same private matrix normalisation and checks.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping, Sequence

from asteroid_fx.ir import catalog
from asteroid_fx.ir.atomic import write_text
from asteroid_fx.ir.catalog import DeviceKind
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.json_fields import read_json
from asteroid_fx.ir.units import is_number, parse_bandwidth, parse_latency, parse_memory

# the unit parsers were defined here first; callers still import them from this module
__all__ = ["FORMAT", "FORMAT_VERSION", "Cluster", "Device", "parse_bandwidth", "parse_latency", "parse_memory",
           "resolve_cluster"]

FORMAT = "asteroid-cluster"
FORMAT_VERSION = 1

NAME_MARKS = "._-"  # what a device name may hold besides letters and digits
MAX_NAME = 64


@dataclasses.dataclass(frozen=True)
class Device:
    name: str  # unique within a cluster, e.g. "nano0"
    kind: str  # a catalog kind name (see asteroid_fx.ir.catalog.kind_names())
    # Memory budget for training in bytes; None (the default) means the kind's physical memory.
    # Smaller budgets model memory other processes keep, or test out-of-memory planning.
    memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise InputError(
                f"device name must be a non-empty string without whitespace, got {self.name!r}; "
                "use names like 'nano0'"
            )
        odd = sorted({c for c in self.name if not (c.isalnum() or c in NAME_MARKS)})
        if odd or len(self.name) > MAX_NAME:
            # names become file names (worker_<name>.pt), store keys and terminal text: no path
            # separators, no control or bidirectional-override characters
            what = (f"holds {', '.join(f'U+{ord(c):04X}' if not c.isprintable() else repr(c) for c in odd)}"
                    if odd else f"is {len(self.name)} characters long")
            raise InputError(
                f"device name {self.name!r} {what}; a name is at most {MAX_NAME} letters, digits and "
                f"{' '.join(NAME_MARKS)} (e.g. 'nano0', 'tx2-0')"
            )
        if not isinstance(self.kind, str) or not catalog.is_known(self.kind):
            raise InputError(
                f"device {self.name!r}: unknown device kind {self.kind!r}; known kinds: "
                f"{', '.join(catalog.kind_names())} (add a DeviceKind to "
                "asteroid_fx.ir.catalog.KINDS for other hardware)"
            )
        if self.memory_bytes is None:
            object.__setattr__(self, "memory_bytes", catalog.kind(self.kind).memory_bytes)
            return
        mem = self.memory_bytes
        if not isinstance(mem, int) or isinstance(mem, bool):
            raise InputError(
                f"device {self.name!r}: memory_bytes must be an integer number of bytes, got "
                f"{mem!r}; in JSON a string like '4GiB' is also accepted"
            )
        if mem <= 0:
            raise InputError(
                f"device {self.name!r}: memory_bytes must be positive, got {mem}; "
                "give the memory budget in bytes"
            )
        # A budget above the hardware is almost always a unit slip (GB vs GiB, MiB vs bytes).
        # Not checked for host-cpu: it is measured wherever the code runs, and a file written
        # on a bigger machine must still load on a smaller one.
        if self.kind != catalog.HOST_CPU and mem > catalog.KINDS[self.kind].memory_bytes:
            physical = catalog.KINDS[self.kind].memory_bytes
            raise InputError(
                f"device {self.name!r}: memory_bytes {mem} exceeds the {physical} bytes "
                f"({physical / catalog.GiB:g} GiB) of physical memory of kind {self.kind!r}; "
                "give a budget at most that, or leave it out to use all of it"
            )


def _measured_kinds(given: object, devices: Sequence[Device]) -> tuple[DeviceKind, ...]:
    """The measured kinds of ``devices``, sorted by name: as ``given``, else this process's."""
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise InputError(f"measured must be a sequence of DeviceKind, got {type(given).__name__}")
    by_name: dict[str, DeviceKind] = {}
    for i, k in enumerate(given):
        if not isinstance(k, DeviceKind):
            raise InputError(f"measured[{i}] must be a DeviceKind, got {k!r}")
        if not catalog.is_measured(k.name):
            raise InputError(f"measured[{i}]: kind {k.name!r} comes from the catalog's spec sheet, not a measurement; "
                             f"only measured kinds ({catalog.HOST_CPU}) travel with a cluster")
        if k.name in by_name:
            raise InputError(f"measured[{i}]: kind {k.name!r} is given twice; give each measured kind once")
        by_name[k.name] = k
    used = sorted({d.kind for d in devices if catalog.is_measured(d.kind)})
    unused = sorted(set(by_name) - set(used))
    if unused:
        raise InputError(f"measured gives kind {', '.join(map(repr, unused))}, but no device is of it; "
                         "leave it out")
    return tuple(by_name[k] if k in by_name else catalog.kind(k) for k in used)


_KIND_FIELDS = ("name", "short", "peak_flops", "memory_bandwidth", "memory_bytes", "efficiency", "overhead_s",
                "source")


def _kind_from_json(data: object, where: str) -> DeviceKind:
    if not isinstance(data, Mapping):
        raise InputError(f"{where} must be an object with fields {', '.join(_KIND_FIELDS)}, got {data!r}")
    missing = [f for f in _KIND_FIELDS if f not in data]
    extra = sorted(set(data) - set(_KIND_FIELDS))
    if missing or extra:
        what = "; ".join(x for x in (f"missing field(s) {', '.join(map(repr, missing))}" if missing else "",
                                     f"unknown field(s) {', '.join(map(repr, extra))}" if extra else "") if x)
        raise InputError(f"{where}: {what}; a measured kind has the fields {', '.join(_KIND_FIELDS)}")
    for f in ("name", "short", "source"):
        if not isinstance(data[f], str):
            raise InputError(f"{where}.{f} must be a string, got {data[f]!r}")
    for f in ("peak_flops", "memory_bandwidth", "memory_bytes", "efficiency", "overhead_s"):
        if not is_number(data[f]):
            raise InputError(f"{where}.{f} must be a number, got {data[f]!r}")
    try:
        return DeviceKind(**{f: data[f] for f in _KIND_FIELDS})
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None


def _matrix_error(field: str, devices: Sequence[Device], i: int, j: int, value: object,
                  want: str) -> InputError:
    return InputError(
        f"{field}[{i}][{j}] (from {devices[i].name!r} to {devices[j].name!r}) must be {want}, "
        f"got {value!r}"
    )


def _normalise_matrix(field: str, value: object, devices: Sequence[Device]) -> tuple:
    n = len(devices)
    unit = "bytes/s" if field == "bandwidth" else "seconds"
    how = f"give {field}[i][j] in {unit} from devices[i] to devices[j], one row per device"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(f"{field} must be a square {n}x{n} matrix, got {value!r}; {how}")
    if len(value) != n:
        raise InputError(
            f"{field} must be a square {n}x{n} matrix for {n} device(s), got {len(value)} rows; "
            f"{how}"
        )
    rows = []
    for i, row in enumerate(value):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise InputError(
                f"{field} must be a square {n}x{n} matrix, but row {i} ({devices[i].name!r}) "
                f"is {row!r}; {how}"
            )
        if len(row) != n:
            raise InputError(
                f"{field} must be a square {n}x{n} matrix, but row {i} ({devices[i].name!r}) "
                f"has {len(row)} entries; {how}"
            )
        out = []
        for j, x in enumerate(row):
            if not is_number(x) or math.isnan(x):
                raise _matrix_error(field, devices, i, j, x, f"a number in {unit}")
            out.append(float(x))
        rows.append(tuple(out))
    return tuple(rows)


@dataclasses.dataclass(frozen=True)
class Cluster:
    devices: tuple[Device, ...]
    bandwidth: tuple[tuple[float, ...], ...]  # bytes/s, [i][j] from devices[i] to devices[j]
    latency: tuple[tuple[float, ...], ...]  # seconds, one way
    name: str = ""
    # the figures of every measured kind of its devices (host-cpu), by name; those not given are
    # taken from this process's catalog, which measures a kind once per process
    measured: tuple[DeviceKind, ...] = ()

    def __post_init__(self) -> None:
        # Lists are accepted and frozen into tuples so that clusters compare and hash by value.
        if isinstance(self.devices, (str, bytes)) or not isinstance(self.devices, Sequence):
            raise InputError(
                f"devices must be a sequence of Device, got {type(self.devices).__name__}; "
                "use Cluster.from_kinds to start from kind names"
            )
        devices = tuple(self.devices)
        if not devices:
            raise InputError("a cluster needs at least one device")
        for i, d in enumerate(devices):
            if not isinstance(d, Device):
                raise InputError(
                    f"devices[{i}] must be a Device, got {d!r}; "
                    "use Cluster.from_kinds to start from kind names"
                )
        counts = collections.Counter(d.name for d in devices)
        dups = sorted(n for n, c in counts.items() if c > 1)
        if dups:
            raise InputError(
                f"device names must be unique, but {', '.join(map(repr, dups))} appear more than "
                "once; rename the duplicates (e.g. 'nano0', 'nano1')"
            )
        if not isinstance(self.name, str):
            raise InputError(f"cluster name must be a string, got {self.name!r}")
        bandwidth = _normalise_matrix("bandwidth", self.bandwidth, devices)
        latency = _normalise_matrix("latency", self.latency, devices)
        for i in range(len(devices)):
            for j in range(len(devices)):
                b, lat = bandwidth[i][j], latency[i][j]
                if i == j:
                    # Self-links carry nothing; only reject values that are plainly garbage.
                    if b < 0:
                        raise _matrix_error("bandwidth", devices, i, j, b, ">= 0 (or inf)")
                    if not 0 <= lat < math.inf:
                        raise _matrix_error("latency", devices, i, j, lat, "finite and >= 0")
                    continue
                if not b > 0:
                    raise _matrix_error(
                        "bandwidth", devices, i, j, b,
                        "positive (bytes/s; every pair of devices must be able to talk)",
                    )
                if not 0 <= lat < math.inf:
                    raise _matrix_error("latency", devices, i, j, lat, "finite and >= 0 seconds")
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "bandwidth", bandwidth)
        object.__setattr__(self, "latency", latency)
        object.__setattr__(self, "measured", _measured_kinds(self.measured, devices))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def uniform(cls, devices: Sequence[Device], bandwidth: float | str,
                latency: float | str = 0.0, name: str = "", measured: Sequence[DeviceKind] = ()) -> Cluster:
        """Every pair of devices joined by one link (bytes/s or "1Gbps"; seconds or "0.5ms")."""
        bw, lat = parse_bandwidth(bandwidth), parse_latency(latency)
        n = len(devices)
        return cls(
            devices=tuple(devices),
            bandwidth=tuple(tuple(math.inf if i == j else bw for j in range(n)) for i in range(n)),
            latency=tuple(tuple(0.0 if i == j else lat for j in range(n)) for i in range(n)),
            name=name,
            measured=tuple(measured),
        )

    @classmethod
    def from_kinds(cls, kinds: Sequence[str], bandwidth: float | str,
                   latency: float | str = 0.0, name: str = "") -> Cluster:
        """A uniform cluster with one device per kind name, each with its kind's full memory.

        Devices are named ``{short}{i}`` with ``i`` counting per kind (nano0, nano1, tx2-0, ...),
        so adding a device of another kind does not rename the existing ones.
        """
        if isinstance(kinds, str):
            raise InputError(f"kinds must be a list of kind names, got the string {kinds!r}")
        seen: collections.Counter[str] = collections.Counter()
        devices = []
        for k in kinds:
            short = catalog.kind(k).short
            devices.append(Device(f"{short}{seen[k]}", k))
            seen[k] += 1
        return cls.uniform(devices, bandwidth, latency, name=name)

    # -- queries -------------------------------------------------------------------------------

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        return {d.name: i for i, d in enumerate(self.devices)}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def index(self, name: str) -> int:
        try:
            return self._positions[name]
        except (KeyError, TypeError):
            label = f"cluster {self.name!r}" if self.name else "the cluster"
            raise InputError(
                f"no device {name!r} in {label}; devices: {', '.join(self.names)}"
            ) from None

    def device(self, name: str) -> Device:
        return self.devices[self.index(name)]

    def kind(self, name: str) -> DeviceKind:
        """The figures of kind ``name`` here: a measured kind's as the cluster carries them, any
        other the catalog's."""
        for k in self.measured:
            if k.name == name:
                return k
        return catalog.kind(name)

    def kind_of(self, name: str) -> DeviceKind:
        return self.kind(self.device(name).kind)

    def device_kinds(self) -> dict[str, DeviceKind]:
        """Every kind of its devices, by name, with the figures the cluster plans with."""
        return {k: self.kind(k) for k in sorted({d.kind for d in self.devices})}

    def link(self, a: str, b: str) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) for sending from device ``a`` to device ``b``."""
        i, j = self.index(a), self.index(b)
        return self.bandwidth[i][j], self.latency[i][j]

    def subset(self, names: Sequence[str]) -> Cluster:
        """The cluster restricted to ``names`` (in that order), with their links unchanged."""
        if isinstance(names, str):
            raise InputError(f"names must be a list of device names, got the string {names!r}")
        idx = [self.index(n) for n in names]
        if len(set(idx)) != len(idx):
            dups = sorted({n for n in names if list(names).count(n) > 1})
            raise InputError(f"subset names must be distinct, but {', '.join(dups)} repeat")
        return Cluster(
            devices=tuple(self.devices[i] for i in idx),
            bandwidth=tuple(tuple(self.bandwidth[i][j] for j in idx) for i in idx),
            latency=tuple(tuple(self.latency[i][j] for j in idx) for i in idx),
            name=self.name,
            measured=tuple(k for k in self.measured if any(self.devices[i].kind == k.name for i in idx)),
        )

    # -- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON object (matrices explicit, infinity as null)."""

        def encode(m: tuple[tuple[float, ...], ...]) -> list[list[float | None]]:
            return [[None if math.isinf(x) else x for x in row] for row in m]

        out: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
        }
        if self.measured:
            out["measured"] = [{f: getattr(k, f) for f in _KIND_FIELDS} for k in self.measured]
        return out | {
            "devices": [
                {"name": d.name, "kind": d.kind, "memory_bytes": d.memory_bytes}
                for d in self.devices
            ],
            "bandwidth": encode(self.bandwidth),
            "latency": encode(self.latency),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, origin: str = "cluster JSON") -> Cluster:
        """Inverse of ``to_json``; also reads the hand-written forms in the module docstring.

        ``origin`` (a file path when called by ``load``) prefixes every error message.
        """
        try:
            return cls._from_json(data)
        except ValueError as e:
            raise InputError(f"{origin}: {e}") from None

    @classmethod
    def _from_json(cls, data: Mapping[str, Any]) -> Cluster:
        if not isinstance(data, Mapping):
            raise InputError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise InputError(
                f"field 'format' must be {FORMAT!r}, got {data.get('format')!r}; "
                "is this a cluster file?"
            )
        if data.get("version") != FORMAT_VERSION:
            raise InputError(
                f"field 'version' is {data.get('version')!r}, but this asteroid_fx reads "
                f"version {FORMAT_VERSION}; write version {FORMAT_VERSION} or upgrade asteroid_fx"
            )
        allowed = {"format", "version", "name", "measured", "devices", "bandwidth", "latency", "links"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise InputError(
                f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
                f"{', '.join(sorted(allowed))}"
            )
        name = data.get("name", "")
        if not isinstance(name, str):
            raise InputError(f"field 'name' must be a string, got {name!r}")

        raw_measured = data.get("measured", [])
        if not isinstance(raw_measured, list):
            raise InputError(f"field 'measured' must be a list of measured device kinds, got {raw_measured!r}")
        measured = tuple(_kind_from_json(k, f"measured[{i}]") for i, k in enumerate(raw_measured))
        carried = {k.name: k for k in measured}

        raw_devices = data.get("devices")
        if not isinstance(raw_devices, list):
            raise InputError(
                f"field 'devices' must be a list of {{'name', 'kind', 'memory_bytes'}} objects, "
                f"got {raw_devices!r}"
            )
        devices = []
        for i, d in enumerate(raw_devices):
            where = f"devices[{i}]"
            if not isinstance(d, Mapping):
                raise InputError(f"{where} must be an object with 'name' and 'kind', got {d!r}")
            extra = sorted(set(d) - {"name", "kind", "memory_bytes"})
            if extra:
                raise InputError(
                    f"{where}: unknown field(s) {', '.join(map(repr, extra))}; "
                    "allowed: name, kind, memory_bytes"
                )
            for key in ("name", "kind"):
                if key not in d:
                    raise InputError(f"{where}: missing field {key!r}")
            mem = d.get("memory_bytes")
            try:
                mem = None if mem is None else parse_memory(mem)
            except ValueError as e:
                raise InputError(f"{where}.memory_bytes: {e}") from None
            if mem is None and d["kind"] in carried:  # the measured kind's memory, not this machine's
                mem = carried[d["kind"]].memory_bytes
            try:
                devices.append(Device(d["name"], d["kind"], mem))
            except ValueError as e:
                raise InputError(f"{where}: {e}") from None

        if "links" in data:
            if "bandwidth" in data or "latency" in data:
                raise InputError(
                    "give either 'links' (one link for every pair) or the 'bandwidth'/'latency' "
                    "matrices, not both"
                )
            links = data["links"]
            if not isinstance(links, Mapping) or "bandwidth" not in links:
                raise InputError(
                    "field 'links' must be an object like "
                    f"{{\"bandwidth\": \"1Gbps\", \"latency\": \"0.5ms\"}}, got {links!r}"
                )
            extra = sorted(set(links) - {"bandwidth", "latency"})
            if extra:
                raise InputError(
                    f"links: unknown field(s) {', '.join(map(repr, extra))}; "
                    "allowed: bandwidth, latency"
                )
            try:
                bw = parse_bandwidth(links["bandwidth"])
            except ValueError as e:
                raise InputError(f"links.bandwidth: {e}") from None
            try:
                lat = parse_latency(links.get("latency", 0.0))
            except ValueError as e:
                raise InputError(f"links.latency: {e}") from None
            return cls.uniform(devices, bw, lat, name=name, measured=measured)

        if "bandwidth" not in data:
            raise InputError(
                "missing field 'bandwidth' (an NxN matrix in bytes/s); for a uniform cluster "
                "write \"links\": {\"bandwidth\": \"1Gbps\", \"latency\": \"0.5ms\"} instead"
            )
        n = len(devices)
        bandwidth = _decode_matrix("bandwidth", data["bandwidth"], parse_bandwidth)
        if "latency" in data:
            latency = _decode_matrix("latency", data["latency"], parse_latency)
        else:
            latency = [[0.0] * n for _ in range(n)]
        return cls(devices=tuple(devices), bandwidth=bandwidth, latency=latency, name=name, measured=measured)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the canonical JSON atomically: readers see the old file or the new, never half."""
        write_text(path, _canonical_text(self.to_json()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Cluster:
        """Read a cluster JSON file; errors name the file and the offending field."""
        return cls.from_json(read_json(path, "cluster file"), origin=str(path))

    # -- display -------------------------------------------------------------------------------

    def __str__(self) -> str:
        title = f"cluster {self.name!r}" if self.name else "cluster"
        lines = [f"{title}: {len(self.devices)} device(s)"]
        rows = [("device", "kind", "memory GiB", "peak GFLOP/s")]
        for d in self.devices:
            k = self.kind(d.kind)
            rows.append((d.name, d.kind, f"{d.memory_bytes / catalog.GiB:.2f}",
                         f"{k.peak_flops / 1e9:.1f}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        for r in rows:
            lines.append("  ".join(
                cell.ljust(w) if c < 2 else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(r, widths))
            ).rstrip())

        def matrix(title: str, m: tuple[tuple[float, ...], ...], scale: float) -> None:
            cells = [["-" if i == j else f"{m[i][j] * scale:g}" for j in range(len(m))]
                     for i in range(len(m))]
            w = max([len(n) for n in self.names] + [len(c) for row in cells for c in row])
            lines.append("")
            lines.append(title)
            lines.append(" " * w + "  " + "  ".join(n.rjust(w) for n in self.names))
            for name, row in zip(self.names, cells):
                lines.append(name.ljust(w) + "  " + "  ".join(c.rjust(w) for c in row))

        matrix("bandwidth Mbit/s (row sends to column)", self.bandwidth, 8 / 1e6)
        matrix("latency ms", self.latency, 1e3)
        return "\n".join(lines)


def _decode_matrix(field: str, value: object, parse: Any) -> list[list[float]]:
    # JSON has no infinity, so null stands for it; strings may carry units ("1Gbps", "2ms").
    # Shape errors are left to Cluster's validation, which names the devices involved.
    if not isinstance(value, list):
        return value  # type: ignore[return-value]
    out: list[list[float]] = []
    for i, row in enumerate(value):
        if not isinstance(row, list):
            out.append(row)
            continue
        decoded = []
        for j, x in enumerate(row):
            if x is None:
                decoded.append(math.inf)
            elif isinstance(x, str):
                try:
                    decoded.append(parse(x))
                except ValueError as e:
                    raise InputError(f"{field}[{i}][{j}]: {e}") from None
            else:
                decoded.append(x)
        out.append(decoded)
    return out


def _canonical_text(data: dict[str, Any]) -> str:
    # json.dumps(indent=2) would put every matrix entry on its own line; one row per line keeps
    # the file readable and diffable.
    def dump(x: object) -> str:
        return json.dumps(x, allow_nan=False, ensure_ascii=False)

    parts = ["{"]
    for key in ("format", "version", "name"):
        parts.append(f"  {dump(key)}: {dump(data[key])},")
    if "measured" in data:
        parts.append('  "measured": [')
        parts.append(",\n".join(f"    {dump(k)}" for k in data["measured"]))
        parts.append("  ],")
    parts.append('  "devices": [')
    parts.append(",\n".join(f"    {dump(d)}" for d in data["devices"]))
    parts.append("  ],")
    for key, last in (("bandwidth", False), ("latency", True)):
        parts.append(f"  {dump(key)}: [")
        parts.append(",\n".join(f"    {dump(row)}" for row in data[key]))
        parts.append("  ]" + ("" if last else ","))
    parts.append("}")
    return "\n".join(parts) + "\n"


_RESOLVE_FORMS = (
    "a Cluster, a list of Device, a list of kind names, a comma-separated string of kind names, "
    "a preset name, or a path to a cluster JSON file"
)


def resolve_cluster(
    x: Cluster | Sequence[Device] | Sequence[str] | str | os.PathLike[str] | Mapping[str, Any],
    *,
    bandwidth: float | str = catalog.LINKS["gigabit-ethernet"].bandwidth,
    latency: float | str = catalog.LINKS["gigabit-ethernet"].latency,
) -> Cluster:
    """Turn any of the usual ways of naming a cluster into a Cluster.

    Accepted: a Cluster (returned as is); a JSON object as from ``to_json``; a preset name
    (``catalog.PRESETS``); a path to a cluster JSON file; a list of Device or of kind names, or
    a string "kind,kind,...", joined uniformly by ``bandwidth``/``latency`` (default: gigabit
    Ethernet, see ``catalog.LINKS``).
    """
    if isinstance(x, Cluster):
        return x
    if isinstance(x, Mapping):
        return Cluster.from_json(x)
    if isinstance(x, os.PathLike):
        return Cluster.load(x)
    if isinstance(x, str):
        if x in catalog.PRESETS:
            return catalog.preset(x)
        if os.path.exists(x):
            return Cluster.load(x)
        parts = [p.strip() for p in x.split(",")]
        if all(catalog.is_known(p) for p in parts):
            return Cluster.from_kinds(parts, bandwidth, latency)
        if x.endswith(".json") or os.sep in x:
            raise InputError(f"cluster file {x!r} does not exist")
        raise InputError(
            f"cannot resolve cluster {x!r}: not a preset ({', '.join(catalog.PRESETS)}), not an "
            f"existing file, and not kind names ({', '.join(catalog.kind_names())}); "
            f"accepted: {_RESOLVE_FORMS}"
        )
    if isinstance(x, Sequence) and not isinstance(x, bytes) and len(x) > 0:
        if all(isinstance(d, Device) for d in x):
            return Cluster.uniform(x, bandwidth, latency)  # type: ignore[arg-type]
        if all(isinstance(k, str) for k in x):
            return Cluster.from_kinds(x, bandwidth, latency)  # type: ignore[arg-type]
    raise TypeError(f"cannot make a cluster from {x!r}; accepted: {_RESOLVE_FORMS}")
