"""Model zoo: small configs train and export with a dynamic batch; full configs
have the published parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.export import Dim

from asteroid_fx import models

NAMES = sorted(models.ZOO)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_keys_and_get():
    assert set(models.ZOO) == {"mlp", "resnet18", "resnet50", "mobilenetv2", "vgg16", "bert", "gpt", "digits"}
    for name, entry in models.ZOO.items():
        assert models.get(name) is entry and entry.name == name
    with pytest.raises(ValueError, match="resnet18"):
        models.get("alexnet")


@pytest.mark.parametrize("name", NAMES)
def test_small_forward_backward(name):
    entry = models.get(name)
    model = entry.build(small=True)
    x, y = entry.example(8, True), entry.labels(8, True)
    loss = entry.loss(model(*x), y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_examples_deterministic(name):
    entry = models.get(name)
    torch.manual_seed(3)
    a = entry.example(4, True), entry.labels(4, True)
    torch.manual_seed(3)
    b = entry.example(4, True), entry.labels(4, True)
    for u, v in zip((*a[0], a[1]), (*b[0], b[1])):
        assert torch.equal(u, v)


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_row_mean(name):
    # Pipeline micro-batching relies on sum_k loss(chunk_k) * rows_k / B == loss(batch).
    entry = models.get(name)
    model = entry.build(small=True)
    x, y = entry.example(6, True), entry.labels(6, True)
    with torch.no_grad():
        out = model(*x)
    full = entry.loss(out, y)
    chunked = sum(entry.loss(out[s], y[s]) * 3 / 6 for s in (slice(0, 3), slice(3, 6)))
    torch.testing.assert_close(chunked, full)


@pytest.mark.parametrize("name", NAMES)
def test_export_dynamic_batch_train_mode(name):
    entry = models.get(name)
    model = entry.build(small=True).train()
    x = entry.example(8, True)
    ep = torch.export.export(
        copy.deepcopy(model), x, dynamic_shapes=tuple({0: Dim.AUTO} for _ in x)
    )
    exported = ep.module()
    # Exported modules refuse .eval(), so compare in train mode: dropout is 0 in the
    # small configs and BatchNorm uses batch statistics on both sides.
    for batch in (5, 3):
        xb, yb = entry.example(batch, True), entry.labels(batch, True)
        model.zero_grad()
        exported.zero_grad()
        ref = model(*xb)
        got = exported(*xb)
        assert got.shape == ref.shape and got.shape[0] == batch
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        entry.loss(ref, yb).backward()
        entry.loss(got, yb).backward()
        eager_grads = dict(model.named_parameters())
        for pname, p in exported.named_parameters():
            torch.testing.assert_close(p.grad, eager_grads[pname].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "name, expected",
    [("resnet18", 11.69e6), ("resnet50", 25.56e6), ("mobilenetv2", 3.50e6), ("vgg16", 138.36e6)],
)
def test_full_param_counts(name, expected):
    # Meta tensors make building the full models free; they are never run.
    with torch.device("meta"):
        model = models.get(name).build()
    assert abs(_params(model) - expected) / expected < 0.01


def test_full_image_example_is_imagenet():
    for name in ("resnet18", "resnet50", "mobilenetv2", "vgg16"):
        (x,) = models.get(name).example(1, False)
        assert tuple(x.shape) == (1, 3, 224, 224)


def test_cifar_input_on_full_width_resnet():
    # Full-width stage layout with the CIFAR stem on a 32x32 image (few rows, cheap).
    model = models.resnet18(cifar_stem=True, num_classes=10, layers=(1, 1, 1, 1))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_gpt_tie_weights_shares_parameter():
    untied = models.gpt(small=True)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    tied = models.gpt(small=True, tie_weights=True)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert _params(untied) - _params(tied) == tied.tok_emb.weight.numel()
    (x,) = models.get("gpt").example(2, True)
    models.get("gpt").loss(tied(x), models.get("gpt").labels(2, True)).backward()
    assert tied.tok_emb.weight.grad is tied.lm_head.weight.grad


def test_gpt_is_causal():
    model = models.gpt(small=True)
    (x,) = models.get("gpt").example(2, True)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :-1], model(x2)[:, :-1])
    assert "mask" not in model.state_dict().keys() and not any("mask" in k for k in model.state_dict())


def test_bert_attention_mask_hides_padding():
    model = models.bert(small=True).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.seq_len))
    mask = torch.ones_like(ids)
    mask[:, 10:] = 0
    ids2 = ids.clone()
    ids2[:, 10:] = (ids2[:, 10:] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), model(ids2, mask))
        assert not torch.allclose(model(ids), model(ids2))
