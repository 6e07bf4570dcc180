"""A model defined outside the zoo, for `asteroid compile tests.cli_model:build`."""

import torch


def build() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


class Centred(torch.nn.Module):
    """Every hidden layer adds back a statistic over the batch's rows (a value that is not batch-first
    and depends on the batch's data), so the cuts it crosses are not allowed."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(6 if i == 0 else 12, 12) for i in range(4))
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        h = self.layers[0](x)
        centre, spread = h.mean(0), h.std(0)
        for layer in self.layers[1:]:
            h = layer(torch.tanh(h)) + centre
        return self.head(h * spread)


def centred() -> torch.nn.Module:
    return Centred()
