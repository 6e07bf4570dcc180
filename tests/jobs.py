"""Jobs as a user writes them, outside the zoo: the runtime imports them by entry
("tests.jobs:build") in every worker process. The datasets count their reads per device (the
worker's --device from its command line) into files under $ASTEROID_TEST_READS when it is set."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from asteroid_fx.runtime.job import Job

FEATURES, CLASSES, SAMPLES, BATCH = 12, 5, 48, 16


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x):
        x = torch.relu(self.norm(self.fc1(x)))
        return self.head(torch.relu(self.fc2(x)))


def _device() -> str:
    argv = sys.argv
    return argv[argv.index("--device") + 1] if "--device" in argv else "main"


def _count(what: str) -> None:
    folder = os.environ.get("ASTEROID_TEST_READS")
    if folder:
        with open(os.path.join(folder, f"{_device()}.{what}"), "a") as f:
            f.write("1")


class Inputs(torch.utils.data.Dataset):
    """Sample i's features, drawn from a generator of its own; ``n`` of them."""

    def __init__(self, n: int = SAMPLES):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        _count("inputs")
        return torch.randn(FEATURES, generator=torch.Generator().manual_seed(1000 + i))


class Labels(torch.utils.data.Dataset):
    def __init__(self, n: int = SAMPLES):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        _count("labels")
        return torch.tensor(i % CLASSES)


def cosine(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * (SAMPLES // BATCH))


CLIP = 0.5  # below the gradients' global norm in most iterations: clipping changes the run


def build() -> Job:
    """Two epochs of AdamW with weight decay off for norms and biases, a cosine schedule and
    gradients clipped by their global norm."""
    return Job(model=Net, dataset=Inputs(), labels=Labels(), loss=F.cross_entropy, batch=BATCH,
               example=torch.zeros(BATCH, FEATURES), optimizer="AdamW", lr=1e-2,
               optimizer_kwargs={"weight_decay": 0.1}, no_decay=("*.bias", "norm.*"), scheduler=cosine,
               clip_grad_norm=CLIP, epochs=2)


class Pairs(torch.utils.data.Dataset):
    """(inputs, label) pairs, the common form."""

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        return Inputs()[i], Labels()[i]


def pairs() -> Job:
    return Job(model=Net, dataset=Pairs(), loss=F.cross_entropy, batch=BATCH, optimizer="SGD", lr=0.1,
               optimizer_kwargs={"momentum": 0.9, "nesterov": True}, epochs=1)


class Wider(Inputs):
    def __getitem__(self, i):
        return torch.randn(FEATURES + 1)


def mismatched() -> Job:
    """Samples one feature wider than the example the model is captured with."""
    return Job(model=Net, dataset=Wider(), labels=Labels(), loss=F.cross_entropy, batch=BATCH,
               example=torch.zeros(BATCH, FEATURES))


def vector_loss() -> Job:
    """A loss that forgets to reduce over the rows."""
    return Job(model=Net, dataset=Inputs(), labels=Labels(), loss=lambda out, y: F.cross_entropy(out, y, reduction="none"),
               batch=BATCH, example=torch.zeros(BATCH, FEATURES))


UNEVEN = 3 * BATCH + 5  # three whole batches and 5 rows an epoch


def uneven() -> Job:
    """``build`` on a dataset that is no multiple of the batch (its last partial batch dropped, as
    by default)."""
    import dataclasses

    return dataclasses.replace(build(), dataset=Inputs(UNEVEN), labels=Labels(UNEVEN))


def uneven_smaller() -> Job:
    """``uneven`` with the 5 rows left at the end of every epoch trained as a smaller batch."""
    import dataclasses

    return dataclasses.replace(uneven(), last_batch="smaller")


def one_left() -> Job:
    """A smaller last batch of one row: too few for a group of two devices to share."""
    import dataclasses

    return dataclasses.replace(uneven_smaller(), dataset=Inputs(3 * BATCH + 1), labels=Labels(3 * BATCH + 1))


def build_with_loader_processes() -> Job:
    """``build`` with two DataLoader processes loading each device's rows ahead."""
    import dataclasses

    return dataclasses.replace(build(), loader_workers=2)


HIDDEN_ENV = "ASTEROID_TEST_HIDDEN"


class Inner(nn.Module):
    """32 features between its first layer and the rest, and ``hidden`` inside the rest."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 32)
        self.fc2 = nn.Linear(32, hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def hidden_from_env() -> Job:
    """``Inner`` with the hidden width $ASTEROID_TEST_HIDDEN (32 without it): a process that sees
    another value builds another model, and the same program when its stages cut after fc1."""
    width = int(os.environ.get(HIDDEN_ENV, "32"))
    return Job(model=lambda: Inner(width), dataset=Inputs(), labels=Labels(), loss=F.cross_entropy, batch=BATCH,
               example=torch.zeros(BATCH, FEATURES), optimizer="SGD", lr=0.1)
