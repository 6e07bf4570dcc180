"""A run folder's metrics files, the progress bar, and `asteroid report` on them."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys

import pytest

from asteroid_fx import cli
from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime.metrics import Metrics, Progress, export_csv, format_duration, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def write_run(folder, n=6, *, lr=0.1, validate_every=3):
    """A run of ``n`` iterations of 8 samples, 0.5 s each, two per epoch, validated every few."""
    with Metrics(folder, clock=FakeClock()) as m:
        for i in range(n):
            m.iteration(i, i // 2, loss=2.0 / (i + 1), lr=lr, seconds=0.5, samples=8)
            if (i + 1) % validate_every == 0:
                m.validation(i, i // 2, val_loss=3.0 / (i + 1), val_accuracy=0.5 + i / 100, samples=20)
    return folder


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_read_back_as_written(tmp_path):
    with Metrics(tmp_path, clock=FakeClock(5.0)) as m:
        a = m.iteration(0, 0, loss=1.5, lr=[0.1, 0.01], seconds=0.25, samples=32)
        b = m.iteration(1, 0, loss=1.25, lr=[0.1, 0.01], seconds=0.5, samples=32)
        v = m.validation(1, 0, val_loss=1.4, val_accuracy=None, samples=100)
    assert a == {"iteration": 0, "epoch": 0, "loss": 1.5, "lr": [0.1, 0.01], "seconds": 0.25, "samples": 32,
                 "samples_per_s": 128.0, "time": 5.0}
    iterations, validation = read_metrics(tmp_path)
    assert iterations == [a, b]
    assert validation == [v] == [{"iteration": 1, "epoch": 0, "val_loss": 1.4, "val_accuracy": None,
                                  "samples": 100, "time": 5.0}]
    # one JSON object per line, each line ended
    lines = (tmp_path / "metrics.jsonl").read_text().split("\n")
    assert lines[-1] == "" and [json.loads(line) for line in lines[:-1]] == [a, b]


def test_lines_reach_the_file_before_close(tmp_path):
    m = Metrics(tmp_path)
    m.iteration(0, 0, loss=1.0, lr=0.1, seconds=1.0, samples=4)
    assert len(read_metrics(tmp_path)[0]) == 1
    m.close()


def test_a_diverged_loss_is_null_and_the_file_stays_strict_json(tmp_path):
    with Metrics(tmp_path) as m:
        m.iteration(0, 0, loss=float("nan"), lr=0.1, seconds=1.0, samples=4)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and json.loads(text)["loss"] is None
    assert read_metrics(tmp_path)[0][0]["loss"] is None


def test_a_new_run_starts_the_files_afresh_and_resume_appends(tmp_path):
    write_run(tmp_path, 4, validate_every=2)
    with Metrics(tmp_path) as m:
        m.iteration(0, 0, loss=1.0, lr=0.1, seconds=1.0, samples=4)
    iterations, validation = read_metrics(tmp_path)
    assert [r["iteration"] for r in iterations] == [0] and validation == []
    with Metrics(tmp_path, resume=True) as m:
        m.iteration(1, 0, loss=0.9, lr=0.1, seconds=1.0, samples=4)
    assert [r["iteration"] for r in read_metrics(tmp_path)[0]] == [0, 1]


def test_a_line_cut_short_at_the_end_is_skipped(tmp_path):
    write_run(tmp_path, 3)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"iteration": 3, "epoch": 1, "loss": 0.4')  # a crash in the middle of a write
    iterations, _ = read_metrics(tmp_path)
    assert [r["iteration"] for r in iterations] == [0, 1, 2]


def test_resume_removes_the_cut_line_before_appending(tmp_path):
    write_run(tmp_path, 3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "ep')
    with Metrics(tmp_path, resume=True) as m:
        m.iteration(3, 1, loss=0.5, lr=0.1, seconds=0.5, samples=8)
    assert [r["iteration"] for r in read_metrics(tmp_path)[0]] == [0, 1, 2, 3]


def test_a_malformed_middle_line_names_the_file_and_the_line(tmp_path):
    write_run(tmp_path, 4)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = '{"iteration": 1, "epoch"\n'
    path.write_text("".join(lines))
    with pytest.raises(InputError, match=r"metrics\.jsonl line 2: not a JSON object"):
        read_metrics(tmp_path)


def test_a_line_with_a_wrong_field_names_the_line_and_the_field(tmp_path):
    write_run(tmp_path, 4)
    path = tmp_path / "validation.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["val_loss"] = "low"
    lines[0] = json.dumps(record) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(InputError, match=r"validation\.jsonl line 1: field 'val_loss' must be a number"):
        read_metrics(tmp_path)


def test_reading_a_folder_without_metrics_says_what_writes_them(tmp_path):
    with pytest.raises(InputError, match=r"holds no metrics\.jsonl: `asteroid launch \.\.\. --out"):
        read_metrics(tmp_path)
    with pytest.raises(InputError, match="no such run folder"):
        read_metrics(tmp_path / "missing")


def test_csv_has_the_iteration_columns(tmp_path):
    write_run(tmp_path, 4)
    with open(tmp_path / "metrics.csv", newline="") as f:  # written by close
        rows = list(csv.reader(f))
    assert rows[0] == ["iteration", "epoch", "loss", "lr", "seconds", "samples", "samples_per_s", "time"]
    assert len(rows) == 5
    assert [float(x) for x in rows[2]] == [1, 0, 1.0, 0.1, 0.5, 8, 16.0, 1000.0]


def test_csv_gives_each_parameter_group_its_lr_column(tmp_path):
    write_run(tmp_path, 2, lr=[0.1, 0.02])
    out = export_csv(tmp_path, tmp_path / "table.csv")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["iteration", "epoch", "loss", "lr_0", "lr_1", "seconds", "samples",
                             "samples_per_s", "time"]
    assert (rows[1]["lr_0"], rows[1]["lr_1"]) == ("0.1", "0.02")


# ---------------------------------------------------------------------------------------------
# Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_prints_plain_lines_at_most_every_n_seconds():
    clock, out = FakeClock(0.0), io.StringIO()
    p = Progress(10, stream=out, every_s=5.0, clock=clock)
    for i in range(10):
        clock.t += 2.0
        p.update(i, loss=1.0 / (i + 1), samples_per_s=64.0)
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # the first, then every 5 s of the 2 s iterations (at 8 s and 14 s), then the last
    assert [line.split()[1] for line in lines] == ["1/10", "4/10", "7/10", "10/10"]
    assert "ETA 0:18" in lines[0]  # 9 iterations left at 2 s each
    assert "ETA 0:12" in lines[1] and "ETA 0:00" in lines[-1]
    assert "loss 0.25" in lines[1] and "64.0 samples/s" in lines[1]


def test_progress_eta_follows_the_moving_average():
    clock, out = FakeClock(0.0), io.StringIO()
    p = Progress(100, stream=out, window=4, clock=clock)
    clock.t += 60.0  # a slow first iteration (warm-up)
    p.update(0)
    for i in range(1, 5):
        clock.t += 1.0
        p.update(i)
    assert p.eta_s() == pytest.approx(95 * 1.0)  # the warm-up is out of the window


def test_progress_close_prints_the_held_back_state():
    clock, out = FakeClock(0.0), io.StringIO()
    p = Progress(10, stream=out, every_s=100.0, clock=clock)
    for i in range(3):
        clock.t += 1.0
        p.update(i, loss=0.5)
    assert out.getvalue().count("\n") == 1
    p.close()
    assert out.getvalue().splitlines()[-1].startswith("iteration 3/10")


def test_progress_on_a_terminal_redraws_one_line():
    clock, out = FakeClock(0.0), Terminal()
    with Progress(4, stream=out, redraw_s=0.0, width=8, clock=clock) as p:
        for i in range(4):
            clock.t += 1.0
            p.update(i, loss=1.0, samples_per_s=10.0)
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "iteration 2/4  [####----]" in text and "iteration 4/4  [########]" in text
    assert "ETA 0:02" in text


def test_format_duration():
    assert (format_duration(5), format_duration(83), format_duration(3725)) == ("0:05", "1:23", "1:02:05")


# ---------------------------------------------------------------------------------------------
# asteroid report


def test_report_writes_a_png_and_a_summary(tmp_path, capsys):
    run = write_run(tmp_path / "run", 10, validate_every=4)
    assert cli.main(["report", str(run)]) == 0
    png = run / "report.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    out, err = capsys.readouterr()
    assert f"run {run}: 10 iterations (0-9, epochs 0-4)" in out
    assert "final loss 0.2 (iteration 9)" in out
    assert "throughput 16.0 samples/s over the last half (iterations 5-9)" in out
    assert "best val loss 0.375 at iteration 7, accuracy 57.00% (2 validations)" in out
    assert f"wrote {png}" in out


def test_report_out_path_and_no_validation(tmp_path, capsys):
    run = tmp_path / "run"
    with Metrics(run) as m:
        for i in range(3):
            m.iteration(i, 0, loss=1.0, lr=0.1, seconds=0.1 * (i + 1), samples=10)
    out = tmp_path / "pictures" / "r.png"
    out.parent.mkdir()
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    assert "val loss" not in text
    assert "throughput 40.0 samples/s over the last half (iterations 1-2)" in text  # 20 samples in 0.5 s


def test_report_runs_as_a_module(tmp_path):
    run = write_run(tmp_path / "run", 4)
    done = subprocess.run([sys.executable, "-m", "asteroid_fx.cli", "report", str(run)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run / "report.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("case, message", [
    ("missing", "no such run folder"),
    ("no_metrics", r"holds no metrics\.jsonl: `asteroid launch \.\.\. --out"),
    ("empty", r"metrics\.jsonl holds no iterations"),
    ("bad_suffix", "cannot tell the picture format"),
])
def test_report_errors_say_what_to_do(tmp_path, capsys, case, message):
    run = tmp_path / "run"
    args = ["report", str(run)]
    if case != "missing":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    if case == "bad_suffix":
        write_run(run)
        args += ["--out", str(tmp_path / "report.jpeg")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("asteroid report: error: ")
    assert re.search(message, err), err


def test_report_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run", 4)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert cli.main(["report", str(run)]) == 2
    out, err = capsys.readouterr()
    assert "final loss" in out  # the summary needs nothing extra
    assert "pip install 'asteroid-fx[plot]'" in err
    assert not (run / "report.png").exists()
