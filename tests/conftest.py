"""Suite-wide settings and fixtures.

One intra-op thread: the tests run many tiny kernels, for which a second OpenMP thread costs far
more than it brings, and on a loaded 2-core machine spinning threads slow small ops by 1000x.

Fault injection (``RunSpec.faults``) is on for the suite: the tests of recovery aim their failures
with it, and a launcher runs it only when its environment says so (runtime/faults.py).

``golden`` reads and checks the golden files under tests/golden (format and regeneration:
tests/golden/README.md)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ["ASTEROID_FAULT_INJECTION"] = "1"

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDENS = "ASTEROID_UPDATE_GOLDENS"
SECTION = "=== "  # starts a section of a case file; no printed IR line starts with it


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every module starts on one thread, even after a test elsewhere changed the count (the
    profile command takes --threads), and leaves the count as it found it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _normal(text: str) -> str:
    """Sections are compared up to trailing blank lines, which the file format cannot keep apart."""
    return text.rstrip("\n") + "\n"


class Golden:
    """One file under tests/golden. A plain file is one expected text. A case file is comment
    lines (``#``), then sections, each a line ``=== NAME`` and the text up to the next one: the
    inputs a test reads (``before``, ...) and the outputs it checks (``expected``, ...)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return self.path.relative_to(GOLDEN_DIR).as_posix()

    def _parts(self) -> tuple[list[str], dict[str, str]]:
        if not self.path.exists():
            return [], {}
        header: list[str] = []
        sections: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in self.path.read_text().splitlines():
            if line.startswith(SECTION):
                current = sections.setdefault(line[len(SECTION):].strip(), [])
            elif current is None:
                header.append(line)
            else:
                current.append(line)
        return header, {k: _normal("\n".join(v)) for k, v in sections.items()}

    def section(self, name: str) -> str:
        """The text of section ``name`` (an input the case file must provide)."""
        _, sections = self._parts()
        if name not in sections:
            pytest.fail(f"{self.path} has no section '{SECTION}{name}'; write it by hand (tests/golden/README.md)")
        return sections[name]

    def check(self, actual: str, section: str | None = "expected") -> None:
        """``actual`` equals the section (``None``: the whole plain file); a mismatch fails with a
        unified diff, expected -> actual. With ASTEROID_UPDATE_GOLDENS=1 the file is rewritten
        instead (inputs and comments kept)."""
        if section is None:
            want = self.path.read_text() if self.path.exists() else None
        else:
            want = self._parts()[1].get(section)
            actual = _normal(actual)
        if os.environ.get(UPDATE_GOLDENS) == "1":
            if want != actual:
                self._write(actual, section)
            return
        if want is None:
            where = "the file" if section is None else f"section '{SECTION}{section}'"
            pytest.fail(f"{self.path}: {where} is missing; create it with {UPDATE_GOLDENS}=1 and review it")
        if actual != want:
            diff = "".join(difflib.unified_diff(want.splitlines(True), actual.splitlines(True),
                                                f"{self.name}{'' if section is None else ', ' + section}", "actual"))
            pytest.fail(f"the output differs from {self.path}:\n{diff}\nif the change is intended, regenerate "
                        f"with {UPDATE_GOLDENS}=1 and review the diff (tests/golden/README.md)", pytrace=False)

    def _write(self, actual: str, section: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if section is None:
            self.path.write_text(actual)
            return
        header, sections = self._parts()
        sections[section] = actual
        blocks = ["\n".join(header).rstrip("\n") + "\n"] if any(header) else []
        blocks += [f"{SECTION}{k}\n{v}" for k, v in sections.items()]
        self.path.write_text("\n".join(blocks))


@pytest.fixture
def golden():
    """``golden("replay/merge.txt")``: the Golden of that file under tests/golden."""
    return lambda name: Golden(GOLDEN_DIR / name)
