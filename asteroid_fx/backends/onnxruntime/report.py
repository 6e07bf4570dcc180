"""The onnxruntime check's report: per stage and for the model's outputs, how ORT and PyTorch
agree, printed as a table (``CheckReport``); ``CheckFailed`` carries it to the caller."""

from __future__ import annotations

import dataclasses

from asteroid_fx.backends.onnxruntime.forward import Agreement
from asteroid_fx.ir.errors import AsteroidError


class CheckFailed(AsteroidError, AssertionError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance; ``report`` holds the table."""

    def __init__(self, report: CheckReport):
        self.report = report
        super().__init__(f"the ONNX Runtime check failed\n{report}")


@dataclasses.dataclass(frozen=True)
class StageCheck:
    index: int
    devices: tuple[str, ...]
    rows: tuple[int, ...]
    exporter: str
    note: str
    agreement: Agreement  # ORT against PyTorch, both through the program
    ort_s: float | None  # per global batch, median
    torch_s: float | None
    export_s: float  # ONNX export, checker and ORT session creation


@dataclasses.dataclass(frozen=True)
class CheckReport:
    backend: str
    opset: int
    rtol: float
    atol: float
    rounding: float  # atol widened by this many times PyTorch's own float32 error per output
    wide: str  # "" when the float64 run worked, else why it could not be made (no widening then)
    repeats: int
    threads: int
    stages: tuple[StageCheck, ...]
    eager: str  # what the model's outputs are compared with
    local_vs_eager: Agreement
    ort_vs_eager: Agreement
    onnx_files: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(s.agreement.ok for s in self.stages) and self.local_vs_eager.ok and self.ort_vs_eager.ok

    def __str__(self) -> str:
        if self.rounding and not self.wide:
            rule = (f"atol + rtol * |ref| + {self.rounding:g} * f32 err, where f32 err is PyTorch's own float32 error "
                    "on that output, against the program run in float64")
        else:
            rule = "atol + rtol * |ref|"
        head = (f"ONNX Runtime check: {len(self.stages)} stage(s), opset {self.opset}, rtol {self.rtol:g}, "
                f"atol {self.atol:g}, rounding {self.rounding:g} (an element is off when |x - ref| > {rule})")
        timing = (f"latency: a stage's F actions over one global batch, median of {self.repeats}, "
                  f"{self.threads} thread(s)") if self.repeats else "latency: not measured (repeats=0)"
        header = ["stage", "devices (rows)", "exporter", "max abs err", "max rel err", "f32 err", "off/elements",
                  "ORT ms", "PyTorch ms", "ORT/PyTorch", "export s", "ok"]
        rows = [[str(s.index), ",".join(f"{d}({r})" for d, r in zip(s.devices, s.rows)), s.exporter,
                 f"{s.agreement.max_abs:.2e}", f"{s.agreement.max_rel:.2e}", _err(s.agreement.float32_error),
                 f"{s.agreement.off}/{s.agreement.elements}", _ms(s.ort_s), _ms(s.torch_s),
                 f"{s.ort_s / s.torch_s:.2f}x" if s.ort_s and s.torch_s else "-", f"{s.export_s:.1f}",
                 "yes" if s.agreement.ok else "NO"] for s in self.stages]
        lines = [head, timing, "", *_table(header, rows), "", f"model outputs against {self.eager}:"]
        for name, a in (("PyTorch through the program (local)", self.local_vs_eager),
                        ("ONNX Runtime through the program", self.ort_vs_eager)):
            lines.append(f"  {name:<37} max abs err {a.max_abs:.2e}  max rel err {a.max_rel:.2e}  "
                         f"f32 err {_err(a.float32_error)}  off {a.off}/{a.elements}  {'ok' if a.ok else 'MISMATCH'}")
        if self.wide:
            lines.append(f"note: PyTorch's float32 error is not measured, so atol is not widened: {self.wide}")
        lines += [f"note: stage {s.index}: {s.exporter} exporter, because {s.note}" for s in self.stages if s.note]
        needed = max(a.atol_to_pass for a in (*(s.agreement for s in self.stages), self.local_vs_eager, self.ort_vs_eager))
        if not self.ok and needed < float("inf"):
            lines.append(f"every element agrees with atol {needed:.1e} at this rtol; compare it with the f32 err "
                         "column (PyTorch's own float32 error) before calling it a bug")
        lines.append("result: " + ("pass" if self.ok else "MISMATCH"))
        return "\n".join(lines)


def _err(error: float | None) -> str:
    return "-" if error is None else f"{error:.2e}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, 1, 2, len(header) - 1}
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header).rstrip(), *(fmt(r).rstrip() for r in rows)]
