"""Argument types of the command line: every number checked for its range, every path for its
kind, when the arguments are parsed, before any work starts. A bad value is one line from
argparse naming the option, what it got and what it takes."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

MAX_COUNT = 10**9  # far beyond any batch, iteration or layer count that fits a machine


def count(least: int = 1, most: int = MAX_COUNT) -> Callable[[str], int]:
    """An integer in [least, most]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {least} to {most}"
                                             if most < MAX_COUNT else f"{value} is out of range: give {least} or more")
        return value

    return parse


def number(least: float = 0.0, *, above: bool = False, most: float = math.inf) -> Callable[[str], float]:
    """A finite number at least ``least`` (above it, with ``above``), at most ``most``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < least or (above and value == least) or value > most:
            bound = f"above {least:g}" if above else f"{least:g} or more"
            if most < math.inf:
                bound += f", at most {most:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: give a finite number {bound}")
        return value

    return parse


def _writable_under(text: str, path: Path) -> None:
    """``path``'s nearest existing folder (itself or a parent) is a folder this process may write in."""
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} lies under {str(parent)!r}, which is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write under {str(parent)!r} (no permission)")


def out_folder(text: str) -> str:
    """A folder to write into: an existing folder, or a path whose nearest existing parent is a
    folder this process may write in."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder; give a folder to write into")
    _writable_under(text, path)
    return text


def out_file(text: str) -> str:
    """A file to write: a new path or a regular file (a FIFO would block the writer, a device
    swallow the output), under a folder this process may write in."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give the file to write, e.g. {path / 'model.pt'}")
    if path.exists() and not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular file (a FIFO or a device); give a file to write")
    _writable_under(text, path.parent if str(path.parent) else Path("."))
    return text


MAX_INPUT_BYTES = 256 << 20  # far beyond any profile or cluster file; a bigger one is not one


def in_file(text: str) -> str:
    """A regular file to read (not a folder, a FIFO or a device, which would block or never end),
    of at most MAX_INPUT_BYTES."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular file")
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r} holds {size} bytes, more than the {MAX_INPUT_BYTES} any input "
                                         "file of asteroid has; give the right file")
    return text


def cluster(text: str) -> str:
    """A preset name, comma-separated kinds, or a cluster JSON file: a path given must be a regular
    file (a FIFO would block the reader) of at most MAX_INPUT_BYTES."""
    path = Path(text)
    if os.sep in text or text.endswith(".json") or path.exists():
        if path.exists() and not path.is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is not a cluster file (a folder or a special file); give a "
                                             "preset name, device kinds, or a cluster JSON file")
        if path.exists():
            in_file(text)
    return text


def optimizer(text: str) -> str:
    """A torch.optim class name the workers can build (checked here, not first inside every worker)."""
    from asteroid_fx.backends.state import OptimizerSettings

    try:
        OptimizerSettings(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def listen(text: str) -> str:
    """HOST:PORT, the port 0 (any free one) to 65535."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT with a port of 0 to 65535 (e.g. 127.0.0.1:0, or "
                                         "0.0.0.0:29500 to accept workers from other machines)")
    return text


def torch_device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N (N below the number of GPUs), mps."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; give cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device that torch can use "
                                             "(a CPU build of torch, or no GPU); give cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s), numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; give cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: profiling runs on cpu, cuda or mps")
    return text
