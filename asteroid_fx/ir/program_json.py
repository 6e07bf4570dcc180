"""The JSON form of a Program: what ``program_to_json`` writes, ``program_from_json`` reads back
to an equal Program, rejecting a malformed document with the JSON path of the bad field."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from asteroid_fx.ir.json_fields import read_json
from asteroid_fx.ir.ops import OPTIONAL_FIELDS, Op
from asteroid_fx.ir.program import FORMAT_VERSION, Action, Program, StageInfo, StageSlot, TensorSpec
from asteroid_fx.ir.program_format import FORMAT_NAME
from asteroid_fx.ir.program_parse import ProgramParseError


def _action_to_json(a: Action) -> dict[str, Any]:
    out: dict[str, Any] = {"op": Op(a.op).value, "stage": a.stage}
    if a.mb is not None:
        out["mb"] = a.mb
    if a.rows is not None:
        out["rows"] = list(a.rows)
    if a.peer is not None:
        out["peer"] = a.peer
    if a.payload is not None:
        out["payload"] = a.payload
    if a.specs:
        out["specs"] = [{"dtype": s.dtype, "shape": list(s.shape)} for s in a.specs]
    if a.group:
        out["group"] = list(a.group)
    if a.params:
        out["params"] = list(a.params)
    if a.max_norm is not None:
        out["max_norm"] = a.max_norm
    return out


def program_to_json(p: Program) -> dict[str, Any]:
    """A JSON-ready dict; ``program_from_json`` reads it back to an equal Program."""
    return {
        "format": FORMAT_NAME,
        "version": p.version,
        "schedule": p.schedule,
        "microbatches": p.microbatches,
        "microbatch_rows": p.microbatch_rows,
        "stages": [
            {
                "index": st.index,
                "layers": list(st.layers),
                "slots": [{"device": s.device, "lo": s.lo, "hi": s.hi} for s in st.slots],
                **({"splits": list(st.splits)} if st.splits else {}),
            }
            for st in p.stages
        ],
        "devices": [{"device": d, "actions": [_action_to_json(a) for a in acts]} for d, acts in p.actions],
    }


def _json_error(path: str, what: str) -> ProgramParseError:
    return ProgramParseError(f"program JSON at {path}: {what}")


def _obj(v: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise _json_error(path, f"expected an object, found {type(v).__name__}")
    unknown = [k for k in v if k not in required and k not in optional]
    if unknown:
        raise _json_error(path, f"unknown field {unknown[0]!r} (expected {', '.join(required + optional)})")
    missing = [k for k in required if k not in v]
    if missing:
        raise _json_error(path, f"missing field {missing[0]!r}")
    return v


def _int(v: Any, path: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _json_error(path, f"expected an integer, found {v!r}")
    return v


def _float(v: Any, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _json_error(path, f"expected a number, found {v!r}")
    return float(v)


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _json_error(path, f"expected a string, found {v!r}")
    return v


def _list(v: Any, path: str) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise _json_error(path, f"expected a list, found {v!r}")
    return list(v)


def _pair(v: Any, path: str) -> tuple[int, int]:
    items = _list(v, path)
    if len(items) != 2:
        raise _json_error(path, f"expected [lo, hi], found {v!r}")
    return _int(items[0], f"{path}[0]"), _int(items[1], f"{path}[1]")


def _action_from_json(v: Any, path: str) -> Action:
    d = _obj(v, path, ("op", "stage"), OPTIONAL_FIELDS)
    try:
        op = Op(_str(d["op"], f"{path}.op"))
    except ValueError:
        raise _json_error(f"{path}.op", f"unknown op {d['op']!r} (expected one of {' '.join(o.value for o in Op)})") from None

    def opt(key: str, read: Any) -> Any:
        return None if d.get(key) is None else read(d[key], f"{path}.{key}")

    specs = tuple(
        TensorSpec(
            _str(_obj(s, f"{path}.specs[{i}]", ("dtype", "shape"))["dtype"], f"{path}.specs[{i}].dtype"),
            tuple(_int(x, f"{path}.specs[{i}].shape[{j}]") for j, x in enumerate(_list(s["shape"], f"{path}.specs[{i}].shape"))),
        )
        for i, s in enumerate(opt("specs", _list) or ())
    )
    group = tuple(_str(g, f"{path}.group[{i}]") for i, g in enumerate(opt("group", _list) or ()))
    params = tuple(_str(n, f"{path}.params[{i}]") for i, n in enumerate(opt("params", _list) or ()))
    return Action(
        op=op,
        stage=_int(d["stage"], f"{path}.stage"),
        mb=opt("mb", _int),
        rows=opt("rows", _pair),
        peer=opt("peer", _str),
        payload=opt("payload", _str),
        specs=specs,
        group=group,
        params=params,
        max_norm=opt("max_norm", _float),
    )


def program_from_json(d: Mapping[str, Any]) -> Program:
    """Read what ``program_to_json`` writes; raises ProgramParseError naming the JSON path."""
    top = _obj(d, "$", ("format", "version", "schedule", "microbatches", "microbatch_rows", "stages", "devices"))
    if top["format"] != FORMAT_NAME:
        raise _json_error("$.format", f"this is not an asteroid program: format is {top['format']!r} (expected {FORMAT_NAME!r})")
    version = _int(top["version"], "$.version")
    if version != FORMAT_VERSION:
        raise _json_error(
            "$.version",
            f"unsupported version {version} (this build reads version {FORMAT_VERSION}); "
            "write it with a matching asteroid_fx or upgrade this one",
        )
    stages = []
    for i, sv in enumerate(_list(top["stages"], "$.stages")):
        path = f"$.stages[{i}]"
        s = _obj(sv, path, ("index", "layers", "slots"), ("splits",))
        slots = tuple(
            StageSlot(
                _str(slot["device"], f"{path}.slots[{j}].device"),
                _int(slot["lo"], f"{path}.slots[{j}].lo"),
                _int(slot["hi"], f"{path}.slots[{j}].hi"),
            )
            for j, slot in enumerate(
                _obj(x, f"{path}.slots[{k}]", ("device", "lo", "hi")) for k, x in enumerate(_list(s["slots"], f"{path}.slots"))
            )
        )
        splits = tuple(_int(x, f"{path}.splits[{j}]") for j, x in enumerate(_list(s.get("splits", []), f"{path}.splits")))
        stages.append(StageInfo(_int(s["index"], f"{path}.index"), _pair(s["layers"], f"{path}.layers"), slots, splits))
    actions = []
    for i, dv in enumerate(_list(top["devices"], "$.devices")):
        path = f"$.devices[{i}]"
        dev = _obj(dv, path, ("device", "actions"))
        acts = tuple(
            _action_from_json(a, f"{path}.actions[{j}]") for j, a in enumerate(_list(dev["actions"], f"{path}.actions"))
        )
        actions.append((_str(dev["device"], f"{path}.device"), acts))
    return Program(
        schedule=_str(top["schedule"], "$.schedule"),
        microbatches=_int(top["microbatches"], "$.microbatches"),
        microbatch_rows=_int(top["microbatch_rows"], "$.microbatch_rows"),
        stages=tuple(stages),
        actions=tuple(actions),
        version=version,
    )


def read_program_json(path: str | os.PathLike[str]) -> Program:
    """Read ``program.json``; errors name the file and the JSON path of the bad field."""
    data = read_json(path, "program", ProgramParseError)
    try:
        return program_from_json(data)
    except ProgramParseError as e:
        raise ProgramParseError(f"{path}: {e}") from None
