"""The contract between a backend and its callers (compiler.py, runtime/): a ``Runner`` trains a
Program iteration after iteration, a ``Comm`` carries one device's messages.

A backend is a folder (or module) of backends/ with a class that satisfies ``Runner``:
``local.LocalRunner`` runs every device of a program in one process, ``torch_dist.DistWorker``
runs one device per process. Both execute F and B through ``stage.StageReplica``, so the meaning
of a stage's compute lives in one place; what a backend adds is how the row slices, all-reduces and
state copies between devices travel. A distributed runner takes those from a ``Comm``: a transport
(gloo today; NCCL, MPI or a socket protocol next) is one class that satisfies it, and the runner,
its pacing and its fault tolerance stay as they are.

Both protocols are structural (typing.Protocol): nothing subclasses them; tests check that the
classes of this package satisfy them (tests/test_backends.py).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch

from asteroid_fx.ir.errors import AsteroidError
from asteroid_fx.ir.program import Action, StageInfo


class BackendError(AsteroidError, RuntimeError):
    """A run cannot go on as its program says (a rollback without its copy, a message that is not
    what its action expects); a RuntimeError too, as these were before the contract."""


class GroupTimeout(AsteroidError, TimeoutError):
    """The devices of a membership epoch did not all come to build its process groups in time."""


class Interrupted(Exception):
    """The run's membership changed (a device failed or left) while this device was waiting. Not an
    error: the training loop catches it and recovers (runtime/worker.py)."""


@runtime_checkable
class Runner(Protocol):
    """Trains a Program: every device it runs holds a replica of its stage (parameters, buffers,
    optimizer). ``iteration`` is the iteration the next ``step`` runs unless told otherwise."""

    iteration: int

    def step(self, inputs: Sequence[torch.Tensor], labels: Any, *, iteration: int | None = None,
             actions: Mapping[str, Sequence[Action]] | None = None,
             stop: Mapping[str, int] | None = None) -> float:
        """One training iteration on a global batch (``microbatches x microbatch_rows`` rows);
        returns the loss this runner's devices computed (the full-batch mean where the runner runs
        the last stage's every device, its share of it otherwise, 0.0 off the last stage).

        ``iteration``: which iteration this is (it tags backups and picks rollback points); None:
        the runner's ``iteration``, which a completed step advances by one. ``actions``: device ->
        the actions it runs instead of its program's (a recovery's redo, a hand-over), over the same
        stage table; devices left out run their program's. ``stop``: device -> how many of its
        actions it completes; the rest are left undone, as a failure leaves them, and the
        iteration stays unfinished (``iteration`` does not advance)."""
        ...

    def swap(self, program: Any) -> None:
        """Run ``program`` from the next iteration on, every replica kept as it is: a program over
        the same stages on the same devices (its rows and micro-batching may differ: an epoch's
        smaller last batch, passes/remainder.py). Nothing moves; swapping back is the same call
        with the running program. Raises on a program whose stages or groups differ."""
        ...

    def state_dict(self, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the stages this runner holds, by model name (copies, on the
        host); ``keys`` keeps only those names."""
        ...

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set every parameter and buffer this runner holds from ``state`` (by model name, as
        ``state_dict`` gives them; names of stages it does not hold are ignored), in place, and
        drop their gradients. Optimizer state is kept. Raises InputError naming what ``state``
        lacks."""
        ...


def step_swapped(runner: "Runner", program: Any, back: Any, inputs, labels) -> float:
    """One iteration of ``runner`` on ``program`` (over the running one's stages and groups:
    ``Runner.swap``), then ``back`` again, also when the step raises; the step's loss."""
    runner.swap(program)
    try:
        return runner.step(inputs, labels)
    finally:
        runner.swap(back)


@runtime_checkable
class Comm(Protocol):
    """One device's transport for one membership epoch, as a distributed runner uses it. Every
    ``send_*``/``recv_*`` posts and returns works (opaque handles); ``wait_all`` completes them
    and raises Interrupted where the membership changed meanwhile. Sends are matched with
    receives by what they carry, never by the order they were posted in across kinds: a SEND's
    row slice by its action (stage, micro-batch, payload), a backup by (stage, part)."""

    def send_rows(self, a: Action, tensors: Sequence[torch.Tensor],
                  arrive: torch.Tensor | None = None) -> list[Any]:
        """Post a SEND's row slice to ``a.peer``: tensor i of its specs (contiguous), and, from an
        emulated device, ``arrive`` (a float64 scalar: when the slice would arrive)."""
        ...

    def recv_rows(self, a: Action, bufs: Sequence[torch.Tensor],
                  arrive: torch.Tensor | None = None) -> list[Any]:
        """Post the receives of a RECV's row slice from ``a.peer`` into ``bufs`` (and ``arrive``)."""
        ...

    def sum_stage_chunks(self, chunks: Sequence[torch.Tensor], stage: StageInfo) -> torch.Tensor:
        """The sum over every chunk of ``stage``, this device's (several devices), in the stage's
        row order (``StageInfo.chunks``), the same bit for bit on each of its devices; ``chunks``
        are this device's, flat tensors of one length in row order (blocking)."""
        ...

    def allreduce_tie(self, group: Sequence[str], tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` in place over ``group``, the holders of a TIE's weights (blocking)."""
        ...

    def allreduce_norm(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` in place over every device of the program, a NORM's group (blocking)."""
        ...

    def send_state(self, peer: str, stage: int, buf: torch.Tensor, part: int = 0) -> Any:
        """Post part ``part`` of a backup of ``stage`` (a uint8 buffer) to its holder ``peer``."""
        ...

    def recv_state(self, peer: str, stage: int, buf: torch.Tensor, part: int = 0) -> Any:
        """Post the receive of part ``part`` of ``peer``'s backup of ``stage`` into ``buf``."""
        ...

    def wait(self, work: Any) -> None:
        ...

    def wait_all(self, works: Sequence[Any]) -> None:
        ...

    def barrier(self, value: float = 0.0) -> float:
        """Every device of the epoch reaches this point; returns the sum of their ``value``s."""
        ...
