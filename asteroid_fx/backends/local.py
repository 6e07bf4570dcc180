"""local backend: execute a Program in one process with real tensors. This is what the IR means.

Every device holds its own replica of each stage it runs (parameters, buffers, optimizer), exactly
as on a real cluster: a device holding several stages (virtual stages) holds one replica per stage,
and every action works on the replica of the stage it names (a SEND/RECV of a cut: the side of the
cut its device is on, ``ops.own_stage``). Actions run in ``verify.execution_order`` (a deterministic interleaving that respects
every SEND -> RECV and collective). Semantics of one iteration over a global batch of
``microbatches x microbatch_rows`` rows (micro-batch m = rows [m*b, (m+1)*b)):
  F     stage 0 reads its rows of the inputs; later stages concatenate the row slices they
        received; the last stage also computes loss(outputs, labels) x rows / batch, so the
        summed loss is the full-batch mean and gradients match full-batch training.
  B     backward from the loss (last stage) or from the received output gradients.
  SEND  a detached row slice of the outputs (act) or of the input gradients (grad).
  ALLREDUCE  sums the group's gradients chunk by chunk in row order (a device's slot is one chunk
        unless the stage has splits; each chunk's gradients are summed over the micro-batches on
        their own, as a device of its own would) and averages its floating buffers over the
        chunks, so the replicas stay identical; BatchNorm running statistics become the mean over
        the chunks, each chunk's updated by its own forwards.
  TIE   every holder of the tied weights ``params`` (the devices of the stages holding a copy)
        gets the sum over those stages of the stage's gradient (the first device's of each stage:
        after the stage's ALLREDUCE they all hold it), so the copies step alike and the update
        is eager training's.
  NORM  clips the gradients by their global norm, as torch.nn.utils.clip_grad_norm_ before the
        step: every device of the program (``group``) brings the squared 2-norm of the gradients
        of the stages it holds, counting a stage only on its first device (after the ALLREDUCE
        the group's replicas hold the same gradients) and a tied weight only at its first holder
        stage (after the TIE every holder holds the sum; ``program.tied_elsewhere``); the sum over
        the devices is the squared global norm, and every device scales every gradient of every
        stage it holds by min(1, max_norm / (norm + 1e-6)) (``stage.clip_coef``).
  STEP  the device's optimizer steps and clears its gradients.

Fault tolerance (docs/replay.md). A state copy is a stage's parameters, buffers and optimizer
state by model name, tagged with the iteration it starts. Every device keeps the copy of its own
stage taken when an iteration starts (its rollback point) until the next one starts, and files the
copies it receives:
  BACKUP    a copy of this device's stage goes to ``peer``; tagged with the next iteration once the
            device has stepped in this one, else with this one.
  RESTORE   files ``peer``'s copy; a copy tagged i serves a rollback of iteration i.
  ROLLBACK  sets the device's stage (a new replica when the stage table changed) to its state at
            the start of the iteration, name by name, from the copies tagged with it.
Before the first iteration a holder holds the initial state of the stages it receives backups of.
``step(..., stop=...)`` runs a prefix of an iteration, as a failure leaves it; ``replay`` switches
to a rewrite's recovery program, which redoes the iteration, then to its program for the rest.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from asteroid_fx.backends.stage import StageReplica, clip_coef

# re-exported: the state copy and the optimizers were first defined here
from asteroid_fx.backends.state import (  # noqa: F401
    OPTIMIZERS,
    OptimizerSettings,
    OptimizerSpec,
    StateCopy,
    make_optimizer,
    trained_parameters,
)
from asteroid_fx.ir import ops
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.program import Action, Op, Program, tied_elsewhere

Key = tuple[str, int]  # (device, stage): one replica
from asteroid_fx.ir.verify import execution_order


class LocalRunner:
    """Runs ``program`` iteration after iteration; ``stages`` are the split stage modules. A
    ``backends.base.Runner``."""

    def __init__(self, program: Program, stages: Sequence, *, loss: Callable, unflatten: Callable,
                 input_names: Sequence[str], optimizer: OptimizerSpec = "sgd", lr: float = 1e-3,
                 loss_reduction: str = "mean", state_keys: Iterable[str] | None = None):
        if loss_reduction not in ("mean", "sum"):
            raise InputError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.program = program
        self.stages = tuple(stages)
        self.loss = loss
        self.unflatten = unflatten
        self.input_index = {name: i for i, name in enumerate(input_names)}
        self.loss_reduction = loss_reduction
        self.state_keys = set(state_keys) if state_keys is not None else None
        self.optimizer_spec, self.lr = optimizer, lr
        self.iteration = 0  # iterations completed
        self.copies: dict[str, dict[int, StateCopy]] = {}  # device -> iteration tag -> copies it holds (by name)
        self._rollback_taken: int | None = None  # the iteration whose rollback points are taken
        self._then: Program | None = None  # the program that follows a recovery iteration
        self._use(program)
        for device, acts in program.actions:  # a holder starts out holding the initial state
            held = self.copies.setdefault(device, {}).setdefault(0, StateCopy())
            for a in acts:
                if a.op == Op.RESTORE:
                    held.update(StateCopy.of(self.replicas[self._key(a.peer, a.stage)], None))

    def _use(self, program: Program) -> None:
        """Run ``program`` from now on, with a fresh replica of every stage on each device holding it."""
        self.program = program
        self.order = execution_order(program)
        self.held: dict[Key, StageReplica] = {}
        self.replicas: dict[Key, torch.nn.Module] = {}
        self.optimizers: dict[Key, torch.optim.Optimizer | None] = {}
        self._only: dict[str, Key] = {}  # a device holding one stage: its replica, whatever stage an action names
        for device in program.devices:
            for info in program.stages_of(device):
                key = (device, info.index)
                stage = self.stages[info.index]
                replica = copy.deepcopy(stage.module)
                replica.train()
                self.replicas[key] = replica
                self.optimizers[key] = make_optimizer(self.optimizer_spec, trained_parameters(replica), self.lr)
                settings = self.optimizer_spec if isinstance(self.optimizer_spec, OptimizerSettings) else None
                self.held[key] = StageReplica(stage, replica, self.optimizers[key],
                                              last=info.index == len(self.stages) - 1, loss=self.loss,
                                              unflatten=self.unflatten, chunks=info.chunks_of(device),
                                              loss_reduction=self.loss_reduction,
                                              set_lr=settings.set_lr if settings is not None else None,
                                              device=device)
            held = program.stages_of(device)
            if len(held) == 1:
                self._only[device] = (device, held[0].index)

    def _key(self, device: str, stage: int | None) -> Key:
        """The replica an action of ``device`` naming ``stage`` works on. A device of one stage has
        one replica, which every action of it uses (as before virtual stages)."""
        only = self._only.get(device)
        if only is not None:
            return only
        if (device, stage) not in self.held:
            raise InputError(f"device {device} holds no stage {stage} "
                             f"(it holds {', '.join(str(s) for d, s in self.held if d == device)}); verify the program")
        return (device, stage)

    def replay(self, rewrite: Any, stages: Sequence | None = None) -> None:
        """Continue after ``rewrite`` (a passes.replay.Rewrite): the failed devices' state is gone,
        the next ``step`` redoes the interrupted iteration with ``rewrite.recovery`` and the ones
        after run ``rewrite.after``. ``stages`` are the stage modules of the new stage table
        (passes.replay.split_stages); without them every new stage must run the layers of an old one."""
        if stages is None:
            by_layers = {st.layers: st for st in self.stages}
            missing = [st for st in rewrite.after.stages if st.layers not in by_layers]
            if missing:
                st = missing[0]
                raise InputError(f"stage {st.index} of the rewritten program runs layers {st.layers[0]}:{st.layers[1]}, "
                                 "which no stage ran before; pass stages= (passes.replay.split_stages builds them)")
            stages = [dataclasses.replace(by_layers[st.layers], index=st.index) for st in rewrite.after.stages]
        for device in rewrite.failure.devices:
            self.copies.pop(device, None)
        self.stages = tuple(stages)
        self._use(rewrite.recovery)
        self._then = rewrite.after

    def switch(self, sw: Any, stages: Sequence) -> None:
        """Move to another plan between two iterations (a passes.replan.Switch): every device files
        its stage's state as the rollback point of the next iteration, runs its hand-over (BACKUPs
        of ``sw.before``'s stages, then RESTOREs), and every device of ``sw.after`` loads its new
        stage (``stages``: the stage modules of ``sw.after``) from what it holds (ROLLBACK)."""
        if self._then is not None:
            raise InputError("a recovery iteration is pending; switch after it has run")
        i = self.iteration
        for (device, stage), replica in self.replicas.items():
            self.copies.setdefault(device, {}).setdefault(i, StateCopy()).update(
                StateCopy.of(replica, self.optimizers[(device, stage)]))
        self._in_flight, self._stepped = {}, set()
        for op in (Op.BACKUP, Op.RESTORE):  # the order every device runs them in: sends first
            for device, acts in sw.handover:
                for a in acts:
                    if a.op == op:
                        RULES[op](self, device, a)
        for device in sw.leaving:
            self.copies.pop(device, None)
        self.stages = tuple(stages)
        self._use(sw.after)
        for device in sw.after.devices:
            for info in sw.after.stages_of(device):
                self._rollback(device, Action(Op.ROLLBACK, info.index))
        self._rollback_taken = None

    def swap(self, program: Program) -> None:
        """Run ``program`` from the next iteration on, with every replica as it is: a program over
        the same stages on the same devices (passes/remainder.same_stages), whose rows and
        micro-batching may differ (an epoch's last partial batch, passes/remainder.py). Nothing
        moves, so nothing is copied: swapping back is the same call with the running program."""
        from asteroid_fx.passes.remainder import same_stages

        if self._then is not None:
            raise InputError("a recovery iteration is pending; swap programs after it has run")
        why = same_stages(self.program, program)
        if why is not None:
            raise InputError(f"cannot swap in a program that moves stages: {why}; switch plans instead "
                             "(passes/replan.py)")
        self.program, self.order = program, execution_order(program)
        for (device, stage), replica in self.held.items():
            replica.rechunk(program.stages[stage].chunks_of(device))

    # --- one iteration -------------------------------------------------------------------------

    def step(self, inputs: Sequence[torch.Tensor], labels: Any, *, iteration: int | None = None,
             actions: Mapping[str, Sequence[Action]] | None = None,
             stop: Mapping[str, int] | None = None) -> float:
        """One training iteration on a global batch; returns its mean loss (``base.Runner.step``).
        With ``stop`` (device -> actions it completes) only that prefix runs, as a failure leaves
        it: the iteration stays unfinished and the loss returned is what the last stage had
        computed. ``actions`` replace some devices' action lists for this iteration."""
        if iteration is not None:
            self.iteration = iteration
        p = self.program
        order = self.order
        if actions is not None:  # the same stage table, other action lists: their own interleaving
            p = dataclasses.replace(p, actions=tuple((d, tuple(actions.get(d, acts))) for d, acts in p.actions))
            order = execution_order(p)
        batch = p.microbatches * p.microbatch_rows
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] != batch:
                raise InputError(f"the program trains on batches of {batch} rows "
                                 f"({p.microbatches} micro-batches x {p.microbatch_rows}); got an input with "
                                 f"{t.shape[0]} rows")
        self._inputs, self._labels, self._batch = tuple(inputs), labels, batch
        for replica in self.held.values():
            replica.begin(batch)
        self._mailbox: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._arrived: dict[tuple[int, int], list[str]] = {}
        self._in_flight: dict[tuple[str, str, int], list[tuple[int, StateCopy]]] = {}  # BACKUP -> RESTORE
        self._loss = 0.0
        self._stepped: set[Key] = set()
        if self._rollback_taken != self.iteration:  # a redone iteration keeps the points it started with
            for held in self.copies.values():  # copies of earlier iterations serve no rollback any more
                for tag in [t for t in held if t < self.iteration]:
                    del held[tag]
            for (device, stage), replica in self.replicas.items():
                held = self.copies.setdefault(device, {}).setdefault(self.iteration, StateCopy())
                held.update(StateCopy.of(replica, self.optimizers[(device, stage)]))
            self._rollback_taken = self.iteration
        lists = {d: acts for d, acts in p.actions}
        for device, index in order:
            if stop is not None and index >= stop.get(device, 0):
                continue
            a = lists[device][index]
            RULES[a.op](self, device, a)
        if stop is None:
            self.iteration += 1
            if self._then is not None:
                self.program, self.order, self._then = self._then, execution_order(self._then), None
        return self._loss

    def _rows(self, mb: int, rows: tuple[int, int]) -> slice:
        base = mb * self.program.microbatch_rows
        return slice(base + rows[0], base + rows[1])

    def _forward(self, device: str, a: Action) -> None:
        replica = self.held[self._key(device, a.stage)]
        inputs = labels = None
        if a.stage == 0:
            sl = self._rows(a.mb, a.rows)
            inputs = tuple(self._inputs[self.input_index[name]][sl] for name in replica.stage.inputs)
        if replica.last:
            labels = self._labels[self._rows(a.mb, a.rows)]
        self._loss += replica.forward(a.mb, a.rows, inputs, labels)

    def _backward(self, device: str, a: Action) -> None:
        self.held[self._key(device, a.stage)].backward(a.mb, a.rows)

    def _send(self, device: str, a: Action) -> None:
        key = self._key(device, ops.own_stage(a))
        data = self.held[key].outgoing(a.mb, a.payload, a.rows)
        self._mailbox[(device, a.peer, a.payload, a.stage, a.mb, a.rows)] = data

    def _recv(self, device: str, a: Action) -> None:
        data = self._mailbox.pop((a.peer, device, a.payload, a.stage, a.mb, a.rows))
        self.held[self._key(device, ops.own_stage(a))].receive(a.mb, a.payload, a.rows, data)

    def _allreduce(self, device: str, a: Action) -> None:
        key = (a.stage, 0)
        arrived = self._arrived.setdefault(key, [])
        arrived.append(device)
        if len(arrived) < len(a.group):
            return
        held = [self.held[self._key(d, a.stage)] for d in a.group]
        # every chunk of the stage in row order (the group's slot order, each slot's chunks in turn):
        # a survivor running a lost device's chunk brings it where that device's replica stood
        chunks = [c for r in held for c in r.chunk_grads()]
        buffers = [c for r in held for c in r.chunk_buffers()]
        with torch.no_grad():
            sums: list[torch.Tensor | None] = []
            for grads in zip(*chunks):
                present = [g for g in grads if g is not None]
                total = None
                if present:
                    total = present[0].clone()
                    for g in present[1:]:
                        total += g
                sums.append(total)
            means = [torch.stack(list(bufs)).mean(0) for bufs in zip(*buffers)]
            for r in held:
                r.settle([t.clone() if t is not None else None for t in sums], [m.clone() for m in means])
        self._arrived.pop(key)

    def _tie(self, device: str, a: Action) -> None:
        key = ops.collective_key(a)
        arrived = self._arrived.setdefault(key, [])
        arrived.append((device, a.stage))
        if len(arrived) < len(a.group):
            return
        self._arrived.pop(key)
        stage_of = dict(arrived)
        replicas = {d: dict(self.replicas[self._key(d, stage)].named_parameters(remove_duplicate=False))
                    for d, stage in arrived}
        # each stage counts once: its first device's gradient (after its ALLREDUCE, the stage's sum)
        firsts = [d for d in a.group if self.program.stages[stage_of[d]].slots[0].device == d]
        with torch.no_grad():
            for name in a.params:
                grads = [replicas[d][name].grad for d in firsts if replicas[d][name].grad is not None]
                if not grads:
                    continue
                total = grads[0].clone()
                for g in grads[1:]:
                    total += g
                for d in a.group:
                    replicas[d][name].grad = total.clone()

    def _norm(self, device: str, a: Action) -> None:
        key = ops.collective_key(a)
        arrived = self._arrived.setdefault(key, [])
        arrived.append(device)
        if len(arrived) < len(a.group):
            return
        self._arrived.pop(key)
        skip = tied_elsewhere(self.program)
        square = 0.0
        for d in a.group:  # what each device brings: the stages it is the first device of
            for info in self.program.stages_of(d):
                if info.slots[0].device == d:
                    square += float(self.held[self._key(d, info.index)].grad_square_norm(skip.get(info.index, ())))
        coef = clip_coef(square, a.max_norm)
        for d in a.group:
            for info in self.program.stages_of(d):
                self.held[self._key(d, info.index)].scale_grads(coef)

    def _step(self, device: str, a: Action) -> None:
        key = self._key(device, a.stage)
        self.held[key].step(self.iteration)
        self._stepped.add(key)

    def _backup(self, device: str, a: Action) -> None:
        key = self._key(device, a.stage)
        tag = self.iteration + (key in self._stepped)
        copy_ = StateCopy.of(self.replicas[key], self.optimizers[key])
        self._in_flight.setdefault((device, a.peer, a.stage), []).append((tag, copy_))

    def _restore(self, device: str, a: Action) -> None:
        tag, copy_ = self._in_flight[(a.peer, device, a.stage)].pop(0)
        self.copies.setdefault(device, {}).setdefault(tag, StateCopy()).update(copy_)

    def _rollback(self, device: str, a: Action) -> None:
        self.held[self._key(device, a.stage)].rollback(self.copies.get(device, {}).get(self.iteration, StateCopy()), device, self.iteration)

    # --- results -------------------------------------------------------------------------------

    def state_dict(self, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the whole model (each stage's first replica), by model name;
        ``keys`` (default: the model's, given as ``state_keys``) keeps only those names."""
        keys = self.state_keys if keys is None else set(keys)
        out: dict[str, torch.Tensor] = {}
        for info in self.program.stages:
            out.update(self.held[self._key(info.slots[0].device, info.index)].state_dict(keys))
        return out

    def stage_copy(self, stage: int) -> StateCopy:
        """Stage ``stage``'s state by name, optimizer state included (its first device's replica)."""
        info = self.program.stages[stage]
        key = self._key(info.slots[0].device, info.index)
        return StateCopy.of(self.replicas[key], self.optimizers[key])

    def load_copy(self, state: StateCopy) -> None:
        """Every replica's parameters, buffers and optimizer state from ``state``, by name (a
        resumed run's checkpoint)."""
        for key, replica in self.replicas.items():
            missing = state.load_into(replica, self.optimizers[key])
            if missing:
                raise InputError(f"the state to load has no {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                                 f"(stage {key[1]} on {key[0]}); it is not a state of this model")

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Every replica's parameters and buffers from ``state``, by model name (``base.Runner.load``)."""
        for (device, _), replica in self.held.items():
            missing = replica.load(state)
            if missing:
                raise InputError(f"the state to load has no {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                                 f"(stage {replica.stage.index} on {device}); give the model's whole state_dict")


RULES: dict[Op, Callable[[LocalRunner, str, Action], None]] = {
    Op.F: LocalRunner._forward,
    Op.B: LocalRunner._backward,
    Op.SEND: LocalRunner._send,
    Op.RECV: LocalRunner._recv,
    Op.ALLREDUCE: LocalRunner._allreduce,
    Op.STEP: LocalRunner._step,
    Op.TIE: LocalRunner._tie,
    Op.NORM: LocalRunner._norm,
    Op.BACKUP: LocalRunner._backup,
    Op.RESTORE: LocalRunner._restore,
    Op.ROLLBACK: LocalRunner._rollback,
}
