"""One device's replica of a stage and what F and B mean for it, shared by every backend.

A replica holds the stage's module and optimizer and, per micro-batch of the running iteration,
what its F saved for its B: the inputs (its rows; a later stage's are the row slices it received,
joined in row order), the outputs, the loss on the last stage (scaled by rows / batch for a mean
loss, so the summed loss is the full-batch mean and gradients match full-batch training), and the
gradients B leaves for the inputs. Gradients of successive B accumulate in the parameters until
the device's STEP. How row slices reach a replica and leave it (SEND/RECV), and how a group's
gradients are summed (ALLREDUCE), is the backend's: see backends/local.py for the meaning. What a
NORM computes on a replica (its share of the squared global norm, and the scaling by the clip
coefficient) is here, so every backend clips alike.

A replica whose slot runs as several chunks (``chunks``: a stage with splits, as replay leaves a
survivor that took over a lost device's rows) keeps, per chunk, what a device of its own would:
its gradients summed over the micro-batches and its buffers (BatchNorm running statistics,
updated by that chunk's forwards only), all starting from the replica's state when the
iteration's first F runs. The module holds one chunk's at a time and F/B switch it; the ALLREDUCE
reads every chunk's (``chunk_grads``, ``chunk_buffers``) and ``settle`` leaves the module with the
sum, as a group's replicas are after theirs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Collection, Mapping, Sequence

import torch

from asteroid_fx.backends.base import BackendError
from asteroid_fx.backends.state import StateCopy
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import MIN_BATCH_STAT_ROWS
from asteroid_fx.passes.batch_stats import batch_stats

log = logging.getLogger(__name__)


# torch.nn.utils.clip_grad_norm_'s guard against a zero norm: clip_coef = max_norm / (norm + EPS)
CLIP_EPS = 1e-6


def clip_coef(square_norm: float, max_norm: float) -> float:
    """What a NORM scales every gradient by, from the squared global norm: clip_grad_norm_'s
    max_norm / (norm + 1e-6), at most 1 (gradients within the norm stay as they are)."""
    return min(1.0, max_norm / (square_norm ** 0.5 + CLIP_EPS))


@dataclasses.dataclass
class ChunkState:
    """What the module holds for one chunk while another chunk runs: its gradients (one per
    parameter, None where it has none yet) and its buffers' values."""

    grads: list[torch.Tensor | None]
    buffers: list[torch.Tensor]


@dataclasses.dataclass
class MicroBatch:
    """What a replica keeps of one micro-batch between its F and its B."""

    received: dict[tuple[int, int], tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    grads_in: dict[tuple[int, int], tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    inputs: tuple[torch.Tensor, ...] = ()
    outputs: tuple[Any, ...] = ()
    loss: torch.Tensor | None = None
    input_grads: tuple[torch.Tensor, ...] = ()


def joined(pieces: list[tuple[torch.Tensor, ...]], i: int) -> torch.Tensor:
    """Tensor i of a micro-batch received as row slices, in row order. One slice (every stage fed
    by one device) is used as received: concatenating it would only copy a buffer nobody else holds."""
    return pieces[0][i] if len(pieces) == 1 else torch.cat([piece[i] for piece in pieces])


class StageReplica:
    """``stage`` (a split Stage: inputs, input_grads, output_grads) run by ``module`` (the device's
    copy of ``stage.module``) and trained by ``optimizer``. ``call`` computes the module's outputs
    from the stage's inputs (default: the module itself; torch_dist calls it through
    passes/direct_calls). ``last``: the stage computes the loss, ``loss(unflatten(outputs), labels)``.
    ``device`` names the device in errors.

    An F over fewer rows than a batch-statistics layer of the stage can take (one row for
    BatchNorm over (N, C): one value per channel, which eager torch refuses and the captured op
    trains on silently) raises InputError; one below ``MIN_BATCH_STAT_ROWS`` that torch takes
    (BatchNorm2d on one image) is logged once as a warning (docs/semantics.md)."""

    def __init__(self, stage: Any, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 last: bool, loss: Callable, unflatten: Callable, chunks: Sequence[tuple[int, int]],
                 loss_reduction: str = "mean", call: Callable | None = None,
                 set_lr: Callable[[Any, int], None] | None = None, device: str | None = None):
        if loss_reduction not in ("mean", "sum"):
            raise InputError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.stage, self.module, self.optimizer, self.last = stage, module, optimizer, last
        self.loss, self.unflatten, self.loss_reduction = loss, unflatten, loss_reduction
        self.call = module if call is None else call
        self.set_lr = set_lr  # (optimizer, iteration): the learning rates of that iteration (a scheduler's)
        self.batch = 0
        self.microbatches: dict[int, MicroBatch] = {}
        # what every micro-batch would otherwise look up again
        self._inputs = len(stage.inputs)
        self._grad_inputs = tuple(i for i, g in enumerate(stage.input_grads) if g)
        self._grad_outputs = tuple(i for i, g in enumerate(stage.output_grads) if g)
        self.device = device
        self.chunks = tuple(tuple(c) for c in chunks)  # the rows [lo, hi) of each chunk, in row order
        if not self.chunks:
            raise InputError(f"stage {stage.index}: a replica runs at least one chunk of rows; give its slot's rows")
        self._active = 0  # the chunk whose gradients and buffers the module holds
        self._held: dict[int, ChunkState] = {}  # the other chunks' (this iteration)
        self._start: list[torch.Tensor] | None = None  # the buffers when the iteration's first F ran
        # the replica's own graph: in train mode, as it runs (a BatchNorm module's mode decides)
        self._batch_stats = batch_stats(module if isinstance(module, torch.fx.GraphModule) else stage.module)
        self._least = MIN_BATCH_STAT_ROWS if self._batch_stats else 0  # fewer rows than this: _few_rows
        self._warned = False

    def rechunk(self, chunks: Sequence[tuple[int, int]]) -> None:
        """From the next iteration on, the replica's slot runs as ``chunks`` (the rows of another
        program over the same stage table: a partial batch's, passes/remainder.py); its module,
        optimizer and their state stay as they are."""
        if not chunks:
            raise InputError(f"stage {self.stage.index}: a replica runs at least one chunk of rows; give its slot's rows")
        self.chunks = tuple(tuple(c) for c in chunks)
        self.begin(0)

    def begin(self, batch: int) -> None:
        """A new iteration on a global batch of ``batch`` rows: nothing of the last one is kept."""
        self.batch, self.microbatches = batch, {}
        self._active, self._held, self._start = 0, {}, None

    def mb(self, mb: int, chunk: int = 0) -> MicroBatch:
        key = (mb, chunk)
        st = self.microbatches.get(key)
        if st is None:
            st = self.microbatches[key] = MicroBatch()
        return st

    def chunk_of(self, rows: tuple[int, int]) -> int:
        """The index of the chunk holding ``rows`` (an F's or B's rows, or a message's)."""
        if len(self.chunks) == 1:
            return 0
        for k, (lo, hi) in enumerate(self.chunks):
            if lo <= rows[0] and rows[1] <= hi:
                return k
        raise BackendError(f"stage {self.stage.index}{f' on {self.device}' if self.device else ''}: rows "
                           f"{rows[0]}:{rows[1]} lie in no chunk of {' '.join(f'{lo}:{hi}' for lo, hi in self.chunks)}; "
                           "verify the program")

    @property
    def _params(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters())

    @property
    def _buffers(self) -> list[torch.Tensor]:
        # looked up each time: a rollback may load new buffer tensors into the module
        return list(self.module.buffers())

    def _switch(self, k: int) -> None:
        """Make the module hold chunk ``k``'s gradients and buffers, keeping the active chunk's."""
        if self._start is None:
            # the first F of the iteration: every chunk's buffers start from here (after any ROLLBACK)
            self._start = [b.detach().clone() for b in self._buffers] if len(self.chunks) > 1 else []
        if k == self._active:
            return
        self._held[self._active] = ChunkState([p.grad for p in self._params],
                                              [b.detach().clone() for b in self._buffers])
        state = self._held.pop(k, None)
        with torch.no_grad():
            for p, g in zip(self._params, state.grads if state is not None else [None] * len(self._params)):
                p.grad = g
            # in place: the optimizer, torch_dist's flat state and bound calls hold these tensors;
            # through .data, as BatchNorm's own update of its running statistics leaves the version
            # counter alone: autograd saved them for the backward of a micro-batch in flight, which
            # reads them only in eval mode, so a bumped version would refuse a valid backward
            for b, v in zip(self._buffers, state.buffers if state is not None else self._start):
                b.data.copy_(v)
        self._active = k

    def chunk_grads(self) -> list[list[torch.Tensor | None]]:
        """Per chunk in row order, the gradient of every parameter (``module.parameters()``
        order; None where it has none): what an ALLREDUCE sums, chunk after chunk."""
        out = []
        for k in range(len(self.chunks)):
            if k == self._active:
                out.append([p.grad for p in self._params])
            else:
                state = self._held.get(k)
                out.append(list(state.grads) if state is not None else [None] * len(self._params))
        return out

    def chunk_buffers(self) -> list[list[torch.Tensor]]:
        """Per chunk in row order, the value of every floating buffer (``module.buffers()`` order)."""
        out = []
        for k in range(len(self.chunks)):
            state = self._held.get(k)
            values = (self._buffers if k == self._active else state.buffers if state is not None
                      else self._start if self._start else self._buffers)
            out.append([v for b, v in zip(self._buffers, values) if b.is_floating_point()])
        return out

    def settle(self, grads: Sequence[torch.Tensor | None], buffers: Sequence[torch.Tensor] | None = None) -> None:
        """After an ALLREDUCE: the module holds ``grads`` (one per parameter) and, when given, the
        floating buffers' new values (the rest from the first chunk; every chunk counted its
        forwards alike); the chunks are one again."""
        first = self._held.get(0) if self._active != 0 else None
        with torch.no_grad():
            for p, g in zip(self._params, grads):
                p.grad = g
            if first is not None:
                for b, v in zip(self._buffers, first.buffers):
                    b.copy_(v)
            if buffers is not None:
                for b, v in zip((b for b in self._buffers if b.is_floating_point()), buffers):
                    b.copy_(v)
        self._active, self._held = 0, {}

    def forward(self, mb: int, rows: tuple[int, int], inputs: tuple[torch.Tensor, ...] | None = None,
                labels: Any = None) -> float:
        """F of micro-batch ``mb`` on ``rows``: ``inputs`` (stage 0: its rows of the batch's) or,
        when None, the row slices received for it; ``labels`` (its rows) on the last stage.
        Returns the loss it adds (0.0 off the last stage)."""
        if rows[1] - rows[0] < self._least:
            self._few_rows(mb, rows)
        k = self.chunk_of(rows)
        self._switch(k)
        st = self.mb(mb, k)
        if inputs is None:
            pieces = [st.received[r] for r in sorted(st.received)]
            inputs = tuple(joined(pieces, i) for i in range(self._inputs))
            st.received.clear()
        # a data input that needs no gradient is used as is: detaching it would only cost time
        if self._grad_inputs or any(t.requires_grad for t in inputs):
            inputs = tuple(t.detach().requires_grad_(g) if g or t.requires_grad else t
                           for t, g in zip(inputs, self.stage.input_grads))
        outputs = self.call(*inputs)
        st.inputs, st.outputs = inputs, tuple(outputs)
        if not self.last:
            return 0.0
        value = self.loss(self.unflatten(list(outputs)), labels)
        scale = (rows[1] - rows[0]) / self.batch if self.loss_reduction == "mean" else 1.0
        st.loss = value * scale
        return st.loss.item()

    def _few_rows(self, mb: int, rows: tuple[int, int]) -> None:
        """Refuse an F over rows a batch-statistics layer cannot take; warn of one it takes badly."""
        n = rows[1] - rows[0]
        where = f"stage {self.stage.index}" + (f" on device {self.device!r}" if self.device else "")
        plural = "s" if n != 1 else ""
        for b in self._batch_stats:
            if not b.takes(n):
                raise InputError(f"{where}: F of micro-batch {mb} over {n} row{plural} (r{rows[0]}:{rows[1]}), but "
                                 f"{b.module} normalizes over the rows it is given and {n} row{plural} give it one "
                                 "value per channel (torch refuses this in training: it would output its bias and "
                                 f"pass no gradient back); give every device of stage {self.stage.index} at least "
                                 f"{MIN_BATCH_STAT_ROWS} rows")
        if not self._warned:
            self._warned = True
            b = self._batch_stats[0]
            log.warning("%s: F over %d row%s: %s normalizes over %d values per channel, and its batch statistics "
                        "are noisy; give every device of stage %d at least %d rows", where, n, plural, b.module,
                        n * b.values_per_row, self.stage.index, MIN_BATCH_STAT_ROWS)

    def backward(self, mb: int, rows: tuple[int, int] | None = None) -> None:
        """B of micro-batch ``mb`` on ``rows`` (a chunk; default: the first): from its loss (last
        stage) or from the output gradients received."""
        k = self.chunk_of(rows) if rows is not None else 0
        self._switch(k)
        st = self.mb(mb, k)
        if st.loss is not None:
            st.loss.backward()
        else:
            pieces = [st.grads_in[r] for r in sorted(st.grads_in)]
            tensors, grads = [], []
            for j, i in enumerate(self._grad_outputs):
                if st.outputs[i].requires_grad:
                    tensors.append(st.outputs[i])
                    grads.append(joined(pieces, j))
            if tensors:
                torch.autograd.backward(tensors, grads)
        if self._grad_inputs:
            st.input_grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t)
                                   for t in (st.inputs[i] for i in self._grad_inputs))
        st.outputs, st.loss, st.grads_in = (), None, {}

    def receive(self, mb: int, payload: str, rows: tuple[int, int], tensors: tuple[torch.Tensor, ...]) -> None:
        """File a RECV's row slice: activations for F ("act") or output gradients for B ("grad")."""
        st = self.mb(mb, self.chunk_of(rows))
        (st.received if payload == "act" else st.grads_in)[rows] = tensors

    def outgoing(self, mb: int, payload: str, rows: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """A SEND's ``rows`` (of the micro-batch, inside one chunk) of the outputs ("act") or of
        the input gradients ("grad"), detached."""
        k = self.chunk_of(rows)
        st = self.mb(mb, k)
        source = st.outputs if payload == "act" else st.input_grads
        sl = slice(rows[0] - self.chunks[k][0], rows[1] - self.chunks[k][0])
        return tuple(t[sl].detach() for t in source)

    def step(self, iteration: int = 0) -> None:
        """STEP of ``iteration``: the optimizer steps at that iteration's learning rates and the
        gradients are cleared."""
        if self.optimizer is not None:
            if self.set_lr is not None:
                self.set_lr(self.optimizer, iteration)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def grad_square_norm(self, skip: Collection[str] = ()) -> torch.Tensor:
        """The sum of the squared 2-norms of the replica's gradients (a float64 scalar on their
        device): each parameter once, however many names it has, leaving out those named in
        ``skip`` (tied weights another stage counts) and those without a gradient."""
        named = dict(self.module.named_parameters(remove_duplicate=False))
        left_out = {id(named[n]) for n in skip if n in named}
        total = torch.zeros((), dtype=torch.float64, device=self._device())
        for p in self.module.parameters():
            if p.grad is not None and id(p) not in left_out:
                total += torch.linalg.vector_norm(p.grad).double() ** 2
        return total

    def scale_grads(self, coef: float) -> None:
        """Multiply every gradient by ``coef`` (a NORM's clip coefficient; 1: nothing to do)."""
        if coef >= 1.0:
            return
        with torch.no_grad():
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)

    def _device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def rollback(self, held: StateCopy, device: str, iteration: int) -> None:
        """ROLLBACK: every name of the replica from ``held``, the copies of the iteration's start."""
        missing = held.load_into(self.module, self.optimizer)
        if missing:
            raise BackendError(f"{device} cannot roll back stage {self.stage.index} to the start of iteration "
                               f"{iteration}: it holds no copy of {', '.join(missing[:4])}"
                               f"{' ...' if len(missing) > 4 else ''}; a RESTORE of that state must come before "
                               "its ROLLBACK")

    def state_dict(self, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()
                if keys is None or k in keys}

    def load(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Copy the replica's parameters and buffers from ``state`` in place (their storage stays:
        the optimizer's references and torch_dist's flat state stay valid); returns the names it
        lacks, loading nothing then."""
        named = [*self.module.named_parameters(remove_duplicate=False),
                 *self.module.named_buffers(remove_duplicate=False)]
        missing = [n for n, _ in named if n not in state]
        if missing:
            return missing
        with torch.no_grad():
            for n, t in named:
                t.copy_(state[n])
        for p in self.module.parameters():
            p.grad = None
        return []
