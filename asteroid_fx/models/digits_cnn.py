"""A small CNN on handwritten-style digits that the project generates itself (no download).

The data: the ten digits of a 5x7 dot-matrix font, each drawn into a 16x16 image through a random
affine map (rotation up to 15 degrees, scale 0.7-1.2, shear, a shift of up to 3 pixels) with
bilinear smoothing, a random stroke weight and heavy Gaussian pixel noise. It is not MNIST: it is a
10-class task that is learnable in a few hundred steps, generated deterministically from a seed,
so the demo trains on real (if synthetic) data offline and can report accuracy on held-out
images.

A batch is a function of the current torch seed (``torch.initial_seed()``): ``example`` and
``labels`` draw the same indices, so a process that seeds and asks for both gets a matching pair
(what the launcher's workers do for every iteration).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

# 5 columns x 7 rows per digit, '#' = ink (the classic 5x7 dot-matrix shapes)
FONT = {
    0: (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    1: ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    2: (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    3: ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    4: ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    5: ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    6: ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    7: ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    8: (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    9: (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}
SIZE = 16
TRAIN, TEST = 8192, 2048


@dataclass(frozen=True)
class DigitsConfig:
    channels: tuple[int, int] = (64, 128)
    hidden: int = 256
    num_classes: int = 10


FULL = DigitsConfig()
SMALL = DigitsConfig(channels=(8, 16), hidden=32)


class DigitsCNN(nn.Module):
    def __init__(self, cfg: DigitsConfig = FULL) -> None:
        super().__init__()
        c1, c2 = cfg.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(c2 * (SIZE // 4) ** 2, cfg.hidden), nn.ReLU(),
                                        nn.Linear(cfg.hidden, cfg.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def config(small: bool = False, **overrides) -> DigitsConfig:
    return replace(SMALL if small else FULL, **overrides)


def build(small: bool = False, **overrides) -> DigitsCNN:
    return DigitsCNN(config(small, **overrides))


def _glyphs() -> torch.Tensor:
    """(10, 1, 7, 5) ink masks of the font."""
    return torch.tensor([[[[1.0 if ch == "#" else 0.0 for ch in row] for row in FONT[d]]] for d in range(10)])


def render(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (N, 1, 16, 16) of the digits in ``labels``, each through its own random distortion."""
    n = len(labels)
    # the glyph centred on a 16x16 canvas at about 2x scale
    canvas = F.interpolate(_glyphs()[labels], size=(14, 10), mode="nearest")
    canvas = F.pad(canvas, (3, 3, 1, 1))
    rnd = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    angle = (rnd(n) - 0.5) * 2 * math.radians(15)
    scale = 0.7 + 0.5 * rnd(n)
    shear = (rnd(n) - 0.5) * 0.8
    shift = (rnd(n, 2) - 0.5) * 2 * (3 / SIZE * 2)  # up to 3 pixels, in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, SIZE, SIZE), align_corners=False)
    img = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weight = 0.4 + 0.8 * rnd(n, 1, 1, 1)  # stroke weight
    img = (img * weight).clamp(0, 1) + 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    return (img - 0.15) / 0.4


@functools.lru_cache(maxsize=2)
def dataset(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The generated split: ``train`` (8192 images) or ``test`` (2048, other seeds)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    g = torch.Generator().manual_seed(1234 if split == "train" else 98765)
    n = TRAIN if split == "train" else TEST
    labels = torch.randint(0, 10, (n,), generator=g)
    return render(labels, g), labels


def _indices(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(torch.initial_seed())
    return torch.randint(0, TRAIN, (batch,), generator=g)


def example(cfg: DigitsConfig, batch: int) -> tuple[torch.Tensor, ...]:
    images, _ = dataset("train")
    return (images[_indices(batch)],)


def labels(cfg: DigitsConfig, batch: int) -> torch.Tensor:
    _, ys = dataset("train")
    return ys[_indices(batch)]


def accuracy(model: nn.Module, split: str = "test") -> float:
    """Top-1 accuracy of ``model`` on a generated split."""
    images, ys = dataset(split)
    was = model.training
    model.eval()
    with torch.no_grad():
        right = sum(int((model(images[i:i + 512]).argmax(1) == ys[i:i + 512]).sum()) for i in range(0, len(ys), 512))
    model.train(was)
    return right / len(ys)
