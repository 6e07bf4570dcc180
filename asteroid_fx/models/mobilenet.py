"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

Inverted residual blocks: 1x1 expansion -> 3x3 depthwise -> 1x1 linear projection,
BatchNorm after each conv, ReLU6 on the first two, and a skip when stride is 1 and
the channel count is unchanged. The full config (width 1.0, 224x224, 1000 classes)
has 3.50M parameters. ``cifar_stem=True`` removes the two earliest stride-2 steps
so 32x32 inputs end at a 4x4 feature map instead of 1x1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


def _make_divisible(v: float, divisor: int) -> int:
    # Rounding channels to a multiple of `divisor` (and never dropping below 90%)
    # follows the reference implementation, so width multipliers give the paper's counts.
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(in_ch, hidden, 1, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden))
        # Linear bottleneck: no activation after the projection, as ReLU would
        # destroy information in the low-dimensional space (Sec. 3.2 of the paper).
        layers.append(_conv_bn(hidden, out_ch, 1, 1, act=False))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


@dataclass(frozen=True)
class MobileNetV2Config:
    settings: tuple[tuple[int, int, int, int], ...] = MOBILENETV2_SETTINGS
    width_mult: float = 1.0
    stem_channels: int = 32
    last_channels: int = 1280
    round_nearest: int = 8
    num_classes: int = 1000
    in_channels: int = 3
    dropout: float = 0.2
    cifar_stem: bool = False
    image_size: int = 224  # only used by example()


FULL = MobileNetV2Config()
SMALL = MobileNetV2Config(
    settings=((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2)),
    stem_channels=8,
    last_channels=64,
    round_nearest=4,
    num_classes=10,
    dropout=0.0,
    cifar_stem=True,
    image_size=32,
)


class MobileNetV2(nn.Module):
    def __init__(self, cfg: MobileNetV2Config = FULL) -> None:
        super().__init__()
        self.cfg = cfg
        div = cfg.round_nearest
        in_ch = _make_divisible(cfg.stem_channels * cfg.width_mult, div)
        # The last conv is never thinned below its nominal width (as in the paper).
        last = _make_divisible(cfg.last_channels * max(1.0, cfg.width_mult), div)
        layers: list[nn.Module] = [_conv_bn(cfg.in_channels, in_ch, 3, 1 if cfg.cifar_stem else 2)]
        for i, (t, c, n, s) in enumerate(cfg.settings):
            if cfg.cifar_stem and i == 1:
                s = 1
            out_ch = _make_divisible(c * cfg.width_mult, div)
            for j in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if j == 0 else 1, t))
                in_ch = out_ch
        layers.append(_conv_bn(in_ch, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        if cfg.dropout > 0:
            head.append(nn.Dropout(cfg.dropout))
        head.append(nn.Linear(last, cfg.num_classes))
        self.classifier = nn.Sequential(*head)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(x)


def config(small: bool = False, **overrides) -> MobileNetV2Config:
    return replace(SMALL if small else FULL, **overrides)


def build(small: bool = False, **overrides) -> MobileNetV2:
    return MobileNetV2(config(small, **overrides))


def example(cfg: MobileNetV2Config, batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size),)


def labels(cfg: MobileNetV2Config, batch: int) -> torch.Tensor:
    return torch.randint(0, cfg.num_classes, (batch,))
