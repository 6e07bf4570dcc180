"""A model defined outside the zoo, for `asteroid compile tests.cli_model:build`."""

import torch


def build() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
