"""Multi-layer perceptron: the simplest pipeline workload.

A stack of fully connected layers with ReLU (Rumelhart, Hinton & Williams 1986).
It has no canonical size; the full config is wide enough that the linear layers
dominate compute, which makes it a handy baseline for partitioning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 784
    hidden: tuple[int, ...] = (2048, 2048, 2048)
    num_classes: int = 10
    dropout: float = 0.1


FULL = MLPConfig()
SMALL = MLPConfig(in_features=32, hidden=(64, 64), num_classes=10, dropout=0.0)


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig = FULL) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, cfg.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten(1) keeps the batch dim symbolic and lets image-shaped inputs through.
        return self.layers(x.flatten(1))


def config(small: bool = False, **overrides) -> MLPConfig:
    return replace(SMALL if small else FULL, **overrides)


def build(small: bool = False, **overrides) -> MLP:
    return MLP(config(small, **overrides))


def example(cfg: MLPConfig, batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, cfg.in_features),)


def labels(cfg: MLPConfig, batch: int) -> torch.Tensor:
    return torch.randint(0, cfg.num_classes, (batch,))
