"""The onnxruntime backend: the program's forward through ONNX Runtime equals PyTorch's, stage by
stage and against the eager model in eval mode, on plans whose groups split micro-batches into
uneven row slices; exported stages are valid ONNX with a dynamic rows dimension; an op ORT cannot
run is reported with the op, the stage and the fx node; `asteroid check` exits non-zero on a mismatch.

Exporting is slow (about a second per stage), so the default run checks each zoo model on one plan
(together every stage count from 1 to 4) and the slow tier checks every model on every plan."""

from __future__ import annotations

import argparse

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's torch.export-based exporter needs it

import asteroid_fx as asteroid  # noqa: E402
from asteroid_fx import models  # noqa: E402
from asteroid_fx.backends import onnxruntime as backend  # noqa: E402
from asteroid_fx.backends.onnxruntime import export as exporting  # noqa: E402
from asteroid_fx.cli import check as check_cli  # noqa: E402
from tests.test_local import BATCH, LAYOUTS, MICROBATCHES, _named_cluster  # noqa: E402

# one plan per model in the default run, so that every stage count is covered
# (the small MLP has three matrix products: at most three stages that compute)
DEFAULT = {"mobilenetv2": 1, "gpt": 2, "resnet50": 2, "bert": 3, "resnet18": 3, "mlp": 3, "vgg16": 4, "digits": 2}


def _compile(name: str, n_stages: int):
    entry = models.get(name)
    torch.manual_seed(0)
    model = entry.build(small=True)
    groups, rows = LAYOUTS[n_stages]
    compiled = asteroid.compile(model, _named_cluster(), example=entry.example(BATCH, True), loss=entry.loss,
                                microbatches=MICROBATCHES, groups=groups, rows=rows)
    return model, compiled


def test_the_real_onnxruntime_package_is_imported():
    """backends/onnxruntime/ is asteroid_fx.backends.onnxruntime: `import onnxruntime` in it is the package."""
    assert backend.__name__ == "asteroid_fx.backends.onnxruntime"
    assert exporting.__name__ == "asteroid_fx.backends.onnxruntime.export"
    assert hasattr(ort, "InferenceSession") and ort.__name__ == "onnxruntime"


@pytest.mark.parametrize("name, n_stages", [
    pytest.param(name, n, marks=() if DEFAULT[name] == n else pytest.mark.slow)
    for name in sorted(models.ZOO) for n in (1, 2, 3, 4) if not (name == "mlp" and n == 4)])
def test_zoo_model_passes_the_check(name, n_stages):
    model, compiled = _compile(name, n_stages)
    assert any(len(s.slots) > 1 and len({hi - lo for _, lo, hi in s.slots}) > 1 for s in compiled.program.stages) \
        or n_stages == 1  # the layouts split some micro-batch into uneven row slices
    before = [(s.module.code, {k: v.clone() for k, v in s.module.state_dict().items()}) for s in compiled.stages]
    report = compiled.check(model=model, repeats=0)
    assert report.ok, report
    assert [s.exporter for s in report.stages] == ["torch.export"] * n_stages
    # the check ran eval-mode copies: the compiled (training) stages and their weights are untouched
    for s, (code, state) in zip(compiled.stages, before):
        assert s.module.code == code
        assert all(torch.equal(v, state[k]) for k, v in s.module.state_dict().items())
    assert report.opset == backend.OPSET
    assert report.local_vs_eager.elements == report.ort_vs_eager.elements > 0


# --- one small compiled plan shared by the tests below ---------------------------------------------

@pytest.fixture(scope="module")
def mlp():
    """The small MLP on two stages, the first a group of two devices with rows 5 and 3."""
    return _compile("mlp", 2)


@pytest.fixture(scope="module")
def plan_dir(mlp, tmp_path_factory):
    """A plan folder as `asteroid compile` writes it, plus the check files and the ONNX stages."""
    _, compiled = mlp
    folder = tmp_path_factory.mktemp("plan")
    compiled.save(folder)
    report = compiled.check(folder=folder, repeats=1)
    return folder, report


def test_report_table_states_errors_latency_and_opset(plan_dir):
    _, report = plan_dir
    text = str(report)
    assert f"opset {backend.OPSET}" in text and "rtol 0.0001" in text and "atol 1e-05" in text
    assert f"rounding {backend.ROUNDING:g}" in text
    for column in ("max abs err", "max rel err", "f32 err", "ORT ms", "PyTorch ms"):
        assert column in text
    assert "d0(5),d1(3)" in text and text.endswith("result: pass")
    assert all(s.ort_s > 0 and s.torch_s > 0 for s in report.stages)


def test_saved_stages_are_valid_onnx_with_dynamic_rows(mlp, plan_dir):
    _, compiled = mlp
    folder, report = plan_dir
    assert len(report.onnx_files) == len(compiled.stages)
    for stage in compiled.stages:
        path = folder / f"stage_{stage.index}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [backend.OPSET]
        for value in (*model.graph.input, *model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == backend.ROWS, value.name
        tagged = {p.value for n in model.graph.node for p in n.metadata_props if p.key == backend.FX_NODE}
        assert tagged and tagged <= {n.name for n in stage.module.graph.nodes}
        # one session runs any row slice: 1 row, and more rows than any micro-batch
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for rows in (1, 11):
            feeds = {i.name: torch.randn(rows, *spec.shape).numpy()
                     for i, spec in zip(session.get_inputs(), stage.input_specs)}
            assert all(out.shape[0] == rows for out in session.run(None, feeds))


# --- a mismatch made for certain ------------------------------------------------------------------

DELTA = 1e-2  # added to the last stage's output bias in ONNX: every output off by exactly that


@pytest.fixture
def wrong_bias(monkeypatch):
    """Export the last stage of the two-stage mlp with its output layer's bias shifted by DELTA in
    the ONNX model only: ORT then differs from PyTorch by DELTA on every output of stage 1 (its last
    op is that Linear), and agrees on stage 0."""
    from onnx import numpy_helper

    export = backend.export_stage

    def perturbed(stage, example, exporter="auto"):
        out = export(stage, example, exporter)
        if stage.index == 1:
            bias = next(i for i in out.model.graph.initializer if i.name.endswith("bias") and len(i.dims) == 1)
            bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + DELTA, bias.name))
        return out

    monkeypatch.setattr(backend, "export_stage", perturbed)


def _needed(report) -> float:
    return max(a.atol_to_pass for a in (*(s.agreement for s in report.stages), report.local_vs_eager,
                                        report.ort_vs_eager))


def test_a_mismatch_raises_with_the_table_naming_the_stage(mlp, wrong_bias):
    _, compiled = mlp
    with pytest.raises(backend.CheckFailed, match="MISMATCH") as info:
        compiled.check(repeats=0)  # the default tolerance, rounding included
    report = info.value.report
    assert not report.ok
    first, second = report.stages
    assert first.agreement.ok and not second.agreement.ok
    assert second.agreement.off == second.agreement.elements  # every output is DELTA off
    assert report.local_vs_eager.ok and not report.ort_vs_eager.ok
    rows = {line.split()[0]: line for line in str(report).splitlines() if line[:1].isdigit()}
    assert rows["0"].endswith("yes") and rows["1"].endswith("NO")
    # the atol that would pass is DELTA, less the rtol share of the smallest |output|, plus rounding
    needed = _needed(report)
    assert DELTA * 0.9 < needed < DELTA * 1.01 and f"every element agrees with atol {needed:.1e}" in str(report)
    assert compiled.check(atol=needed * 1.01, repeats=0).ok
    assert not compiled.check(atol=needed * 0.9, repeats=0, strict=False).ok


def test_rounding_widens_atol_by_pytorchs_own_float32_error(mlp):
    _, compiled = mlp
    report = compiled.check(repeats=0)
    for a in (*(s.agreement for s in report.stages), report.ort_vs_eager):
        assert 0 < a.float32_error < 1e-5 and a.slack == pytest.approx(backend.ROUNDING * a.float32_error)
    assert "f32 err" in str(report) and not report.wide
    plain = compiled.check(rounding=0, repeats=0, strict=False)
    assert plain.stages[0].agreement.float32_error is None and "rounding 0 " in str(plain)
    # rounding only widens: a difference within atol passes either way, and DELTA never hides
    assert [s.agreement.max_abs for s in plain.stages] == [s.agreement.max_abs for s in report.stages]
    with pytest.raises(ValueError, match="rounding must be >= 0"):
        compiled.check(rounding=-1, repeats=0)


def test_a_model_that_refuses_float64_is_checked_with_atol_alone():
    class Float32Only(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(torch.mm(h.float(), self.w.float()) + h)

    compiled = _two_stages(Float32Only())
    report = compiled.check(repeats=0)
    assert report.ok and "does not run in float64" in report.wide and "atol is not widened" in str(report)
    assert all(s.agreement.float32_error is None for s in report.stages)


def test_inputs_must_be_one_global_batch(mlp):
    _, compiled = mlp
    with pytest.raises(ValueError, match=f"batches of {BATCH} rows"):
        compiled.check(inputs=(torch.randn(BATCH + 1, 16),), repeats=0)


def test_other_inputs_and_the_eager_model(mlp):
    model, compiled = mlp
    x = torch.randn(BATCH, *compiled.stages[0].input_specs[0].shape)
    report = compiled.check(inputs=(x,), model=model, repeats=0)
    assert report.ok and report.eager.startswith("eager MLP")


def test_unknown_backend_names_the_one_there_is(mlp):
    _, compiled = mlp
    with pytest.raises(ValueError, match="'onnxruntime'"):
        compiled.check(backend="tensorrt")


def test_torchscript_exporter(mlp):
    _, compiled = mlp
    report = compiled.check(exporter="torchscript", repeats=0)
    assert report.ok, report
    assert [s.exporter for s in report.stages] == ["torchscript"] * 2


def test_fallback_to_torchscript_says_so(mlp, monkeypatch):
    def refuse(module, example):
        raise RuntimeError("the torch.export-based exporter cannot do this")

    monkeypatch.setattr(exporting, "_export_torch", refuse)
    _, compiled = mlp
    with pytest.warns(UserWarning, match=r"stage \d: exported with the TorchScript exporter, because"):
        report = compiled.check(repeats=0)
    assert report.ok and [s.exporter for s in report.stages] == ["torchscript"] * 2
    assert "cannot do this" in report.stages[0].note and "note: stage 1: torchscript exporter" in str(report)


# --- ops ONNX Runtime cannot run -------------------------------------------------------------------

@torch.library.custom_op("asteroid_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Net(torch.nn.Module):
    def __init__(self, last: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(i, o, dtype=dtype) for i, o in ((4, 8), (8, 8), (8, 2)))
        self.last = last

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        h = mystery(h) if self.last == "mystery" else torch.nn.functional.gelu(h)
        return self.c(h)


def _two_stages(model: torch.nn.Module, dtype: torch.dtype = torch.float32):
    return asteroid.compile(model, "host-2", example=torch.randn(8, 4, dtype=dtype), microbatches=2, stages=2)


def _stage_with(compiled, node_name: str) -> int:
    return next(s.index for s in compiled.stages if node_name in {n.name for n in s.module.graph.nodes})


def test_an_op_no_exporter_can_translate_names_op_stage_and_node():
    compiled = _two_stages(Net("mystery"))
    with pytest.raises(backend.UnsupportedOpError) as info:
        compiled.check(repeats=0)
    e = info.value
    assert (e.op, e.stage, e.fx_nodes) == ("asteroid_test.mystery.default", _stage_with(compiled, "mystery"), ("mystery",))
    assert f"stage {e.stage}: ONNX Runtime cannot run asteroid_test.mystery.default (fx node mystery)" in str(e)


def test_an_op_without_an_ort_kernel_names_op_stage_and_node():
    """ORT's CPU provider has no float64 Erf, which GELU exports to."""
    compiled = _two_stages(Net("gelu", torch.float64), torch.float64)
    with pytest.raises(backend.UnsupportedOpError, match="Erf") as info:
        compiled.check(repeats=0)
    e = info.value
    assert e.stage == _stage_with(compiled, "gelu") and e.fx_nodes == ("gelu",)
    assert "aten.gelu.default" in e.op and "double" in str(e)


# --- asteroid check PLAN_DIR -----------------------------------------------------------------------

def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="asteroid")
    check_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_check_passes(plan_dir, capsys):
    folder, _ = plan_dir
    assert _cli(["check", "--backend", "onnxruntime", str(folder), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "against the stages chained on the whole batch" in out and out.rstrip().endswith("result: pass")


def test_cli_check_exits_non_zero_on_a_mismatch(plan_dir, capsys, wrong_bias):
    folder, _ = plan_dir
    assert _cli(["check", str(folder), "--repeats", "0"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and next(line for line in out.splitlines() if line.startswith("1 ")).endswith("NO")
    assert _cli(["check", str(folder), "--repeats", "0", "--atol", f"{DELTA * 1.01}"]) == 0


def test_cli_check_on_a_folder_without_check_files_says_what_to_do(mlp, tmp_path):
    _, compiled = mlp
    with pytest.raises(ValueError, match="program.json missing"):
        _cli(["check", str(tmp_path)])
    compiled.save(tmp_path)
    (tmp_path / backend.MANIFEST).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="save_check_files"):
        _cli(["check", str(tmp_path)])
