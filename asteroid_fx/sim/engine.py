"""sim: time a Program on a Cluster with the cost model, without running it.

``simulate(program, lg, cluster)`` is a discrete-event simulation of one training iteration. It
models exactly this, and nothing else:

  compute     F and B run one at a time per device, in the device's order (a device holding several
              stages runs them all through one queue), for the stage model's
              ``cost.stage.compute_s(lg, kind, op, layers, rows)`` seconds (kind: the device's
              kind).
  SEND        asynchronous, as torch_dist's isend: the transfer starts when the SEND is posted (the
              receiver's buffer is taken to be ready) and the device goes on at once. A SEND moves
              ``transfer_bytes(action)`` = rows x the bytes of one row of every tensor in its specs.
  RECV        blocks the device until the matching SEND's data has arrived (matched as ``verify``
              matches them: same endpoints, payload, stage, micro-batch and rows, k-th with k-th).
  links       a transfer from a to b takes latency(a, b) + bytes / bandwidth(a, b) on its own
              (``cost.stage.message_s``).
              Transfers from a to b go one after another in the order posted (one connection per
              pair, as gloo and NCCL keep them). Every device has a full-duplex NIC: one "out" and
              one "in" channel, which the transfers of different pairs share max-min fairly, in
              time: a transfer running at a fraction x of its pair's bandwidth uses x of its
              sender's out channel and x of its receiver's in channel, and each channel gives at
              most 1 in all. Latency is a delay after the last byte, not link time. With
              ``shared_medium=True`` (one Wi-Fi channel) every transfer also uses x of a single
              medium shared by all devices, in both directions.
  ALLREDUCE   blocks until every member of the group reached it, then is a ring: each member sends
              2 (g-1)/g x the stage's gradient and buffer bytes to the next, all edges in lockstep
              at the pace of the slowest (bounded by the slowest link, and sharing the links as
              above), plus 2 (g-1) x the largest latency on the ring (``cost.stage.Ring``: the
              same time as ``Ring.seconds`` when the links are otherwise idle).
  TIE         the same ring over its holders (every device of the stages holding the tied weights,
              which meet at it whatever stage each names), of the tied weights' bytes (its specs).
  NORM        the same ring over every device of the program, of one float64
              (``cost.stage.NORM_BYTES``): in effect 2 (n-1) latencies, and a barrier before the STEPs.
  BACKUP      like SEND (in the background), RESTORE like RECV, of the stage's state: weights,
              optimizer state (weights x opt_state_factor) and buffers (torch_dist sends these
              bytes as one message, after a 64-byte header, with the holder's receive posted when
              the iteration starts).
  STEP        ROLLBACK (a local copy) and any op without a rule: no time.
  memory      cost.stage.device_memory's model (a tied weight counted on every stage holding a copy),
              as a timeline: weights x (2 + opt_state_factor) +
              buffers all iteration, plus one micro-batch's activations (kept for backward, with the
              stage's input and output slices) from the start of its F to the end of its B. With
              ``recovery`` also, all iteration, the copies torch_dist keeps for a rollback: every
              device's rollback point (its stage's state, what a BACKUP carries) and a holder's two
              copies (this iteration's and the next's) of each stage it backs up. A device holding
              several stages holds the sum of theirs. A device running its slot as several chunks
              (a stage with splits) also holds each further chunk's gradients and its chunks'
              buffers (``cost.stage.chunk_memory``); its activations are its chunks' rows.

Not modelled: optimizer-step time, the first stage's input loading and the last stage's loss,
kernel-launch jitter, CPU cost of sending, memory fragmentation and the allocator's caching,
contention between compute and communication for memory bandwidth, TCP dynamics (a transfer runs
at its fair share at once), the receiver having to post its receive before bytes move (torch_dist
posts receives one ahead, which hides this), the backend's separate second all-reduce of floating
buffers (folded into the one ring, its latency counted once), the copy a BACKUP packs before it
sends, and the memory of the copies kept for a rollback unless ``recovery`` is asked for.
Iteration time is when the last device finishes its last action.

Beyond times, a Simulation gives its critical path (the chain of computes and messages that ends
last, walked back from the last device to t=0) and, from it, what binds the iteration.

A program that cannot finish (a RECV whose SEND never comes, members of an ALLREDUCE that never
meet) raises ``verify.DeadlockError`` naming each blocked device, its line and what it waits for.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from typing import Callable, Mapping, Sequence

from asteroid_fx.cost.stage import (ADAM_STATE_FACTOR, NORM_BYTES, StageCosts, activation_memory, allreduce_bytes,
                                    chunk_memory, ring, state_memory, static_memory, tensor_bytes)
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir import ops
from asteroid_fx.ir.program import Action, Op, Program, TensorSpec, backup_holders, default_holders
from asteroid_fx.ir.program_text import format_action, layout_program
from asteroid_fx.ir.verify import DeadlockError
from asteroid_fx.sim.network import AIR, Flow, fair_rates
from asteroid_fx.sim.report import DeviceReport, MemoryTimeline, Simulation, Span, Transfer

# Bytes per element of the dtypes a cut carries; any other dtype asks torch.
_ELEMENT_BYTES: Mapping[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16,
}


def element_bytes(dtype: str) -> int:
    if dtype in _ELEMENT_BYTES:
        return _ELEMENT_BYTES[dtype]
    import torch

    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r} in a transfer's specs; use a torch dtype name such as 'float32'")
    return torch.empty((), dtype=dt).element_size()


def spec_bytes(specs: Sequence[TensorSpec]) -> int:
    """Bytes of one row of every tensor in ``specs``."""
    total = 0
    for s in specs:
        n = element_bytes(s.dtype)
        for d in s.shape:
            n *= d
        total += n
    return total


def transfer_bytes(a: Action) -> int:
    """Bytes a SEND/RECV moves: its rows times one row of its specs (what the backend sends)."""
    return (a.rows[1] - a.rows[0]) * spec_bytes(a.specs) if a.rows else 0


# ---------------------------------------------------------------------------------------------
# the engine


class _Engine:
    """The simulation's state while it runs (analysis state, not IR)."""

    def __init__(self, program: Program, lg: LayerGraph, cluster: Cluster, shared_medium: bool,
                 opt_state_factor: float, recovery: bool = False) -> None:
        self.p, self.lg, self.cluster = program, lg, cluster
        self.shared_medium = shared_medium
        self.opt = opt_state_factor
        self.names = [d for d, _ in program.actions]
        self.acts = {d: acts for d, acts in reversed(program.actions)}
        self.held: dict[str, tuple[int, ...]] = {}  # device -> its stages, in order
        for st in program.stages:
            for s in st.slots:
                self.held[s.device] = (*self.held.get(s.device, ()), st.index)
        for d in self.names:
            if d not in self.held:
                raise InputError(f"device {d} has actions but no slot in the stage table; verify(program) says more")
        self.nic = {d: 2 * cluster.index(d) for d in self.names}  # out channel id; in = +1
        self.kind = {d: cluster.device(d).kind for d in self.names}
        self.now = 0.0
        self.pc = dict.fromkeys(self.names, 0)
        self.finish: dict[str, float] = {}
        self.heap: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.flows: list[Flow] = []  # on the wire now
        self.queued: dict[tuple[str, str], list[Flow]] = defaultdict(list)  # per pair, behind the one on the wire
        self.flows_changed = False
        self.ready: list[str] = []
        self.arrived: set[tuple] = set()
        self.waiting: dict[tuple, tuple[str, float]] = {}  # channel key -> (device, since)
        self.gathering: dict[tuple, dict[str, float]] = defaultdict(dict)  # collective -> member -> arrival
        self.spans: list[Span] = []
        self.transfers: list[Transfer] = []
        self.compute_s = Counter()
        self.wait_s = Counter()
        self.allreduce_s = Counter()
        self.live: dict[str, Counter] = {d: Counter() for d in self.names}  # (stage, rows) -> in flight
        self.memory: dict[str, list[tuple[float, int]]] = {}
        self.peak: dict[str, int] = {}
        held = backups_held(program) if recovery else {}
        # backups held count once per device, with its first stage
        self.static = {d: sum(static_memory(lg, program.stages[s].layers, opt_state_factor, recovery=recovery,
                                            held=held.get(d, ()) if k == 0 else ())
                              for k, s in enumerate(self.held[d])) for d in self.names}
        # a slot run as several chunks keeps each chunk's gradients and buffers apart
        self.chunked = {d: [chunk_memory(lg, program.stages[s].layers, len(program.stages[s].chunks_of(d)))
                            for s in self.held[d]] for d in self.names}
        for d in self.names:
            self.static[d] += sum(g + b for g, b in self.chunked[d])
        self.costs = StageCosts(lg, cluster, opt_state_factor)
        self._act_cache: dict[tuple[int, int], float] = {}
        self._keys = self._channel_keys()
        for d in self.names:
            self.memory[d] = [(0.0, int(self.static[d]))]
            self.peak[d] = int(self.static[d])

    # -- keys ---------------------------------------------------------------------------------

    def _channel_keys(self) -> dict[tuple[str, int], tuple]:
        """Each transfer action's channel key, with its ordinal on the channel (k-th with k-th),
        and each ALLREDUCE's collective key (the k-th of its stage and group)."""
        keys: dict[tuple[str, int], tuple] = {}
        for d in self.names:
            seen: Counter = Counter()
            for i, a in enumerate(self.acts[d]):
                key = _channel_key(d, a)
                if key is None:
                    continue
                keys[(d, i)] = (*key, seen[key])
                seen[key] += 1
        return keys

    # -- time ---------------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn))

    def compute_seconds(self, device: str, a: Action) -> float:
        return self.costs.compute_s(device, a.op, self.p.stages[a.stage].layers, a.rows[1] - a.rows[0])

    def activation(self, stage: int, rows: int) -> float:
        key = (stage, rows)
        if key not in self._act_cache:
            self._act_cache[key] = activation_memory(self.lg, self.p.stages[stage].layers, rows)
        return self._act_cache[key]

    def run(self) -> None:
        self.ready = list(self.names)
        while True:
            while self.ready:
                ready, self.ready = self.ready, []
                for d in ready:
                    self.advance(d)
            if self.flows_changed:
                fair_rates(self.flows)
                self.flows_changed = False
            t_next, first = math.inf, None
            for f in self.flows:
                if f.rate > 0:
                    t = self.now + f.remaining / f.rate
                    if t < t_next:
                        t_next, first = t, f
            if self.heap and self.heap[0][0] <= t_next:
                t_next, first = self.heap[0][0], None
            if t_next == math.inf:
                break
            self.drain(t_next, first)
            while self.heap and self.heap[0][0] <= self.now:
                heapq.heappop(self.heap)[2]()
        blocked = {d: self.pc[d] for d in self.names if self.pc[d] < len(self.acts[d])}
        if blocked:
            raise self.deadlock(blocked)

    def drain(self, t: float, first: Flow | None) -> None:
        dt = t - self.now
        self.now = t
        if not self.flows or dt <= 0 and first is None:
            return
        done = []
        for f in self.flows:
            f.remaining -= f.rate * dt
            # flows that end together with ``first`` (to rounding) end now too
            if f is first or f.remaining <= f.rate * 1e-12 * (1.0 + t):
                done.append(f)
        if done:
            self.flows = [f for f in self.flows if f not in done]
            self.flows_changed = True
            for f in done:
                f.remaining = 0.0
                self.finish_flow(f)

    def finish_flow(self, f: Flow) -> None:
        arrive = self.now + f.latency
        f.first_record = len(self.transfers)
        for src, dst, label, nbytes in f.edges:
            self.transfers.append(Transfer(src, dst, label, nbytes, f.posted, f.started, self.now, arrive))
        self.at(arrive, lambda: f.on_done(f))
        if f.pair is not None:
            queue = self.queued[f.pair]
            if queue:
                nxt = queue.pop(0)
                nxt.started = self.now
                self.flows.append(nxt)
            else:
                del self.queued[f.pair]

    def start_flow(self, uses, airtime: float, nominal: float, nbytes: float, latency: float, on_done,
                   edges, pair: tuple[str, str] | None) -> None:
        """``uses``: the channels and the share of each the flow takes at its nominal rate;
        ``airtime``: the share of the shared medium it takes then (when there is one)."""
        if nominal == math.inf:  # an infinitely fast link: only the latency
            self.finish_flow(Flow(uses, nominal, nbytes, latency, on_done, edges, self.now, None))
            return
        flow = Flow(uses, nominal, max(nbytes, 0.0), latency, on_done, edges, self.now, pair)
        if self.shared_medium:
            flow.uses = (*uses, (AIR, airtime))
        if pair is not None and pair in self.queued:
            self.queued[pair].append(flow)  # behind the pair's earlier messages
            return
        if pair is not None:
            self.queued[pair] = []
        self.flows.append(flow)
        self.flows_changed = True

    # -- devices ------------------------------------------------------------------------------

    def advance(self, d: str) -> None:
        """Run device ``d`` from its current action until it computes, blocks or is done."""
        acts = self.acts[d]
        while self.pc[d] < len(acts):
            i = self.pc[d]
            if not _RULES.get(acts[i].op, _Engine.instant)(self, d, i, acts[i]):
                return
            self.pc[d] = i + 1
        self.finish.setdefault(d, self.now)

    def instant(self, d: str, i: int, a: Action) -> bool:
        return True

    def compute(self, d: str, i: int, a: Action) -> bool:
        start = self.now
        end = start + self.compute_seconds(d, a)
        if ops.info(a.op).compute == "fwd":
            self.hold(d, a, +1)

        def done() -> None:
            self.spans.append(Span(d, i, start, end, "compute", format_action(a, short=True)))
            self.compute_s[d] += end - start
            if ops.info(a.op).compute == "bwd":
                self.hold(d, a, -1)
            self.pc[d] = i + 1
            self.ready.append(d)

        self.at(end, done)
        return False

    def hold(self, d: str, a: Action, sign: int) -> None:
        """A micro-batch's activations come to life at its F and die at its B."""
        live = self.live[d]
        live[(a.stage, a.rows[1] - a.rows[0])] += sign
        total = self.static[d] + sum(n * self.activation(s, r) for (s, r), n in live.items() if n)
        self.memory[d].append((self.now, int(total)))
        self.peak[d] = max(self.peak[d], int(total))

    def post(self, d: str, i: int, a: Action) -> bool:
        key = self._keys[(d, i)]
        nbytes = float(_PAYLOAD_BYTES[ops.info(a.op).moves](self, a))
        bw, lat = self.cluster.link(d, a.peer)
        src, dst = self.nic[d], self.nic[a.peer] + 1
        label = format_action(a, short=True)

        def arrived(flow: Flow) -> None:
            self.arrived.add(key)
            waiter = self.waiting.pop(key, None)
            if waiter is not None:
                device, since = waiter
                self.spans.append(Span(device, self.pc[device], since, self.now, "wait",
                                       format_action(self.acts[device][self.pc[device]], short=True),
                                       flow.first_record))
                self.wait_s[device] += self.now - since
                self.pc[device] += 1
                self.ready.append(device)

        self.start_flow(((src, 1.0), (dst, 1.0)), 1.0, bw, nbytes, lat, arrived, ((d, a.peer, label, nbytes),), (d, a.peer))
        return True

    def wait(self, d: str, i: int, a: Action) -> bool:
        key = self._keys[(d, i)]
        if key in self.arrived:
            return True
        self.waiting[key] = (d, self.now)
        return False

    def collective(self, d: str, i: int, a: Action) -> bool:
        key = self._keys[(d, i)]
        members = a.group if d in a.group else (*a.group, d)
        here = self.gathering[key]
        here[d] = self.now
        if len(here) < len(members):
            return False
        del self.gathering[key]
        start = self.now
        label = format_action(a, short=True)
        # the stage model's ring (cost/stage.py), run as one flow whose edges move in lockstep at
        # the slowest edge's pace and share the NICs with the other transfers
        r = ring(self.cluster, members)
        per_edge = r.edge_bytes(_COLLECTIVE_BYTES[a.op](self, a))
        slowest = r.bandwidth
        uses = tuple(u for (x, y), (bw, _) in zip(r.edges, r.links)
                     for u in ((self.nic[x], slowest / bw), (self.nic[y] + 1, slowest / bw)))

        def done(flow: Flow) -> None:
            for m in members:
                arrived_at = here[m]
                mi = self.pc[m]
                if start > arrived_at:
                    self.spans.append(Span(m, mi, arrived_at, start, "wait", label))
                    self.wait_s[m] += start - arrived_at
                self.spans.append(Span(m, mi, start, self.now, "allreduce", label))
                self.allreduce_s[m] += self.now - start
                self.pc[m] = mi + 1
                self.ready.append(m)

        airtime = sum(slowest / bw for bw, _ in r.links)  # every edge's bytes go over the air
        self.start_flow(uses, airtime, slowest, per_edge, r.latency, done, tuple((x, y, label, per_edge) for x, y in r.edges),
                        None)
        return False

    # -- deadlock -----------------------------------------------------------------------------

    def deadlock(self, blocked: dict[str, int]) -> DeadlockError:
        layout = layout_program(self.p)

        def where(device: str) -> str:
            if device not in self.acts:
                return f"{device} is not a device of this program"
            if self.pc[device] >= len(self.acts[device]):
                return f"{device} has finished all its actions"
            line = layout.action_lines[(device, self.pc[device])]
            return f"{device} is blocked at line {line} ({format_action(self.acts[device][self.pc[device]], short=True)})"

        lines = []
        for d, i in blocked.items():
            a = self.acts[d][i]
            key = self._keys.get((d, i))
            if ops.info(a.op).collective:
                members = a.group if d in a.group else (*a.group, d)
                late = [m for m in members if m not in self.gathering.get(key, {})]
                why = "waits for its group, but " + "; ".join(where(m) for m in late)
            else:
                sender = next(((s, j) for (s, j), k in self._keys.items()
                               if k == key and self.acts[s][j].op in ops.SEND_OPS), None)
                if sender is None:
                    why = f"waits for a {a.op.value} counterpart on {a.peer}, which {a.peer} never runs"
                else:
                    s, j = sender
                    why = (f"waits for '{format_action(self.acts[s][j], short=True)}' on {s} "
                           f"(line {layout.action_lines[(s, j)]}), but {where(s)}")
            lines.append(f"  device {d}, line {layout.action_lines[(d, i)]}: {format_action(a)}\n    {why}")
        message = (f"deadlock at t={self.now * 1e3:.3f} ms of the simulation: no device can move, "
                   f"{len(blocked)} blocked:\n" + "\n".join(lines)
                   + "\nReorder these actions so that every RECV's SEND (and every member of an ALLREDUCE) "
                     "can run first; verify(program) shows the step where the dry run stops.")
        return DeadlockError(message, [], blocked)


def _state_bytes(e: _Engine, a: Action) -> int:
    """What a BACKUP carries: the stage's weights with their optimizer state, and its buffers."""
    return int(state_memory(e.lg, e.p.stages[a.stage].layers, e.opt))


def backups_held(program: Program) -> dict[str, tuple[tuple[int, int], ...]]:
    """Device -> the layer ranges of the stages whose backups it holds in a run with recovery:
    where the program's BACKUPs go, or, in a program without them, where add_backups puts them."""
    held: dict[str, tuple[tuple[int, int], ...]] = {}
    for stage, device in sorted((backup_holders(program) or default_holders(program)).items()):
        held[device] = (*held.get(device, ()), program.stages[stage].layers)
    return held


def _channel_key(d: str, a: Action) -> tuple | None:
    """The channel a transfer is on (``ops.channel``), or a collective's key (its stage and group)."""
    ch = ops.channel(d, a)
    if ch is not None:
        return ch.key
    return ops.collective_key(a) if ops.info(a.op).collective else None


# What a posted transfer carries, by what it moves (``OpInfo.moves``).
_PAYLOAD_BYTES: Mapping[str, Callable[[_Engine, Action], int]] = {
    ops.DATA: lambda e, a: transfer_bytes(a),
    ops.WEIGHTS: _state_bytes,
}


def _tie_bytes(e: _Engine, a: Action) -> int:
    """What a TIE reduces: the tied weights' gradients, their whole shapes in its specs."""
    return sum(tensor_bytes(s.dtype, s.shape) for s in a.specs)


# What a collective reduces, by op.
_COLLECTIVE_BYTES: Mapping[Op, Callable[[_Engine, Action], int]] = {
    Op.ALLREDUCE: lambda e, a: allreduce_bytes(e.lg, e.p.stages[a.stage].layers),
    Op.TIE: _tie_bytes,
    Op.NORM: lambda e, a: NORM_BYTES,
}


def _rule(op: Op) -> Callable[[_Engine, str, int, Action], bool]:
    """How an op runs, from its facts: compute takes time, a send posts, a receive waits, a
    collective gathers its group; any other op (STEP, ROLLBACK, any a rewrite adds) takes none."""
    info = ops.info(op)
    if info.compute:
        return _Engine.compute
    if info.moves is not None:
        return _Engine.post if info.sends else _Engine.wait
    return _Engine.collective if info.collective else _Engine.instant


_RULES: Mapping[Op, Callable[[_Engine, str, int, Action], bool]] = {op: _rule(op) for op in Op}


def simulate(program: Program, lg: LayerGraph, cluster: Cluster, *, shared_medium: bool = False,
             opt_state_factor: float = ADAM_STATE_FACTOR, recovery: bool = False) -> Simulation:
    """Time one iteration of ``program`` on ``cluster`` with ``lg``'s costs (see the module
    docstring for the model). Expects a program whose devices are in ``cluster`` and whose stages
    index ``lg``'s layers; runs any such program (a rewritten one too) and raises DeadlockError
    when it cannot finish. ``recovery``: the program runs with pipeline replay, and every device's
    memory holds the copies kept for a rollback (``backups_held`` says where the backups are).
    Deterministic: the same inputs give the same Simulation."""
    engine = _Engine(program, lg, cluster, shared_medium, opt_state_factor, recovery)
    engine.run()
    iteration = max(engine.finish.values(), default=0.0)
    reports = []
    for d in engine.names:
        held = engine.held[d]
        ranges = [program.stages[s].layers for s in held]
        weights = sum(lg.param_bytes(lo, hi) for lo, hi in ranges)
        buffers = sum(lg.buffer_bytes(lo, hi) for lo, hi in ranges)
        chunk_grads = sum(g for g, _ in engine.chunked[d])
        chunk_buffers = sum(b for _, b in engine.chunked[d])
        copies = int(engine.static[d] - chunk_grads - chunk_buffers
                     - sum(static_memory(lg, r, opt_state_factor) for r in ranges))
        memory = MemoryTimeline(weights, int(weights + chunk_grads), int(weights * opt_state_factor),
                                int(buffers + chunk_buffers),
                                tuple(engine.memory[d]), engine.peak[d], cluster.device(d).memory_bytes, copies)
        compute = engine.compute_s[d]
        reports.append(DeviceReport(d, held[0], engine.kind[d], compute, engine.wait_s[d], engine.allreduce_s[d],
                                    engine.finish[d], compute / iteration if iteration > 0 else 0.0, memory, held))
    spans = tuple(sorted(engine.spans, key=lambda s: (s.start, s.device, s.index)))
    return Simulation(program, cluster, shared_medium, iteration, tuple(reports), spans, tuple(engine.transfers))
