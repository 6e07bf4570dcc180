"""A stage's state by model name, and the optimizers a replica trains with: what every backend
copies for a rollback point or a backup, and builds for each replica (backends/local.py gives the
rules; torch_dist packs the same copies into one message per backup)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch

from asteroid_fx.ir.errors import InputError

OptimizerSpec = str | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
}


def make_optimizer(spec: OptimizerSpec, params: list[torch.nn.Parameter], lr: float = 1e-3) -> torch.optim.Optimizer | None:
    if not params:
        return None
    if callable(spec):
        return spec(params)
    name = spec.lower()
    if name not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {spec!r}; use one of {', '.join(OPTIMIZERS)} or pass a callable "
                         "params -> torch.optim.Optimizer")
    return OPTIMIZERS[name](params, lr)


class StateCopy:
    """A stage's state by model name: parameters, buffers and per-parameter optimizer state.

    ``StateCopy.later(make)`` is a copy whose entries ``make()`` builds when one is first read:
    a packed backup (backends/torch_dist/) is kept as the buffer it arrived in, and only a
    rollback or a hand-over, which read it, pays for unpacking it by name. ``update`` merges in
    order, and keeps what it merges deferred until then too."""

    def __init__(self, params: dict[str, torch.Tensor] | None = None, buffers: dict[str, torch.Tensor] | None = None,
                 optim: dict[str, dict[str, Any]] | None = None):
        self._params = {} if params is None else params
        self._buffers = {} if buffers is None else buffers
        self._optim = {} if optim is None else optim
        self._later: list[Callable[[], StateCopy]] = []  # merged over the entries above, in order

    @classmethod
    def later(cls, make: Callable[[], StateCopy]) -> StateCopy:
        out = cls()
        out._later.append(make)
        return out

    @classmethod
    def of(cls, replica: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> StateCopy:
        named = list(replica.named_parameters(remove_duplicate=False))
        state = optimizer.state if optimizer is not None else {}
        return cls(
            {n: p.detach().clone() for n, p in named},
            {n: b.detach().clone() for n, b in replica.named_buffers(remove_duplicate=False)},
            {n: _clone_state(state[p]) for n, p in named if state.get(p)},
        )

    def _settle(self) -> None:
        while self._later:
            other = self._later.pop(0)()
            self._params.update(other.params)
            self._buffers.update(other.buffers)
            self._optim.update(other.optim)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        self._settle()
        return self._params

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        self._settle()
        return self._buffers

    @property
    def optim(self) -> dict[str, dict[str, Any]]:
        self._settle()
        return self._optim

    def update(self, other: StateCopy) -> None:
        """Entries of ``other`` replace those of the same name."""
        self._later.append(lambda: other)

    def load_into(self, replica: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[str]:
        """Copy every name ``replica`` has from this copy; returns the names it lacks."""
        missing = []
        with torch.no_grad():
            for n, p in replica.named_parameters(remove_duplicate=False):
                if n not in self.params:
                    missing.append(n)
                    continue
                p.copy_(self.params[n])
                p.grad = None
                if optimizer is not None:
                    optimizer.state.pop(p, None)
                    if n in self.optim:
                        optimizer.state[p] = _clone_state(self.optim[n])
            for n, b in replica.named_buffers(remove_duplicate=False):
                if n not in self.buffers:
                    missing.append(n)
                else:
                    b.copy_(self.buffers[n])
        return missing


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}
