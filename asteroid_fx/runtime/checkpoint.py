"""Checkpoints of a run: one file per stage and a manifest, written atomically, read weights-only.

A checkpoint taken after k iterations lives in ``<run>/checkpoints/it_<k>/``:

  stage_<p>.pt     the stage's state by model name, from its first device: {"params", "buffers",
                   "optim"} (parameters, buffers, per-parameter optimizer state), tensors only
  manifest.json    what the checkpoint is: the iteration to resume at, the job entry and seed, the
                   model's state keys with their shapes and dtypes, the cluster's devices, and
                   each stage file with its layers and SHA-256

and ``<run>/checkpoints/latest`` names the newest complete one. Each file is written to a
temporary name and renamed, the manifest last, so a crash leaves the previous checkpoint whole.
A resumed run (on the same plan or another: names, not stage bounds, are what a checkpoint
holds) loads each stage's names from the union of the stage files; ``export_state`` writes the
model's own state_dict, which the original model loads with ``strict=True``.

Plain files rather than torch.distributed.checkpoint: a stage's state is already one process's
(the first device of its group), the devices of a run need not share a file system with one
another (each writes its stages where it runs; the launcher's folder gets the manifest), and a
file per stage read with ``torch.load(weights_only=True)`` is all a resume on another plan needs:
DCP's resharding solves the problem of tensors split across ranks, which stages do not have.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from asteroid_fx.backends.state import StateCopy
from asteroid_fx.ir.atomic import torch_save, write_text
from asteroid_fx.ir.errors import InputError

FORMAT = 1


def folder_of(run: str | os.PathLike, iteration: int) -> Path:
    return Path(run) / "checkpoints" / f"it_{iteration}"


def stage_file(run: str | os.PathLike, iteration: int, stage: int) -> Path:
    return folder_of(run, iteration) / f"stage_{stage}.pt"


def write_stage(run: str | os.PathLike, iteration: int, stage: int, state: StateCopy) -> dict[str, Any]:
    """Write one stage's state; returns its manifest entry (file and digest)."""
    path = stage_file(run, iteration, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_save({"params": state.params, "buffers": state.buffers, "optim": state.optim}, path)
    return {"index": stage, "file": path.name, "sha256": _digest(path)}


def write_manifest(run: str | os.PathLike, iteration: int, *, model: str, seed: int, keys: Mapping[str, torch.Tensor],
                   devices: list[str], stages: list[dict[str, Any]]) -> Path:
    """The manifest of the checkpoint after ``iteration`` iterations (its stage files written),
    then ``latest`` pointing at it."""
    folder = folder_of(run, iteration)
    for st in stages:
        if not (folder / st["file"]).is_file():
            raise InputError(f"checkpoint {folder}: stage file {st['file']} is missing; every stage's first device "
                             "writes its file into the run folder (a shared folder, or copy them there)")
    manifest = {"format": FORMAT, "iteration": iteration, "model": model, "seed": seed, "devices": devices,
                "keys": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in keys.items()},
                "stages": stages}
    write_text(folder / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    write_text(Path(run) / "checkpoints" / "latest", folder.name + "\n")
    return folder


def latest(run: str | os.PathLike) -> dict[str, Any]:
    """The newest complete checkpoint's manifest (with its folder under "folder")."""
    run = Path(run)
    pointer = run / "checkpoints" / "latest"
    if not run.is_dir():
        raise InputError(f"run folder {run} does not exist; give the --out folder of an earlier run")
    if not pointer.is_file():
        raise InputError(f"{run} holds no checkpoint (no {pointer}); a run writes one at its end and every "
                         "--checkpoint-every iterations")
    folder = run / "checkpoints" / pointer.read_text().strip()
    return read_manifest(folder)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"cannot read checkpoint manifest {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON (line {e.lineno}: {e.msg}); the checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: not a checkpoint manifest of format {FORMAT}")
    for field, kind in (("iteration", int), ("model", str), ("keys", dict), ("stages", list), ("devices", list)):
        if not isinstance(manifest.get(field), kind):
            raise InputError(f"{path}: field {field!r} is missing or not a {kind.__name__}")
    manifest["folder"] = str(Path(folder))
    return manifest


def read_state(manifest: Mapping[str, Any], *, verify: bool = True) -> StateCopy:
    """Every stage file of the checkpoint merged by name (a tied weight's copies are equal)."""
    folder = Path(manifest["folder"])
    merged = StateCopy()
    for st in manifest["stages"]:
        path = folder / str(st.get("file", ""))
        if not path.is_file():
            raise InputError(f"checkpoint {folder}: stage file {path.name} is missing")
        if verify and _digest(path) != st.get("sha256"):
            raise InputError(f"checkpoint {folder}: {path.name} does not match its digest in the manifest (a partial "
                             "or altered file); resume from an earlier checkpoint")
        try:
            got = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise InputError(f"checkpoint {path} cannot be read as a weights-only file ({type(e).__name__}: {e})") from e
        if not isinstance(got, dict) or not {"params", "buffers", "optim"} <= set(got):
            raise InputError(f"checkpoint {path} is not a stage state (params, buffers, optim)")
        merged.update(StateCopy(got["params"], got["buffers"], got["optim"]))
    return merged


def check_model(manifest: Mapping[str, Any], model: str, keys: Mapping[str, torch.Tensor]) -> None:
    """Refuse to resume a checkpoint of another model: the job entry and every state key's shape
    and dtype must match."""
    where = manifest["folder"]
    if manifest["model"] != model:
        raise InputError(f"checkpoint {where} is of job {manifest['model']!r}, not {model!r}; resume a run with the "
                         "job that made it")
    want = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in keys.items()}
    if want != manifest["keys"]:
        diff = sorted(set(want) ^ set(manifest["keys"])) or [k for k in want if want[k] != manifest["keys"][k]]
        raise InputError(f"checkpoint {where} holds another model than {model!r} builds now (differs at "
                         f"{', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}); was the job's code changed?")


def check_devices(manifest: Mapping[str, Any], devices: list[str], new_cluster: bool) -> None:
    """Refuse to resume on other devices than the checkpoint's unless asked to (``new_cluster``:
    the run is planned anew for these)."""
    if sorted(manifest["devices"]) != sorted(devices) and not new_cluster:
        raise InputError(f"checkpoint {manifest['folder']} was made on devices {', '.join(manifest['devices'])}, and "
                         f"this cluster has {', '.join(devices)}; to continue on these devices with a new plan, say "
                         "so (new_cluster=True; `asteroid launch --resume RUN --new-cluster`)")


def find(run_or_folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint folder, or of a run folder's newest checkpoint."""
    given = Path(run_or_folder)
    return read_manifest(given) if (given / "manifest.json").is_file() else latest(given)


def export_state(run_or_folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the newest checkpoint of a run (or the checkpoint folder given) as the model's
    state_dict: its own keys only, loadable with ``model.load_state_dict(..., strict=True)``."""
    state = model_state(find(run_or_folder))
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out} is a folder; give the file to write, e.g. {out / 'model.pt'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch_save(state, out)
    return out


def model_state(manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as the model's state_dict (its own keys)."""
    state = read_state(manifest)
    everything = {**state.params, **state.buffers}
    missing = [k for k in manifest["keys"] if k not in everything]
    if missing:
        raise InputError(f"checkpoint {manifest['folder']} lacks {', '.join(missing[:4])}: a stage file is missing "
                         "from it")
    return {k: everything[k].clone() for k in manifest["keys"]}


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
