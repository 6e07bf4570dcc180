"""What a block of layers holds in memory while it runs: the bytes it saves for backward and its
peak (``MemoryProbe``), and the bytes of its gradients and optimizer state."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from asteroid_fx.ir.profile import BoundaryStorage


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create while active (CPU has no allocator statistics):
    a storage counts from the op that made it until nothing refers to it any more."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live and key not in self.exclude:
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        return out


class MemoryProbe:
    """Saved-for-backward bytes (every device) and peak bytes (CUDA: the allocator's statistics;
    CPU: ``_LiveBytes``) of what runs inside it, beyond the tensors in ``exclude``; and which of
    the saved storages hold the layer's boundary values (``boundary``)."""

    def __init__(self, device: torch.device, weights: Iterable[torch.Tensor], inputs: Iterable[torch.Tensor]):
        self.device = device
        # saved bytes leave out weights (resident anyway) but count saved inputs: a stage's layers
        # save each other's outputs; peak bytes leave out both, which exist before the run
        self.weights = {storage_key(t) for t in weights}
        self.exclude = self.weights | {storage_key(t) for t in inputs}
        self.saved_keys: dict[int, int] = {}  # storage -> bytes, of what autograd saved
        self.saved_bytes = 0
        self.peak_bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in self.weights and key not in self.saved_keys:
            self.saved_keys[key] = t.untyped_storage().nbytes()
            self.saved_bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> "MemoryProbe":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._live = _LiveBytes(self.exclude)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._live.__exit__(*exc)
            self.peak_bytes = self._live.peak
        self._hooks.__exit__(*exc)


    def boundary(self, values: Mapping[str, Any]) -> tuple[BoundaryStorage, ...]:
        """The storages of ``values`` (value name -> tensor: the inputs the layer received and the
        outputs it sent, alive since the run, so no saved storage that was freed can share their
        address) that autograd saved or that hold several of them, each with the names of the
        values in it (in the order of ``values``) and its saved bytes (0: not saved)."""
        names: dict[int, list[str]] = {}
        for name, t in values.items():
            if isinstance(t, torch.Tensor):
                names.setdefault(storage_key(t), []).append(name)
        return tuple(BoundaryStorage(tuple(n), self.saved_keys.get(key, 0)) for key, n in names.items()
                     if key in self.saved_keys or len(n) > 1)


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_bytes(params: list[torch.nn.Parameter], optimizer: str) -> int:
    """Bytes of optimizer state after one step on the gradients the run left (then undone by the
    caller's restore)."""
    from asteroid_fx.backends.local import make_optimizer

    with_grad = [p for p in params if p.grad is not None]
    opt = make_optimizer(optimizer, with_grad, lr=0.0) if with_grad else None
    if opt is None:
        return 0
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return unique_bytes(state)
