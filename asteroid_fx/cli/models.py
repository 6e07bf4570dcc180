"""How the command line names a model: a zoo name, or package.module:callable with --input specs."""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Sequence

import torch

DTYPES = {"f32": torch.float32, "f16": torch.float16, "f64": torch.float64, "i64": torch.int64,
          "i32": torch.int32, "b8": torch.bool}


def parse_input_spec(spec: str) -> torch.Tensor:
    """'f32[32,3,32,32]' -> a random tensor; integer inputs 'i64[8,16]<100' draw from [0, 100)."""
    m = re.fullmatch(r"(\w+)\[([\d,\s]+)\](?:<(\d+))?", spec.strip())
    if not m or m.group(1) not in DTYPES:
        raise SystemExit(f"bad --input {spec!r}: write DTYPE[SIZES], e.g. f32[32,3,32,32] or i64[8,16]<1000 "
                         f"(dtypes: {', '.join(DTYPES)})")
    shape = [int(s) for s in m.group(2).split(",") if s.strip()]
    dtype = DTYPES[m.group(1)]
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.randint(0, int(m.group(3) or 2), shape, dtype=dtype)


def load_model(name: str, batch: int | None, inputs: Sequence[str]) -> tuple[torch.nn.Module, tuple, Any]:
    """A zoo name (small config with ':small'), or 'module:attribute': a Job (runtime/job.py), or a
    callable returning a Job, a module or (module, example). ``batch``: the example's rows (None:
    the job's own batch, else 32); a module's --input specs give their own."""
    from asteroid_fx import models

    base, _, variant = name.partition(":")
    if base in models.ZOO and variant in ("", "small"):
        entry = models.get(base)
        small = variant == "small"
        return entry.build(small=small), entry.example(batch or 32, small), entry.loss
    if ":" not in name:
        raise SystemExit(f"unknown model {name!r}: use a zoo model ({', '.join(models.ZOO)}, add ':small' "
                         "for the test config) or 'package.module:callable'")
    module_name, attr = name.split(":", 1)
    try:
        made = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"cannot load {name!r}: {e}") from e
    from asteroid_fx.runtime.job import Job

    if not isinstance(made, Job):
        made = made()
    if isinstance(made, Job):  # a job: its model, its example (at its own batch unless --batch) and loss
        from asteroid_fx.runtime.spec import example_of

        if batch is not None and batch != made.batch:
            example = made.example
            if example is not None:  # the job's own example: its first ``batch`` rows
                if batch > made.batch:
                    raise SystemExit(f"{name!r} is a job whose example has {made.batch} rows, fewer than --batch "
                                     f"{batch}; leave --batch out, or give the job a larger batch and example")
                example = torch.utils._pytree.tree_map(
                    lambda t: t[:batch] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, example)
            made = dataclasses.replace(made, batch=batch, example=example)
        args, kwargs = example_of(made)
        if kwargs:
            raise SystemExit(f"{name!r} is a job with keyword inputs; compile it from Python "
                             "(asteroid.compile(model, cluster, example=..., kwargs=...))")
        return made.model(), args, made.loss
    if isinstance(made, tuple):
        model, example = made[0], made[1]
        example = example if isinstance(example, tuple) else (example,)
    else:
        model = made
        if not inputs:
            raise SystemExit(f"{name!r} returned a module without example inputs: pass --input DTYPE[SIZES] "
                             "for each positional input, or return (module, example_inputs)")
        example = tuple(parse_input_spec(s) for s in inputs)
    return model, example, None

