"""`asteroid worker`: one device of a run. It connects to the run's store, claims its device (a
device has one worker), re-runs the compiler with the launcher's plan pinned, checks that its
program is byte-for-byte the launcher's and its build the launcher's (runtime/build.py; else it
refuses the run, and says why to the launcher), trains its device's share with the torch_dist
backend (``Training``) and writes its losses into the store and its weights into the run folder.
Every value it reads from the store or writes into it is signed with the run's secret
(runtime/auth.py), which it is given in its environment."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path

import torch

from asteroid_fx.backends.torch_dist import CAN_CUT, Interrupted, cut_connections
from asteroid_fx.ir.atomic import torch_save
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program_text import format_program, parse_program
from asteroid_fx.backends.state import StateCopy
from asteroid_fx.runtime import checkpoint, switch
from asteroid_fx.runtime.auth import SECRET_ENV, SECRET_FILE_ENV, SignedStore, secret_from_env
from asteroid_fx.runtime.build import build_of, difference
from asteroid_fx.runtime.errors import RunFailed, StoreValueRejected
from asteroid_fx.runtime.heartbeat import Heartbeat
from asteroid_fx.runtime.member import Member
from asteroid_fx.runtime.recovery import recover
from asteroid_fx.runtime.data import Loader, needed_rows
from asteroid_fx.runtime.spec import (RunSpec, batches_of, check_last_batch, compile_spec, iterations_of, job_of,
                                      smaller_program, weights_path)
from asteroid_fx.runtime.store import (BUILD, CLUSTER, PROGRAM, REFUSED, SPEC, STORE_TIMEOUT_S, checkpoint_key,
                                       claim_key, connect, loss_key, result_key, seconds_key)

log = logging.getLogger(__name__)


def run_worker(coordinator: str | None, device: str | None, out: str | os.PathLike, *,
               connect_timeout_s: float = STORE_TIMEOUT_S, join: bool = False, store=None) -> int:
    """One worker: join, rebuild the program with the launcher's plan, check it, train, report.
    Without --coordinator/--device, torchrun's MASTER_ADDR, MASTER_PORT and RANK are used (the
    rank picks the program's device in order). With ``join`` the device is one of the cluster's
    that the running program does not use: it asks to be taken in, and starts training at the
    iteration boundary where the run switches to a plan that includes it (passes/replan.py).
    ``store``: the run's store, already connected and signed (a torchrun rank's, runtime/train.py);
    otherwise the run's secret comes from the environment (``auth.secret_from_env``)."""
    torch.set_num_threads(1)
    if store is not None:
        pass
    elif coordinator is None:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise InputError("give --coordinator HOST:PORT (or set MASTER_ADDR and MASTER_PORT, as torchrun does)")
        coordinator = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if store is None:
        secret = secret_from_env()  # before connecting: without it the run's store is of no use
        store = SignedStore(connect(coordinator, connect_timeout_s), secret,
                            device or f"rank{os.environ.get('RANK', '?')}")
    program_text = _first_read(store, PROGRAM).decode()
    devices = parse_program(program_text).devices
    if device is None:
        if "RANK" not in os.environ:
            raise InputError("give --device NAME (or set RANK, as torchrun does)")
        device = devices[int(os.environ["RANK"])]
    spec = RunSpec.from_json(store.get(SPEC).decode())
    cluster = Cluster.from_json(json.loads(store.get(CLUSTER).decode()))
    if join:
        if device in devices:
            raise InputError(f"device {device!r} already runs in this program; --join is for a device that does not")
        if device not in cluster.names:
            raise InputError(f"device {device!r} is not in the run's cluster (devices: {', '.join(cluster.names)}); "
                             "a device that joins must be described in the cluster the run was launched with")
        if not (spec.recovery and spec.replan):
            raise InputError("this run does not take devices in: launch it with --recover (and re-planning on)")
    elif device not in devices:
        raise InputError(f"device {device!r} is not in this run's program (devices: {', '.join(devices)})")
    _claim(store, device)
    heartbeat = None
    if spec.recovery:
        heartbeat = Heartbeat(store.over(connect(coordinator, connect_timeout_s), device), device,
                              interval_s=spec.heartbeat_s,
                              timeout_s=spec.heartbeat_timeout_s)
        if CAN_CUT:  # waits blocked on the failed epoch's connections fail at once (Comm.wait_all)
            heartbeat.on_interrupt = lambda: cut_connections(keep_port=store.port)
        heartbeat.start()
    compiled = compile_spec(spec, cluster)
    _check_build(store, device, compiled, program_text)
    running: list[Training] = []
    if heartbeat is not None:
        heartbeat.on_given_up = lambda own_store: _leave_given_up(own_store, device, running)
    try:
        training = Training(spec, compiled, store, device, heartbeat, join=join, out=out)
        running.append(training)
        training.run()
        keys = set(compiled.captured.module.state_dict().keys())
        Path(out).mkdir(parents=True, exist_ok=True)
        result = result_of(training)
        if not training.left:
            torch_save(training.worker.state_dict(keys), weights_path(out, device))
        store.set(result_key(device), json.dumps(result))
        if not training.left:
            try:
                training.comm.barrier()  # nobody leaves while a peer may still wait on its messages
                training.write_manifest()  # every stage's last file is written: the barrier says so
            except Interrupted:
                pass  # a device failed after the last iteration: nothing is left to recover
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    if spec.recovery:
        # waits abandoned in a failure stay blocked in gloo, and tearing down groups with a dead
        # member can abort the interpreter at exit; the results are written, so leave at once
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _claim(store, device: str) -> None:
    """Make this process the run's only worker of ``device``, or refuse it: a second worker for a
    device would train its share twice and write over the first one's records."""
    mine = {"device": device, "host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8)}
    holder = json.loads(store.compare_set(claim_key(device), "", json.dumps(mine)).decode())
    if holder.get("token") != mine["token"]:
        raise InputError(f"another worker already runs device {device!r} in this run (process {holder.get('pid')} "
                         f"on {holder.get('host')}): stop this one, or give it the --device of a device that has no "
                         "worker yet")


def _check_build(store, device: str, compiled, program_text: str) -> None:
    """Refuse the run unless this process compiled the launcher's program from the launcher's build
    (runtime/build.py): the reason goes to the launcher (``REFUSED``), which stops the run at once
    instead of leaving the others to time out waiting for this device."""
    here = build_of(compiled)
    if store.check([BUILD]):  # set before the program by every launcher that publishes one
        reason = difference(here, json.loads(store.get(BUILD).decode()))
    else:
        reason = "the launcher published no build fingerprint (it runs another version of asteroid_fx)"
    if format_program(compiled.program) != program_text:
        reason = "the program compiled here differs from the launcher's" + (f": {reason}" if reason else "")
    if reason is None:
        return
    reason += (f" (asteroid_fx {here['asteroid_fx']}, torch {here['torch']} here): every process must run the "
               "same build of the model, asteroid_fx and torch")
    store.compare_set(REFUSED, "", json.dumps({"device": device, "reason": reason, "at": time.time()}))
    raise RunFailed(f"device {device} refuses the run: {reason}")


def _first_read(store, key: str) -> bytes:
    """The first value this worker reads: where a wrong secret shows, said as such in one line."""
    try:
        return store.get(key)
    except StoreValueRejected as e:
        if not getattr(e, "unsigned", False):
            raise
        raise InputError(f"the run's store does not take this worker's secret (its {key!r} is not signed with it): "
                         f"give the worker the launcher's secret, in {SECRET_ENV} or in a file named by "
                         f"{SECRET_FILE_ENV} (`asteroid launch` writes it to store.secret in its run folder)") from None


def result_of(training: Training, left: bool | None = None) -> dict:
    """The worker's result record (``result/<device>``): whether it left, its final program, the
    membership history, recoveries and switches it took part in, and its times."""
    return {"device": training.device, "left": training.left if left is None else left,
            "lag_s": training.worker.lag_s if training.worker is not None else 0.0,
            "program": format_program(training.full), "epochs": training.epochs,
            "recoveries": training.recoveries, "switches": training.switches,
            "backups": training.points.count, "backed_up": training.points.history,
            "data_s": training.data_s, "train_s": training.train_s}


def _leave_given_up(store, device: str, running: list) -> None:
    """The others declared this device failed and its training loop has not left (it is blocked
    in a wait of the epoch they abandoned, which nothing wakes): say it left, and end the process."""
    log.warning("[%s] the others declared this device failed and training is blocked in a wait they abandoned; "
                "leaving (where each thread was, below)", device)
    try:
        faulthandler.dump_traceback(all_threads=True)
        result = result_of(running[0], left=True) if running else {"device": device, "left": True, "lag_s": 0.0}
        store.set(result_key(device), json.dumps(result))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class Training(Member):
    """One device's training loop. With ``spec.recovery`` it runs the program with backups (every
    ``backup_every`` iterations, or as the leader's ``BackupPace`` decides), and after an agreed
    failure it rewrites the program for the survivors, regroups and redoes the lost iterations
    (runtime/recovery.py; docs/replay.md). With ``spec.replan`` too, the first device of the
    program (the "leader") runs the planner in the background after a recovery and when a device
    asks to join, and the run switches to the new plan at an iteration boundary
    (runtime/switch.py; passes/replan.py). ``join``: this device is not in the program yet and
    waits to be taken in."""

    def __init__(self, spec: RunSpec, compiled, store, device: str, heartbeat=None, join: bool = False,
                 out: str | os.PathLike | None = None):
        super().__init__(spec, compiled, store, device, heartbeat)
        # only this device's rows, the next iteration's loaded while this one trains
        self.data = Loader(batches_of(spec, compiled), iterations=iterations_of(spec),
                           workers=job_of(spec).loader_workers)
        # the program of an epoch's smaller last batch (Job.last_batch "smaller"; runs without recovery)
        check_last_batch(spec, job_of(spec))
        self.smaller = smaller_program(job_of(spec), compiled)
        self.out = out  # the run folder: checkpoints go there
        self.manifest_due: int | None = None  # the checkpoint whose manifest the leader writes next
        self.data_s = 0.0  # time spent waiting for this device's rows (what prefetch did not hide)
        self.train_s = 0.0  # wall time of the training loop, barriers and data waits included
        self.start = spec.start
        resumed = None
        if spec.resume is not None:  # the state after spec.start iterations, by name
            resumed = checkpoint.read_state(checkpoint.read_manifest(spec.resume))
            self.points.restart(spec.start)
        if join:
            switch.join(self)
            return
        self.comm = self.new_comm(self.full, 0)
        if heartbeat is not None:
            heartbeat.watch(0, self.full.devices)
        self.worker = self.new_worker(self.full, compiled.stages, {})
        if resumed is not None:
            missing = resumed.load_into(self.worker.module, self.worker.optimizer)
            if missing:
                raise RunFailed(f"{device}: the checkpoint {spec.resume} holds no {', '.join(missing[:4])}; it is "
                                "not a checkpoint of this model")
        self.hold_initial_state(resumed, spec.start)

    def due(self, done: int) -> bool:
        """Whether a checkpoint is taken once ``done`` iterations are: every ``checkpoint_every``
        and at the end."""
        every = self.spec.checkpoint_every
        return self.out is not None and (done == iterations_of(self.spec) or bool(every and done % every == 0))

    def checkpoint(self, done: int) -> None:
        """Write this device's stage file of the checkpoint after ``done`` iterations if it is the
        stage's first device (the others hold the same state); the leader writes the manifest
        once every stage's file is written (``write_manifest``, after the next barrier)."""
        info = self.worker.info
        if self.worker.slot.device == info.slots[0].device:
            entry = checkpoint.write_stage(self.out, done, info.index,
                                           StateCopy.of(self.worker.module, self.worker.optimizer))
            self.store.set(checkpoint_key(done, info.index), json.dumps({**entry, "layers": list(info.layers)}))
        if self.leader:
            self.manifest_due = done

    def write_manifest(self) -> None:
        done, self.manifest_due = self.manifest_due, None
        if done is None:
            return
        keys = [checkpoint_key(done, p) for p in range(len(self.worker.program.stages))]
        if not self.store.check(keys):  # a stage's device failed before writing: the last checkpoint stays
            log.warning("[%s] checkpoint after %d iterations incomplete (a stage file is missing); not published",
                        self.device, done)
            return
        stages = [json.loads(self.store.get(k).decode()) for k in keys]
        folder = checkpoint.write_manifest(self.out, done, model=self.spec.model, seed=self.spec.seed,
                                           keys=self.compiled.captured.module.state_dict(),
                                           devices=list(self.compiled.cluster.names), stages=stages)
        log.info("[%s] checkpoint after %d iterations: %s", self.device, done, folder)

    def run(self) -> None:
        began = time.perf_counter()
        try:
            self._run()
        finally:
            self.data.close()
            self.train_s = time.perf_counter() - began

    def _rows_of(self, actions) -> tuple:
        """The batch rows this device's ``actions`` read inputs and labels of."""
        program = self.worker.program
        return needed_rows(actions, program.microbatch_rows, len(program.stages) - 1)

    def _run(self) -> None:
        points = self.points
        i, self.completed = self.start, self.start
        iterations = iterations_of(self.spec)
        while i < iterations and not self.left:
            try:
                if self.admitted is not None:  # a device that joins: the switch that takes it in
                    record, self.admitted = self.admitted, None
                    switch.hand_over(self, i, record)
                    continue
                redoing = self.redo is not None and i == points.base
                # the point is taken before the barrier: a failure agreed in the barrier rolls back here
                if self.spec.recovery and points.is_tag(i) and not redoing:
                    self.worker.take_point(i)  # a redone iteration keeps the point it rolls back to
                # iterations start together, so their times compare; the leader's flag says that a
                # switch to a new plan is published: every device makes it here, before iteration i
                flags = self.comm.barrier(switch.offer(self, i) + points.flag(i, self.leader and self.has_backups))
                self.write_manifest()  # past the barrier every stage has written the last checkpoint's files
                if flags % 2 >= 1:
                    switch.hand_over(self, i)
                    continue
                if self.spec.recovery:
                    points.decide(i, flags, self.has_backups)
                    # past the barrier every survivor has finished iteration i - 1
                    self.worker.drop_copies_before(points.tag_at_or_before(i))
                actions = self.redo if redoing else (self.full if points.backs_up(i) else self.plain).of(self.device)
                # an epoch's smaller last batch: its program swapped in for this iteration, on the
                # same stages and groups (nothing moves), and the running one back after it
                running = self.worker.program
                partial = self.smaller is not None and self.data.batches.rows_at(i) < self.data.batches.batch
                if partial:
                    self.worker.swap(self.smaller)
                    actions = self.smaller.of(self.device)
                try:
                    waited = time.perf_counter()
                    inputs, labels = self.data.get(i, *self._rows_of(actions))
                    self.data_s += time.perf_counter() - waited
                    started = time.perf_counter()
                    loss = self.worker.step(inputs, labels, actions={self.device: actions}, iteration=i)
                    took = time.perf_counter() - started
                finally:
                    if partial:
                        self.worker.swap(running)
            except Interrupted:
                if self.left:
                    return
                while True:  # another failure while regrouping is recovered from the new program
                    try:
                        i = recover(self)
                        break
                    except Interrupted:
                        continue
                if self.left:
                    return
                continue
            # the loss last: it marks the iteration done (a recovery counts it), and a device killed
            # between the two must not leave a done iteration without its time
            self.store.set(seconds_key(self.device, i), repr(took))
            self.store.set(loss_key(self.device, i), repr(loss))
            log.info("[%s] iteration %d/%d: %.1f ms", self.device, i + 1, iterations, took * 1e3)
            i += 1
            self.completed = i
            if self.due(i):
                self.checkpoint(i)
            for event in self.recoveries:  # a recovery interrupted by another resumes when training does
                if "resumed_at" not in event and i > event["iteration"]:
                    event["resumed_at"] = time.time()
            if self.replan_after is not None and i > self.replan_after[0]:
                reason, self.replan_after = self.replan_after[1], None
                if self.leader:
                    switch.plan_in_background(self, list(self.full.devices), reason)
            if i == self.points.base + 1:
                self.redo = None
