"""One device's part in a run: the membership epoch, the program it runs (with and without
backups), its process groups and worker, and the history every survivor keeps alike. The training
loop (runtime/worker.py), recovery (runtime/recovery.py) and switches (runtime/switch.py) change
it; this module holds what they share and the steps they take alike."""

from __future__ import annotations

import dataclasses

from asteroid_fx.backends.local import StateCopy
from asteroid_fx.backends.torch_dist import Comm, DistWorker, Emulation
from asteroid_fx.ir.program import Op
from asteroid_fx.passes.replay import add_backups
from asteroid_fx.runtime.backups import BackupPoints
from asteroid_fx.runtime.faults import Faults, injected
from asteroid_fx.runtime.spec import RunSpec, optimizer_of
from asteroid_fx.runtime.store import STORE_TIMEOUT_S


class Member:
    """This device's state in the run. ``full`` is the running program with its backups, ``plain``
    the same without them; ``epochs`` [(first iteration, devices)] is the membership history, the
    same on every device that took part; ``retired`` keeps the groups and workers of past epochs
    (never destroyed: gloo's destructor joins threads that may be blocked on a dead peer until the
    group's timeout)."""

    def __init__(self, spec: RunSpec, compiled, store, device: str, heartbeat=None):
        self.spec, self.compiled, self.store, self.device, self.heartbeat = spec, compiled, store, device, heartbeat
        self.plain = compiled.program
        self.full = add_backups(compiled.program) if spec.recovery and len(compiled.program.stages) > 1 else self.plain
        self.epoch = 0
        self.redo = None  # the recovery program's actions, for iteration points.base
        self.points = BackupPoints(spec.backup_every, spec.backup_budget,
                                   paced=spec.recovery and spec.backup_every is None)
        self.epochs: list[tuple[int, tuple[str, ...]]] = [(0, self.full.devices)]
        self.recoveries: list[dict] = []
        self.switches: list[dict] = []
        self.retired: list = []
        self.left = False
        self.start = 0  # the first iteration this device runs
        self.completed = 0  # iterations this device has finished
        # re-planning (runtime/switch.py)
        self.planned = None  # (epoch, reason, program, joining): a plan ready to switch to
        self.planning = False  # a background planner is running
        self.joins_seen, self.joins_polled = 0, 0.0
        self.admitted: dict | None = None  # the switch record that takes this joining device in
        self.replan_after: tuple[int, str] | None = None  # (iteration, reason): re-plan once it is done
        faults = injected()  # the launcher's, by environment: never the store's (runtime/faults.py)
        self.faults = Faults(faults, device, store, leave=self._leave) if faults else None
        self.comm, self.worker = None, None

    @property
    def leader(self) -> bool:
        """The first device of the running program: it paces backups and runs the planner."""
        return self.full.devices[0] == self.device

    @property
    def has_backups(self) -> bool:
        return self.full is not self.plain

    def new_comm(self, program, epoch: int, **kwargs) -> Comm:
        """The process groups of ``program`` in membership ``epoch``, interrupted by the heartbeat."""
        hb = self.heartbeat
        return Comm(self.store, program, self.device, epoch=epoch, timeout_s=STORE_TIMEOUT_S,
                    interrupt=hb.interrupt if hb else None, suspect=hb.suspect if hb else None, **kwargs)

    def new_worker(self, program, stages, copies) -> DistWorker:
        """A worker of ``program`` on this device's ``comm``, holding ``copies`` (backups received)."""
        c = self.compiled
        return DistWorker(program, stages, self.device, loss=c.loss, unflatten=c.captured.unflatten_outputs,
                          input_names=[n.name for n in c.captured.module.graph.nodes if n.op == "placeholder"],
                          optimizer=optimizer_of(self.spec), comm=self.comm, copies=copies,
                          emulation=Emulation(c.layer_graph, c.cluster, self.spec.dilation) if self.spec.emulate else None,
                          fault=self.faults.before_action if self.faults else None)

    def hold_initial_state(self, resumed: StateCopy | None = None, start: int = 0) -> None:
        """A holder starts out holding the state of what it backs up at the first iteration:
        the initial weights, or a resumed run's checkpoint (every name of it)."""
        for a in self.full.of(self.device):
            if a.op == Op.RESTORE:
                held = self.worker.copies.setdefault(start, StateCopy())
                held.update(resumed if resumed is not None else StateCopy.of(self.compiled.stages[a.stage].module, None))

    def enter(self, program, base: int) -> None:
        """``program`` runs from iteration ``base`` on (after a recovery's rollback, or a switch)."""
        self.full, self.plain = program, without_backups(program)
        self.points.restart(base)
        self.epochs.append((base, program.devices))

    def _leave(self) -> None:
        self.left = True
        self.heartbeat.leave()


def without_backups(program):
    return dataclasses.replace(program, actions=tuple(
        (d, tuple(a for a in acts if a.op not in (Op.BACKUP, Op.RESTORE))) for d, acts in program.actions))
