"""torch_dist backend: every device is one process that runs its own action list on
torch.distributed, with gloo process groups on CPU tensors. (CUDA devices with nccl are not
supported yet: the early-posted receives below would serialize behind sends on nccl's per-pair
stream, recovery needs gloo's blocking waits, and no GPU has run this backend.)

Same meaning as the local backend (backends/local.py), action by action:
  SEND       isend of each tensor of the row slice (contiguous copies), completed before the
             iteration ends, so compute goes on while the bytes travel;
  RECV       irecv into buffers allocated from the action's specs and rows, waited on at once
             (the device needs the data for its next compute). The irecvs are posted ahead: gloo
             moves a message's bytes only once its receive is posted, so a receive posted at its
             action would stall for the whole transfer. When an iteration starts, its receives are
             posted in order as long as their buffers add up to at most ``post_ahead_bytes``
             (64 MiB by default), and each RECV tops them up again; the next receive is posted
             whatever its size. A run of consecutive RECVs (one micro-batch's row slices from
             several peers) counts as one receive. Posted at the start, the peers learn of every
             receive before they send: no notice of a receive then reaches a sender in the middle
             of its sends (see ``Comm`` for why that matters);
  ALLREDUCE  one flat all_reduce of the stage's gradients on the group's sub-group (created once,
             in the same order on every rank), then the group's floating buffers are averaged;
  STEP       the device's optimizer;
  BACKUP     a copy of the stage (parameters, buffers, optimizer state, by model name) to the
             holder, as one message: a small header (iteration tag), then the tensors packed into
             one segment per dtype (the packing is the copy). Where each tensor lies (``StateLayout``)
             follows from a JSON list of names, dtypes and shapes that travels once per link and is
             kept by both ends; never a pickle. Completed before the iteration ends, like a SEND;
  RESTORE    waits for such a copy and files it, once complete, under the iteration it starts (local
             backend rule). Its receive is posted when the iteration starts (``drop_copies_before``),
             so the bytes travel while the holder computes and the wait at its end is short;
  ROLLBACK   loads the copies filed under the iteration being redone, name by name.
Tags keep messages apart: (stage, micro-batch, payload, tensor index) -> one int per message, the
same on both sides.

Emulation (``Emulation``): a worker can stand in for a slower device of the cluster. Compute is
padded to the cost model's time for the emulated device kind (a host faster than the emulated
device sleeps the difference; a slower one cannot and the lag is counted); every message carries
the time it would arrive over the emulated link (sender's link busy until its previous message
has gone, then latency + bytes / bandwidth), and the receiver waits until then; an all-reduce is
padded to the ring time of the group's slowest link. With a time dilation d every emulated
duration is d times longer (a host slower than the emulated devices can still keep their pace).
A worker whose links are shaped by the kernel (asteroid_fx/netns.py runs it in a network namespace
and says so in its environment) paces only its compute: its messages and all-reduces take the time
they take over the shaped links (``Emulation.links`` is False, every arrival time sent is 0).

Process groups (``Comm``) are plain ``ProcessGroupGloo`` objects over ``PrefixStore(f"epoch{k}",
store)`` of the run's store, one world per membership epoch and one per multi-device stage (or,
without a store, torch.distributed's default group): after a failure the survivors build the
groups of epoch k+1 in place and drop the broken ones. With an ``interrupt`` event a device blocked
on a dead peer's message leaves as soon as the failure is agreed: gloo's send and receive works
report completion only through a blocking wait (a wait with a timeout closes the connection it
waits on), so the heartbeat shuts the process's gloo connections down before it sets the event
(``cut_connections``) and the blocked wait fails at once; where /proc is missing a helper thread
waits on each work while the device watches the event. Building an epoch's groups is
interruptible too: the devices check in through the store first (``Comm._check_in``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import queue
import struct
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from asteroid_fx.backends.local import OptimizerSpec, StateCopy, make_optimizer
from asteroid_fx.passes.direct_calls import direct_calls
from asteroid_fx.ir.program import Action, Op, Program

# Set (to "1") in the environment of a worker whose links the kernel shapes (runtime/netns.py):
# the emulation then paces compute only, since pacing messages too would count the links twice.
SHAPED_LINKS_ENV = "ASTEROID_SHAPED_LINKS"

DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32",
                                                  "int16", "int8", "uint8", "bool")}


def message_tag(a: Action, index: int) -> int:
    """One tag per tensor of a message; identical on the sending and the receiving side."""
    payload = 0 if a.payload == "act" else 1
    return ((a.stage * 4096 + a.mb) * 2 + payload) * 64 + index  # below BACKUP_TAG for < 2048 stages


@dataclasses.dataclass(frozen=True)
class Emulation:
    """Pace a worker like the cluster's device: costs from the LayerGraph, links from the Cluster."""

    layer_graph: Any
    cluster: Any
    # time dilation: every emulated duration (compute, latency, bytes over bandwidth) this many
    # times longer, for a host slower than the devices it emulates; divide measured times by it
    dilation: float = 1.0
    # pace messages and all-reduces too; False where the kernel shapes the links (a worker started
    # in a shaped network has SHAPED_LINKS_ENV set), which pacing them here would count twice
    links: bool = dataclasses.field(default_factory=lambda: os.environ.get(SHAPED_LINKS_ENV) != "1")

    def compute_s(self, device: str, a: Action, layers: tuple[int, int]) -> float:
        kind = self.cluster.device(device).kind
        fit = self.layer_graph.fwd if a.op == Op.F else self.layer_graph.bwd
        return self.dilation * fit(kind, *layers)(a.rows[1] - a.rows[0])

    def allreduce_s(self, group: Sequence[str], layers: tuple[int, int]) -> float:
        from asteroid_fx.cost.estimate import ring_allreduce_s

        return self.dilation * ring_allreduce_s(self.cluster, group, self.layer_graph.param_bytes(*layers))

    def link(self, a: str, b: str) -> tuple[float, float]:
        """(bandwidth, latency) of the emulated link, dilated."""
        bandwidth, latency = self.cluster.link(a, b)
        return bandwidth / self.dilation, latency * self.dilation


class Interrupted(Exception):
    """The run's membership changed (a device failed or left) while this device was waiting."""


CHECK_IN_POLL_S = 0.002  # how often a device building an epoch's groups looks for the others
BACKUP_TAG = 1 << 30  # BACKUP/RESTORE messages: a tag space apart from SEND/RECV's (gloo tags are int32)


class Comm:
    """This device's process groups for one membership epoch: the world (every device of
    ``program``, ranks in program order), a second group over the same devices that carries the
    gradients of SEND/RECV (``grads``, where the program sends any), a third for BACKUP/RESTORE
    (``backups``, where the program has any: a backup goes against the activations' direction on
    some links, and on theirs it would stall them as below), and the group of its stage
    when the stage has several devices. ``interrupt`` (set when a failure is agreed) makes every
    wait raise Interrupted; a wait that fails (a dead peer's connection) raises Interrupted too if
    the failure is agreed within ``grace_s``.

    Activations and gradients go between two devices in opposite directions; on one connection,
    what a device sends would contend with what it receives. gloo handles a connection's reads
    and writes under one lock, which its event-loop thread only tries to take and, failing, polls
    again at once: with more busy threads than cores (workers sharing a host) a thread preempted
    while holding it stalls the sends of its process by milliseconds while the loop spins. Apart,
    each connection carries one direction's messages (and the notices of the receives for them,
    sent before them)."""

    def __init__(self, store: dist.Store, program: Program, device: str, *, epoch: int = 0,
                 timeout_s: float = 60.0, interrupt: threading.Event | None = None, grace_s: float = 5.0,
                 world: Sequence[str] | None = None, name: str = "", suspect: Callable[[], None] | None = None):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.epoch, self.interrupt = epoch, interrupt
        self.suspect = suspect  # told when a connection breaks (Heartbeat.suspect: look at the peers now)
        self.grace_s, self._waiter = grace_s, None
        # ``world``: a wider membership than the program's, for a hand-over between plans
        # (passes/replan.py) where devices that leave or join take part; ``name`` keeps its groups
        # apart from the epoch's own
        self.rank_of = {d: i for i, d in enumerate(program.devices if world is None else world)}
        prefix = f"epoch{epoch}{name}"
        # a connection of the epoch's own: a group whose peer died may block in the store (gloo
        # waits there for the peer to come back) and must not hold up the training loop's store
        store = dist.TCPStore(store.host, store.port, world_size=None, is_master=False, timeout=timeout)
        if interrupt is not None:
            self._check_in(store, prefix, timeout_s)
        self.world = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), self.rank_of[device],
                                           len(self.rank_of), timeout)
        self.grads = None
        if sends_grads(program):
            self.grads = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}/grads", store), self.rank_of[device],
                                               len(self.rank_of), timeout)
        self.backups = None
        if world is None and has_backups(program):
            self.backups = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}/backups", store), self.rank_of[device],
                                                 len(self.rank_of), timeout)
        info = program.stage_of(device) if device in program.devices else None
        self.group = None
        if info is not None and len(info.slots) > 1 and world is None:
            self.group = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}/stage{info.index}", store),
                                               info.devices.index(device), len(info.slots), timeout)

    def _check_in(self, store: dist.Store, prefix: str, timeout_s: float) -> None:
        """Wait until every member has come to build the groups. gloo's own rendezvous waits in
        the store, where no interrupt reaches it, for the whole timeout: a member that died before
        it came would hold the others there. Here a failure agreed meanwhile raises Interrupted."""
        key, members = f"{prefix}/check-in", len(self.rank_of)
        deadline = time.monotonic() + timeout_s
        count = store.add(key, 1)
        while count < members:
            if self.interrupt.is_set():
                raise Interrupted()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{members - count} of the {members} devices of {prefix} did not come to build its "
                                   f"process groups within {timeout_s:.0f}s")
            time.sleep(CHECK_IN_POLL_S)
            count = store.add(key, 0)

    @classmethod
    def default_group(cls, program: Program, device: str) -> "Comm":
        """The groups of torch.distributed's default group (``init_process_group``): its world, and
        a sub-group per multi-device stage, created on every rank in stage order (new_group is
        collective over the world)."""
        self = cls.__new__(cls)
        self.epoch, self.interrupt, self._waiter, self.suspect = 0, None, None, None
        self.rank_of = {d: i for i, d in enumerate(program.devices)}
        self.world = dist.distributed_c10d._get_default_group()
        self.grads = dist.new_group(list(range(len(self.rank_of)))) if sends_grads(program) else None
        self.backups = dist.new_group(list(range(len(self.rank_of)))) if has_backups(program) else None
        self.group = None
        for info in program.stages:
            if len(info.slots) > 1:
                g = dist.new_group([self.rank_of[d] for d in info.devices])
                if device in info.devices:
                    self.group = g
        return self

    def send(self, t: torch.Tensor, peer: str, tag: int, *, grads: bool = False, backups: bool = False) -> dist.Work:
        return self._post(self._group(grads, backups).send, [t], self.rank_of[peer], tag)

    def recv(self, t: torch.Tensor, peer: str, tag: int, *, grads: bool = False, backups: bool = False) -> dist.Work:
        return self._post(self._group(grads, backups).recv, [t], self.rank_of[peer], tag)

    def _group(self, grads: bool, backups: bool) -> Any:
        if grads and self.grads is not None:
            return self.grads
        if backups and self.backups is not None:
            return self.backups
        return self.world

    def allreduce(self, group: Any, tensors: list[torch.Tensor]) -> dist.Work:
        return self._post(group.allreduce, tensors)

    def _post(self, op: Callable, *args) -> dist.Work:
        """Post a gloo operation. On a connection already broken (its peer died, or recovery cut it)
        gloo raises at once rather than in the wait: the same failure, the same Interrupted."""
        try:
            return op(*args)
        except RuntimeError as e:
            if self.suspect is not None:
                self.suspect()
            if self.interrupt is not None and self.interrupt.wait(self.grace_s):
                raise Interrupted() from e
            raise

    def wait(self, work: dist.Work) -> None:
        self.wait_all((work,))

    def wait_all(self, works: Sequence[dist.Work]) -> None:
        """Wait for every one of ``works``, in order. With an ``interrupt`` on Linux the waits are
        direct: whoever sets the interrupt first cuts this process's connections of the broken
        epoch (``cut_connections``), so a wait blocked on them fails at once and raises Interrupted.
        Elsewhere one hand-over to a helper thread waits for all of them while this one watches the
        interrupt (two thread switches per hand-over: tens of microseconds on a busy host)."""
        if self.interrupt is None or CAN_CUT:
            try:
                for work in works:
                    work.wait()
            except Exception as e:  # a connection broke: its peer died, or recovery cut it
                if self.suspect is not None:
                    self.suspect()
                if self.interrupt is not None and self.interrupt.wait(self.grace_s):
                    raise Interrupted() from e
                raise
            return
        if not works:
            return
        # gloo's send/recv works report completion only through a blocking wait (is_completed stays
        # false until then), and a wait with a timeout closes the connection it times out on: a
        # helper thread waits, this one watches
        if self._waiter is None:
            self._waiter = _Waiter()
        box = self._waiter.submit(works)
        while not box.done.wait(0.05):
            if self.interrupt.is_set():
                raise Interrupted()
        if box.error is not None:
            # a peer's connection broke: it died, and the heartbeat is about to say so
            if self.interrupt.wait(self.grace_s):
                raise Interrupted() from box.error
            raise box.error

    def barrier(self, value: float = 0.0) -> float:
        """Every device of the epoch reaches this point (interruptible); returns the sum of the
        ``value``s they brought (a flag any device can raise for all at no extra message)."""
        flag = torch.tensor([value])
        self.wait(self.allreduce(self.world, [flag]))
        return float(flag)


def has_backups(program: Program) -> bool:
    """Whether ``program`` backs any stage up (every rank decides alike, as for ``sends_grads``)."""
    return any(a.op == Op.BACKUP for _, actions in program.actions for a in actions)


def sends_grads(program: Program) -> bool:
    """Whether any device of ``program`` sends a gradient (every rank decides alike: the groups
    made for them are collective)."""
    return any(a.op == Op.SEND and a.payload == "grad" for _, actions in program.actions for a in actions)


@dataclasses.dataclass
class _Box:
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None


CAN_CUT = os.path.isdir("/proc/self/fd")  # cut_connections finds the sockets there


def cut_connections(keep_port: int) -> int:
    """Shut down every TCP connection of this process but those to or from ``keep_port`` (the run's
    store), and return how many: gloo gives no way to wake a thread blocked on a peer that fell
    silent (abort() does not, a timed wait closes the connection anyway), but a connection shut
    down under it makes the wait fail at once, as a dead peer's reset does. Called when a failure
    is agreed, before this device builds the next epoch's groups: every group of the epoch is
    abandoned then. Linux only (the sockets are found in /proc/self/fd)."""
    import socket
    import stat

    cut = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except (OSError, ValueError):
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                peer = sock.getpeername()
            except OSError:  # listening, or not connected
                continue
            if keep_port in (peer[1], sock.getsockname()[1]):
                continue
            sock.shutdown(socket.SHUT_RDWR)
            cut += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays gloo's
    return cut


class _Waiter:
    """A daemon thread that waits on works in order; one per epoch (after a failure it may stay
    blocked on a dead peer's message, and is dropped with its groups)."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="comm-waiter", daemon=True).start()

    def submit(self, works: Sequence[dist.Work]) -> _Box:
        box = _Box()
        self._queue.put((works, box))
        return box

    def _run(self) -> None:
        while True:
            works, box = self._queue.get()
            try:
                for work in works:
                    work.wait()
            except Exception as e:  # handed to the waiting thread
                box.error = e
            box.done.set()


@dataclasses.dataclass
class _Pending:
    received: dict[tuple[int, int], tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    grads_in: dict[tuple[int, int], tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    inputs: tuple[torch.Tensor, ...] = ()
    outputs: tuple[Any, ...] = ()
    loss: torch.Tensor | None = None
    input_grads: tuple[torch.Tensor, ...] = ()


class DistWorker:
    """One device's side of a Program. ``stages`` are the split stage modules of ``program``'s
    stage table (every rank compiles the same model the same way; only this device's stage is
    copied and trained here). ``copies`` (iteration tag -> StateCopy) are the rollback points
    and backups this device holds; a worker built after a rewrite takes over its predecessor's.
    ``comm`` defaults to the groups of torch.distributed's default group.
    ``fault`` (for tests and benchmarks) is called before every action with (iteration, index)."""

    def __init__(self, program: Program, stages: Sequence, device: str, *, loss: Callable,
                 unflatten: Callable, input_names: Sequence[str], optimizer: OptimizerSpec = "sgd",
                 lr: float = 1e-3, loss_reduction: str = "mean", torch_device: str = "cpu",
                 emulation: Emulation | None = None, copies: dict[int, StateCopy] | None = None,
                 comm: Comm | None = None, fault: Callable[[int, int], None] | None = None,
                 post_ahead_bytes: int = 64 << 20):
        self.program = program
        self.post_ahead_bytes = post_ahead_bytes
        self.device = device
        self.comm = comm if comm is not None else Comm.default_group(program, device)
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
        self.flat = FlatState(self.module, self.optimizer)  # what a rollback point or a backup copies
        # what F runs: the replica's graph with its tensors bound once (they are the optimizer's,
        # updated in place for the worker's life) and ops called through torch's own bindings
        self._direct = direct_calls(self.module)
        self._bound = self._direct.bind(self.module)
        self.copies: dict[int, StateCopy] = {} if copies is None else copies
        self.fault = fault
        self.done = 0  # actions completed in the current iteration (a failure's progress)
        self._runs: dict[tuple[Action, ...], _Prepared] = {}
        # what every micro-batch would otherwise look up again: where stage 0's inputs are among
        # the model's, which inputs take a gradient, which outputs receive one
        self._input_positions = tuple(self.input_index[n] for n in self.stage.inputs) if self.info.index == 0 else ()
        self._grad_inputs = tuple(i for i, g in enumerate(self.stage.input_grads) if g)
        self._grad_outputs = tuple(i for i, g in enumerate(self.stage.output_grads) if g)
        # backups, per link (process group, stage, peer): the layout of the last copy sent or
        # received on it, and the holder's receive posted ahead for the next copy
        self._sent_layouts: dict[tuple, StateLayout] = {}
        self._held_layouts: dict[tuple, StateLayout] = {}
        self._restoring: dict[tuple, tuple[torch.Tensor, dist.Work]] = {}
        self._sent: tuple[int, StateLayout, torch.Tensor] | None = None  # the last copy sent after a STEP

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

    def _file(self, tag: int, layout: "StateLayout", buf: torch.Tensor) -> None:
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
                self._restoring[(comm, stage, peer)] = self._post_restore(peer, BACKUP_TAG + stage * 65536,
                                                                          layout.nbytes)

    def step(self, inputs: Sequence[torch.Tensor], labels: Any, *, actions: Sequence[Action] | None = None,
             iteration: int = 0) -> float:
        """One iteration (the program's actions, or ``actions`` over the same stage table); returns
        this device's share of the loss (0 off the last stage)."""
        p = self.program
        actions = tuple(p.of(self.device) if actions is None else actions)
        prepared = self._runs.get(actions)
        if prepared is None:
            prepared = self._runs[actions] = _Prepared.of(actions, p.microbatch_rows, self.post_ahead_bytes)
        self._prepared, self.receives, self._receive_of = prepared, prepared.receives, prepared.receive_of
        self.iteration, self._stepped = iteration, False
        self._inputs, self._labels = tuple(inputs), labels
        self._pieces: dict[int, tuple[torch.Tensor, ...]] = {}
        self._batch = p.microbatches * p.microbatch_rows
        self._state: dict[int, _Pending] = {}
        self._sends: list[dist.Work] = []
        self._loss = 0.0
        self._posted: dict[Action, tuple] = {}
        self._posted_through = -1
        self._post_through(prepared.reach[0])
        fault, emulation = self.fault, self.emulation
        for k, (run, a) in enumerate(zip(prepared.handlers, actions)):
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
        return self._loss

    def _pace(self, a: Action, took: float) -> None:
        if a.op == Op.ALLREDUCE:
            if not self.emulation.links:
                return
            target = self.emulation.allreduce_s(a.group, self.info.layers)
        else:
            target = self.emulation.compute_s(self.device, a, self.info.layers)
        if took < target:
            time.sleep(target - took)
        else:
            self.lag_s += took - target

    def _mb(self, mb: int) -> _Pending:
        st = self._state.get(mb)
        if st is None:
            st = self._state[mb] = _Pending()
        return st

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
        st = self._mb(a.mb)
        if a.stage == 0:
            inputs = tuple(self._batch_rows(i, self._inputs[i], a) for i in self._input_positions)
        else:
            pieces = [st.received[r] for r in sorted(st.received)]
            inputs = tuple(joined(pieces, i) for i in range(len(self.stage.inputs)))
            st.received.clear()
        # a data input that needs no gradient is used as is: detaching it would only cost time
        if self._grad_inputs or any(t.requires_grad for t in inputs):
            inputs = tuple(t.detach().requires_grad_(g) if g or t.requires_grad else t
                           for t, g in zip(inputs, self.stage.input_grads))
        outputs = self._direct.module(*self._bound, *inputs)
        st.inputs, st.outputs = inputs, tuple(outputs)
        if self.last:
            labels = self._batch_rows(-1, self._labels, a)
            value = self.loss_fn(self.unflatten(list(outputs)), labels)
            scale = (a.rows[1] - a.rows[0]) / self._batch if self.loss_reduction == "mean" else 1.0
            st.loss = value * scale
            self._loss += st.loss.item()

    def _backward(self, a: Action) -> None:
        st = self._mb(a.mb)
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
        st = self._mb(a.mb)
        sl = slice(a.rows[0] - self.slot.lo, a.rows[1] - self.slot.lo)
        source = st.outputs if a.payload == "act" else st.input_grads
        tensors = [t[sl].detach().contiguous() for t in source]
        if self.emulation is not None:
            arrive = self._arrival(a.peer, sum(t.numel() * t.element_size() for t in tensors))
            self._sends.append(self.comm.send(torch.tensor([arrive], dtype=torch.float64), a.peer,
                                              message_tag(a, 63), grads=a.payload == "grad"))
        for i, t in enumerate(tensors):
            self._sends.append(self.comm.send(t, a.peer, message_tag(a, i), grads=a.payload == "grad"))

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
        grads = a.payload == "grad"
        works = [self.comm.recv(b, a.peer, message_tag(a, i), grads=grads) for i, b in enumerate(bufs)]
        arrive = None
        if self.emulation is not None:
            arrive = torch.empty(1, dtype=torch.float64)
            works.append(self.comm.recv(arrive, a.peer, message_tag(a, 63), grads=grads))
        return bufs, works, arrive

    def _recv(self, a: Action) -> None:
        self._post_through(self._prepared.reach[self._receive_of[a] + 1])
        bufs, works, arrive = self._posted.pop(a)
        self.comm.wait_all(works)
        if arrive is not None and float(arrive) > time.time():
            time.sleep(float(arrive) - time.time())
        st = self._mb(a.mb)
        (st.received if a.payload == "act" else st.grads_in)[a.rows] = bufs

    def _allreduce(self, a: Action) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.comm.wait(self.comm.allreduce(self.comm.group, [flat]))
            offset = 0
            for p, g in zip(params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
                offset += g.numel()
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        if buffers:
            flat = torch.cat([b.reshape(-1) for b in buffers])
            self.comm.wait(self.comm.allreduce(self.comm.group, [flat]))
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
        self._stepped = True

    def _backup(self, a: Action) -> None:
        # tagged like the local backend: the iteration this state starts
        tag = self.iteration + self._stepped
        layout, buf = self.flat.copy()  # the copy: what the next iteration starts from, whatever runs after
        link, base = (self.comm, a.stage, a.peer), BACKUP_TAG + a.stage * 65536
        known = self._sent_layouts.get(link)
        if known is None or known.meta != layout.meta:
            # the holder has posted a receive of the size it knows: announce the new layout in it
            body = json.dumps(layout.meta).encode()
            notice = torch.zeros(HEADER_BYTES if known is None else known.nbytes, dtype=torch.uint8)
            write_header(notice, (LAYOUT, tag, 0.0, len(body)))
            self._sends.append(self.comm.send(notice, a.peer, base, backups=True))
            self._sends.append(self.comm.send(torch.frombuffer(bytearray(body), dtype=torch.uint8), a.peer, base + 1,
                                              backups=True))
            self._sent_layouts[link] = layout
        arrive = self._arrival(a.peer, layout.nbytes) if self.emulation is not None else 0.0
        write_header(buf, (COPY, tag, arrive))
        self._sends.append(self.comm.send(buf, a.peer, base, backups=True))
        if self._stepped:  # nothing changes the stage after its STEP: take_point may file this copy
            self._sent = (tag, layout, buf)

    def _restore(self, a: Action) -> None:
        link, base = (self.comm, a.stage, a.peer), BACKUP_TAG + a.stage * 65536
        layout = self._held_layouts.get(link)
        posted = self._restoring.pop(link, None)  # posted ahead by drop_copies_before
        if posted is None:
            posted = self._post_restore(a.peer, base, HEADER_BYTES if layout is None else layout.nbytes)
        buf, work = posted
        self.comm.wait(work)
        what, tag, arrive, body_bytes = read_header(buf)
        if what == LAYOUT:
            body = torch.empty(int(body_bytes), dtype=torch.uint8)
            self.comm.wait(self.comm.recv(body, a.peer, base + 1, backups=True))
            self._held_layouts[link] = layout = StateLayout.of(json.loads(bytes(body.numpy()).decode()))
            buf, work = self._post_restore(a.peer, base, layout.nbytes)
            self.comm.wait(work)
            what, tag, arrive, _ = read_header(buf)
        if what != COPY or layout is None:
            raise RuntimeError(f"{self.device}: the backup of stage {a.stage} from {a.peer} is not a state copy "
                               f"(header {what:g}); both ends must run the same asteroid_fx version")
        if arrive > time.time():
            time.sleep(arrive - time.time())
        # filed only once every byte is here: a copy cut off by a failure never serves a rollback
        self._file(int(tag), layout, buf)

    def _post_restore(self, peer: str, base: int, nbytes: int) -> tuple[torch.Tensor, dist.Work]:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf, self.comm.recv(buf, peer, base, backups=True)

    def _rollback(self, a: Action) -> None:
        held = self.copies.get(self.iteration, StateCopy())
        missing = held.load_into(self.module, self.optimizer)
        if missing:
            raise RuntimeError(f"{self.device} cannot roll back stage {a.stage} to the start of iteration "
                               f"{self.iteration}: it holds no copy of {', '.join(missing[:4])}"
                               f"{' ...' if len(missing) > 4 else ''}")

    def state_dict(self, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()
                if keys is None or k in keys}


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

    def copy(self) -> tuple["StateLayout", torch.Tensor]:
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
            raise RuntimeError(f"the stage's state lies on {', '.join(off_host)}; this backend keeps it in host "
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
            raise ValueError(f"cannot back up {name} ({key or kind}): dtype {dtype} is none of {', '.join(DTYPES)}")
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


# A backup is one message: a header of float64 fields (what it is, the iteration tag, the emulated
# arrival time, the length of a layout), then the state packed by its StateLayout. The holder
# posts the receive ahead, which needs its size: both ends keep the layout of the last copy on the
# link (process group, stage, peer), and a copy whose layout differs is preceded by a LAYOUT notice
# of the size the holder expects, then the layout as JSON. The layout thus travels once per link.
HEADER_BYTES = 64
COPY, LAYOUT = 1.0, 2.0


def write_header(buf: torch.Tensor, fields: Sequence[float]) -> None:
    struct.pack_into(f"<{len(fields)}d", buf.numpy(), 0, *fields)


def read_header(buf: torch.Tensor) -> tuple[float, float, float, float]:
    what, tag, arrive, body_bytes = struct.unpack_from("<4d", buf.numpy(), 0)
    return what, tag, arrive, body_bytes


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where a state copy's tensors lie in a backup message: after the header, one segment per
    dtype (64-byte aligned) with that dtype's tensors back to back, in ``meta`` order. A function
    of ``meta`` alone, so the sender and the holder compute the same one from the same list."""

    meta: tuple[tuple, ...]
    # per segment: dtype, byte offset, elements, and the indices (among the tensors) it holds
    segments: tuple[tuple[torch.dtype, int, int, tuple[int, ...]], ...]
    shapes: tuple[tuple[int, ...], ...]  # per tensor
    nbytes: int

    @classmethod
    def of(cls, meta: Sequence[Sequence]) -> "StateLayout":
        meta = tuple((kind, name, key, dtype, tuple(shape) if kind != "v" else shape)
                     for kind, name, key, dtype, shape in meta)
        shapes = tuple(e[4] for e in meta if e[0] != "v")
        members: dict[str, list[int]] = {}
        for i, dtype in enumerate(e[3] for e in meta if e[0] != "v"):
            members.setdefault(dtype, []).append(i)
        segments, offset = [], HEADER_BYTES
        for name, indices in members.items():
            dtype = DTYPES[name]
            count = sum(math.prod(shapes[i]) for i in indices)
            segments.append((dtype, offset, count, tuple(indices)))
            offset += -(-count * dtype.itemsize // 64) * 64
        return cls(meta, tuple(segments), shapes, offset)

    def pack(self, tensors: Sequence[torch.Tensor], header: Sequence[float]) -> torch.Tensor:
        """One buffer: ``header``, then a copy of ``tensors`` (laid out by ``meta``)."""
        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        write_header(buf, header)
        for dtype, offset, count, indices in self.segments:
            if count:
                out = buf[offset:offset + count * dtype.itemsize].view(dtype)
                torch.cat([tensors[i].reshape(-1) for i in indices], out=out)
        return buf

    def unpack(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """The tensors of a packed buffer, as views of it (in ``meta`` order)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.shapes)
        for dtype, offset, count, indices in self.segments:
            segment = buf[offset:offset + count * dtype.itemsize].view(dtype)
            at = 0
            for i in indices:
                n = math.prod(self.shapes[i])
                out[i] = segment[at:at + n].view(self.shapes[i])
                at += n
        return out


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
    def of(cls, actions: tuple[Action, ...], microbatch_rows: int, post_ahead_bytes: int) -> "_Prepared":
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


def message_bytes(a: Action) -> int:
    """The bytes a SEND or RECV moves: its rows of every tensor of its specs."""
    return (a.rows[1] - a.rows[0]) * sum(math.prod(spec.shape) * DTYPES[spec.dtype].itemsize for spec in a.specs)


PACED = (Op.F, Op.B, Op.ALLREDUCE)  # the actions an emulated device pads to the cost model's time


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
    Op.BACKUP: DistWorker._backup,
    Op.RESTORE: DistWorker._restore,
    Op.ROLLBACK: DistWorker._rollback,
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
