"""torch_dist backend: every device is one process that runs its own action list on
torch.distributed (gloo on CPU, nccl on CUDA).

Same meaning as the local backend (backends/local.py), action by action:
  SEND       isend of each tensor of the row slice (contiguous copies), completed before the
             iteration ends, so compute goes on while the bytes travel;
  RECV       irecv into buffers allocated from the action's specs and rows, waited on at once
             (the device needs the data for its next compute). The irecvs are posted one receive
             ahead: gloo moves a message's bytes only once its receive is posted, so a receive
             posted at its action would stall for the whole transfer; posted while the previous
             compute runs, the bytes arrive meanwhile. A run of consecutive RECVs (one
             micro-batch's row slices from several peers) counts as one receive; at most one
             receive beyond the current one is in flight, so memory grows by one message;
  ALLREDUCE  one flat all_reduce of the stage's gradients on the group's sub-group (created once,
             in the same order on every rank), then the group's floating buffers are averaged;
  STEP       the device's optimizer.
Tags keep messages apart: (stage, micro-batch, payload, tensor index) -> one int per message, the
same on both sides.

Emulation (``Emulation``): a worker can stand in for a slower device of the cluster. Compute is
padded to the cost model's time for the emulated device kind (a host faster than the emulated
device sleeps the difference; a slower one cannot and the lag is counted); every message carries
the time it would arrive over the emulated link (sender's link busy until its previous message
has gone, then latency + bytes / bandwidth), and the receiver waits until then; an all-reduce is
padded to the ring time of the group's slowest link.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from asteroid_fx.backends.local import OptimizerSpec, make_optimizer
from asteroid_fx.program import Action, Op, Program

DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32",
                                                  "int16", "int8", "uint8", "bool")}


def message_tag(a: Action, index: int) -> int:
    """One tag per tensor of a message; identical on the sending and the receiving side."""
    payload = 0 if a.payload == "act" else 1
    return ((a.stage * 1_000_003 + a.mb) * 2 + payload) * 64 + index


@dataclasses.dataclass(frozen=True)
class Emulation:
    """Pace a worker like the cluster's device: costs from the LayerGraph, links from the Cluster."""

    layer_graph: Any
    cluster: Any

    def compute_s(self, device: str, a: Action, layers: tuple[int, int]) -> float:
        kind = self.cluster.device(device).kind
        fit = self.layer_graph.fwd if a.op == Op.F else self.layer_graph.bwd
        return fit(kind, *layers)(a.rows[1] - a.rows[0])

    def allreduce_s(self, group: Sequence[str], layers: tuple[int, int]) -> float:
        from asteroid_fx.estimate import ring_allreduce_s

        return ring_allreduce_s(self.cluster, group, self.layer_graph.param_bytes(*layers))


@dataclasses.dataclass
class _Pending:
    received: dict[tuple[int, int], tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    grads_in: dict[tuple[int, int], tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    inputs: tuple[torch.Tensor, ...] = ()
    outputs: tuple[Any, ...] = ()
    loss: torch.Tensor | None = None
    input_grads: tuple[torch.Tensor, ...] = ()


class DistWorker:
    """One device's side of a Program. ``stages`` are the split stage modules (every rank compiles
    the same model the same way; only this device's stage is copied and trained here)."""

    def __init__(self, program: Program, stages: Sequence, device: str, *, loss: Callable,
                 unflatten: Callable, input_names: Sequence[str], optimizer: OptimizerSpec = "sgd",
                 lr: float = 1e-3, loss_reduction: str = "mean", torch_device: str = "cpu",
                 emulation: Emulation | None = None):
        self.program = program
        self.device = device
        self.rank_of = {d: i for i, d in enumerate(program.devices)}
        self.rank = self.rank_of[device]
        self.info = program.stage_of(device)
        self.slot = program.slot_of(device)
        self.stage = stages[self.info.index]
        self.last = self.info.index == len(program.stages) - 1
        self.loss_fn, self.unflatten, self.loss_reduction = loss, unflatten, loss_reduction
        self.input_index = {name: i for i, name in enumerate(input_names)}
        self.torch_device = torch.device(torch_device)
        self.emulation = emulation
        self.link_free_at = 0.0
        self.lag_s = 0.0  # compute time beyond what the emulated device would take
        self.module = copy.deepcopy(self.stage.module).to(self.torch_device)
        self.module.train()
        self.optimizer = make_optimizer(optimizer, [p for p in self.module.parameters() if p.requires_grad], lr)
        self.receives = receive_runs(program.of(device))
        self._receive_of = {a: k for k, run in enumerate(self.receives) for a in run}
        # every rank creates every group, in stage order: new_group is collective over the world
        self.group = None
        for info in program.stages:
            if len(info.slots) > 1:
                g = dist.new_group([self.rank_of[d] for d in info.devices])
                if info.index == self.info.index:
                    self.group = g

    def step(self, inputs: Sequence[torch.Tensor], labels: Any) -> float:
        """One iteration; returns this device's share of the loss (0 off the last stage)."""
        p = self.program
        self._inputs, self._labels = tuple(inputs), labels
        self._batch = p.microbatches * p.microbatch_rows
        self._state: dict[int, _Pending] = {}
        self._sends: list[dist.Work] = []
        self._loss = 0.0
        self._posted: dict[Action, tuple] = {}
        self._posted_through = -1
        self._post_through(0)
        for a in p.of(self.device):
            started = time.perf_counter()
            ACTIONS[a.op](self, a)
            if self.emulation is not None and a.op in (Op.F, Op.B, Op.ALLREDUCE):
                self._pace(a, time.perf_counter() - started)
        for w in self._sends:
            w.wait()
        return self._loss

    def _pace(self, a: Action, took: float) -> None:
        if a.op == Op.ALLREDUCE:
            target = self.emulation.allreduce_s(a.group, self.info.layers)
        else:
            target = self.emulation.compute_s(self.device, a, self.info.layers)
        if took < target:
            time.sleep(target - took)
        else:
            self.lag_s += took - target

    def _mb(self, mb: int) -> _Pending:
        return self._state.setdefault(mb, _Pending())

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.torch_device else t.to(self.torch_device)

    def _rows(self, mb: int, rows: tuple[int, int]) -> slice:
        base = mb * self.program.microbatch_rows
        return slice(base + rows[0], base + rows[1])

    def _forward(self, a: Action) -> None:
        st = self._mb(a.mb)
        if a.stage == 0:
            sl = self._rows(a.mb, a.rows)
            inputs = tuple(self._on_device(self._inputs[self.input_index[n]][sl]) for n in self.stage.inputs)
        else:
            pieces = [st.received[r] for r in sorted(st.received)]
            inputs = tuple(joined(pieces, i) for i in range(len(self.stage.inputs)))
            st.received.clear()
        # a data input that needs no gradient is used as is: detaching it would only cost time
        inputs = tuple(t.detach().requires_grad_(g) if g or t.requires_grad else t
                       for t, g in zip(inputs, self.stage.input_grads))
        outputs = self.module(*inputs)
        st.inputs, st.outputs = inputs, tuple(outputs)
        if self.last:
            labels = self._on_device(self._labels[self._rows(a.mb, a.rows)])
            value = self.loss_fn(self.unflatten(list(outputs)), labels)
            scale = (a.rows[1] - a.rows[0]) / self._batch if self.loss_reduction == "mean" else 1.0
            st.loss = value * scale
            self._loss += float(st.loss.detach())

    def _backward(self, a: Action) -> None:
        st = self._mb(a.mb)
        if st.loss is not None:
            st.loss.backward()
        else:
            pieces = [st.grads_in[r] for r in sorted(st.grads_in)]
            needing = [i for i, g in enumerate(self.stage.output_grads) if g]
            tensors, grads = [], []
            for j, i in enumerate(needing):
                if st.outputs[i].requires_grad:
                    tensors.append(st.outputs[i])
                    grads.append(joined(pieces, j))
            if tensors:
                torch.autograd.backward(tensors, grads)
        st.input_grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t)
                               for t, g in zip(st.inputs, self.stage.input_grads) if g)
        st.outputs, st.loss, st.grads_in = (), None, {}

    def _send(self, a: Action) -> None:
        st = self._mb(a.mb)
        sl = slice(a.rows[0] - self.slot.lo, a.rows[1] - self.slot.lo)
        source = st.outputs if a.payload == "act" else st.input_grads
        tensors = [t[sl].detach().contiguous() for t in source]
        if self.emulation is not None:
            bandwidth, latency = self.emulation.cluster.link(self.device, a.peer)
            start = max(time.time(), self.link_free_at)
            self.link_free_at = start + sum(t.numel() * t.element_size() for t in tensors) / bandwidth
            arrive = torch.tensor([self.link_free_at + latency], dtype=torch.float64)
            self._sends.append(dist.isend(arrive, self.rank_of[a.peer], tag=message_tag(a, 63)))
        for i, t in enumerate(tensors):
            self._sends.append(dist.isend(t, self.rank_of[a.peer], tag=message_tag(a, i)))

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
        works = [dist.irecv(b, self.rank_of[a.peer], tag=message_tag(a, i)) for i, b in enumerate(bufs)]
        arrive = None
        if self.emulation is not None:
            arrive = torch.empty(1, dtype=torch.float64)
            works.append(dist.irecv(arrive, self.rank_of[a.peer], tag=message_tag(a, 63)))
        return bufs, works, arrive

    def _recv(self, a: Action) -> None:
        self._post_through(self._receive_of[a] + 1)
        bufs, works, arrive = self._posted.pop(a)
        for w in works:
            w.wait()
        if arrive is not None and float(arrive) > time.time():
            time.sleep(float(arrive) - time.time())
        st = self._mb(a.mb)
        (st.received if a.payload == "act" else st.grads_in)[a.rows] = bufs

    def _allreduce(self, a: Action) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for p, g in zip(params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
                offset += g.numel()
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        if buffers:
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.all_reduce(flat, group=self.group)
            flat /= len(a.group)
            offset = 0
            with torch.no_grad():
                for b in buffers:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    def _step(self, a: Action) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()
                if keys is None or k in keys}


def joined(pieces: list[tuple[torch.Tensor, ...]], i: int) -> torch.Tensor:
    """Tensor i of a micro-batch received as row slices, in row order. One slice (every stage fed
    by one device) is used as received: concatenating it would only copy a buffer nobody else holds."""
    return pieces[0][i] if len(pieces) == 1 else torch.cat([piece[i] for piece in pieces])


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
}


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def init_process_group(host: str, port: int, rank: int, world: int, timeout_s: float = 60.0,
                       backend: str = "gloo") -> dist.TCPStore:
    """Join the run's rendezvous (a TCPStore served by the launcher) and the default group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size=None, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore("asteroid", store), rank=rank, world_size=world,
                            timeout=timeout)
    return store
