"""What a Hugging Face transformers user meets first (tiny configs built here, random weights,
nothing downloaded): a dict of keyword inputs is an example, a batch for ``run`` and the inputs
of ``check``, as a tokenizer's output is; a forward whose outputs' rows are not its inputs' rows
(a boolean-mask selection) is refused at compile time; and a saved plan's stage files load strict
into the original model, a tied head included."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import asteroid_fx as asteroid
from asteroid_fx.ir.errors import InputError
from tests.eager import Call, assert_same_state, eager_train

BATCH, SEQ, VOCAB, BLOCKS = 8, 16, 64, 2
MICROBATCHES = 2
PRESET = "edge-4-1g"


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=BLOCKS,
                                  num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=BLOCKS, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    return transformers.GPT2LMHeadModel(cfg)


def _tokens() -> dict[str, torch.Tensor]:
    """A tokenizer's output for a padded batch: ids, and a mask of ones then padding zeros."""
    pad = torch.randint(0, SEQ // 2, (BATCH, 1))
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ)),
            "attention_mask": (torch.arange(SEQ)[None, :] < SEQ - pad).long()}


def _classify(out, labels):
    return F.cross_entropy(out["logits"], labels)


def _next_token(out, labels):
    logits = out["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = _bert()
    compiled = asteroid.compile(model, PRESET, example=_tokens(), loss=_classify, stages=2,
                                microbatches=MICROBATCHES)
    return model, compiled


# --- 1. a dict of keyword inputs --------------------------------------------------------------------

def test_a_dict_example_is_the_keyword_inputs(bert):
    model, by_dict = bert
    torch.manual_seed(0)
    tokens = _tokens()
    by_kwargs = asteroid.compile(model, PRESET, example=(), kwargs=tokens, loss=_classify, stages=2,
                                 microbatches=MICROBATCHES)
    for compiled in (by_dict, by_kwargs):
        names = [n.name for n in compiled.captured.module.graph.nodes if n.op == "placeholder"]
        assert names == ["input_ids", "attention_mask"]
        assert compiled.captured.in_spec.child(0).num_children == 0  # nothing positional
    assert by_dict.captured.in_spec == by_kwargs.captured.in_spec
    assert str(by_dict.program) == str(by_kwargs.program)


def test_a_tokenizer_output_is_a_dict_example():
    torch.manual_seed(0)
    encoding = transformers.BatchEncoding(_tokens())  # what a tokenizer returns: a Mapping, not a dict
    compiled = asteroid.compile(_bert(), PRESET, example=encoding, loss=_classify, stages=2,
                                microbatches=MICROBATCHES)
    flat = compiled.captured.call_inputs(encoding)
    assert flat[0] is encoding["input_ids"] and flat[1] is encoding["attention_mask"]


def test_run_takes_dicts_of_keyword_inputs_and_trains_like_eager(bert):
    model, compiled = bert
    torch.manual_seed(1)
    batches = [(_tokens(), torch.randint(0, 3, (BATCH,))) for _ in range(2)]
    # one batch with its keys in another order, one as a tokenizer gives it
    data = [({"attention_mask": batches[0][0]["attention_mask"], "input_ids": batches[0][0]["input_ids"]},
             batches[0][1]),
            (transformers.BatchEncoding(batches[1][0]), batches[1][1])]

    def make_opt(params):
        return torch.optim.Adam(params, lr=1e-3)

    runner, losses = compiled.run(data, 2, optimizer=make_opt)
    ref, ref_losses = eager_train(model, [(Call((), x), y) for x, y in batches], _classify, make_opt,
                                  microbatches=MICROBATCHES, rows=BATCH // MICROBATCHES)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    want = ref.state_dict()
    assert_same_state({k: v for k, v in runner.state_dict().items() if k in want}, want)


def test_run_names_the_keywords_a_batch_lacks(bert):
    _, compiled = bert
    tokens = _tokens()
    with pytest.raises(InputError, match=r"keywords \['input_ids', 'attention_mask'\], got 0 positional leaves "
                                         r"and keywords \['input_ids'\]"):
        compiled.run([({"input_ids": tokens["input_ids"]}, torch.zeros(BATCH, dtype=torch.long))], 1)


def test_check_takes_a_dict_of_keyword_inputs(bert):
    model, compiled = bert
    tokens = _tokens()
    report = compiled.check(inputs=tokens, model=model, repeats=0)
    assert report.ok and len(report.stages) == 2
    as_kwargs = compiled.check(inputs=(), kwargs=tokens, model=model, repeats=0)
    assert report.local_vs_eager == as_kwargs.local_vs_eager  # the same inputs, read either way
    half = {k: v[: BATCH // 2] for k, v in tokens.items()}
    with pytest.raises(InputError, match=rf"input 'input_ids' has shape \({BATCH // 2}, {SEQ}\)"):
        compiled.check(inputs=half, repeats=0)


def test_a_dict_example_and_kwargs_together_are_refused():
    with pytest.raises(InputError, match=r"give them once: example=\{\.\.\.\} alone"):
        asteroid.compile(_bert(), PRESET, example=_tokens(), kwargs={"token_type_ids": None}, loss=_classify)


def test_a_misspelt_keyword_input_is_named():
    with pytest.raises(ValueError, match=r"note: the keyword inputs \['ids'\] are not parameters of "
                                         r"BertForSequenceClassification.forward, which takes them in \*\*kwargs; "
                                         r"its parameters are input_ids, attention_mask,"):
        asteroid.compile(_bert(), PRESET, example={"ids": torch.zeros(BATCH, SEQ, dtype=torch.long)},
                         loss=_classify)


class TakesADict(nn.Module):
    """A forward whose one parameter is a dict: it is given as example=(d,), and a batch as d."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, batch: dict):
        return self.b(torch.relu(self.a(batch["x"]) * batch["scale"]))


def test_a_forward_that_takes_one_dict_reads_a_dict_batch_positionally():
    torch.manual_seed(0)
    model = TakesADict()
    example = {"x": torch.randn(BATCH, 4), "scale": torch.rand(BATCH, 1)}
    with pytest.raises(ValueError, match=r"missing a required argument: 'batch'; the keyword inputs \['x', 'scale'\] "
                                         r"go to .* \(a forward that takes one dict gets example=\(d,\)\)"):
        asteroid.compile(model, "laptop-i7", example=example, loss=F.mse_loss)
    compiled = asteroid.compile(model, "laptop-i7,laptop-i7", example=(example,), loss=F.mse_loss,
                                microbatches=MICROBATCHES, groups=[["i7-0"], ["i7-1"]])
    batch = {"scale": torch.rand(BATCH, 1), "x": torch.randn(BATCH, 4)}
    flat = compiled.captured.call_inputs(batch)
    assert flat[0] is batch["x"] and flat[1] is batch["scale"]  # in the example's key order
    labels = torch.randn(BATCH, 2)
    _, losses = compiled.run([(batch, labels)], 1, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    rows = BATCH // MICROBATCHES
    with torch.no_grad():  # eager, micro-batch by micro-batch, each mean weighted by rows / batch
        ref = sum(float(F.mse_loss(model({k: v[m * rows:(m + 1) * rows] for k, v in batch.items()}),
                                   labels[m * rows:(m + 1) * rows])) * rows / BATCH for m in range(MICROBATCHES))
    assert losses == pytest.approx([ref], rel=1e-5)


# --- 2. outputs whose rows are not the input rows ----------------------------------------------------

class KeepsSomeRows(nn.Module):
    """Classifies only the rows a mask keeps: a boolean-mask selection, or ``nonzero`` indexing."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        keep = h.sum(1) > 1.0
        if self.how == "mask":
            return {"logits": self.head(h[keep])}
        return {"logits": self.head(h[torch.nonzero(keep).squeeze(1)])}


@pytest.mark.parametrize("how, chosen", [("mask", "index"), ("nonzero", "nonzero")])
def test_an_output_whose_rows_depend_on_the_data_is_refused_at_compile_time(how, chosen):
    with pytest.raises(InputError) as e:
        asteroid.compile(KeepsSomeRows(how), "laptop-i7,laptop-i7", example=torch.randn(BATCH, 4), loss=_classify)
    message = str(e.value)
    assert "the row count of output['logits'] depends on the values in the batch" in message, message
    assert f"rows chosen by {chosen}" in message and "test_hf_inputs.py" in message, message
    assert "reduction='none') * keep).mean()" in message, message


class MasksRows(nn.Module):
    """What the refusal advises: every row kept, and the mask returned for the loss to weight by."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"logits": self.head(h), "keep": (h.sum(1) > 1.0).float()}


def _masked_loss(out, labels):
    return (F.cross_entropy(out["logits"], labels, reduction="none") * out["keep"]).mean()


def test_the_advised_rewrite_trains_like_eager_on_a_group():
    torch.manual_seed(0)
    model = MasksRows()
    compiled = asteroid.compile(model, "laptop-i7,laptop-i7,laptop-i7", example=torch.randn(BATCH, 4),
                                loss=_masked_loss, microbatches=MICROBATCHES, groups=[["i7-0", "i7-1"], ["i7-2"]],
                                rows=[[1, 3], [4]])
    batches = [((torch.randn(BATCH, 4),), torch.randint(0, 3, (BATCH,))) for _ in range(2)]
    kept = model(batches[0][0][0])["keep"]
    assert 0 < kept.sum() < BATCH  # some rows dropped, some kept
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    runner, losses = compiled.run(batches, 2, optimizer=sgd)
    ref, ref_losses = eager_train(model, batches, _masked_loss, sgd, microbatches=MICROBATCHES,
                                  rows=BATCH // MICROBATCHES)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_state(runner.state_dict(), ref.state_dict())


def test_outputs_that_reduce_or_reshape_the_rows_still_compile():
    class Reshapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)

        def forward(self, x):  # (B, 4) -> (B * 3, 2) rows, and a mean over the rows
            h = self.a(x)
            return h.reshape(-1, 2), h.mean(0)

    compiled = asteroid.compile(Reshapes(), "laptop-i7", example=torch.randn(BATCH, 4),
                                loss=lambda out, y: out[0].pow(2).mean())
    out = next(n for n in compiled.captured.module.graph.nodes if n.op == "output")
    shapes = [a.meta["val"].shape for a in out.args[0]]
    assert str(shapes[0][0]) == f"3*{compiled.captured.batch_symbol}" and tuple(shapes[1]) == (6,)


# --- stage counts and layer bounds the model or the cluster cannot take ------------------------------

def _five_layer_mlp():
    from asteroid_fx.models.mlp import MLP, MLPConfig

    return MLP(MLPConfig(in_features=32, hidden=(64,) * 4, num_classes=10, dropout=0.0))


def test_more_stages_than_the_cluster_has_devices_says_the_most_and_why():
    with pytest.raises(InputError) as e:
        asteroid.compile(_five_layer_mlp(), PRESET, example=torch.randn(16, 32), loss=F.cross_entropy, stages=5)
    message = str(e.value)
    assert message.startswith("5 stages asked for, but the cluster has 4 devices (a stage needs one of its own): "
                              "at most 4 stages"), message
    assert "no plan fits" not in message


def test_layer_bounds_past_the_model_are_an_argument_error():
    model = _five_layer_mlp()
    with pytest.raises(InputError) as e:
        asteroid.compile(model, PRESET, example=torch.randn(16, 32), loss=F.cross_entropy, layers=[0, 24])
    message = str(e.value)
    n_layers = len(asteroid.compile(model, PRESET, example=torch.randn(16, 32), loss=F.cross_entropy).layer_graph)
    assert f"layer bounds [0, 24] must end at {n_layers}, the number of layers" in message, message
    assert "its allowed cuts are 1, 2," in message and "no plan fits" not in message, message


# --- saved stages load strict into the original model ------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_saved_stage_files_load_strict_into_the_original_model(name, tmp_path):
    torch.manual_seed(0)
    if name == "bert":
        model, loss, example = _bert(), _classify, _tokens()
    else:
        model, loss, example = _gpt2(), _next_token, (torch.randint(0, VOCAB, (BATCH, SEQ)),)
    compiled = asteroid.compile(model, PRESET, example=example, loss=loss, stages=2, microbatches=MICROBATCHES)
    assert len(compiled.stages) == 2
    folder = compiled.save(tmp_path / "out")
    merged = {}
    for st in compiled.stages:
        merged.update(torch.load(folder / f"stage_{st.index}.pt", weights_only=True))
    torch.manual_seed(1)
    fresh = _bert() if name == "bert" else _gpt2()
    fresh.load_state_dict(merged, strict=True)
    assert_same_state(fresh.state_dict(), model.state_dict(), rtol=0.0)
    if name == "gpt2":  # the tied head is one weight again after loading
        assert fresh.lm_head.weight is fresh.transformer.wte.weight
        assert {"lm_head.weight", "transformer.wte.weight"} <= merged.keys()
