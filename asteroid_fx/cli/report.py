"""asteroid report RUN: a run folder's loss and throughput, as a short summary and a picture."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from asteroid_fx.cli import args as args_
from asteroid_fx.ir.errors import AsteroidError, InputError
from asteroid_fx.runtime.metrics import ITERATIONS_FILE, read_metrics

_PICTURE_FORMATS = (".png", ".svg", ".pdf")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``asteroid report`` to the CLI's subcommands."""
    s = sub.add_parser("report", help="summarize a run's metrics; plot loss and throughput per iteration")
    s.add_argument("run", metavar="RUN", help="a run folder (what `asteroid launch --out` wrote: metrics.jsonl)")
    s.add_argument("--out", metavar="PATH.png", default=None, type=args_.out_file,
                   help="where to write the plot (.png, .svg or .pdf; default RUN/report.png; needs matplotlib)")
    s.set_defaults(func=run)
    return s


def run(args: argparse.Namespace) -> int:
    folder = Path(args.run)
    out = Path(args.out) if args.out else folder / "report.png"
    if out.suffix.lower() not in _PICTURE_FORMATS:
        raise InputError(f"cannot tell the picture format of {str(out)!r}: use a name ending in "
                         f"{', '.join(_PICTURE_FORMATS)}")
    iterations, validation = read_metrics(folder)
    if not iterations:
        raise InputError(f"{folder / ITERATIONS_FILE} holds no iterations: the run has not finished its first "
                         "iteration yet (or stopped before it); run the report again once it has")
    print(summary(iterations, validation, folder))
    plot(iterations, validation, out, title=str(folder))
    print(f"wrote {out}")
    return 0


def _last_half(iterations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return iterations[len(iterations) // 2:]


def throughput(iterations: list[dict[str, Any]]) -> float | None:
    """Samples per second over ``iterations``: all their samples over all their seconds."""
    seconds = sum(r["seconds"] for r in iterations)
    return sum(r["samples"] for r in iterations) / seconds if seconds > 0 else None


def _number(x: float | None, spec: str = ".4g") -> str:
    return "nan" if x is None else format(x, spec)


def summary(iterations: list[dict[str, Any]], validation: list[dict[str, Any]], folder: Path) -> str:
    """A few lines: iterations and epochs, final loss, throughput over the last half, best val loss."""
    first, last = iterations[0], iterations[-1]
    epochs = sorted({r["epoch"] for r in iterations})
    span = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
    lines = [f"run {folder}: {len(iterations)} iterations ({first['iteration']}-{last['iteration']}, {span}), "
             f"{sum(r['seconds'] for r in iterations):.1f} s of training",
             f"final loss {_number(last['loss'])} (iteration {last['iteration']})"]
    half = _last_half(iterations)
    rate = throughput(half)
    if rate is not None:
        lines.append(f"throughput {rate:,.1f} samples/s over the last half (iterations "
                     f"{half[0]['iteration']}-{half[-1]['iteration']})")
    scored = [v for v in validation if v["val_loss"] is not None]
    if scored:
        best = min(scored, key=lambda v: v["val_loss"])
        accuracy = "" if best["val_accuracy"] is None else f", accuracy {100 * best['val_accuracy']:.2f}%"
        lines.append(f"best val loss {best['val_loss']:.4g} at iteration {best['iteration']}{accuracy} "
                     f"({len(validation)} validations)")
    elif validation:
        lines.append(f"{len(validation)} validations, none with a finite loss")
    return "\n".join(lines)


def _figure_classes():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AsteroidError("the report's plot needs matplotlib, which is not installed: "
                            "pip install 'asteroid-fx[plot]' (or pip install matplotlib); "
                            "the summary above and RUN/metrics.csv need nothing extra") from None
    return Figure, FigureCanvasAgg


def plot(iterations: list[dict[str, Any]], validation: list[dict[str, Any]], path: str | Path, *,
         title: str = "") -> Path:
    """Loss (and validation loss) over iterations above throughput (samples/s) over iterations,
    written to ``path`` (.png, .svg or .pdf by its suffix) with matplotlib's Agg canvas."""
    path = Path(path)
    Figure, FigureCanvasAgg = _figure_classes()
    fig = Figure(figsize=(9, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    loss_ax, rate_ax = fig.subplots(2, 1, sharex=True)
    xs = [r["iteration"] for r in iterations]
    nan = float("nan")  # a null (diverged) loss is a gap in the line
    losses = [nan if r["loss"] is None else r["loss"] for r in iterations]
    loss_ax.plot(xs, losses, color="#4c72b0", linewidth=1.2, label="training loss")
    scored = [v for v in validation if v["val_loss"] is not None]
    if scored:
        loss_ax.plot([v["iteration"] for v in scored], [v["val_loss"] for v in scored], color="#c44e52",
                     marker="o", markersize=4, linewidth=1.2, label="validation loss")
    finite = [y for y in losses + [v["val_loss"] for v in scored] if math.isfinite(y)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
        loss_ax.set_yscale("log")  # a loss falling over decades reads better on a log axis
    loss_ax.set_ylabel("loss")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(loc="upper right")
    if title:
        loss_ax.set_title(title)

    rates = [nan if r["samples_per_s"] is None else r["samples_per_s"] for r in iterations]
    rate_ax.plot(xs, rates, color="#55a868", linewidth=1.0, label="samples/s")
    half = _last_half(iterations)
    mean = throughput(half)
    if mean is not None:
        rate_ax.hlines(mean, half[0]["iteration"], half[-1]["iteration"], colors="#333333", linestyles="dashed",
                       label=f"last half: {mean:,.1f} samples/s")
    rate_ax.set_ylabel("samples/s")
    rate_ax.set_xlabel("iteration")
    rate_ax.set_ylim(bottom=0)
    rate_ax.grid(True, alpha=0.3)
    rate_ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path
