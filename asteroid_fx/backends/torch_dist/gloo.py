"""The gloo transport of torch_dist: one device's process groups for a membership epoch (``Comm``,
a ``backends.base.Comm``), and how a device blocked on a dead peer gets out.

Process groups are plain ``ProcessGroupGloo`` objects over ``PrefixStore(f"epoch{k}", store)`` of
the run's store (signed, when the run's store is: runtime/auth.py), one world per membership epoch
and one per multi-device stage (or, without a store, torch.distributed's default group), all built
by ``_build_groups``: after a failure the survivors build the groups of epoch k+1 in place and
drop the broken ones. With an ``interrupt`` event a device blocked on a dead peer's message leaves
as soon as the failure is agreed: gloo's send and receive works report completion only through a
blocking wait (a wait with a timeout closes the connection it waits on), so the heartbeat shuts
the process's gloo connections down before it sets the event (``cut_connections``) and the
blocked wait fails at once; where /proc is missing a helper thread waits on each work while the
device watches the event. Building an
epoch's groups is interruptible too: the devices check in through the store first
(``Comm._check_in``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import threading
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from asteroid_fx.backends.base import GroupTimeout, Interrupted
from asteroid_fx.backends.torch_dist.messages import TaggedMessages
from asteroid_fx.ir.program import Op, Program, StageInfo

CHECK_IN_POLL_S = 0.002  # how often a device building an epoch's groups looks for the others


class Comm(TaggedMessages):
    """This device's process groups for one membership epoch: the world (every device of
    ``program``, ranks in program order), a second group over the same devices that carries the
    gradients of SEND/RECV (``grads``, where the program sends any), a third for BACKUP/RESTORE
    (``backups``, where the program has any: a backup goes against the activations' direction on
    some links, and on theirs it would stall them as below), the group of its stage
    when the stage has several devices, the group of each TIE it runs (``ties``, by members), and
    one more over every device for the NORM's one-number sum (``norm``, where the program clips:
    apart from the world, whose connections carry the activations). ``interrupt`` (set when a failure is agreed) makes every
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
        connection = dist.TCPStore(store.host, store.port, world_size=None, is_master=False, timeout=timeout)
        # a signed run store (runtime/auth.SignedStore) signs and checks gloo's rendezvous records
        # too: gloo's C++ side parses them, and a stranger's would crash it. The object is kept: the
        # groups hold only its C++ half
        over = getattr(store, "over", None)
        self._store = store = over(connection).c10d() if over is not None else connection
        if interrupt is not None:
            self._check_in(store, prefix, timeout_s)

        def gloo(suffix: str, members: Sequence[str]) -> Any:
            return dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}{suffix}", store), members.index(device),
                                         len(members), timeout)

        # a hand-over's world holds devices of two programs: only its world and gradient channel
        _build_groups(self, program, device, gloo, stage_groups=world is None)

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
                raise GroupTimeout(f"{members - count} of the {members} devices of {prefix} did not come to build its "
                                   f"process groups within {timeout_s:.0f}s")
            time.sleep(CHECK_IN_POLL_S)
            count = store.add(key, 0)

    @classmethod
    def default_group(cls, program: Program, device: str) -> Comm:
        """The groups of torch.distributed's default group (``init_process_group``): its world, and
        a sub-group per multi-device stage, created on every rank in stage order (new_group is
        collective over the world)."""
        self = cls.__new__(cls)
        self.epoch, self.interrupt, self._waiter, self.suspect = 0, None, None, None
        self.rank_of = {d: i for i, d in enumerate(program.devices)}

        def default(name: str, members: Sequence[str]) -> Any:
            if name == "":
                return dist.distributed_c10d._get_default_group()
            return dist.new_group([self.rank_of[d] for d in members])

        _build_groups(self, program, device, default, stage_groups=True, collective=True)
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

    def sum_stage_chunks(self, chunks: Sequence[torch.Tensor], stage: StageInfo) -> torch.Tensor:
        """The sum over every chunk of ``stage`` (this device's stage) in its row order, equal bit
        for bit on every member: ``chunks`` are this device's, flat and of one length, in row order.

        gloo's all-reduce adds the members' tensors in an order of its own that differs between
        parts of the tensor and with the group's size; float32 addition is not associative, so a
        survivor that adds a lost member's chunk to its own would not get the failure-free sum.
        Here every sum is in row order, whoever holds the chunks: member r adds up part r of the
        tensor (every chunk's part r, sent to it by one all-to-all), then an all-gather gives each
        member every part. Each member sends and receives about twice the tensor times
        (members - 1) / members, as a ring all-reduce does."""
        order, counts = self.group_order, {d: len(stage.chunks_of(d)) for d in stage.devices}
        members, me = len(order), self.group.rank()
        n = chunks[0].numel()
        part = -(-n // members)
        # to member r: this device's chunks' part r, in row order
        if len(chunks) == 1 and n == members * part:
            send = chunks[0].contiguous()
        else:
            mine = torch.zeros(len(chunks), members * part, dtype=chunks[0].dtype)
            for k, c in enumerate(chunks):
                mine[k, :n] = c
            send = mine.view(len(chunks), members, part).transpose(0, 1).contiguous().view(-1)
        received = torch.empty(sum(counts.values()) * part, dtype=send.dtype)
        self.wait(self._post(self.group.alltoall_base, received, send,
                             [counts[d] * part for d in order], [len(chunks) * part] * members,
                             dist.AllToAllOptions()))
        blocks, at = {}, 0
        for d in order:
            blocks[d] = received[at:at + counts[d] * part].view(counts[d], part)
            at += counts[d] * part
        rows = [blocks[d][k] for d in stage.devices for k in range(counts[d])]
        total = rows[0].clone()
        for r in rows[1:]:
            total += r
        gathered = torch.empty(members, part, dtype=total.dtype)
        self.wait(self._post(self.group.allgather, [list(gathered)], [total]))
        return gathered.view(-1)[:n]

    def allreduce_tie(self, group: Sequence[str], tensors: list[torch.Tensor]) -> None:
        self.wait(self.allreduce(self.ties[tuple(group)], tensors))

    def allreduce_norm(self, tensors: list[torch.Tensor]) -> None:
        self.wait(self.allreduce(self.norm, tensors))

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


def _build_groups(comm: Comm, program: Program, device: str, make: Callable[[str, Sequence[str]], Any], *,
                  stage_groups: bool, collective: bool = False) -> None:
    """The one place that decides which groups a Comm has: ``make(name, members)`` builds the group
    of ``members`` (devices, ranks in that order) under ``name`` ("" for the world). Every rank
    calls ``make`` for the same groups in the same order (building a group is collective over the
    world): the world, the gradients' channel where the program sends any, the backups' where it
    has any, the NORM's where it clips, the group of its multi-device stage, and the holders of
    each TIE it runs (every such group where ``make`` is ``collective``: torch.distributed's
    new_group must be called by every rank of the world for every group). ``stage_groups`` False
    (a hand-over between plans) builds the world and the gradients' channel only."""
    members = tuple(comm.rank_of)
    comm.world = make("", members)
    comm.grads = make("/grads", members) if sends_grads(program) else None
    comm.backups = make("/backups", members) if stage_groups and has_backups(program) else None
    comm.norm = make("/norm", members) if stage_groups and clips(program) else None
    comm.group, comm.group_order = None, ()
    comm.ties = {}
    if not stage_groups:
        return
    for info in program.stages:
        if len(info.slots) > 1 and (collective or device in info.devices):
            g = make(f"/stage{info.index}", info.devices)
            if device in info.devices:
                comm.group = g
                # its members by rank: torch.distributed's new_group ranks them by world rank
                comm.group_order = (tuple(sorted(info.devices, key=comm.rank_of.__getitem__)) if collective
                                    else info.devices)
                if comm.group_order.index(device) != g.rank():
                    raise RuntimeError(f"the process group of stage {info.index} ranks {device!r} "
                                       f"{g.rank()}, not {comm.group_order.index(device)} as its members "
                                       f"{', '.join(comm.group_order)} say")
    # the holders of each set of tied weights (a TIE's group), named by their position in the
    # program's sorted list of such groups, which every rank computes alike
    for k, members in enumerate(tie_groups(program)):
        if collective or device in members:
            g = make(f"/tie{k}", members)
            if device in members:
                comm.ties[members] = g


def tie_groups(program: Program) -> tuple[tuple[str, ...], ...]:
    """The distinct groups of the program's TIEs, sorted (every rank decides alike)."""
    return tuple(sorted({a.group for _, actions in program.actions for a in actions if a.op == Op.TIE}))


def clips(program: Program) -> bool:
    """Whether ``program`` clips its gradients by their global norm (runs NORM; every rank decides
    alike)."""
    return any(a.op == Op.NORM for _, actions in program.actions for a in actions)


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


def init_process_group(host: str, port: int, rank: int, world: int, timeout_s: float = 60.0,
                       backend: str = "gloo") -> dist.TCPStore:
    """Join the run's rendezvous (a TCPStore served by the launcher) and the default group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size=None, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore("asteroid", store), rank=rank, world_size=world,
                            timeout=timeout)
    return store
