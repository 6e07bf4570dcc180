"""A stage's state by model name, and the optimizers a replica trains with: what every backend
copies for a rollback point or a backup, and builds for each replica (backends/local.py gives the
rules; torch_dist packs the same copies into one message per backup)."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from asteroid_fx.ir.errors import InputError

# short names, each a torch.optim class with the keyword arguments the name implies
SHORT_NAMES: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
}
OPTIMIZERS = {name: (lambda cls, kw: lambda params, lr: cls(params, lr=lr, **kw))(cls, kw)
              for name, (cls, kw) in SHORT_NAMES.items()}


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """An optimizer as a job names it, built alike on every replica of every stage.

    ``optimizer``: a ``torch.optim.Optimizer`` class, its name ("AdamW", "torch.optim.AdamW") or
    a short name of ``OPTIMIZERS``; ``kwargs`` go to it (weight_decay, momentum, nesterov, betas).
    ``no_decay``: fnmatch patterns of parameter names (the model's, e.g. "*.bias", "*norm*")
    that form a second parameter group with weight_decay 0. ``scheduler``: a callable
    optimizer -> ``torch.optim.lr_scheduler.LRScheduler``, stepped once per iteration after the
    step, as in eager training. The learning rate of iteration i is read off a shadow optimizer
    stepped i times (``lr_at``), not kept in each replica: every device, a resumed run and an
    iteration redone after a rollback use the same rate for the same iteration."""

    optimizer: str | type = "sgd"
    lr: float = 1e-3
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    no_decay: tuple[str, ...] = ()
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None

    def __post_init__(self):
        object.__setattr__(self, "no_decay", tuple(self.no_decay))
        self.optimizer_class()  # a bad name fails here, where the job is read
        if "lr" in self.kwargs:
            raise InputError("give the learning rate as lr=, not in the optimizer's kwargs")
        object.__setattr__(self, "_lrs", [])

    def optimizer_class(self) -> tuple[type, dict[str, Any]]:
        """The torch.optim class and the keyword arguments its name implies ("momentum": SGD's 0.9)."""
        o = self.optimizer
        if isinstance(o, type):
            if not issubclass(o, torch.optim.Optimizer):
                raise InputError(f"optimizer {o.__name__} is not a torch.optim.Optimizer subclass")
            return o, {}
        if not isinstance(o, str):
            raise InputError(f"optimizer {o!r}: give a torch.optim.Optimizer class or its name")
        if o.lower() in SHORT_NAMES:
            return SHORT_NAMES[o.lower()]
        name = o.removeprefix("torch.optim.").lower()
        known = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
                 if isinstance(getattr(torch.optim, n), type) and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                 and n != "Optimizer"}
        if name not in known:
            raise InputError(f"unknown optimizer {o!r}; give a torch.optim class or one of its names "
                             f"({', '.join(sorted(c.__name__ for c in known.values()))})")
        return known[name], {}

    def groups(self, named: Sequence[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
        """The parameter groups of ``named`` (the parameters to train, by model name): everything,
        or with ``no_decay`` the parameters it matches apart with weight_decay 0. Each group says
        which of the model's it is (``"group"``: 0, or 1 for no decay), even in a stage that has
        no parameter of the other."""
        if not self.no_decay:
            return [{"params": [p for _, p in named], "group": 0}]
        off = [p for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in self.no_decay)]
        on = [p for n, p in named if not any(fnmatch.fnmatchcase(n, pat) for pat in self.no_decay)]
        return [g for g in ({"params": on, "group": 0}, {"params": off, "weight_decay": 0.0, "group": 1})
                if g["params"]]

    def build(self, named: Sequence[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer | None:
        if not named:
            return None
        cls, implied = self.optimizer_class()
        try:
            return cls(self.groups(named), lr=self.lr, **{**implied, **self.kwargs})
        except TypeError as e:
            raise InputError(f"{cls.__name__} refuses the job's optimizer settings {dict(self.kwargs)}: {e}") from e

    def lr_at(self, iteration: int) -> tuple[float, ...]:
        """Each group's learning rate in ``iteration`` (by ``"group"``): the scheduler's after
        ``iteration`` steps, or ``lr`` without one."""
        if self.scheduler is None:
            return (self.lr, self.lr)
        lrs: list = self._lrs  # type: ignore[attr-defined]
        if not lrs:
            shadow = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
            named = [("decay", shadow[0]), ("no_decay", shadow[1])]
            patterns = dataclasses.replace(self, no_decay=("no_decay",) if self.no_decay else (), scheduler=None)
            opt = patterns.build(named) if self.no_decay else patterns.build(named[:1])
            try:
                sched = self.scheduler(opt)
            except Exception as e:
                raise InputError(f"the job's scheduler failed on an optimizer ({type(e).__name__}: {e}); give a "
                                 "callable optimizer -> torch.optim.lr_scheduler.LRScheduler") from e
            if not hasattr(sched, "step") or not hasattr(sched, "get_last_lr"):
                raise InputError(f"the job's scheduler returned {type(sched).__name__}, not an LR scheduler "
                                 "(ReduceLROnPlateau, which needs a metric, is not supported)")
            lrs.extend([[g["lr"] for g in opt.param_groups], opt, sched])
        history, opt, sched = lrs[0], lrs[1], lrs[2]
        per = len(opt.param_groups)
        while len(history) // per <= iteration:
            opt.step()  # no gradients: nothing moves, the scheduler only counts
            sched.step()
            history.extend(g["lr"] for g in opt.param_groups)
        got = tuple(history[iteration * per:(iteration + 1) * per])
        return got if per == 2 else (got[0], got[0])

    def set_lr(self, optimizer: torch.optim.Optimizer | None, iteration: int) -> None:
        """Give ``optimizer``'s groups the rates of ``iteration`` (nothing without a scheduler)."""
        if optimizer is None or self.scheduler is None:
            return
        lrs = self.lr_at(iteration)
        for g in optimizer.param_groups:
            g["lr"] = lrs[g.get("group", 0)]

    def state_factor(self) -> float:
        """The optimizer's state per parameter, in parameters (Adam 2, SGD with momentum 1, SGD 0):
        measured by one step of it on a small tensor, so any optimizer gets its own."""
        p = torch.nn.Parameter(torch.zeros(64))
        opt = dataclasses.replace(self, scheduler=None, no_decay=()).build([("p", p)])
        p.grad = torch.ones_like(p)
        opt.step()
        return float(sum(v.numel() for v in opt.state[p].values()
                         if isinstance(v, torch.Tensor) and v.numel() > 1) / p.numel())


OptimizerSpec = str | OptimizerSettings | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def make_optimizer(spec: OptimizerSpec, params: Sequence, lr: float = 1e-3) -> torch.optim.Optimizer | None:
    """``spec``'s optimizer over ``params``: parameters, or (model name, parameter) pairs, which
    ``OptimizerSettings``' name patterns need."""
    if not params:
        return None
    named = [p if isinstance(p, tuple) else (str(k), p) for k, p in enumerate(params)]
    if isinstance(spec, OptimizerSettings):
        return spec.build(named)
    plain = [p for _, p in named]
    if callable(spec):
        return spec(plain)
    name = spec.lower()
    if name not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {spec!r}; use one of {', '.join(OPTIMIZERS)} or pass a callable "
                         "params -> torch.optim.Optimizer")
    return OPTIMIZERS[name](plain, lr)


def trained_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters an optimizer trains, by model name (what ``no_decay`` patterns match)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


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
