"""VGG-16 (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for
Large-Scale Image Recognition"), configuration D.

Thirteen 3x3 convs in five max-pooled stages, then three fully connected layers.
BatchNorm is optional and off by default (the original network predates it).
The full config (224x224, 7x7 pooled features, 4096-wide classifier, 1000 classes)
has 138.36M parameters; 32x32 inputs also work because the adaptive pool
resizes the 1x1 map to whatever `pool_size` the classifier expects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import torch
from torch import nn

# Integers are conv output channels, "M" a 2x2/2 max-pool.
VGG16_LAYERS: tuple[Union[int, str], ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


@dataclass(frozen=True)
class VGGConfig:
    layers: tuple[Union[int, str], ...] = VGG16_LAYERS
    batch_norm: bool = False
    pool_size: int = 7
    hidden: int = 4096
    num_classes: int = 1000
    in_channels: int = 3
    dropout: float = 0.5
    image_size: int = 224  # only used by example()


FULL = VGGConfig()
SMALL = VGGConfig(
    layers=(8, "M", 16, "M", 32, 32, "M", 32, "M", 32, "M"),
    pool_size=1,
    hidden=64,
    num_classes=10,
    dropout=0.0,
    image_size=32,
)


class VGG(nn.Module):
    def __init__(self, cfg: VGGConfig = FULL) -> None:
        super().__init__()
        self.cfg = cfg
        feats: list[nn.Module] = []
        in_ch = cfg.in_channels
        for v in cfg.layers:
            if v == "M":
                feats.append(nn.MaxPool2d(2, 2))
                continue
            assert isinstance(v, int)
            # With BatchNorm following, a conv bias would be cancelled by the mean subtraction.
            feats.append(nn.Conv2d(in_ch, v, 3, padding=1, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                feats.append(nn.BatchNorm2d(v))
            feats.append(nn.ReLU())
            in_ch = v
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(cfg.pool_size)
        head: list[nn.Module] = []
        width = in_ch * cfg.pool_size * cfg.pool_size
        for _ in range(2):
            head += [nn.Linear(width, cfg.hidden), nn.ReLU()]
            if cfg.dropout > 0:
                head.append(nn.Dropout(cfg.dropout))
            width = cfg.hidden
        head.append(nn.Linear(width, cfg.num_classes))
        self.classifier = nn.Sequential(*head)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(x)


def config(small: bool = False, **overrides) -> VGGConfig:
    return replace(SMALL if small else FULL, **overrides)


def build(small: bool = False, **overrides) -> VGG:
    return VGG(config(small, **overrides))


def example(cfg: VGGConfig, batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size),)


def labels(cfg: VGGConfig, batch: int) -> torch.Tensor:
    return torch.randint(0, cfg.num_classes, (batch,))
