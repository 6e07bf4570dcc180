"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of it.

Every file the project writes that someone else reads (plans, programs, profiles, clusters,
traces, checkpoints) goes through here: write a temporary file in the same folder, flush it to
disk, give it ordinary permissions (a temporary file is created private), then rename it over the
target. A failure removes the temporary file and re-raises.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def write_with(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write`` on a binary file that becomes ``path`` atomically once it returns."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return write_with(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` atomically (load it back with ``torch.load(..., weights_only=True)``)."""
    import torch

    return write_with(path, lambda f: torch.save(obj, f))
