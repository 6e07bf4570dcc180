"""Quantities as people write them in cluster files: memory ("4GiB"), bandwidth ("1Gbps"), latency ("0.5ms").

Bits and bytes are told apart by the case of "b"/"B" (Gbps vs GB/s) because mixing them up is an
8x error in every communication estimate; prefixes are case-insensitive.
"""

from __future__ import annotations

import re

from asteroid_fx.ir.errors import InputError


_NUMBER = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
           "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
_MEMORY_RE = re.compile(rf"^\s*{_NUMBER}\s*([kmgt]i?)?b\s*$", re.IGNORECASE)
_BANDWIDTH_RE = re.compile(rf"^\s*{_NUMBER}\s*([kmgtKMGT]i?)?(bps|bit/s|b/s|B/s|Bps)\s*$")
_LATENCY_RE = re.compile(rf"^\s*{_NUMBER}\s*(s|ms|us|µs|μs|ns)\s*$", re.IGNORECASE)
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_memory(value: int | str) -> int:
    """Bytes from an int (taken as bytes) or a string such as "4GiB", "512MiB", "8GB", "100kB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)  # JSON's 4e9 arrives as a float
    if isinstance(value, str):
        m = _MEMORY_RE.match(value)
        if m:
            return int(round(float(m.group(1)) * _PREFIX[(m.group(2) or "").lower()]))
    raise InputError(
        f"cannot parse memory size {value!r}; give an integer number of bytes or a string like "
        "'4GiB', '512MiB' or '8GB' (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
    )


def parse_bandwidth(value: float | str) -> float:
    """Bytes/s from a number (taken as bytes/s) or a string like "1Gbps", "100Mbps", "125MB/s"."""
    if is_number(value):
        return float(value)
    if isinstance(value, str):
        m = _BANDWIDTH_RE.match(value)
        if m:
            scale = _PREFIX[(m.group(2) or "").lower()]
            per_byte = 1.0 if m.group(3) in ("B/s", "Bps") else 1 / 8
            return float(m.group(1)) * scale * per_byte
    raise InputError(
        f"cannot parse bandwidth {value!r}; give bytes/s as a number or a string like '1Gbps', "
        "'300Mbps' or '125MB/s' (bits: bps, Kbps, Mbps, Gbps; bytes: B/s, KB/s, MB/s, GB/s)"
    )


def parse_latency(value: float | str) -> float:
    """Seconds from a number (taken as seconds) or a string such as "0.5ms", "20us", "1s"."""
    if is_number(value):
        return float(value)
    if isinstance(value, str):
        m = _LATENCY_RE.match(value)
        if m:
            unit = m.group(2)
            scale = _SECONDS[unit] if unit in _SECONDS else _SECONDS[unit.lower()]
            return float(m.group(1)) * scale
    raise InputError(
        f"cannot parse latency {value!r}; give seconds as a number or a string like '0.5ms', "
        "'20us' or '1s' (units: s, ms, us, ns)"
    )
