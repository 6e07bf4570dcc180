"""The folder tree is the architecture: each folder of asteroid_fx is one layer, and a module imports
only from its own layer and the ones below it, lazy imports (inside functions) included. Only
imports under ``if TYPE_CHECKING:`` are exempt: they never run.

    models   the zoo: plain torch, nothing of the project
    ir       Program, text/JSON, verify, Plan, LayerGraph, Cluster, profile format, errors
    cost     roofline, memory model, closed form, calibration
    sim      the discrete-event simulator of a Program, traces
    passes   capture ... split, schedule, lower_comm, lower, replay, replan; planners/
    backends local (the meaning), torch_dist, onnxruntime
    compiler asteroid_fx.compile and Compiled (the package root re-exports it)
    runtime  run spec, launcher, training loop, recovery, heartbeat, netns, link probe, profiler
    cli      one module per subcommand
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "asteroid_fx"
LAYERS = ("models", "ir", "cost", "sim", "passes", "backends", "compiler", "runtime", "cli")
RANK = {name: i for i, name in enumerate(LAYERS)}
ROOT_RANK = RANK["compiler"]  # `import asteroid_fx` gets the facade: compile and the IR types


def layer_of(module: str) -> int:
    """The rank of a module name of this package: asteroid_fx.<layer>[.rest]."""
    parts = module.split(".")
    if parts == ["asteroid_fx"]:
        return ROOT_RANK
    if parts[1] not in RANK:
        raise AssertionError(f"{module} is in no layer: add its folder to LAYERS in {__file__} (and to "
                             "docs/architecture.md)")
    return RANK[parts[1]]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, here: str | None = None) -> list[tuple[int, str]]:
    """(line, imported module) of every import of the package in ``path`` (module ``here``) that can run."""
    tree = ast.parse(path.read_text(), str(path))
    here = here or _module_name(path)
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "asteroid_fx")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "asteroid_fx":
                # `from asteroid_fx import ir` imports asteroid_fx.ir; `from asteroid_fx.ir import plan` a module
                for a in node.names:
                    candidate = f"{target}.{a.name}"
                    sub = PACKAGE.parent / Path(*candidate.split("."))
                    found.append((node.lineno, candidate if sub.with_suffix(".py").exists() or sub.is_dir()
                                  else target))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_import_runs_down_the_layers():
    wrong = []
    for path in _modules():
        here = _module_name(path)
        if here == "asteroid_fx":
            rank = ROOT_RANK
        else:
            rank = layer_of(here)
        for line, target in imports(path):
            if layer_of(target) > rank:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} ({LAYERS[rank]}) imports "
                             f"{target} ({LAYERS[layer_of(target)]})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_the_checker_sees_lazy_imports_and_skips_type_checking_only(tmp_path):
    """The test above can fail: a lazy import of a higher layer is found, a TYPE_CHECKING one is not."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from asteroid_fx.cli import main\n"
              "def f():\n    from asteroid_fx.runtime import launcher\n")
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = imports(probe, "asteroid_fx.ir.probe")
    assert found == [(5, "asteroid_fx.runtime.launcher")]
    assert layer_of(found[0][1]) > layer_of("asteroid_fx.ir.probe")


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_is_a_folder_or_module(layer):
    assert (PACKAGE / layer).is_dir() or (PACKAGE / f"{layer}.py").is_file()
