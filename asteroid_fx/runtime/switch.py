"""Re-planning while the run goes on: the leader runs the planner in the background after a
recovery and when a device asks to join, and every device switches to its plan at an iteration
boundary when the simulator predicts a gain (passes/replan.py).

A switch is published by the leader (``offer``) and carried out by every device of the running
program and every device that joins (``hand_over``): each hands its stage's state over to the new
plan's devices, and the hand-over commits once all have done their part. A failure before that
abandons the switch on every device alike; one after it is recovered in the new program.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from asteroid_fx.backends.torch_dist import Interrupted
from asteroid_fx.ir.program import Action, Op
from asteroid_fx.ir.program_text import format_program, parse_program
from asteroid_fx.passes.replan import replan, switch
from asteroid_fx.passes.replay import add_backups, split_stages
from asteroid_fx.runtime.errors import RunTimedOut
from asteroid_fx.runtime.member import Member
from asteroid_fx.runtime.store import (EPOCH, JOIN_COUNT, admit_key, has, join_key, switch_key,
                                       switch_outcome_key)
from asteroid_fx.sim import simulate

log = logging.getLogger(__name__)

JOIN_POLL_S = 0.25  # how often the leader looks for devices asking to join
JOIN_TIMEOUT_S = 600.0  # how long a device that asked to join waits for an answer
MIN_GAIN = 0.05  # a re-plan is switched to when predicted at least this much faster


def offer(m: Member, i: int) -> float:
    """On the leader at the boundary before iteration ``i``: publish a plan the background
    planner has ready (1.0: switch now), or 0.0. Also notices devices that ask to join."""
    if not (m.spec.recovery and m.spec.replan and m.leader) or m.redo is not None:
        return 0.0
    if time.monotonic() - m.joins_polled > JOIN_POLL_S:  # a store round trip, a few times a second
        m.joins_polled = time.monotonic()
        asked = m.store.add(JOIN_COUNT, 0)
        if asked > m.joins_seen and not m.planning and m.planned is None:
            # a request counted but not written is looked at again at the next poll, never waited
            # on; one missing before a written one is a count nobody wrote a request for (the
            # store's counters are unsigned: a stranger can move them), and is passed over
            present = [k for k in range(m.joins_seen + 1, asked + 1) if has(m.store, join_key(k))]
            joining = [m.store.get(join_key(k)).decode() for k in present]
            if joining:
                m.joins_seen = present[-1]
                plan_in_background(m, list(m.full.devices) + joining, f"{', '.join(joining)} asked to join",
                                   tuple(joining))
    if m.planned is None or m.planned[0] != m.epoch:
        m.planned = None  # planned for a membership that has changed since
        return 0.0
    _, reason, program, joining = m.planned
    m.planned = None
    record = {"epoch": m.epoch + 1, "iteration": i, "reason": reason, "before": format_program(m.full),
              "after": format_program(program), "joining": list(joining), "history": m.epochs,
              "joins_seen": m.joins_seen}
    m.store.set(switch_key(m.epoch), json.dumps(record))
    for d in joining:
        m.store.set(admit_key(d), json.dumps(record))
    return 1.0


def plan_in_background(m: Member, devices: list[str], reason: str, joining: tuple[str, ...] = ()) -> None:
    """Run the planner for ``devices`` in a thread; keep its plan if the simulator predicts it
    at least MIN_GAIN faster than the running one (a device that asked to join and is not in
    the plan is told so)."""
    epoch, c = m.epoch, m.compiled
    m.planning = True

    def work() -> None:
        verdict = ""
        try:
            started = time.perf_counter()
            _, program = replan(c, devices, planner=m.spec.planner, schedule="1f1b")
            now = simulate(m.plain, c.layer_graph, c.cluster).iteration_s
            new = simulate(program, c.layer_graph, c.cluster).iteration_s
            took = time.perf_counter() - started
            if joining and not set(joining) & set(program.devices):
                verdict = "the planner's best plan leaves it out (too slow to help)"
            elif new < now * (1 - MIN_GAIN):
                full = add_backups(program) if len(program.stages) > 1 else program
                m.planned = (epoch, f"{reason}; re-planned in {took:.2f}s: predicted "
                             f"{_ms(now)} -> {_ms(new)} per iteration", full, joining)
            else:
                verdict = f"no gain predicted ({_ms(now)} -> {_ms(new)} per iteration)"
            log.info("[%s] re-plan for %s: %s", m.device, ", ".join(devices), verdict or "switching")
        except Exception as e:  # a failed re-plan leaves the running program as it is
            verdict = f"re-planning failed: {e}"
            log.warning("[%s] %s", m.device, verdict)
        finally:
            for d in joining if verdict else ():
                m.store.set(admit_key(d), json.dumps({"declined": verdict}))
            m.planning = False

    threading.Thread(target=work, name="replan", daemon=True).start()


def join(m: Member) -> None:
    """Ask to be taken in and wait for the switch that does (or for the answer that it won't)."""
    k = m.store.add(JOIN_COUNT, 1)
    m.store.set(join_key(k), m.device)
    log.info("[%s] asked to join; waiting for a plan that takes it in", m.device)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not has(m.store, admit_key(m.device)):
        if time.monotonic() > deadline:
            raise RunTimedOut(f"{m.device} asked to join but was not taken in within {JOIN_TIMEOUT_S:.0f}s: "
                              "is the run still going, with --recover?")
        time.sleep(0.05)
    record = json.loads(m.store.get(admit_key(m.device)))
    if "declined" in record:
        log.info("[%s] not taken in: %s", m.device, record["declined"])
        m.left = True
        return
    m.epoch = record["epoch"] - 1
    m.epochs = [tuple(e) for e in record["history"]]
    m.start = record["iteration"]
    m.admitted = record  # the training loop starts with the switch that takes this device in


def hand_over(m: Member, i: int, record: dict | None = None) -> None:
    """At the boundary before iteration ``i``, every device of the published switch (the
    running program's and those that join) hands its state over and moves to the new plan;
    a device the new plan leaves out leaves after handing over.

    A device that fails meanwhile: the hand-over commits once every device of it has done its
    part, which an all-reduce over all of them shows. Until then the switch is abandoned (its
    record in the store says which, first come first served, so every device does the same):
    the devices of the running program recover the failure in it, those that were joining
    leave. After, the failure is one in the new program's first iteration (Interrupted reaches
    the training loop, which recovers it there: the hand-over gave every holder of a backup its
    copy)."""
    record = record or json.loads(m.store.get(switch_key(m.epoch)))
    sw = switch(parse_program(record["before"]), parse_program(record["after"]), reason=record["reason"])
    after, e, c = sw.after, record["epoch"], m.compiled
    m.joins_seen = record["joins_seen"]  # a new leader must not take the same requests again
    started = time.time()
    if m.heartbeat is not None:  # a failure of any device of the hand-over interrupts every one
        m.heartbeat.watch(m.epoch, sw.world)
    event = {"iteration": i, "reason": sw.reason, "devices": list(after.devices), "joining": list(sw.joining),
             "leaving": list(sw.leaving), "started_at": started}
    m.switches.append(event)
    running_comm, running = m.comm, m.worker
    stages = split_stages(after, c.captured, c.layer_graph) if m.device in after.devices else None
    sender = running
    try:
        handover = m.new_comm(after, e, world=sw.world, name="handover")
        m.retired.append((handover,))
        if running is not None:  # a device of the running program: its stage's state at the boundary
            running.take_point(i)
        else:  # a device that joins holds nothing; it receives on a worker of its new stage
            m.comm = handover
            sender = m.new_worker(after, stages, {})
        sender.comm = handover
        sender.fault = m.faults.before_handover_action if m.faults else None
        actions = sw.of(m.device)
        sender.step((), None, actions={m.device: actions}, iteration=i)
        if sender.fault is not None:
            sender.fault(i, len(actions))
        handover.barrier()  # completes only once every device of the hand-over has done its part
        outcome = "committed"
    except Interrupted:
        outcome = "abandoned"
    outcome = m.store.compare_set(switch_outcome_key(m.epoch), "", outcome).decode()
    if outcome == "abandoned":
        event["abandoned"] = True
        if running is None:
            log.warning("[%s] a device failed during the hand-over; the switch is abandoned and this device "
                        "not taken in; leaving", m.device)
            m.left = True
            return
        log.warning("[%s] a device failed during the hand-over before iteration %d; the switch is abandoned, "
                    "recovering in the running program", m.device, i)
        m.comm, m.worker = running_comm, running
        running.comm, running.fault, running.done = running_comm, m.faults.before_action if m.faults else None, 0
        raise Interrupted()
    if m.device not in after.devices:
        log.info("[%s] the new plan leaves this device out; leaving after handing over", m.device)
        m.left = True
        return
    # committed: from here a failure is recovered in the new program, from what the devices hold
    m.epoch = e
    m.store.set(EPOCH, str(e))
    if m.heartbeat is not None:
        m.heartbeat.watch(e, after.devices)
    m.enter(after, i)
    m.worker, sender.done = sender, 0  # what a recovery needs of a worker until the new one: its copies
    m.comm = m.new_comm(after, e)
    m.worker = m.new_worker(after, stages, sender.copies)
    # the first iteration loads the new stage from what the device holds, then runs the new plan
    m.redo = (Action(Op.ROLLBACK, after.stage_of(m.device).index), *after.of(m.device))
    event["switched_at"] = time.time()
    log.info("[%s] epoch %d: switched to a new plan (%s) at iteration %d", m.device, e, sw.reason, i)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"
