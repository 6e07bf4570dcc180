"""A user's job (tests/jobs.py, not the zoo) trained by the runtime: the same rows, the same
optimizer and schedule as eager training with the program's micro-batching, on the local backend
and on worker processes, and every device reading only what its actions use."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from asteroid_fx.backends.state import OptimizerSettings
from asteroid_fx.ir.cluster import Cluster, Device
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program import Op
from asteroid_fx.runtime.auth import SECRET_ENV, new_secret
from asteroid_fx.runtime.data import Batches, needed_rows
from asteroid_fx.runtime.job import Job, load_job
from asteroid_fx.runtime.launcher import launch, load_weights
from asteroid_fx.runtime.spec import (RunSpec, batches, compile_spec, iterations_of, job_of, optimizer_of,
                                      smaller_program)
from tests import jobs
from tests.eager import assert_same_state, eager_train_job

CLUSTER = Cluster.uniform([Device("a", "jetson-nano"), Device("b", "jetson-tx2"), Device("c", "jetson-xavier-nx")],
                          bandwidth=125e6, latency=1e-3)
# two stages, the second a group of two with an uneven split of each micro-batch's 8 rows
SPEC = RunSpec(model="tests.jobs:build", microbatches=2, groups=(("a",), ("b", "c")), rows=((8,), (3, 5)))


def _eager(spec: RunSpec):
    job = job_of(spec)
    return eager_train_job(job, batches(spec), microbatches=spec.microbatches, seed=spec.seed)


def test_the_job_spans_two_epochs_of_its_dataset_in_a_seeded_shuffle():
    job = job_of(SPEC)
    assert iterations_of(SPEC) == 2 * jobs.SAMPLES // jobs.BATCH == job.iterations
    data = Batches(job, seed=0)
    first = torch.cat([data.indices(i) for i in range(3)])
    second = torch.cat([data.indices(i) for i in range(3, 6)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(jobs.SAMPLES))  # each sample once an epoch
    assert first.tolist() != second.tolist()  # reshuffled
    assert Batches(job, seed=0).indices(4).tolist() == data.indices(4).tolist()  # every process alike
    assert Batches(job, seed=1).indices(0).tolist() != data.indices(0).tolist()


def test_the_local_backend_trains_the_job_like_eager_training():
    compiled = compile_spec(SPEC, CLUSTER)
    runner, losses = compiled.run(batches(SPEC), iterations_of(SPEC), optimizer=optimizer_of(SPEC))
    ref, ref_losses = _eager(SPEC)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())
    # the schedule moved the rate: the last iterations ran at cosine's small rates
    assert optimizer_of(SPEC).lr_at(5)[0] < 0.2 * optimizer_of(SPEC).lr_at(0)[0]
    # and the clipping mattered: without it the run ends elsewhere
    unclipped = dataclasses.replace(job_of(SPEC), clip_grad_norm=None)
    free, _ = eager_train_job(unclipped, batches(SPEC), microbatches=SPEC.microbatches)
    assert "NORM" in str(compiled.program)
    with pytest.raises(AssertionError):
        assert_same_state(free.state_dict(), ref.state_dict(), rtol=1e-3)


@pytest.mark.parametrize("entry", ["tests.jobs:build", "tests.jobs:build_with_loader_processes"])
def test_worker_processes_train_the_job_like_eager_and_read_only_their_rows(entry, tmp_path, monkeypatch):
    reads = tmp_path / "reads"
    reads.mkdir()
    monkeypatch.setenv("ASTEROID_TEST_READS", str(reads))
    result = launch(dataclasses.replace(SPEC, model=entry), CLUSTER, tmp_path / "run", timeout_s=240,
                    log=lambda m: None)
    counts = {p.name: len(p.read_text()) for p in reads.iterdir()}
    # the launcher, no device, checks samples 0 and 1 against the model before any worker starts
    assert counts.pop("main.inputs") == counts.pop("main.labels") == 2
    ref, ref_losses = _eager(SPEC)
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    got = load_weights(tmp_path / "run", result["program"].devices)
    assert_same_state(got, ref.state_dict())
    n = iterations_of(SPEC)
    # a (stage 0) reads every row's inputs and no label; b and c (the last stage) only the labels
    # of their rows (3 and 5 of each micro-batch's 8)
    assert counts == {"a.inputs": n * jobs.BATCH, "b.labels": n * 2 * 3, "c.labels": n * 2 * 5}


def test_a_device_needs_the_inputs_of_its_first_stage_rows_and_the_labels_of_its_last():
    compiled = compile_spec(SPEC, CLUSTER)
    program = compiled.program
    last = len(program.stages) - 1
    assert needed_rows(program.of("a"), program.microbatch_rows, last) == (((0, 16),), ())
    assert needed_rows(program.of("b"), program.microbatch_rows, last) == ((), ((0, 3), (8, 11)))
    assert needed_rows(program.of("c"), program.microbatch_rows, last) == ((), ((3, 8), (11, 16)))


def test_pairs_jobs_and_sgd_with_nesterov_train_like_eager():
    spec = RunSpec(model="tests.jobs:pairs", microbatches=2, groups=(("a", "b"), ("c",)), rows=((3, 5), (8,)))
    compiled = compile_spec(spec, CLUSTER)
    runner, losses = compiled.run(batches(spec), iterations_of(spec), optimizer=optimizer_of(spec))
    ref, ref_losses = _eager(spec)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())


def test_the_optimizer_state_factor_comes_from_the_optimizer():
    assert OptimizerSettings("AdamW").state_factor() == 2.0
    assert OptimizerSettings("SGD").state_factor() == 0.0
    assert OptimizerSettings("SGD", kwargs={"momentum": 0.9}).state_factor() == 1.0
    adam = compile_spec(SPEC, CLUSTER)
    sgd = compile_spec(dataclasses.replace(SPEC, optimizer="sgd"), CLUSTER)
    # the same plan, AdamW's two states per weight beside plain SGD's none
    memory = {name: [u.memory_bytes for u in c.plan.prediction.devices] for name, c in (("adam", adam), ("sgd", sgd))}
    weights = [sum(st.module.get_parameter(n).numel() * 4 for n, _ in st.module.named_parameters())
               for st in adam.stages]
    assert [a - s for a, s in zip(memory["adam"], memory["sgd"])] == [2 * weights[0], 2 * weights[1], 2 * weights[1]]


def test_no_decay_patterns_make_a_group_without_weight_decay():
    model = jobs.Net()
    opt = job_of(SPEC).settings.build(list(model.named_parameters()))
    decayed, free = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in free["params"]) == ["fc1.bias", "fc2.bias", "head.bias", "norm.bias",
                                                            "norm.weight"]
    assert free["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.1


@pytest.mark.parametrize("entry, message", [
    ("tests.no_such_module:build", "cannot import the job's module 'tests.no_such_module'"),
    ("tests.jobs:nothing", "module 'tests.jobs' has no 'nothing'"),
    ("tests.jobs:FEATURES", "gave a int, not an asteroid_fx Job"),
    ("nonsense", "neither a zoo model"),
])
def test_a_job_entry_that_does_not_load_says_why(entry, message):
    with pytest.raises(InputError, match=message):
        load_job(entry)


def test_bad_jobs_are_refused_with_what_to_do():
    with pytest.raises(InputError, match="not a module instance"):
        Job(model=jobs.Net(), dataset=jobs.Inputs(), loss=torch.nn.functional.cross_entropy, batch=4)
    with pytest.raises(InputError, match="fewer than one batch"):
        Job(model=jobs.Net, dataset=jobs.Pairs(), loss=torch.nn.functional.cross_entropy, batch=1000)
    with pytest.raises(InputError, match="unknown optimizer 'Adamm'"):
        Job(model=jobs.Net, dataset=jobs.Pairs(), loss=torch.nn.functional.cross_entropy, batch=4, optimizer="Adamm")
    with pytest.raises(InputError, match="one per sample"):
        Job(model=jobs.Net, dataset=jobs.Inputs(), labels=[0, 1], loss=torch.nn.functional.cross_entropy, batch=4)


def test_a_dataset_of_single_values_is_not_taken_for_pairs():
    job = Job(model=jobs.Net, dataset=jobs.Inputs(), loss=torch.nn.functional.cross_entropy, batch=4)
    with pytest.raises(InputError, match=r"not an \(inputs, label\) pair"):
        Batches(job, seed=0).whole(0)


# --- checkpoints ----------------------------------------------------------------------------------


def test_a_run_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    first = launch(dataclasses.replace(SPEC, iterations=3, checkpoint_every=2), CLUSTER, tmp_path / "one",
                   timeout_s=240, log=lambda m: None)
    assert (tmp_path / "one/checkpoints/latest").read_text().strip() == "it_3"
    assert sorted(p.name for p in (tmp_path / "one/checkpoints").iterdir()) == ["it_2", "it_3", "latest"]
    # resumed on another plan of the same devices: the first stage a group now
    replanned = dataclasses.replace(SPEC, groups=(("a", "b"), ("c",)), rows=((3, 5), (8,)))
    second = launch(replanned, CLUSTER, tmp_path / "two", timeout_s=240, log=lambda m: None, resume=tmp_path / "one")
    ref, ref_losses = _eager(SPEC)
    assert first["losses"] + second["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(load_weights(tmp_path / "two", second["program"].devices), ref.state_dict())

    # the export loads strictly into the original model and evaluates like the eager one
    from asteroid_fx.runtime.checkpoint import export_state

    path = export_state(tmp_path / "two", tmp_path / "model.pt")
    model = jobs.Net()
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x, y = batches(SPEC).__next__()
    with torch.no_grad():
        assert float(job_of(SPEC).loss(model(*x), y)) == pytest.approx(float(job_of(SPEC).loss(ref(*x), y)), rel=1e-5)


def test_a_resume_refuses_a_checkpoint_of_another_model_or_cluster_or_a_finished_run(tmp_path):
    launch(dataclasses.replace(SPEC, iterations=2), CLUSTER, tmp_path / "one", timeout_s=240, log=lambda m: None)
    other = RunSpec(model="tests.jobs:pairs", microbatches=2, groups=SPEC.groups, rows=SPEC.rows)
    with pytest.raises(InputError, match="is of job 'tests.jobs:build', not 'tests.jobs:pairs'"):
        launch(other, CLUSTER, tmp_path / "two", resume=tmp_path / "one", log=lambda m: None)
    two = Cluster.uniform([Device("a", "jetson-nano"), Device("b", "jetson-tx2")], bandwidth=125e6, latency=1e-3)
    with pytest.raises(InputError, match="was made on devices a, b, c"):
        launch(dataclasses.replace(SPEC, groups=None, rows=None), two, tmp_path / "two", resume=tmp_path / "one",
               log=lambda m: None)
    with pytest.raises(InputError, match="the run of 2 is done"):
        launch(dataclasses.replace(SPEC, iterations=2), CLUSTER, tmp_path / "two", resume=tmp_path / "one",
               log=lambda m: None)
    with pytest.raises(InputError, match="holds no checkpoint"):
        launch(SPEC, CLUSTER, tmp_path / "two", resume=tmp_path, log=lambda m: None)
    damaged = tmp_path / "one/checkpoints/it_2/stage_1.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    from asteroid_fx.runtime.checkpoint import export_state

    with pytest.raises(InputError, match="does not match its digest"):
        export_state(tmp_path / "one", tmp_path / "model.pt")


# --- the Python API -------------------------------------------------------------------------------


def test_train_on_the_local_backend_takes_a_job_object_and_resumes(tmp_path):
    import asteroid_fx as asteroid

    job = jobs.build()
    pin = dict(microbatches=2, groups=SPEC.groups, rows=SPEC.rows)
    first = asteroid.train(job, CLUSTER, out=tmp_path / "one", iterations=4, **pin)
    rest = asteroid.train(job, CLUSTER, out=tmp_path / "two", resume=tmp_path / "one", **pin)
    ref, ref_losses = _eager(SPEC)
    assert rest.start == 4 and first.losses + rest.losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(rest.state_dict, ref.state_dict())
    model = jobs.Net()
    model.load_state_dict(rest.state_dict, strict=True)


def test_train_on_processes_needs_the_jobs_entry(tmp_path):
    import asteroid_fx as asteroid

    with pytest.raises(InputError, match="give its entry 'package.module:attribute'"):
        asteroid.train(jobs.build(), CLUSTER, out=tmp_path, backend="processes")
    with pytest.raises(InputError, match="runs inside a torchrun job"):
        asteroid.train("tests.jobs:build", CLUSTER, out=tmp_path, backend="torchrun")


def test_a_torchrun_script_trains_the_job_rank_by_device(tmp_path):
    import subprocess
    import sys

    cluster = tmp_path / "cluster.json"
    CLUSTER.save(cluster)
    out = tmp_path / "run"
    out.mkdir()
    root = Path(__file__).parent.parent
    # a script's own folder is on its path, not the project's: the job's package is put there, as a
    # user's project would be (installed, or on PYTHONPATH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           SECRET_ENV: new_secret()}  # the user's, given to every rank: the ranks sign the store's values with it
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                           "tests/torchrun_job.py", str(out), str(cluster)], capture_output=True, text=True,
                          timeout=240, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    result = json.loads((out / "result.json").read_text())
    ref, ref_losses = _eager(SPEC)
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(load_weights(out, result["devices"]), ref.state_dict())
    assert (out / "checkpoints/latest").read_text().strip() == f"it_{iterations_of(SPEC)}"


def test_a_device_killed_in_the_middle_of_an_epoch_is_recovered_from_with_the_same_rows(tmp_path):
    # c (half of the last stage's group) dies in iteration 4, the second batch of the second epoch:
    # b redoes it with c's rows as well, read again from the same shuffled samples
    spec = dataclasses.replace(SPEC, recovery=True, replan=False, backup_every=1, faults=(("c", 4, 3, "kill"),))
    result = launch(spec, CLUSTER, tmp_path, timeout_s=120, log=lambda m: None)
    (failure,) = result["failures"]
    assert failure["device"] == "c" and failure["iteration"] == 4
    assert result["program"].devices == ("a", "b")
    ref, ref_losses = _eager(SPEC)
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(load_weights(tmp_path, result["program"].devices), ref.state_dict())


def test_the_command_line_launches_a_job_and_exports_its_weights(tmp_path, capsys):
    from asteroid_fx.cli import main

    cluster = tmp_path / "cluster.json"
    CLUSTER.save(cluster)
    run = tmp_path / "run"
    assert main(["launch", "tests.jobs:build", "--cluster", str(cluster), "--out", str(run), "--iterations", "2",
                 "--checkpoint-every", "1"]) == 0
    assert "iteration 2: loss" in capsys.readouterr().out
    assert main(["launch", "tests.jobs:build", "--cluster", str(cluster), "--out", str(tmp_path / "more"),
                 "--iterations", "3", "--resume", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "iteration 3: loss" in printed and "iteration 1: loss" not in printed
    from asteroid_fx.runtime.metrics import read_metrics

    assert [r["iteration"] for r in read_metrics(run)[0]] == [0, 1]
    assert [r["iteration"] for r in read_metrics(tmp_path / "more")[0]] == [2]
    # resumed into its own folder, a run keeps the records of the iterations before
    assert main(["launch", "tests.jobs:build", "--cluster", str(cluster), "--out", str(run), "--iterations", "4",
                 "--resume", str(run)]) == 0
    records = read_metrics(run)[0]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert [r["lr"][0] for r in records] == pytest.approx([job_of(SPEC).settings.lr_at(i)[0] for i in range(4)])
    assert main(["report", str(run)]) == 0 and (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "more"), str(tmp_path / "model.pt")]) == 0
    assert "after 3 iterations" in capsys.readouterr().out
    jobs.Net().load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    assert main(["export", str(tmp_path), str(tmp_path / "x.pt")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("entry, message", [
    ("tests.jobs:mismatched", r"input 'x' as \(13,\) torch.float32 per row, and the example .* has \(12,\)"),
    ("tests.jobs:vector_loss", r"loss returned a tensor of shape \(2,\); it must return a scalar"),
])
def test_a_job_whose_samples_or_loss_do_not_fit_the_model_stops_before_any_worker_starts(entry, message, tmp_path):
    with pytest.raises(InputError, match=message):
        launch(RunSpec(model=entry), CLUSTER, tmp_path, timeout_s=60, log=lambda m: None)
    assert not list(tmp_path.glob("worker_*.log"))


# --- an epoch's last partial batch -----------------------------------------------------------------

# 53 samples, batches of 16: the 5 rows left at the end of every epoch trained as a smaller batch
UNEVEN = dataclasses.replace(SPEC, model="tests.jobs:uneven_smaller")


def _eager_smaller(spec: RunSpec):
    """Eager training on the same batches, the smaller one in its program's micro-batches."""
    job = job_of(spec)
    smaller = smaller_program(job, compile_spec(spec, CLUSTER))
    return eager_train_job(job, batches(spec), microbatches=spec.microbatches, seed=spec.seed,
                           smaller_microbatches=smaller.microbatches)


def test_a_smaller_last_batch_ends_every_epoch_and_trains_like_eager_on_the_local_backend(tmp_path):
    import asteroid_fx as asteroid
    from asteroid_fx.runtime.metrics import read_metrics

    job = job_of(UNEVEN)
    assert iterations_of(UNEVEN) == 8 and [job.rows_at(i) for i in range(8)] == [16, 16, 16, 5] * 2
    data = Batches(job, seed=0)
    for epoch in range(2):  # every sample once an epoch, the smaller batch included
        rows = torch.cat([data.indices(4 * epoch + k) for k in range(4)])
        assert sorted(rows.tolist()) == list(range(jobs.UNEVEN))
    assert [len(data.whole(i)[1]) for i in (2, 3, 4)] == [16, 5, 16]
    ref, ref_losses = _eager_smaller(UNEVEN)
    compiled = compile_spec(UNEVEN, CLUSTER)
    runner, losses = compiled.run(batches(UNEVEN), iterations_of(UNEVEN), optimizer=optimizer_of(UNEVEN))
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())
    assert str(runner.program) == str(compiled.program)  # swapped back after each smaller batch
    # the Python API, the choice made there for a job that drops by default; stopped before the
    # first smaller batch and resumed from there
    pin = dict(microbatches=2, groups=SPEC.groups, rows=SPEC.rows, last_batch="smaller")
    first = asteroid.train(jobs.uneven(), CLUSTER, out=tmp_path / "one", iterations=3, **pin)
    rest = asteroid.train(jobs.uneven(), CLUSTER, out=tmp_path / "two", resume=tmp_path / "one", **pin)
    assert rest.start == 3 and first.losses + rest.losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(rest.state_dict, ref.state_dict())
    assert [r["samples"] for r in read_metrics(tmp_path / "two")[0]] == [5] + [16, 16, 16, 5]


def test_the_last_partial_batch_is_dropped_by_default_as_before():
    spec = dataclasses.replace(SPEC, model="tests.jobs:uneven")
    job = job_of(spec)
    assert job.last_batch == "drop" and iterations_of(spec) == 6 and {job.rows_at(i) for i in range(6)} == {16}
    data = Batches(job, seed=0)
    for epoch in range(2):  # 48 of the 53 samples an epoch, each once
        rows = torch.cat([data.indices(3 * epoch + k) for k in range(3)]).tolist()
        assert len(set(rows)) == 48 and set(rows) <= set(range(jobs.UNEVEN))
    assert smaller_program(job, compile_spec(spec, CLUSTER)) is None
    compiled = compile_spec(spec, CLUSTER)
    runner, losses = compiled.run(batches(spec), iterations_of(spec), optimizer=optimizer_of(spec))
    ref, ref_losses = _eager(spec)
    assert len(losses) == 6 and losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())
    # the run's choice overrides the job's, both ways
    assert iterations_of(dataclasses.replace(UNEVEN, last_batch="drop")) == 6
    assert iterations_of(dataclasses.replace(spec, last_batch="smaller")) == 8


def test_worker_processes_train_a_smaller_last_batch_like_eager(tmp_path):
    from asteroid_fx.runtime.metrics import read_metrics

    result = launch(UNEVEN, CLUSTER, tmp_path, timeout_s=240, log=lambda m: None)
    ref, ref_losses = _eager_smaller(UNEVEN)
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(load_weights(tmp_path, result["program"].devices), ref.state_dict())
    assert [r["samples"] for r in read_metrics(tmp_path)[0]] == [16, 16, 16, 5] * 2


def test_a_smaller_last_batch_is_refused_with_recovery_and_bad_choices_are_named(tmp_path, capsys):
    from asteroid_fx.cli import main

    with pytest.raises(InputError, match=r"recovery \(--recover\) does not support last_batch='smaller' yet"):
        launch(dataclasses.replace(UNEVEN, recovery=True), CLUSTER, tmp_path, timeout_s=60, log=lambda m: None)
    assert not list(tmp_path.glob("worker_*.log"))
    cluster = tmp_path / "cluster.json"
    CLUSTER.save(cluster)
    # the command line's choice reaches the job: a job that drops by default, made to keep its rest
    assert main(["launch", "tests.jobs:uneven", "--cluster", str(cluster), "--out", str(tmp_path / "run"),
                 "--last-batch", "smaller", "--recover"]) == 2
    err = capsys.readouterr().err
    assert "does not support last_batch='smaller' yet: drop the last partial batch (--last-batch drop)" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["launch", "tests.jobs:uneven", "--cluster", str(cluster), "--last-batch", "pad"])
    assert "--last-batch: invalid choice: 'pad'" in capsys.readouterr().err
    # a remainder of one row, which the last stage's group of two cannot share: before any worker starts
    from asteroid_fx.passes.remainder import RemainderError

    with pytest.raises(RemainderError, match="has 1 row, fewer than the 2 that stage 1's group of 2 devices"):
        launch(dataclasses.replace(SPEC, model="tests.jobs:one_left"), CLUSTER, tmp_path, timeout_s=60,
               log=lambda m: None)
    assert not list(tmp_path.glob("worker_*.log"))
    with pytest.raises(InputError, match=r"Job.last_batch='pad': give 'drop' .* or 'smaller'"):
        dataclasses.replace(jobs.uneven(), last_batch="pad")
    with pytest.raises(InputError, match="last_batch='pad': give 'drop' or 'smaller'"):
        RunSpec(model="tests.jobs:uneven", last_batch="pad")


# --- transformers models on worker processes --------------------------------------------------------


# the tied GPT-2 also trains on three stage workers in the recovery tests below (default run)
@pytest.mark.parametrize("entry", [pytest.param("tests.hf_jobs:gpt2", marks=pytest.mark.slow), "tests.hf_jobs:llama"])
def test_a_transformers_model_trains_on_three_stage_workers_like_eager(entry, tmp_path):
    pytest.importorskip("transformers")
    spec = RunSpec(model=entry, stages=3, microbatches=4, iterations=3)
    result = launch(spec, CLUSTER, tmp_path, timeout_s=240, log=lambda m: None)
    assert len(result["plan"].stages) == 3
    ref, ref_losses = _eager(spec)
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    got = load_weights(tmp_path, result["program"].devices)
    want = ref.state_dict()
    assert_same_state({k: v for k, v in got.items() if k in want}, want)
    if entry.endswith("gpt2"):  # the tie: the head is the embedding on every holder, trained alike
        assert "lm_head.weight" in got and torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])


def test_local_workers_import_the_job_from_where_the_launcher_does(tmp_path, monkeypatch):
    # the launcher runs elsewhere than the job's source tree: its workers still find tests.jobs
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    result = launch(dataclasses.replace(SPEC, iterations=1), CLUSTER, tmp_path / "run", timeout_s=120,
                    log=lambda m: None)
    assert len(result["losses"]) == 1


def _trained_like_eager_with_the_head_tied(result: dict, spec: RunSpec, out: Path) -> None:
    ref, ref_losses = _eager(spec)
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    got = load_weights(out, result["program"].devices)
    want = ref.state_dict()
    assert_same_state({k: v for k, v in got.items() if k in want}, want)
    assert torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])


# the holder of the embedding, and of the tied head (slow: the default run keeps one)
@pytest.mark.parametrize("victim", ["a", pytest.param("b", marks=pytest.mark.slow)])
def test_tied_gpt2_on_three_stage_workers_recovers_from_a_kill_like_eager(victim, tmp_path):
    # the stage of the victim merges into the middle one: the tie's holders change, and the
    # survivors go on with the update eager training makes, the head still the embedding
    pytest.importorskip("transformers")
    spec = RunSpec(model="tests.hf_jobs:gpt2", stages=3, microbatches=4, iterations=5, recovery=True,
                   replan=False, backup_every=1, faults=((victim, 3, 2, "kill"),))
    result = launch(spec, CLUSTER, tmp_path, timeout_s=240, log=lambda m: None)
    (failure,) = result["failures"]
    assert failure["device"] == victim and failure["iteration"] == 3
    program = result["program"]
    assert victim not in program.devices and len(program.stages) == 2
    # the head and the embedding are on the two survivors' stages, tied again over both
    ties = {a.group for _, acts in program.actions for a in acts if a.op == Op.TIE}
    assert ties == {tuple(d for d in ("a", "c", "b") if d != victim)}
    _trained_like_eager_with_the_head_tied(result, spec, tmp_path)


def test_tied_gpt2_re_planned_after_a_kill_switches_live_and_trains_like_eager(tmp_path):
    # the rewrite ties the head over the two survivors' stages; the planner's plan for them is one
    # stage on c, and the hand-over brings the tied copies together without a step lost
    pytest.importorskip("transformers")
    spec = RunSpec(model="tests.hf_jobs:gpt2", stages=3, microbatches=4, iterations=9, recovery=True,
                   replan=True, backup_every=1, faults=(("a", 3, 2, "kill"),))
    result = launch(spec, CLUSTER, tmp_path, timeout_s=240, log=lambda m: None)
    (failure,) = result["failures"]
    (switch,) = result["switches"]
    assert switch["iteration"] > failure["iteration"] and switch["reason"].startswith("a failed")
    _trained_like_eager_with_the_head_tied(result, spec, tmp_path)
