"""Which build a process runs: a fingerprint of what every stage computes and of the versions,
which the launcher publishes and every worker compares with its own before it trains.

The program's text names stages, rows and actions, not what a stage computes: two builds whose
models differ inside a stage (a hidden width, an activation, a layer's epsilon) compile the same
program, and would train different models whose weights load into each other's slots without a
word. So the fingerprint covers each stage's fx graph code, its submodules' settings, every
parameter and buffer (name, shape, dtype) and the asteroid_fx and torch versions; a worker whose
fingerprint differs refuses the run, saying what differs (``difference``)."""

from __future__ import annotations

import hashlib
import json

import torch

import asteroid_fx


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _stage(stage) -> dict:
    module = stage.module
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    # a submodule is a call in the code: what it computes is its own code (a graph) or, for a leaf
    # module a symbolic trace kept, its settings (eps, p)
    inner = [f"{name}: " + (m.code if isinstance(m, torch.fx.GraphModule)
                            else f"{type(m).__module__}.{type(m).__qualname__}({m.extra_repr()})")
             for name, m in module.named_modules() if name]
    return {"code": _digest("\n".join([module.code, *inner])),
            "tensors": [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in tensors]}


def build_of(compiled) -> dict:
    """The fingerprint of ``compiled`` as this process built it: {"asteroid_fx", "torch",
    "stages": [{"code": digest, "tensors": [[name, shape, dtype], ...]}], "digest"} (the digest is
    over the rest)."""
    record = {"asteroid_fx": asteroid_fx.__version__, "torch": torch.__version__,
              "stages": [_stage(s) for s in compiled.stages]}
    return {**record, "digest": _digest(json.dumps(record, sort_keys=True))}


def difference(here: dict, launcher: dict) -> str | None:
    """What differs between this process's build and the launcher's, first things first (versions,
    then stage by stage its tensors and its code); None when the two are the same build."""
    if here.get("digest") == launcher.get("digest"):
        return None
    for part in ("asteroid_fx", "torch"):
        if here[part] != launcher.get(part):
            return f"{part} {here[part]} here, {launcher.get(part)} at the launcher"
    theirs = launcher.get("stages") or []
    if len(here["stages"]) != len(theirs):
        return f"{len(here['stages'])} stages here, {len(theirs)} at the launcher"
    for p, (mine, other) in enumerate(zip(here["stages"], theirs)):
        a = {name: (tuple(shape), dtype) for name, shape, dtype in mine["tensors"]}
        b = {name: (tuple(shape), dtype) for name, shape, dtype in other.get("tensors", [])}
        for name in [*a, *(n for n in b if n not in a)]:
            if a.get(name) != b.get(name):
                return f"stage {p}'s {name} is {_tensor(a.get(name))} here, {_tensor(b.get(name))} at the launcher"
        if mine["code"] != other.get("code"):
            return f"stage {p}'s graph code differs from the launcher's (another definition of the model)"
    return "the build fingerprints differ"


def _tensor(entry) -> str:
    if entry is None:
        return "absent"
    shape, dtype = entry
    return f"{dtype} of shape ({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})"
