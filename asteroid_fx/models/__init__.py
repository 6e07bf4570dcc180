"""Model zoo: plain-torch reference models for the pipeline compiler.

Every entry builds a full-size model by default (the real architecture on its
standard input) or, with ``small=True``, a tiny variant for fast tests. All models
export with ``torch.export.export`` in train mode with a dynamic batch dimension.

Keyword overrides passed to ``build`` replace fields of the model's config
dataclass; ``example``/``labels`` always use the unmodified default config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import bert as _bert
from . import digits_cnn as _digits
from . import gpt as _gpt
from . import mlp as _mlp
from . import mobilenet as _mobilenet
from . import resnet as _resnet
from . import vgg as _vgg


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[..., nn.Module]  # build(small: bool = False, **overrides) -> nn.Module
    example: Callable[[int, bool], tuple]  # example(batch, small) -> positional input tensors
    labels: Callable[[int, bool], torch.Tensor]  # labels(batch, small) -> loss targets
    loss: Callable  # loss(outputs, labels) -> scalar mean over rows


def mlp(small: bool = False, **kw) -> nn.Module:
    return _mlp.build(small, **kw)


def resnet18(small: bool = False, **kw) -> nn.Module:
    return _resnet.resnet18(small, **kw)


def resnet50(small: bool = False, **kw) -> nn.Module:
    return _resnet.resnet50(small, **kw)


def mobilenetv2(small: bool = False, **kw) -> nn.Module:
    return _mobilenet.build(small, **kw)


def vgg16(small: bool = False, **kw) -> nn.Module:
    return _vgg.build(small, **kw)


def bert(small: bool = False, **kw) -> nn.Module:
    return _bert.build(small, **kw)


def gpt(small: bool = False, **kw) -> nn.Module:
    return _gpt.build(small, **kw)


def digits(small: bool = False, **kw) -> nn.Module:
    return _digits.build(small, **kw)


def _entry(name: str, build: Callable[..., nn.Module], config: Callable, module, loss: Callable) -> ZooEntry:
    def example(batch: int, small: bool = False) -> tuple:
        return module.example(config(small), batch)

    def labels(batch: int, small: bool = False) -> torch.Tensor:
        return module.labels(config(small), batch)

    return ZooEntry(name=name, build=build, example=example, labels=labels, loss=loss)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _entry("mlp", mlp, _mlp.config, _mlp, F.cross_entropy),
        _entry("resnet18", resnet18, _resnet.config18, _resnet, F.cross_entropy),
        _entry("resnet50", resnet50, _resnet.config50, _resnet, F.cross_entropy),
        _entry("mobilenetv2", mobilenetv2, _mobilenet.config, _mobilenet, F.cross_entropy),
        _entry("vgg16", vgg16, _vgg.config, _vgg, F.cross_entropy),
        _entry("bert", bert, _bert.config, _bert, F.cross_entropy),
        _entry("gpt", gpt, _gpt.config, _gpt, _gpt.lm_loss),
        _entry("digits", digits, _digits.config, _digits, F.cross_entropy),
    )
}


def get(name: str) -> ZooEntry:
    """Look up a zoo entry by name; unknown names raise ValueError listing the known ones."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(ZOO))}") from None


__all__ = [
    "ZOO", "ZooEntry", "get", "mlp", "resnet18", "resnet50", "mobilenetv2", "vgg16", "bert", "gpt", "digits",
]
