"""DistWorker: one device's side of a Program on torch.distributed (a ``backends.base.Runner``).

Same meaning as the local backend (backends/local.py), action by action; F and B run through
``backends.stage.StageReplica``, messages go through a ``backends.base.Comm`` (``gloo.Comm``):
  SEND       the row slice (contiguous copies) posted to the peer, completed before the iteration
             ends, so compute goes on while the bytes travel;
  RECV       receives into buffers allocated from the action's specs and rows, waited on at once
             (the device needs the data for its next compute). The receives are posted ahead: gloo
             moves a message's bytes only once its receive is posted, so a receive posted at its
             action would stall for the whole transfer. When an iteration starts, its receives are
             posted in order as long as their buffers add up to at most ``post_ahead_bytes``
             (64 MiB by default), and each RECV tops them up again; the next receive is posted
             whatever its size. A run of consecutive RECVs (one micro-batch's row slices from
             several peers) counts as one receive. Posted at the start, the peers learn of every
             receive before they send: no notice of a receive then reaches a sender in the middle
             of its sends (see ``gloo.Comm`` for why that matters);
  ALLREDUCE  the gradients of every chunk of the stage (one per device where the stage has no
             split) summed in row order, flat, over the stage's group (``gloo.Comm.sum_stage_chunks``:
             the same sum bit for bit whichever device holds which chunk; a device alone in its
             stage adds its chunks itself), then the floating buffers averaged over the chunks alike;
  TIE        one flat all-reduce of the tied weights' gradients over their holders' group, the
             stage's first device bringing its gradients and the others zeros (local rule);
  NORM       one all-reduce of a float64 over every device of the program: the stage's first
             device brings its squared gradient norm (a tied weight left out where an earlier
             stage holds it), the others zero; then every device scales its gradients by the clip
             coefficient of the sum (local rule, ``stage.clip_coef``);
  STEP       the device's optimizer;
  BACKUP     a copy of the stage (parameters, buffers, optimizer state, by model name) to the
             holder, as one message: a small header (iteration tag), then the tensors packed into
             one segment per dtype (the packing is the copy, ``flat_state.FlatState``). Where each
             tensor lies (``StateLayout``) follows from a JSON list of names, dtypes and shapes that
             travels once per link and is kept by both ends; never a pickle. Completed before the
             iteration ends, like a SEND;
  RESTORE    waits for such a copy and files it, once complete, under the iteration it starts (local
             backend rule). Its receive is posted when the iteration starts (``drop_copies_before``),
             so the bytes travel while the holder computes and the wait at its end is short;
  ROLLBACK   loads the copies filed under the iteration being redone, name by name.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from asteroid_fx.backends.base import BackendError, Comm
from asteroid_fx.backends.stage import StageReplica, clip_coef
from asteroid_fx.backends.state import OptimizerSettings, OptimizerSpec, StateCopy, make_optimizer, trained_parameters
from asteroid_fx.backends.torch_dist.emulation import PACED, Emulation, pad, wait_until
from asteroid_fx.backends.torch_dist.flat_state import FlatState, state_from_message
from asteroid_fx.backends.torch_dist.gloo import Comm as GlooComm
from asteroid_fx.backends.torch_dist.messages import (
    COPY,
    DTYPES,
    HEADER_BYTES,
    LAYOUT,
    StateLayout,
    message_bytes,
    read_header,
    write_header,
)
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program import Action, Op, Program, tied_elsewhere
from asteroid_fx.passes.direct_calls import direct_calls


class DistWorker:
    """One device's side of a Program (a ``backends.base.Runner``). ``stages`` are the split stage modules of ``program``'s
    stage table (every rank compiles the same model the same way; only this device's stage is
    copied and trained here). ``copies`` (iteration tag -> StateCopy) are the rollback points
    and backups this device holds; a worker built after a rewrite takes over its predecessor's.
    ``comm`` (any ``backends.base.Comm``) defaults to the gloo groups of torch.distributed's
    default group.
    ``fault`` (for tests and benchmarks) is called before every action with (iteration, index)."""

    def __init__(self, program: Program, stages: Sequence, device: str, *, loss: Callable,
                 unflatten: Callable, input_names: Sequence[str], optimizer: OptimizerSpec = "sgd",
                 lr: float = 1e-3, loss_reduction: str = "mean", torch_device: str = "cpu",
                 emulation: Emulation | None = None, copies: dict[int, StateCopy] | None = None,
                 comm: Comm | None = None, fault: Callable[[int, int], None] | None = None,
                 post_ahead_bytes: int = 64 << 20):
        if program.virtual_stages:  # one replica per worker; the local backend holds one per stage
            raise BackendError("this program has a device holding several stages (virtual stages), which run on "
                               "the local backend only for now; give every device one stage to run it on torch_dist")
        self.program = program
        self.post_ahead_bytes = post_ahead_bytes
        self.device = device
        self.comm = comm if comm is not None else GlooComm.default_group(program, device)
        self.info = program.stage_of(device)
        self.slot = program.slot_of(device)
        self.stage = stages[self.info.index]
        self.last = self.info.index == len(program.stages) - 1
        self.input_index = {name: i for i, name in enumerate(input_names)}
        self.torch_device = torch.device(torch_device)
        self.emulation = emulation
        self.link_free_at = 0.0
        self.lag_s = 0.0  # compute time beyond what the emulated device would take
        self.module = copy.deepcopy(self.stage.module).to(self.torch_device)
        self.module.train()
        self.optimizer = make_optimizer(optimizer, trained_parameters(self.module), lr)
        self.flat = FlatState(self.module, self.optimizer)  # what a rollback point or a backup copies
        # what F runs: the replica's graph with its tensors bound once (they are the optimizer's,
        # updated in place for the worker's life) and ops called through torch's own bindings
        self._direct = direct_calls(self.module)
        self._bound = self._direct.bind(self.module)
        self.replica = StageReplica(self.stage, self.module, self.optimizer, last=self.last, loss=loss,
                                    unflatten=unflatten, chunks=self.info.chunks_of(device),
                                    loss_reduction=loss_reduction,
                                    call=functools.partial(self._direct.module, *self._bound), device=device,
                                    set_lr=optimizer.set_lr if isinstance(optimizer, OptimizerSettings) else None)
        # what this device's NORM leaves out: tied weights an earlier stage counts
        self._norm_skip = tied_elsewhere(program).get(self.info.index, frozenset())
        self.iteration = 0
        self.copies: dict[int, StateCopy] = {} if copies is None else copies
        self.fault = fault
        self.done = 0  # actions completed in the current iteration (a failure's progress)
        self._runs: dict[tuple[int, tuple[Action, ...]], _Prepared] = {}
        # where stage 0's inputs are among the model's, which every micro-batch would look up again
        self._input_positions = tuple(self.input_index[n] for n in self.stage.inputs) if self.info.index == 0 else ()
        # backups, per link (process group, stage, peer): the layout of the last copy sent or
        # received on it, and the holder's receive posted ahead for the next copy
        self._sent_layouts: dict[tuple, StateLayout] = {}
        self._held_layouts: dict[tuple, StateLayout] = {}
        self._restoring: dict[tuple, tuple[torch.Tensor, Any]] = {}
        self._sent: tuple[int, StateLayout, torch.Tensor] | None = None  # the last copy sent after a STEP

    def swap(self, program: Program) -> None:
        """Run ``program`` from the next iteration on, over the same process groups and with the
        stage's module and optimizer as they are: a program over the same stages on the same
        devices (passes/remainder.same_stages), whose rows and micro-batching may differ (an
        epoch's last partial batch, passes/remainder.py). Swapping back is the same call with the
        running program."""
        from asteroid_fx.passes.remainder import same_stages

        why = same_stages(self.program, program)
        if why is not None:
            raise BackendError(f"{self.device}: cannot swap in a program that moves stages: {why}")
        self.program = program
        self.info, self.slot = program.stage_of(self.device), program.slot_of(self.device)
        self.replica.rechunk(self.info.chunks_of(self.device))

    def take_point(self, iteration: int) -> None:
        """File the stage's current state as the rollback point of ``iteration`` (its start)."""
        sent, self._sent = self._sent, None
        if sent is not None and sent[0] == iteration:
            # a copy sent after this iteration's STEP is the state the next one starts from: the
            # same bytes serve as the rollback point, without a second copy
            _, layout, buf = sent
        else:
            layout, buf = self.flat.copy()
        self._file(iteration, layout, buf)

    def _file(self, tag: int, layout: StateLayout, buf: torch.Tensor) -> None:
        # kept packed: only a rollback or a hand-over reads a copy by name
        point = StateCopy.later(lambda: state_from_message(layout.meta, layout.unpack(buf)))
        if tag in self.copies:
            self.copies[tag].update(point)
        else:
            self.copies[tag] = point

    def drop_copies_before(self, iteration: int) -> None:
        """Drop the copies no rollback can need any more (every device has finished the iteration
        before ``iteration``), then post the receives of the next backups this device holds, in
        the memory they leave: the bytes move as soon as each sender sends, while this device
        computes, and a holder never holds more than two copies of a stage."""
        for tag in [t for t in self.copies if t < iteration]:
            del self.copies[tag]
        for (comm, stage, peer), layout in self._held_layouts.items():
            if comm is self.comm and (comm, stage, peer) not in self._restoring:
                self._restoring[(comm, stage, peer)] = self._post_restore(peer, stage, layout.nbytes)

    def step(self, inputs: Sequence[torch.Tensor], labels: Any, *, iteration: int | None = None,
             actions: Mapping[str, Sequence[Action]] | None = None,
             stop: Mapping[str, int] | None = None) -> float:
        """One iteration (``base.Runner.step``): the program's actions, or ``actions[device]`` over
        the same stage table; returns this device's share of the loss (0 off the last stage). With
        ``stop`` the device stops after ``stop[device]`` actions, as a failure leaves it: what it
        sent and posted is not waited for, and this epoch's groups are to be dropped."""
        p = self.program
        if iteration is None:
            iteration = self.iteration
        mine = actions.get(self.device) if actions is not None else None
        actions = tuple(p.of(self.device) if mine is None else mine)
        limit = len(actions) if stop is None else min(stop.get(self.device, 0), len(actions))
        # keyed by the micro-batch size too: a swapped-in program's rows are cut from other batches
        prepared = self._runs.get((p.microbatch_rows, actions))
        if prepared is None:
            prepared = self._runs[(p.microbatch_rows, actions)] = _Prepared.of(actions, p.microbatch_rows,
                                                                               self.post_ahead_bytes)
        self._prepared, self.receives, self._receive_of = prepared, prepared.receives, prepared.receive_of
        self.iteration, self._stepped = iteration, False
        self._inputs, self._labels = tuple(inputs), labels
        self._pieces: dict[int, tuple[torch.Tensor, ...]] = {}
        self.replica.begin(p.microbatches * p.microbatch_rows)
        self._sends: list[Any] = []
        self._loss = 0.0
        self._posted: dict[Action, tuple] = {}
        self._posted_through = -1
        self._post_through(prepared.reach[0])
        fault, emulation = self.fault, self.emulation
        for k, (run, a) in enumerate(zip(prepared.handlers, actions)):
            if k == limit:
                self.done = k
                return self._loss
            self.done = k
            if fault is not None:
                fault(iteration, k)
            if emulation is None:
                run(self, a)
                continue
            started = time.perf_counter()
            run(self, a)
            if a.op in PACED:
                self._pace(a, time.perf_counter() - started)
        self.done = len(actions)
        self.comm.wait_all(self._sends)
        self.iteration = iteration + 1
        return self._loss

    def _pace(self, a: Action, took: float) -> None:
        if a.op in (Op.ALLREDUCE, Op.TIE):
            if not self.emulation.links:
                return
            target = (self.emulation.allreduce_s(a.group, self.info.layers) if a.op == Op.ALLREDUCE
                      else self.emulation.tie_s(a))
        else:
            target = self.emulation.compute_s(self.device, a, self.info.layers)
        self.lag_s += pad(took, target)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.torch_device else t.to(self.torch_device)

    def _rows(self, mb: int, rows: tuple[int, int]) -> slice:
        base = mb * self.program.microbatch_rows
        return slice(base + rows[0], base + rows[1])

    def _batch_rows(self, which: int, t: Any, a: Action) -> Any:
        """The rows ``a`` reads of a whole-batch value (stage 0's input ``which``, or the labels as
        -1): the step's one split of it serves every F whose rows are one of its pieces."""
        piece = self._prepared.piece_of.get((a.mb, a.rows))
        if piece is None or not isinstance(t, torch.Tensor):
            return self._on_device(t[self._rows(a.mb, a.rows)])
        pieces = self._pieces.get(which)
        if pieces is None:
            pieces = self._pieces[which] = t.tensor_split(self._prepared.cuts)
        return self._on_device(pieces[piece])

    def _forward(self, a: Action) -> None:
        inputs = labels = None
        if a.stage == 0:
            inputs = tuple(self._batch_rows(i, self._inputs[i], a) for i in self._input_positions)
        if self.last:
            labels = self._batch_rows(-1, self._labels, a)
        self._loss += self.replica.forward(a.mb, a.rows, inputs, labels)

    def _backward(self, a: Action) -> None:
        self.replica.backward(a.mb, a.rows)

    def _arrival(self, peer: str, nbytes: int) -> float:
        """When a message of ``nbytes`` sent now to ``peer`` arrives over the emulated link (0: when
        it arrives over a shaped one)."""
        if not self.emulation.links:
            return 0.0
        bandwidth, latency = self.emulation.link(self.device, peer)
        start = max(time.time(), self.link_free_at)
        self.link_free_at = start + nbytes / bandwidth
        return self.link_free_at + latency

    def _send(self, a: Action) -> None:
        tensors = [t.contiguous() for t in self.replica.outgoing(a.mb, a.payload, a.rows)]
        arrive = None
        if self.emulation is not None:
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            arrive = torch.tensor([self._arrival(a.peer, nbytes)], dtype=torch.float64)
        self._sends.extend(self.comm.send_rows(a, tensors, arrive))

    def _post_through(self, k: int) -> None:
        """Post the irecvs of every receive up to the k-th (in this device's action order)."""
        while self._posted_through < min(k, len(self.receives) - 1):
            self._posted_through += 1
            for a in self.receives[self._posted_through]:
                self._posted[a] = self._post(a)

    def _post(self, a: Action) -> tuple:
        rows = a.rows[1] - a.rows[0]
        bufs = tuple(torch.empty((rows, *spec.shape), dtype=DTYPES[spec.dtype], device=self.torch_device)
                     for spec in a.specs)
        arrive = torch.empty(1, dtype=torch.float64) if self.emulation is not None else None
        return bufs, self.comm.recv_rows(a, bufs, arrive), arrive

    def _recv(self, a: Action) -> None:
        self._post_through(self._prepared.reach[self._receive_of[a] + 1])
        bufs, works, arrive = self._posted.pop(a)
        self.comm.wait_all(works)
        if arrive is not None:
            wait_until(float(arrive))
        self.replica.receive(a.mb, a.payload, a.rows, bufs)

    def _allreduce(self, a: Action) -> None:
        # every chunk of the stage summed in row order (gloo.Comm.sum_stage_chunks where the stage
        # has a group, here for a device alone in it): the same sum whoever holds which chunk
        alone = len(a.group) == 1
        everything = list(self.module.parameters())
        trained = [i for i, p in enumerate(everything) if p.requires_grad]
        sums: list[torch.Tensor | None] = [None] * len(everything)
        if trained:
            flats = [torch.cat([(c[i] if c[i] is not None else torch.zeros_like(everything[i])).reshape(-1)
                                for i in trained])
                     for c in self.replica.chunk_grads()]
            flat = self._sum_chunks(flats, alone)
            offset = 0
            for i in trained:
                n = everything[i].numel()
                sums[i] = flat[offset:offset + n].view_as(everything[i]).clone()
                offset += n
        buffers = self.replica.chunk_buffers()
        means = None
        if buffers and buffers[0]:
            flat = self._sum_chunks([torch.cat([b.reshape(-1) for b in chunk]) for chunk in buffers], alone)
            flat /= len(self.info.chunks)
            means, offset = [], 0
            for b in buffers[0]:
                means.append(flat[offset:offset + b.numel()].view_as(b).clone())
                offset += b.numel()
        self.replica.settle(sums, means)

    def _sum_chunks(self, flats: list[torch.Tensor], alone: bool) -> torch.Tensor:
        if not alone:
            return self.comm.sum_stage_chunks(flats, self.info)
        total = flats[0].clone() if len(flats) > 1 else flats[0]
        for f in flats[1:]:
            total += f
        return total

    def _tie(self, a: Action) -> None:
        # the stage's first device brings the stage's sum (after its ALLREDUCE every device of the
        # stage holds it), the others zeros: the sum over the holders counts each stage once
        named = dict(self.module.named_parameters(remove_duplicate=False))
        params = [named[n] for n in a.params]
        first = self.slot.device == self.info.slots[0].device
        grads = [p.grad if first and p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.comm.allreduce_tie(a.group, [flat])
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def _norm(self, a: Action) -> None:
        first = self.slot.device == self.info.slots[0].device  # the stage counts once
        square = (self.replica.grad_square_norm(self._norm_skip).reshape(1) if first
                  else torch.zeros(1, dtype=torch.float64, device=self.torch_device))
        self.comm.allreduce_norm([square])
        self.replica.scale_grads(clip_coef(float(square), a.max_norm))

    def _step(self, a: Action) -> None:
        self.replica.step(self.iteration)
        self._stepped = True

    def _backup(self, a: Action) -> None:
        # tagged like the local backend: the iteration this state starts
        tag = self.iteration + self._stepped
        layout, buf = self.flat.copy()  # the copy: what the next iteration starts from, whatever runs after
        link = (self.comm, a.stage, a.peer)
        known = self._sent_layouts.get(link)
        if known is None or known.meta != layout.meta:
            # the holder has posted a receive of the size it knows: announce the new layout in it
            body = json.dumps(layout.meta).encode()
            notice = torch.zeros(HEADER_BYTES if known is None else known.nbytes, dtype=torch.uint8)
            write_header(notice, (LAYOUT, tag, 0.0, len(body)))
            self._sends.append(self.comm.send_state(a.peer, a.stage, notice))
            self._sends.append(self.comm.send_state(a.peer, a.stage, torch.frombuffer(bytearray(body), dtype=torch.uint8),
                                                    part=1))
            self._sent_layouts[link] = layout
        arrive = self._arrival(a.peer, layout.nbytes) if self.emulation is not None else 0.0
        write_header(buf, (COPY, tag, arrive))
        self._sends.append(self.comm.send_state(a.peer, a.stage, buf))
        if self._stepped:  # nothing changes the stage after its STEP: take_point may file this copy
            self._sent = (tag, layout, buf)

    def _restore(self, a: Action) -> None:
        link = (self.comm, a.stage, a.peer)
        layout = self._held_layouts.get(link)
        posted = self._restoring.pop(link, None)  # posted ahead by drop_copies_before
        if posted is None:
            posted = self._post_restore(a.peer, a.stage, HEADER_BYTES if layout is None else layout.nbytes)
        buf, work = posted
        self.comm.wait(work)
        what, tag, arrive, body_bytes = read_header(buf)
        if what == LAYOUT:
            body = torch.empty(int(body_bytes), dtype=torch.uint8)
            self.comm.wait(self.comm.recv_state(a.peer, a.stage, body, part=1))
            self._held_layouts[link] = layout = StateLayout.of(json.loads(bytes(body.numpy()).decode()))
            buf, work = self._post_restore(a.peer, a.stage, layout.nbytes)
            self.comm.wait(work)
            what, tag, arrive, _ = read_header(buf)
        if what != COPY or layout is None:
            raise BackendError(f"{self.device}: the backup of stage {a.stage} from {a.peer} is not a state copy "
                               f"(header {what:g}); both ends must run the same asteroid_fx version")
        wait_until(arrive)
        # filed only once every byte is here: a copy cut off by a failure never serves a rollback
        self._file(int(tag), layout, buf)

    def _post_restore(self, peer: str, stage: int, nbytes: int) -> tuple[torch.Tensor, Any]:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf, self.comm.recv_state(peer, stage, buf)

    def _rollback(self, a: Action) -> None:
        self.replica.rollback(self.copies.get(self.iteration, StateCopy()), self.device, self.iteration)

    def state_dict(self, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        """This device's stage's parameters and buffers, by model name, on the host."""
        return self.replica.state_dict(keys)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """The stage's parameters and buffers from ``state``, by model name (``base.Runner.load``)."""
        missing = self.replica.load(state)
        if missing:
            raise InputError(f"the state to load has no {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                             f"(stage {self.info.index} on {self.device}); give the model's whole state_dict")


class _Prepared(NamedTuple):
    """An action list made ready to run once: each action's handler; its receives
    (``receive_runs``) with the run each RECV belongs to, and how far to post them ahead; and the
    rows its F actions read of the batch (stage 0's inputs, the last stage's labels), as the points
    one ``tensor_split`` of a whole-batch tensor cuts at and the piece each F's (micro-batch, rows)
    is, where it is one: a split makes every view in one call, where slicing per F costs a call each."""

    handlers: tuple[Callable, ...]
    receives: tuple[tuple[Action, ...], ...]
    receive_of: dict[Action, int]
    # reach[k]: the last receive to have posted once receive k - 1 is being waited on (reach[0]:
    # when the iteration starts): the next one, and those after it while their buffers fit the budget
    reach: tuple[int, ...]
    cuts: tuple[int, ...]
    piece_of: dict[tuple[int, tuple[int, int]], int]

    @classmethod
    def of(cls, actions: tuple[Action, ...], microbatch_rows: int, post_ahead_bytes: int) -> _Prepared:
        runs = receive_runs(actions)
        sizes = [sum(message_bytes(a) for a in run) for run in runs]
        reach = []
        for k in range(len(runs) + 1):
            last, held = k, sizes[k] if k < len(runs) else 0
            while last + 1 < len(runs) and held + sizes[last + 1] <= post_ahead_bytes:
                last += 1
                held += sizes[last]
            reach.append(last)
        spans = {(a.mb, a.rows): (a.mb * microbatch_rows + a.rows[0], a.mb * microbatch_rows + a.rows[1])
                 for a in actions if a.op == Op.F}
        edges = sorted({0, *(row for span in spans.values() for row in span)})
        piece_of = {key: edges.index(lo) for key, (lo, hi) in spans.items()
                    if edges.index(lo) + 1 < len(edges) and edges[edges.index(lo) + 1] == hi}
        return cls(tuple(ACTIONS[a.op] for a in actions), runs, {a: k for k, run in enumerate(runs) for a in run},
                   tuple(reach), tuple(edges[1:]), piece_of)


def receive_runs(actions: Sequence[Action]) -> tuple[tuple[Action, ...], ...]:
    """The device's RECVs in order, consecutive ones (nothing else between them) as one run."""
    runs: list[list[Action]] = []
    previous = None
    for a in actions:
        if a.op == Op.RECV:
            if previous != Op.RECV:
                runs.append([])
            runs[-1].append(a)
        previous = a.op
    return tuple(tuple(run) for run in runs)


ACTIONS: dict[Op, Callable[[DistWorker, Action], None]] = {
    Op.F: DistWorker._forward,
    Op.B: DistWorker._backward,
    Op.SEND: DistWorker._send,
    Op.RECV: DistWorker._recv,
    Op.ALLREDUCE: DistWorker._allreduce,
    Op.STEP: DistWorker._step,
    Op.TIE: DistWorker._tie,
    Op.NORM: DistWorker._norm,
    Op.BACKUP: DistWorker._backup,
    Op.RESTORE: DistWorker._restore,
    Op.ROLLBACK: DistWorker._rollback,
}
