"""A stage's state as one buffer: ``FlatState`` keeps a replica's tensors in one buffer laid out
by their ``StateLayout``, so a rollback point or a backup is one memory copy; ``state_message``
and ``state_from_message`` turn a StateCopy into tensors and a JSON-able list and back (a backup
never travels as a pickle)."""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch

from asteroid_fx.backends.base import BackendError
from asteroid_fx.backends.state import StateCopy
from asteroid_fx.backends.torch_dist.messages import DTYPES, StateLayout
from asteroid_fx.ir.errors import InputError


class FlatState:
    """A replica's parameters, buffers and optimizer state moved into one buffer laid out by their
    ``StateLayout`` (a header, then a segment per dtype), so that a copy of the whole state is one
    memory copy instead of one per tensor. Every tensor keeps its identity, so the optimizer's and
    ``direct_calls``' references stay valid: its ``.data`` becomes a view of the buffer, updated
    in place from then on (as optimizers and BatchNorm do). ``copy`` first checks that every
    tensor still lies where it was put, and lays the state out again when one does not: the
    optimizer creates its state at its first step, a rollback loads new state tensors, and an
    optimizer that replaces its tensors instead of updating them is caught here, never copied stale."""

    def __init__(self, replica: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        self.replica, self.optimizer = replica, optimizer
        self.params = [p for _, p in replica.named_parameters(remove_duplicate=False)]
        # named_buffers' order: each module's own buffers, modules in named_modules order
        self.buffer_slots = [(m, n) for _, m in replica.named_modules(remove_duplicate=False)
                             for n, b in m._buffers.items() if b is not None]
        self.layout: StateLayout | None = None
        self.buf = torch.empty(0, dtype=torch.uint8)
        self.where: list[int] = []  # the address each tensor must have (a tied tensor: its first slot's)
        self.values: list[Any] = []  # optimizer entries that are not tensors (in the layout's meta)
        self.tied: list[tuple[torch.Tensor, int]] = []  # (slot, index of the tensor it repeats)

    def live(self) -> tuple[list[torch.Tensor], list[Any]]:
        """The tensors of the state, in ``state_message``'s order, and its non-tensor entries."""
        tensors = self.params + [m._buffers[n] for m, n in self.buffer_slots]
        values = []
        if self.optimizer is not None:
            state = self.optimizer.state
            for p in self.params:
                entries = state.get(p)
                if entries:
                    for v in entries.values():
                        if isinstance(v, torch.Tensor):
                            tensors.append(v)
                        else:
                            values.append(v)
        return tensors, values

    def copy(self) -> tuple[StateLayout, torch.Tensor]:
        """The layout and a copy of the buffer (its header bytes are the caller's to write)."""
        tensors, values = self.live()
        if self.layout is None or values != self.values or [t.data_ptr() for t in tensors] != self.where:
            self._lay_out(tensors, values)
        out = self.buf.clone()
        if self.tied:
            views = self.layout.unpack(out)
            for slot, first in self.tied:
                views[slot].copy_(views[first])
        return self.layout, out

    def _lay_out(self, tensors: list[torch.Tensor], values: list[Any]) -> None:
        off_host = sorted({str(t.device) for t in tensors if t.device.type != "cpu"})
        if off_host:
            raise BackendError(f"the stage's state lies on {', '.join(off_host)}; this backend keeps it in host "
                               "memory (gloo sends from there)")
        packed, meta = state_message(live_state(self.replica, self.optimizer))
        layout = StateLayout.of(meta)
        buf = layout.pack(packed, ())  # the copy's taker writes the header
        first: dict[int, int] = {}
        self.tied = []
        for k, (t, view) in enumerate(zip(tensors, layout.unpack(buf))):
            if id(t) in first:  # a tensor under two names (tied weights): each copy refreshes its slot
                self.tied.append((k, first[id(t)]))
                continue
            first[id(t)] = k
            t.data = view
        self.layout, self.buf, self.values = layout, buf, values
        self.where = [t.data_ptr() for t in tensors]


def live_state(replica: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> StateCopy:
    """The entries ``StateCopy.of`` takes, without copying them: the live tensors, for a message
    that copies them once, packed."""
    named = list(replica.named_parameters(remove_duplicate=False))
    state = optimizer.state if optimizer is not None else {}
    return StateCopy({n: p.detach() for n, p in named},
                     {n: b.detach() for n, b in replica.named_buffers(remove_duplicate=False)},
                     {n: state[p] for n, p in named if state.get(p)})


def state_message(copy_: StateCopy) -> tuple[list[torch.Tensor], tuple[tuple, ...]]:
    """A state copy as tensors and a JSON-able list of (kind, name, key, dtype, shape) per tensor;
    an optimizer entry that is not a tensor (a step count as a number) travels in the list as
    (kind "v", name, key, "json", its JSON text)."""
    tensors, meta = [], []

    def add(kind: str, name: str, key: str, t: torch.Tensor) -> None:
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise InputError(f"cannot back up {name} ({key or kind}): dtype {dtype} is none of {', '.join(DTYPES)}")
        tensors.append(t.detach().cpu().contiguous())
        meta.append((kind, name, key, dtype, tuple(t.shape)))

    for n, t in copy_.params.items():
        add("p", n, "", t)
    for n, t in copy_.buffers.items():
        add("b", n, "", t)
    for n, state in copy_.optim.items():
        for key, v in state.items():
            if isinstance(v, torch.Tensor):
                add("o", n, key, v)
            else:
                meta.append(("v", n, key, "json", json.dumps(v)))
    return tensors, tuple(meta)


def state_from_message(meta: Sequence[Sequence], tensors: Sequence[torch.Tensor]) -> StateCopy:
    out = StateCopy()
    it = iter(tensors)
    for kind, name, key, dtype, shape in meta:
        if kind == "v":
            out.optim.setdefault(name, {})[key] = json.loads(shape)
            continue
        t = next(it)
        if kind == "p":
            out.params[name] = t
        elif kind == "b":
            out.buffers[name] = t
        else:
            out.optim.setdefault(name, {})[key] = t
    return out
