"""RESULTS.md is written only by the benchmark scripts: each owns one section, between markers,
and replaces it whole with what it just measured."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from asteroid_fx.ir.atomic import write_text
from asteroid_fx.ir.catalog import host_cpu_name

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = ("# Benchmark results\n\nEvery table below is written by the script named in its heading; "
          "rerun the script to refresh it. Nothing here is typed by hand.\n")


def machine() -> str:
    return (f"{host_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def write_section(name: str, body: str) -> None:
    """Replace section ``name`` of RESULTS.md (atomically; other sections are kept)."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text(RESULTS, text)
