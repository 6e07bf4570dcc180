"""ResNet-18 and ResNet-50 (He et al. 2016, "Deep Residual Learning for Image Recognition").

BasicBlock (two 3x3 convs) for ResNet-18, Bottleneck (1x1-3x3-1x1, expansion 4) for
ResNet-50, BatchNorm after every conv and identity / projection skip connections.
The stride of a downsampling Bottleneck sits on the 3x3 conv ("ResNet v1.5"), which
matches torchvision and the 25.56M parameter count.

The full configs expect 224x224 ImageNet inputs (1000 classes); the global average
pool makes any spatial size work, and ``cifar_stem=True`` swaps the 7x7/2 conv +
max-pool for a single 3x3/1 conv so that 32x32 inputs keep useful resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    # Projection shortcut (option B in the paper) only where the shape changes;
    # elsewhere the identity keeps the skip parameter-free.
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


@dataclass(frozen=True)
class ResNetConfig:
    block: str = "basic"  # "basic" | "bottleneck"
    layers: tuple[int, ...] = (2, 2, 2, 2)
    width: int = 64  # channels of the first stage; doubled at each later stage
    num_classes: int = 1000
    in_channels: int = 3
    cifar_stem: bool = False
    image_size: int = 224  # only used by example()


RESNET18 = ResNetConfig(block="basic", layers=(2, 2, 2, 2))
RESNET50 = ResNetConfig(block="bottleneck", layers=(3, 4, 6, 3))
RESNET18_SMALL = ResNetConfig(
    block="basic", layers=(1, 1, 1, 1), width=8, num_classes=10, cifar_stem=True, image_size=32
)
RESNET50_SMALL = ResNetConfig(
    block="bottleneck", layers=(1, 1, 1, 1), width=4, num_classes=10, cifar_stem=True, image_size=32
)


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig = RESNET18) -> None:
        super().__init__()
        self.cfg = cfg
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[cfg.block]
        w = cfg.width
        if cfg.cifar_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_channels, w, 7, 2, 3, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        in_ch = w
        stages = []
        for i, n in enumerate(cfg.layers):
            width = w * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, width, stride))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He initialisation, which the paper introduced for deep ReLU nets.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def config18(small: bool = False, **overrides) -> ResNetConfig:
    return replace(RESNET18_SMALL if small else RESNET18, **overrides)


def config50(small: bool = False, **overrides) -> ResNetConfig:
    return replace(RESNET50_SMALL if small else RESNET50, **overrides)


def resnet18(small: bool = False, **overrides) -> ResNet:
    return ResNet(config18(small, **overrides))


def resnet50(small: bool = False, **overrides) -> ResNet:
    return ResNet(config50(small, **overrides))


def example(cfg: ResNetConfig, batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size),)


def labels(cfg: ResNetConfig, batch: int) -> torch.Tensor:
    return torch.randint(0, cfg.num_classes, (batch,))
