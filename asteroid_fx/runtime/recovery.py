"""Recovery from a failed or departed device, in place: the survivors agree on who failed and how
far each got, roll back to the last iteration every copy exists for, rewrite the program for the
survivors (passes/replay.py; each computes the same rewrite from the same inputs), build the new
epoch's process groups and redo the lost iterations from the same batches (docs/replay.md, "Live").
No process restarts, no checkpoint."""

from __future__ import annotations

import json
import logging
import time

from asteroid_fx.ir.program import Action, Op
from asteroid_fx.passes.replay import Failure, replay, split_stages
from asteroid_fx.runtime.member import Member
from asteroid_fx.runtime.store import EPOCH, agreed_failure, done_key, loss_key

log = logging.getLogger(__name__)


def recover(m: Member) -> int:
    """Agree on the failure and the iteration to return to, rewrite, regroup; returns the
    iteration to run next (the run's end if this device leaves: ``m.left``)."""
    if m.heartbeat is None:
        raise RuntimeError("interrupted without recovery")
    record = agreed_failure(m.store, m.epoch)
    x = record["device"]
    if x == m.device:  # declared failed by the others (it fell silent): it cannot rejoin
        log.warning("[%s] the others declared this device failed (%s); leaving", m.device, record["reason"])
        m.left = True
        return m.spec.iterations
    log.warning("[%s] %s failed (%s) during iteration %d; recovering", m.device, x, record["reason"], m.completed)
    m.store.set(done_key(m.epoch, m.device), json.dumps([m.completed, m.worker.done]))
    # every device reports how far it got, or is found failed too (devices can die together)
    epoch = m.epoch
    records = m.heartbeat.agree_failed(m.full.devices, lambda d: done_key(epoch, d),
                                       deadline_s=m.spec.heartbeat_timeout_s * 4 + 10)
    failed = [rec["device"] for rec in records]
    if m.device in failed:  # the others gave this device up (it was silent too long): it cannot rejoin
        log.warning("[%s] the others declared this device failed; leaving", m.device)
        m.left = True
        return m.spec.iterations
    also = failed[1:]
    if also:
        together = ", ".join(f"{rec['device']} ({rec['reason']})" for rec in records[1:])
        log.warning("[%s] failed at the same time: %s", m.device, together)
    survivors = [d for d in m.full.devices if d not in failed]
    reports = {d: json.loads(m.store.get(done_key(m.epoch, d))) for d in survivors}
    r = min(done for done, _ in reports.values())  # the iteration some survivor has not finished
    # the failed devices of the running program; the others were joining (a switch's hand-over):
    # they never ran an iteration of it, and are as if they had never asked
    lost = [d for d in failed if d in m.full.devices]
    # an iteration counts only once every device published its loss (before its next barrier,
    # so nobody has dropped the copies of an iteration a dead device did not publish)
    while r > m.points.base and not m.store.check([loss_key(d, r - 1) for d in lost]):
        r -= 1
    t = m.points.tag_at_or_before(r)  # the last iteration start every copy exists for
    # the iterations from t on are undone: counted as done, a failure in the first redone one
    # would agree on an iteration after t, whose copies only that iteration's end makes
    m.completed = t
    progress = tuple((d, k if done == r else 0) for d, (done, k) in reports.items())
    c = m.compiled
    if lost:
        rewrite = replay(m.full, Failure(lost[0], r, progress, tuple(lost[1:])), c.layer_graph, c.cluster)
        after, redo, changes = rewrite.after, rewrite.recovery.of(m.device), list(rewrite.changes)
    else:  # the program stays; its groups, which the failure broke, are built again
        after = m.full
        redo = (Action(Op.ROLLBACK, after.stage_of(m.device).index), *after.of(m.device))
        changes = [f"{', '.join(failed)} failed while joining; the program is unchanged"]
    event = {"epoch": m.epoch, "device": x, "also": also, "reason": record["reason"], "declared_at": record["at"], "iteration": r,
             "rollback_to": t, "changes": changes}
    m.recoveries.append(event)
    m.epoch += 1
    m.store.set(EPOCH, str(m.epoch))
    if m.device not in after.devices:  # left out by the rewrite: too slow to help
        log.info("[%s] the rewrite leaves this device out; leaving", m.device)
        m.left = True
        return m.spec.iterations
    m.heartbeat.watch(m.epoch, after.devices)
    # the new program is this device's before its groups are built: a failure meanwhile (the
    # groups wait for every member) is recovered from it, with the copies the worker holds
    m.enter(after, t)
    m.redo = redo
    m.worker.done = 0
    m.retired.append((m.comm, m.worker))  # the broken groups are kept, never destroyed (Member)
    if m.faults is not None:
        m.faults.before_regroup(r)
    m.comm = m.new_comm(after, m.epoch)
    m.worker = m.new_worker(after, split_stages(after, c.captured, c.layer_graph), m.worker.copies)
    regrouped = time.time()
    for earlier in m.recoveries:  # a recovery interrupted while regrouping is regrouped by this one
        earlier.setdefault("regrouped_at", regrouped)
    log.info("[%s] epoch %d: %s; redoing from iteration %d", m.device, m.epoch, "; ".join(changes), t)
    # the rewrite is local; the planner may know better. It runs once the interrupted iteration
    # is redone: a planner thread holds the interpreter lock for most of its run, and
    # alongside it the leader's redone iterations were several times slower
    m.replan_after = (r, f"{', '.join(failed)} failed") if m.spec.replan and m.leader else None
    return t
