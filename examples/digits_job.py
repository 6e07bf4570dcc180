"""A training job to copy: a small CNN on real handwritten digits, trained across devices.

    asteroid launch examples.digits_job:build --cluster edge-4-pi-1g --out run --emulate
    asteroid report run                     # loss and throughput, as a PNG
    asteroid export run model.pt            # the trained state_dict, for DigitsCNN()

The data are scikit-learn's copy of the UCI optical recognition of handwritten digits test set
(Alpaydin and Kaynak, 1998: 1,797 8x8 images of 43 writers' digits, pixels 0..16), which the
package ships: nothing is downloaded. ``generated`` is the same job on the project's own generated
16x16 digits (asteroid_fx/models/digits_cnn.py), for a machine without scikit-learn.

Everything a job names is plain PyTorch: the model factory, a map-style Dataset per split (the
labels apart, so that the devices of the last stage read labels and nothing else), the loss, the
optimizer with its parameter groups, the schedule, gradient clipping.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from asteroid_fx.runtime.job import Job

VALIDATION = 297  # of the 1,797 images, held out (a seeded split); 1,500 train


class DigitsCNN(nn.Module):
    def __init__(self, side: int = 8, width: int = 64, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.norm = nn.GroupNorm(4, 2 * width)
        self.fc1 = nn.Linear(2 * width * (side // 2) ** 2, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.norm(self.conv3(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Images(torch.utils.data.Dataset):
    """Images (1, side, side) at the given indices of an image tensor."""

    def __init__(self, images: torch.Tensor, indices: torch.Tensor):
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[self.indices[i]]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("examples.digits_job:build reads scikit-learn's digits: pip install scikit-learn, or use "
                          "examples.digits_job:generated (the project's own generated digits)") from None
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (images - 0.3) / 0.4, torch.tensor(d.target, dtype=torch.int64)


def _job(images: torch.Tensor, labels: torch.Tensor, validation: int, side: int, name: str,
         batch: int, epochs: int) -> Job:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, held = order[validation:], order[:validation]
    steps = epochs * (len(train) // batch)
    return Job(
        name=name,
        model=functools.partial(DigitsCNN, side),
        dataset=Images(images, train), labels=labels[train],
        validation=Images(images, held), validation_labels=labels[held],
        loss=F.cross_entropy, batch=batch, epochs=epochs,
        optimizer="AdamW", lr=3e-3, optimizer_kwargs={"weight_decay": 0.05},
        no_decay=("*.bias", "norm.*"),  # no weight decay on biases and the norm's scale
        scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps),
        clip_grad_norm=1.0,
    )


def build(batch: int = 128, epochs: int = 8) -> Job:
    """The job on scikit-learn's real 8x8 digits (1,500 train, 297 held out)."""
    images, labels = _digits()
    return _job(images, labels, VALIDATION, 8, "digits (UCI, scikit-learn)", batch, epochs)


def generated(batch: int = 128, epochs: int = 2) -> Job:
    """The same job on the project's generated 16x16 digits (no scikit-learn needed)."""
    from asteroid_fx.models.digits_cnn import dataset

    train_x, train_y = dataset("train")
    test_x, test_y = dataset("test")
    images, labels = torch.cat([test_x, train_x]), torch.cat([test_y, train_y])
    return _job(images, labels, len(test_y), 16, "digits (generated)", batch, epochs)
