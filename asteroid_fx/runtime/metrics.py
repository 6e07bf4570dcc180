"""What a run records for the people watching it: a run folder's metrics files and a progress bar.

``Metrics(folder)`` appends one JSON object per line to two files of the run folder:

  metrics.jsonl     one line per training iteration: iteration (0-based), epoch, loss, lr (a number,
                    or a list with one per parameter group), seconds (the iteration's wall time),
                    samples (rows in the iteration), samples_per_s, time (unix seconds)
  validation.jsonl  one line per validation: iteration, epoch, val_loss, val_accuracy (or null),
                    samples, time

and on ``close`` (or ``export_csv``) writes ``metrics.csv``, the iterations as a table. A loss that
is not finite (a diverged run) is written as null, so each line stays strict JSON. Every line goes
to the file in one append write, so a reader never sees two records interleaved; a crash can still
cut the last line short, which ``read_metrics`` skips and ``Metrics(folder, resume=True)`` removes
before appending. One process writes a folder's metrics.

``Progress(total)`` draws one line (iteration k/total, loss, samples/s, ETA): redrawn in place on a
terminal, printed as plain lines at most every ``every_s`` seconds into a log (CI). Both need only
the standard library.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.json_fields import Fields, read_text

ITERATIONS_FILE = "metrics.jsonl"
VALIDATION_FILE = "validation.jsonl"
CSV_FILE = "metrics.csv"
ITERATION_COLUMNS = ("iteration", "epoch", "loss", "lr", "seconds", "samples", "samples_per_s", "time")
VALIDATION_COLUMNS = ("iteration", "epoch", "val_loss", "val_accuracy", "samples", "time")

LearningRate = float | Sequence[float]


def _finite_or_none(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _lr_value(lr: LearningRate) -> float | list[float]:
    if isinstance(lr, (list, tuple)):
        return [float(x) for x in lr]
    return float(lr)


class _JsonLines:
    """One append-only JSON-lines file; each record is one ``os.write`` of a whole line."""

    def __init__(self, path: Path, *, resume: bool) -> None:
        self.path = path
        if resume:
            _drop_partial_tail(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if resume else os.O_TRUNC)
        self.fd: int | None = os.open(path, flags, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        if self.fd is None:
            raise ValueError(f"{self.path}: the metrics were closed; record before Metrics.close()")
        data = (json.dumps(record, allow_nan=False) + "\n").encode()
        while data:  # os.write may write less than asked (a full disk, a signal)
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _drop_partial_tail(path: Path) -> None:
    """Cut ``path`` back to its last whole line, so that appending after a crash does not glue a new
    record to a half-written one."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


class Metrics:
    """The metrics files of the run folder ``folder`` (created if missing). A new ``Metrics`` starts
    the files afresh; ``resume=True`` appends to what an earlier, interrupted run of the folder wrote."""

    def __init__(self, folder: str | os.PathLike[str], *, resume: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._resume, self._clock = resume, clock
        self._iterations = _JsonLines(self.folder / ITERATIONS_FILE, resume=resume)
        self._validation: _JsonLines | None = None  # opened by the first validation
        if not resume:
            for stale in (VALIDATION_FILE, CSV_FILE):
                (self.folder / stale).unlink(missing_ok=True)

    def iteration(self, iteration: int, epoch: int, loss: float, lr: LearningRate, seconds: float,
                  samples: int) -> dict[str, Any]:
        """Record training iteration ``iteration`` (0-based) of ``epoch``: its loss, learning rate(s),
        wall time in seconds and number of samples. Returns the record as written."""
        seconds = float(seconds)
        record = {"iteration": int(iteration), "epoch": int(epoch), "loss": _finite_or_none(loss),
                  "lr": _lr_value(lr), "seconds": seconds, "samples": int(samples),
                  "samples_per_s": int(samples) / seconds if seconds > 0 else None, "time": self._clock()}
        self._iterations.write(record)
        return record

    def validation(self, iteration: int, epoch: int, val_loss: float, val_accuracy: float | None,
                   samples: int) -> dict[str, Any]:
        """Record a validation after iteration ``iteration``: mean loss and accuracy (None for a task
        without one) over ``samples`` held-out samples. Returns the record as written."""
        if self._validation is None:
            self._validation = _JsonLines(self.folder / VALIDATION_FILE, resume=self._resume)
        record = {"iteration": int(iteration), "epoch": int(epoch), "val_loss": _finite_or_none(val_loss),
                  "val_accuracy": None if val_accuracy is None else float(val_accuracy),
                  "samples": int(samples), "time": self._clock()}
        self._validation.write(record)
        return record

    def export_csv(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the iterations recorded so far as a CSV table (default: ``<folder>/metrics.csv``)."""
        return export_csv(self.folder, path)

    def close(self) -> Path:
        """Close the files and write ``metrics.csv``; returns its path."""
        self._iterations.close()
        if self._validation is not None:
            self._validation.close()
        return self.export_csv()

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Reading


def _written_by(folder: Path) -> str:
    return f"`asteroid launch ... --out {folder}` writes it, one line per training iteration"


def _number_or_null(f: Fields, key: str) -> float | None:
    return None if f.raw(key) is None else f.number(key)


def _check_iteration(f: Fields) -> None:
    f.integer("iteration", minimum=0)
    f.integer("epoch", minimum=0)
    _number_or_null(f, "loss")
    lr = f.raw("lr")
    if isinstance(lr, list):
        for i, v in enumerate(lr):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise f.bad(f"lr[{i}]", "a number", v)
    else:
        f.number("lr")
    f.number("seconds")
    f.integer("samples", minimum=0)
    _number_or_null(f, "samples_per_s")
    f.number("time")


def _check_validation(f: Fields) -> None:
    f.integer("iteration", minimum=0)
    f.integer("epoch", minimum=0)
    _number_or_null(f, "val_loss")
    _number_or_null(f, "val_accuracy")
    f.integer("samples", minimum=0)
    f.number("time")


def _read_lines(path: Path, check: Callable[[Fields], None]) -> list[dict[str, Any]]:
    text = read_text(path, "metrics file (JSON lines)")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it: the line a crash may have cut short
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            if last:
                break
            raise InputError(f"{path} line {number}: not a JSON object ({e.msg} at column {e.colno}); "
                             "the file was changed by hand or by another program: fix or delete that line") from None
        fields = Fields(data, f"{path} line {number}")
        check(fields)
        records.append(data)
    return records


def read_metrics(folder: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The iterations (metrics.jsonl) and validations (validation.jsonl, [] when absent) a run
    folder holds, in the order written. A trailing line that a crash cut short is skipped; any other
    line that is not a whole record raises ``InputError`` naming the file and the line."""
    folder = Path(folder)
    if not folder.is_dir():
        why = "not a folder" if folder.exists() else "no such run folder"
        raise InputError(f"{folder}: {why}; {_written_by(folder)}")
    path = folder / ITERATIONS_FILE
    if not path.is_file():
        raise InputError(f"{folder} holds no {ITERATIONS_FILE}: {_written_by(folder)}")
    iterations = _read_lines(path, _check_iteration)
    vpath = folder / VALIDATION_FILE
    validation = _read_lines(vpath, _check_validation) if vpath.is_file() else []
    return iterations, validation


def export_csv(folder: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """Write the iterations of the run folder ``folder`` as CSV (default: ``<folder>/metrics.csv``),
    one column per field; a learning rate per parameter group gets columns lr_0, lr_1, ... Returns
    the path."""
    iterations, _ = read_metrics(folder)
    out = Path(path) if path is not None else Path(folder) / CSV_FILE
    groups = max((len(r["lr"]) for r in iterations if isinstance(r["lr"], list)), default=0)
    lr_columns = [f"lr_{i}" for i in range(groups)] if groups else ["lr"]
    columns = [c for c in ITERATION_COLUMNS if c != "lr"]
    columns[columns.index("loss") + 1:columns.index("loss") + 1] = lr_columns
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:  # written aside and renamed: never half a table
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in iterations:
            lr = r["lr"] if isinstance(r["lr"], list) else [r["lr"]]
            row = {c: r[c] for c in ITERATION_COLUMNS if c != "lr"}
            row.update({c: (lr[i] if i < len(lr) else "") for i, c in enumerate(lr_columns)})
            writer.writerow(["" if row[c] is None else row[c] for c in columns])
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# Progress


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour)."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A one-line progress bar for ``total`` iterations on ``stream``. On a terminal the line is
    redrawn in place (at most ``redraw_s`` apart, and always for the last iteration); elsewhere (a
    log file, CI) it is printed as a plain line for the first iteration, then at most every
    ``every_s`` seconds, and for the last. The ETA is the remaining iterations times the mean time of
    the last ``window`` iterations, so a slow first iteration (warm-up) stops counting soon."""

    def __init__(self, total: int, *, stream: TextIO | None = None, every_s: float = 10.0,
                 redraw_s: float = 0.1, window: int = 20, width: int = 24,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if total < 1:
            raise InputError(f"a progress bar needs at least one iteration, got total={total}")
        self.total, self.every_s, self.redraw_s, self.width = total, every_s, redraw_s, width
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._clock = clock
        self._times: deque[float] = deque(maxlen=window)
        self._last_t = clock()
        self._done = 0
        self._shown_at: float | None = None
        self._pending = ""  # the latest line, not yet shown
        self._drawn = 0  # characters of the line on a terminal, to blank what a shorter one leaves

    def update(self, iteration: int, loss: float | None = None, samples_per_s: float | None = None) -> None:
        """Iteration ``iteration`` (0-based) finished with ``loss`` at ``samples_per_s``."""
        now = self._clock()
        done = min(iteration + 1, self.total)
        steps = max(1, done - self._done)  # iterations since the last update share its time
        per = (now - self._last_t) / steps
        self._times.extend([per] * min(steps, self._times.maxlen or steps))
        self._last_t, self._done = now, done
        self._pending = self.line(done, loss, samples_per_s)
        gap = self.redraw_s if self.tty else self.every_s
        if self._shown_at is None or now - self._shown_at >= gap or done == self.total:
            self._show(now)

    def eta_s(self) -> float | None:
        """Seconds left by the moving average; None before the first update."""
        if not self._times:
            return None
        return (self.total - self._done) * sum(self._times) / len(self._times)

    def line(self, done: int, loss: float | None, samples_per_s: float | None) -> str:
        parts = [f"iteration {done}/{self.total}"]
        if self.tty:
            filled = round(self.width * done / self.total)
            parts.append("[" + "#" * filled + "-" * (self.width - filled) + "]")
        parts.append(f"{100 * done / self.total:3.0f}%")
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        if samples_per_s is not None:
            parts.append(f"{samples_per_s:,.1f} samples/s")
        eta = self.eta_s()
        parts.append("ETA " + ("?" if eta is None else format_duration(eta)))
        return "  ".join(parts)

    def _show(self, now: float) -> None:
        if self.tty:
            pad = " " * max(0, self._drawn - len(self._pending))
            self.stream.write("\r" + self._pending + pad)
            self._drawn = len(self._pending)
        else:
            self.stream.write(self._pending + "\n")
        self.stream.flush()
        self._shown_at, self._pending = now, ""

    def close(self) -> None:
        """Show the latest state if it was held back, and end the terminal's line."""
        if self._pending:
            self._show(self._clock())
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
