"""capture_check: compile stops when the captured graph does not compute what forward does (the
node that diverges named), and stays quiet on models it captures right, dropout on included;
the check leaves the model, its mode and the caller's RNG as they were."""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch
import torch.nn as nn

import asteroid_fx as asteroid
from asteroid_fx import cli, models
from asteroid_fx.ir.errors import InputError
from asteroid_fx.passes.capture import capture
from asteroid_fx.passes.capture_check import CHECK_ROWS, _drawn_like, _first_rows, verify_capture

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLUSTER = "laptop-i7,laptop-i7"  # catalog kinds: nothing is measured on this machine


class Counter(nn.Module):
    """Scales by how often it was called: the graph freezes the count it saw during capture."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.calls


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.count = Counter()
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.count(torch.relu(self.inp(x))))


class ExportOnly(nn.Module):
    """Doubles its input only while being exported: wrong on the example itself."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if torch.compiler.is_exporting():
            h = h * 2
        return self.out(h)


class SkewedDropout(nn.Module):
    """Eager draws one random number more than the graph before its dropout: with one seed the two
    drop other elements, a difference of randomness only."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            torch.rand(1)
        return self.out(self.drop(self.inp(x)))


def counting_model() -> nn.Module:
    """For `asteroid compile tests.test_capture_check:counting_model`."""
    torch.manual_seed(0)
    return Counting()


def _x() -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


def test_state_frozen_by_capture_is_caught_with_the_node_named():
    model = counting_model()
    with pytest.raises(InputError) as e:
        asteroid.compile(model, CLUSTER, example=_x())
    text = str(e.value)
    assert "on a second batch drawn like the example, output 0 differs" in text
    # the first module whose output diverges is the counter; its mul is the node
    assert "graph node 'mul', an output of count (Counter)" in text
    assert "register_buffer" in text and "check_capture=False" in text
    assert model.count.calls == 0  # the eager runs happened on a copy


def test_a_graph_wrong_on_the_example_names_its_first_node():
    torch.manual_seed(0)
    with pytest.raises(InputError) as e:
        asteroid.compile(ExportOnly(), CLUSTER, example=_x())
    text = str(e.value)
    assert "on the example, output 0 differs" in text
    assert "graph node 'mul', computed in the model itself (ExportOnly) and fed to out (Linear)" in text
    assert "Capture recorded another computation" in text


def test_check_capture_false_skips_the_check():
    compiled = asteroid.compile(counting_model(), CLUSTER, example=_x(), check_capture=False)
    assert len(compiled.stages) >= 1


def test_the_cli_flag_skips_the_check(tmp_path, capsys):
    argv = ["compile", "tests.test_capture_check:counting_model", "--input", "f32[8,4]", "--cluster", "host-2",
            "--batch", "8", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "graph node 'mul', an output of count (Counter)" in capsys.readouterr().err
    assert cli.main([*argv, "--no-capture-check"]) == 0
    assert (tmp_path / "o" / "program.txt").exists()


def test_randomness_alone_is_a_warning_not_an_error():
    torch.manual_seed(0)
    model = SkewedDropout()
    captured = capture(model, (_x(),))
    with pytest.warns(UserWarning, match="the difference is randomness"):
        verify_capture(captured, model, (_x(),))


class BatchNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.norm(self.inp(x))))


def test_the_model_rng_and_graph_are_left_as_they_were():
    torch.manual_seed(0)
    model = BatchNormed().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    captured = capture(model, (_x(),))
    graph_before = {k: v.clone() for k, v in captured.module.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verify_capture(captured, model, (_x(),))
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training and not any(m.training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():  # running statistics and num_batches_tracked included
        assert torch.equal(after[k], v), k
    for k, v in graph_before.items():
        assert torch.equal(captured.module.state_dict()[k], v), k


def test_compile_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = BatchNormed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    asteroid.compile(model, CLUSTER, example=_x())
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_a_second_batch_keeps_shapes_ranges_masks_and_aliases():
    ids = torch.randint(3, 50, (8, 16))
    mask = (torch.arange(16)[None] < 12).long().expand(8, 16).contiguous()
    x = torch.randn(8, 5)
    additive = torch.zeros(8, 16).masked_fill(mask == 0, float("-inf"))
    call = _drawn_like((x, x), {"input_ids": ids, "attention_mask": mask, "bias": additive, "k": 3})
    (x1, x2), kw = call.args, call.kwargs
    assert x1 is x2 and x1.shape == x.shape and not torch.equal(x1, x)
    assert x.min() <= x1.min() and x1.max() <= x.max()
    assert kw["input_ids"].dtype == ids.dtype and 3 <= kw["input_ids"].min() and kw["input_ids"].max() <= 49
    assert not torch.equal(kw["input_ids"], ids)
    assert set(kw["attention_mask"].unique().tolist()) == {0, 1} and kw["attention_mask"].dtype == mask.dtype
    assert set(kw["bias"].unique().tolist()) == {0.0, float("-inf")}
    assert kw["k"] == 3


@pytest.mark.parametrize("name", ["mlp", "resnet18", "bert", "gpt", "digits"])
def test_no_false_alarm_on_the_zoo(name):
    entry = models.get(name)
    torch.manual_seed(0)
    model = entry.build(small=True)
    example = entry.example(8, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verify_capture(capture(model, example), model, example)


# --- transformers, dropout on, in train mode -------------------------------------------------

V, S = 64, 16


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, V, (4, S))
    mask = (torch.arange(S)[None] < S - torch.randint(0, S // 2, (4, 1))).long()
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)
    if name == "bert":
        cfg = transformers.BertConfig(**small, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        return transformers.BertForSequenceClassification(cfg), (), {"input_ids": ids, "attention_mask": mask}
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.1,
                                      embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg), (), {"input_ids": ids, "attention_mask": mask}
    if name == "llama":
        cfg = transformers.LlamaConfig(**small, num_key_value_heads=2, attention_dropout=0.1, use_cache=False)
        return transformers.LlamaForCausalLM(cfg), (ids,), {}
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_labels=5, hidden_dropout_prob=0.1,
                                 attention_probs_dropout_prob=0.1)
    return transformers.ViTForImageClassification(cfg), (torch.randn(4, 3, 16, 16),), {}


@pytest.mark.parametrize("name", [pytest.param("bert", marks=pytest.mark.slow), "gpt2",
                                  pytest.param("llama", marks=pytest.mark.slow), "vit"])
def test_no_false_alarm_on_transformers_with_dropout(name):  # bert and llama under the slow marker
    torch.manual_seed(0)
    model, args, kwargs = _hf(name)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    captured = capture(model, args, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # not even put down to randomness: the same masks
        verify_capture(captured, model, args, kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_a_model_returning_its_cache_is_told_to_pass_use_cache_false():
    from asteroid_fx.passes.capture import CaptureError

    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=True)
    with pytest.raises(CaptureError, match=r"returns a DynamicCache .* Pass use_cache=False"):
        capture(transformers.LlamaForCausalLM(cfg), (torch.randint(0, V, (4, S)),))


class NumpyNoise(nn.Module):
    """Adds noise drawn with NumPy: the graph keeps the draw it saw during capture."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        return self.inp(x) + torch.from_numpy(np.random.rand(*x.shape[1:]).astype("float32"))


def test_randomness_outside_torch_is_named_as_such():
    torch.manual_seed(0)
    model = NumpyNoise()
    captured = capture(model, (_x(),))
    with pytest.raises(InputError) as e:
        verify_capture(captured, model, (_x(),))
    text = str(e.value)
    assert "on the example, output 0 differs" in text
    assert "graph node 'add', an output of the model itself (NumpyNoise)" in text
    assert "Eager forward itself gives other outputs on two runs from the same torch seed" in text


# --- the check runs on a few rows -----------------------------------------------------------------

SEEN: list[int] = []  # rows eager forward saw (a global: the check's eager copy shares it)


class RowRecorder(nn.Module):
    """Records the rows of every eager call; refuses fewer than ``least`` rows, as a forward that
    needs a minimum batch does (capture drops that bound)."""

    def __init__(self, least: int = 0) -> None:
        super().__init__()
        self.least = least
        self.inp = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            SEEN.append(x.shape[0])
            if x.shape[0] < self.least:
                raise ValueError(f"needs {self.least} rows")
        return self.out(self.norm(self.inp(x) + y.sum(1, keepdim=True)))


def _graph_rows(captured) -> list[int]:
    """Record the rows of every graph run (the check calls the graph's forward)."""
    rows, forward = [], captured.module.forward

    def recording(*flat):
        rows.append(flat[0].shape[0])
        return forward(*flat)

    captured.module.forward = recording
    return rows


def test_the_check_runs_on_the_examples_first_rows():
    torch.manual_seed(0)
    model = RowRecorder()
    x, y = torch.randn(32, 4), torch.randn(32, 3)
    captured = capture(model, (x, y))
    graph_rows = _graph_rows(captured)
    SEEN.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verify_capture(captured, model, (x, y))
    assert SEEN == [CHECK_ROWS, CHECK_ROWS] and graph_rows == [CHECK_ROWS, CHECK_ROWS]


def test_without_a_batch_symbol_the_check_runs_on_the_whole_example():
    torch.manual_seed(0)
    model = RowRecorder()
    x, y = torch.randn(32, 4), torch.randn(32, 3)
    captured = dataclasses.replace(capture(model, (x, y)), batch_symbol=None)
    SEEN.clear()
    verify_capture(captured, model, (x, y))
    assert SEEN == [32, 32]


def test_a_forward_that_refuses_the_cut_rows_is_checked_on_the_whole_example():
    torch.manual_seed(0)
    model = RowRecorder(least=CHECK_ROWS + 1)
    x, y = torch.randn(32, 4), torch.randn(32, 3)
    captured = capture(model, (x, y))
    SEEN.clear()
    verify_capture(captured, model, (x, y))
    assert SEEN == [CHECK_ROWS, 32, 32]  # the cut refused, then the example and the second batch whole


def test_the_cut_keeps_aliases_and_inputs_that_are_not_batch_first():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
            return self.lin(a) * scale + b

    x = torch.randn(16, 4)
    captured = capture(Pair(), (x, x, 2.0))
    calls = _first_rows(captured, (x, x, 2.0), {}, CHECK_ROWS)
    for call in calls:
        a, b, scale = call.args
        assert a is b and a.shape == (CHECK_ROWS, 4) and scale == 2.0
    assert torch.equal(calls[0].args[0], x[:CHECK_ROWS]) and calls[0].args[0].data_ptr() != x.data_ptr()


def test_a_wrong_capture_is_still_caught_on_the_cut_rows_and_the_error_says_which_rows():
    model = counting_model()
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(InputError) as e:
        asteroid.compile(model, CLUSTER, example=x)
    text = str(e.value)
    assert "on a second batch drawn like the example, output 0 differs" in text
    assert f"{CHECK_ROWS} rows drawn like the example's first {CHECK_ROWS} of its 32)" in text
    assert "graph node 'mul', an output of count (Counter)" in text
