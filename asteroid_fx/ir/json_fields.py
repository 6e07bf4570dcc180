"""Typed reading of the JSON files asteroid_fx writes, with errors that name the file and the field.

A reader of a plan or cost file asks ``Fields`` for each field with the type it must have; a
missing key, a wrong type or a document that is not JSON at all raises ``InputError`` (or the
reader's own subclass) saying ``<origin>: field 'stages[2].rows' ...`` instead of letting a
``KeyError``, ``IndexError`` or ``TypeError`` escape from deep inside the reader.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asteroid_fx.ir.errors import InputError

# the largest integer a field holds: far beyond any count or byte size, and what int64 holds (a
# bigger one would overflow numpy and torch downstream)
MAX_INTEGER = 2**63 - 1


def read_text(path: str | os.PathLike[str], what: str, error: type[InputError] = InputError, *,
              hint: str = "") -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or binary file raises ``error`` saying it
    should hold a ``what``, followed by ``hint`` (what to do) when given."""
    path = Path(path)
    then = f"; {hint}" if hint else ""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such {what}{then}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text, so not a {what}{then}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None


def read_json(path: str | os.PathLike[str], what: str, error: type[InputError] = InputError) -> Any:
    """The JSON document in ``path``; ``what`` ("plan", "cost file") says what it should hold."""
    path = Path(path)
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if not text.strip():
            raise error(f"{path}: the file is empty; write the {what} again") from None
        cut = e.pos >= len(text.rstrip())
        why = "truncated (the JSON ends early; the file was cut short)" if cut else "invalid JSON"
        raise error(f"{path}: {why} at line {e.lineno} column {e.colno}: {e.msg}; write the {what} again") from None


class Fields:
    """One JSON object being read; ``path`` is where it sits in the document ("" at the top)."""

    def __init__(self, data: Any, origin: str, path: str = "", error: type[InputError] = InputError) -> None:
        self.origin, self.path, self.error = origin, path, error
        if not isinstance(data, Mapping):
            raise self.fail(f"{self.where_self()} must be a JSON object, got {_kind(data)}")
        self.data = data

    def where_self(self) -> str:
        return f"field {self.path!r}" if self.path else "the document"

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, message: str) -> InputError:
        return self.error(f"{self.origin}: {message}")

    def bad(self, key: str, want: str, got: Any) -> InputError:
        return self.fail(f"field {self.where(key)!r} must be {want}, got {got!r}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        if key not in self.data:
            raise self.fail(f"missing field {self.where(key)!r}")
        return self.data[key]

    def integer(self, key: str, *, minimum: int | None = None) -> int:
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum) \
                or abs(v) > MAX_INTEGER:
            huge = isinstance(v, int) and abs(v) > MAX_INTEGER
            raise self.bad(key, "an integer" + (f" >= {minimum}" if minimum is not None else "")
                           + f" of at most {MAX_INTEGER}", f"{str(v)[:20]}..." if huge else v)
        return v

    def integer_or_null(self, key: str, *, minimum: int | None = None) -> int | None:
        return None if self.raw(key) is None else self.integer(key, minimum=minimum)

    def number(self, key: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
        """A number (never NaN); with ``minimum``, a finite one at least that; with ``maximum``, at most that."""
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) \
                or (minimum is not None and not (math.isfinite(v) and v >= minimum)) \
                or (maximum is not None and not v <= maximum):
            raise self.bad(key, "a number" + (f" >= {minimum:g} and finite" if minimum is not None else "")
                           + (f" of at most {maximum:g}" if maximum is not None else ""), v)
        return float(v)

    def string(self, key: str, default: str | None = None) -> str:
        if default is not None and key not in self.data:
            return default
        v = self.raw(key)
        if not isinstance(v, str):
            raise self.bad(key, "a string", v)
        return v

    def boolean(self, key: str, default: bool | None = None) -> bool:
        if default is not None and key not in self.data:
            return default
        v = self.raw(key)
        if not isinstance(v, bool):
            raise self.bad(key, "true or false", v)
        return v

    def list(self, key: str, default: list[Any] | None = None) -> list[Any]:
        if default is not None and key not in self.data:
            return default
        v = self.raw(key)
        if not isinstance(v, (list, tuple)):  # a tuple: a document built by to_json, not read from a file
            raise self.bad(key, "a list", v)
        return list(v)

    def obj(self, key: str) -> Fields:
        return Fields(self.raw(key), self.origin, self.where(key), self.error)

    def objs(self, key: str) -> list[Fields]:
        return [Fields(v, self.origin, f"{self.where(key)}[{i}]", self.error) for i, v in enumerate(self.list(key))]

    def strings(self, key: str, default: list[Any] | None = None) -> tuple[str, ...]:
        items = self.list(key, default)
        for i, v in enumerate(items):
            if not isinstance(v, str):
                raise self.bad(f"{key}[{i}]", "a string", v)
        return tuple(items)

    def integers(self, key: str, *, minimum: int | None = None) -> tuple[int, ...]:
        items = self.list(key)
        for i, v in enumerate(items):
            if isinstance(v, bool) or not isinstance(v, int) or abs(v) > MAX_INTEGER \
                    or (minimum is not None and v < minimum):
                raise self.bad(f"{key}[{i}]", "an integer" + (f" >= {minimum}" if minimum is not None else ""), v)
        return tuple(items)

    def span(self, key: str) -> tuple[int, int]:
        """A ``[lo, hi]`` pair of integers, 0 <= lo < hi."""
        items = self.integers(key, minimum=0)
        if len(items) != 2 or items[0] >= items[1]:
            raise self.bad(key, "a pair [lo, hi] with 0 <= lo < hi", list(items))
        return items[0], items[1]

    def points(self, key: str, most_seconds: float = math.inf) -> tuple[tuple[float, float], ...]:
        """A non-empty list of ``[rows, seconds]`` pairs (a TimeFit's points): rows above 0 and
        increasing, seconds finite, >= 0 and at most ``most_seconds``."""
        out: list[tuple[float, float]] = []
        for i, p in enumerate(self.list(key)):
            ok = isinstance(p, (list, tuple)) and len(p) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in p) \
                and p[0] > 0 and 0 <= p[1] <= most_seconds and (not out or p[0] > out[-1][0])
            if not ok:
                raise self.bad(f"{key}[{i}]", "a pair [rows, seconds] of finite numbers, rows above 0 and above "
                                              f"the pair before, seconds >= 0 and at most {most_seconds:g}", p)
            out.append((float(p[0]), float(p[1])))
        if not out:
            raise self.bad(key, "a non-empty list of [rows, seconds] pairs", [])
        return tuple(out)

    def expect(self, key: str, value: Any, hint: str) -> None:
        """A field that must hold exactly ``value`` (a format name, a version)."""
        got = self.data.get(key)
        if got != value:
            raise self.fail(f"field {self.where(key)!r} is {got!r}, expected {value!r}; {hint}")


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__
