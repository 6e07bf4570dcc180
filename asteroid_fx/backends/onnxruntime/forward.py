"""Run and compare for the onnxruntime check: the program's forward actions with any stage runner
(ORT sessions, PyTorch, PyTorch in float64), and the agreement of two sets of outputs under the
tolerance rule of the package docstring."""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from asteroid_fx.backends.onnxruntime.export import CheckStage, ExportError
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program import Action, Op, Program
from asteroid_fx.ir.verify import execution_order

StageRunner = Callable[[int, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]  # (stage, inputs) -> outputs


def _ort_runner(sessions: Sequence[Any]) -> StageRunner:
    def run(index: int, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        sess = sessions[index]
        names = [i.name for i in sess.get_inputs()]
        if len(names) != len(inputs):
            raise InputError(f"stage {index}: the ONNX model takes {len(names)} inputs, the stage {len(inputs)}")
        feeds = {n: t.detach().contiguous().numpy() for n, t in zip(names, inputs)}
        try:
            outs = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"stage {index}: ONNX Runtime failed on {inputs[0].shape[0]} rows: {e}") from e
        return tuple(torch.from_numpy(o) for o in outs)
    return run


def _torch_runner(stages: Sequence[CheckStage]) -> StageRunner:
    def run(index: int, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = stages[index].module(*inputs)
        return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    return run


# --- the program's forward -------------------------------------------------------------------------


@dataclasses.dataclass
class Forward:
    """One forward pass of a program: what every F action produced and how long each stage took."""

    program: Program
    stage_inputs: Sequence[Sequence[str]]
    run_stage: StageRunner
    inputs: Mapping[str, torch.Tensor]  # stage 0's inputs by name, whole batch
    outputs: dict[tuple[int, int, tuple[int, int]], tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    seconds: list[float] = dataclasses.field(default_factory=list)
    _mailbox: dict[tuple, tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    _received: dict[tuple[str, int], dict[tuple[int, int], tuple[torch.Tensor, ...]]] = dataclasses.field(default_factory=dict)

    def run(self) -> Forward:
        self.seconds = [0.0] * len(self.program.stages)
        actions = dict(self.program.actions)
        for device, i in execution_order(self.program):
            a = actions[device][i]
            FORWARD_RULES.get(a.op, Forward._skip)(self, device, a)
        return self

    def _rows(self, mb: int, rows: tuple[int, int]) -> slice:
        base = mb * self.program.microbatch_rows
        return slice(base + rows[0], base + rows[1])

    def _forward(self, device: str, a: Action) -> None:
        if a.stage == 0:
            sl = self._rows(a.mb, a.rows)
            inputs = tuple(self.inputs[name][sl] for name in self.stage_inputs[0])
        else:
            got = self._received.pop((device, a.mb))
            pieces = [got[r] for r in sorted(got)]
            inputs = tuple(torch.cat([piece[i] for piece in pieces]) for i in range(len(self.stage_inputs[a.stage])))
        started = time.perf_counter()
        outputs = self.run_stage(a.stage, inputs)
        self.seconds[a.stage] += time.perf_counter() - started
        self.outputs[(a.stage, a.mb, a.rows)] = outputs

    def _send(self, device: str, a: Action) -> None:
        if a.payload != "act":
            return
        lo, hi = next(r for s, mb, r in self.outputs if s == a.stage and mb == a.mb and r[0] <= a.rows[0] and a.rows[1] <= r[1])
        outputs = self.outputs[(a.stage, a.mb, (lo, hi))]
        sl = slice(a.rows[0] - lo, a.rows[1] - lo)
        self._mailbox[(device, a.peer, a.stage, a.mb, a.rows)] = tuple(t[sl] for t in outputs)

    def _recv(self, device: str, a: Action) -> None:
        if a.payload != "act":
            return
        data = self._mailbox.pop((a.peer, device, a.stage, a.mb, a.rows))
        self._received.setdefault((device, a.mb), {})[a.rows] = data

    def _skip(self, device: str, a: Action) -> None:
        pass

    def stage_outputs(self, stage: int) -> tuple[torch.Tensor, ...]:
        """The outputs of ``stage`` over the whole batch: every F action's rows, in row order."""
        b = self.program.microbatch_rows
        pieces = sorted(((mb * b + r[0], mb * b + r[1], out) for (s, mb, r), out in self.outputs.items() if s == stage),
                        key=lambda piece: piece[:2])
        covered = [(lo, hi) for lo, hi, _ in pieces]
        expected = self.program.microbatches * b
        if any(x[1] != y[0] for x, y in zip(covered, covered[1:])) or not covered or covered[0][0] != 0 or covered[-1][1] != expected:
            raise InputError(f"stage {stage}: the program's F actions do not cover rows [0, {expected}) once "
                             f"(they cover {covered}); run verify(program)")
        outs = [p[2] for p in pieces]
        for i, t in enumerate(outs[0]):
            if t.dim() == 0:
                raise InputError(f"stage {stage}: output {i} is a 0-dim tensor; the check re-assembles outputs "
                                 "by rows, so every output must be batch-first")
        return tuple(torch.cat([o[i] for o in outs]) for i in range(len(outs[0])))


FORWARD_RULES: dict[Op, Callable[[Forward, str, Action], None]] = {
    Op.F: Forward._forward,
    Op.SEND: Forward._send,
    Op.RECV: Forward._recv,
}


def run_forward(program: Program, stages: Sequence[CheckStage], run_stage: StageRunner,
                inputs: Mapping[str, torch.Tensor]) -> Forward:
    """Run the program's forward actions with ``run_stage`` computing each stage."""
    return Forward(program, [s.inputs for s in stages], run_stage, inputs).run()


# --- comparison --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Agreement:
    max_abs: float
    max_rel: float
    off: int  # elements beyond atol + rtol * |ref|
    elements: int
    atol_to_pass: float  # the smallest atol under which every element agrees, rtol kept, no widening (inf: never)
    float32_error: float | None = None  # PyTorch's own: max |ref - ref in float64| (None: not measured)
    slack: float | None = None  # what the rounding rule added to atol (the largest over the outputs)

    @property
    def ok(self) -> bool:
        return self.off == 0


def float_error(ref: Sequence[torch.Tensor], wide: Sequence[torch.Tensor] | None) -> tuple[float, ...] | None:
    """Per output, max |ref - wide| over its finite elements: PyTorch's own rounding error where
    ``wide`` is the same computation in float64 (0 for outputs that are not floating point)."""
    if wide is None:
        return None
    if len(wide) != len(ref):
        raise InputError(f"{len(wide)} float64 outputs for {len(ref)} outputs")
    errors = []
    for r, w in zip(ref, wide):
        if not r.is_floating_point() or r.shape != w.shape or r.dtype == torch.float64:
            errors.append(0.0)
            continue
        d = (r.detach().to(torch.float64) - w.detach().to(torch.float64)).abs()
        d = d[torch.isfinite(d)]
        errors.append(float(d.max()) if d.numel() else 0.0)
    return tuple(errors)


def compare(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], rtol: float, atol: float, *,
            errors: Sequence[float] | None = None, rounding: float = 0.0) -> Agreement:
    """torch.testing's rule and error measures, over all the tensors together; ``errors`` (from
    ``float_error``), times ``rounding``, widen each output's atol by PyTorch's own float32 error."""
    if len(got) != len(ref):
        raise InputError(f"{len(got)} outputs to compare with {len(ref)}")
    max_abs = max_rel = atol_to_pass = 0.0
    off = elements = 0
    for i, (g, r) in enumerate(zip(got, ref)):
        elements += r.numel()
        if g.shape != r.shape:
            off, max_abs, max_rel, atol_to_pass = off + r.numel(), float("inf"), float("inf"), float("inf")
            continue
        if r.is_complex():
            g, r = torch.view_as_real(g), torch.view_as_real(r)
        g64, r64 = g.detach().to(torch.float64), r.detach().to(torch.float64)
        # equal (infinities included) or both NaN: no error; otherwise a NaN on one side is an infinite one
        same = (g64 == r64) | (torch.isnan(g64) & torch.isnan(r64))
        diff = torch.where(same, torch.zeros_like(r64), (g64 - r64).abs().nan_to_num(nan=float("inf")))
        finite = torch.isfinite(r64)
        slack = rounding * errors[i] if errors is not None else 0.0
        tolerance = torch.where(finite, atol + slack + rtol * r64.abs(), torch.zeros_like(r64))
        if not r.is_floating_point():  # integers and booleans agree exactly or not at all
            tolerance = torch.zeros_like(r64)
        off += int((diff > tolerance).sum())
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            if r.is_floating_point():
                beyond_rtol = torch.where(finite, diff - rtol * r64.abs(), diff.masked_fill(diff > 0, float("inf")))
            else:
                beyond_rtol = diff.masked_fill(diff > 0, float("inf"))
            atol_to_pass = max(atol_to_pass, float(beyond_rtol.max()))
            scaled = finite & (r64 != 0)
            if scaled.any():
                max_rel = max(max_rel, float((diff[scaled] / r64[scaled].abs()).max()))
    slack = max((rounding * e for e in errors), default=0.0) if errors is not None else None
    return Agreement(max_abs, max_rel, off, elements, atol_to_pass,
                     max(errors, default=0.0) if errors is not None else None, slack)


def _widened(t: Any) -> Any:
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _wide_forward(program: Program, stages: Sequence[CheckStage], inputs: Mapping[str, torch.Tensor]) -> Forward:
    """The program's forward in float64: every stage's floating weights and buffers, and the
    floating inputs, widened. Raises whatever PyTorch raises where the model insists on float32."""
    wide = [dataclasses.replace(s, module=copy.deepcopy(s.module).double()) for s in stages]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_forward(program, wide, _torch_runner(wide), {n: _widened(t) for n, t in inputs.items()})
