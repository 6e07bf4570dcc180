"""The stage-cost model: what one stage of a plan costs on one device, in time and in memory.

Everything that prices a stage reads it from here: the planner's closed form
(``estimate.CostTable``, which tabulates it as prefix sums, and the DP's group matrices in
``passes/planners/group_costs.py``), the simulator (``sim``), and the emulation that paces a
worker like a catalog device (``backends``). A stage is layers [lo, hi) of a LayerGraph.

compute     F (or B) of a stage on ``rows`` rows on a device kind is the sum over its layers of
            each layer's forward (backward) ``TimeFit`` at ``rows``: ``compute_s``; F + B is
            ``step_s`` (what ``LayerGraph.stage_time`` gives, summed the same way).
all-reduce  the stage's gradients and buffers (``allreduce_bytes``) go round a ring over the group
            in its order: every member sends 2 (g - 1) / g of them to the next, all edges in
            lockstep at the slowest edge's bandwidth, plus 2 (g - 1) x the largest latency on the
            ring (``Ring.seconds``); a group of one, or a stage with nothing to reduce, takes no
            time (``allreduce_s``). A TIE (a weight several stages hold) is the same ring over
            every device of those stages, of the weight's bytes (``tie_s``; ``ties_s`` for a plan).
            A NORM (clipping by the global gradient norm) is the same ring over every device of
            the program, of one float64 (``NORM_BYTES``, ``norm_s``): latency-bound.
transfer    a message of ``nbytes`` from a to b alone on its link takes latency(a, b) +
            nbytes / bandwidth(a, b) (``message_s``); ``wire_s`` is its part that occupies the
            link. A cut's message carries ``cut_bytes`` (its bytes per row x rows).
memory      weights + gradients + optimizer state (``opt_state_factor`` x weights) + buffers all
            iteration (``static_memory``; a tied weight on every stage holding a copy; with recovery also a rollback point and the backups the
            device holds, ``state_memory`` each), plus, per micro-batch in flight (``in_flight``),
            the activations kept for backward and the stage's input and output slices
            (``activation_memory``); the peak is ``device_memory``.

How transfers share links, and when each action runs, is the simulator's business; this module
prices one action of one stage.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Sequence

from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.ir.costs import TimeFit
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.plan import warmup_depth
from asteroid_fx.ir.program import Op

if TYPE_CHECKING:
    import numpy as np

ADAM_STATE_FACTOR = 2.0
# a peak within this fraction of its budget fits: peaks are sums of floats taken in different
# orders by the planner, its group matrices and the simulator, and a plan that fits exactly must
# not be refused (or reported over budget) for an ulp of rounding
MEMORY_RTOL = 1e-9


def within(need, budget):
    """Whether ``need`` bytes fit a ``budget`` of bytes, up to rounding (``MEMORY_RTOL``); the one
    memory comparison of the planner, its baselines and the simulator. Elementwise for arrays."""
    return need <= budget * (1.0 + MEMORY_RTOL)


# ---------------------------------------------------------------------------------------------
# compute


def compute_s(lg: LayerGraph, kind: str, op: Op, layers: tuple[int, int], rows: float) -> float:
    """Seconds of ``op`` (F or B) of layers ``layers`` on ``rows`` rows on a device of ``kind``."""
    lo, hi = layers
    if op == Op.F:
        return sum(layer.cost(kind).fwd(rows) for layer in lg.layers[lo:hi])
    if op == Op.B:
        return sum(layer.cost(kind).bwd(rows) for layer in lg.layers[lo:hi])
    raise InputError(f"{op} is not a computation; only F and B have a compute time")


def step_s(lg: LayerGraph, kind: str, layers: tuple[int, int], rows: float) -> float:
    """Seconds of F + B of layers ``layers`` on ``rows`` rows on ``kind`` (one micro-batch's step)."""
    lo, hi = layers
    return sum(layer.cost(kind).fwd(rows) + layer.cost(kind).bwd(rows) for layer in lg.layers[lo:hi])


def step_table(lg: LayerGraph, kind: str, rows: "np.ndarray") -> "np.ndarray":
    """Per row count and layer, F + B seconds on ``kind``: shape (len(rows), len(lg)); the model of
    ``step_s`` for many row counts at once (``step_s`` is a sum of one row of it)."""
    import numpy as np

    out = np.zeros((len(rows), len(lg)))
    for i, layer in enumerate(lg.layers):
        c = layer.cost(kind)
        out[:, i] = fit_at(c.fwd, rows) + fit_at(c.bwd, rows)
    return out


def fit_at(fit: TimeFit, rows: "np.ndarray") -> "np.ndarray":
    """A TimeFit evaluated at an array of row counts, with TimeFit's own rules at the ends."""
    import numpy as np

    pts = fit.points
    xs = np.array([p[0] for p in pts], dtype=float)
    ys = np.array([p[1] for p in pts], dtype=float)
    out = np.empty_like(rows)
    if len(pts) == 1:
        out[:] = ys[0] * rows / xs[0]
    else:
        out[:] = np.interp(rows, xs, ys)
        below = rows < xs[0]
        out[below] = ys[0] * rows[below] / xs[0]
        above = rows > xs[-1]
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        out[above] = np.maximum(0.0, ys[-1] + slope * (rows[above] - xs[-1]))
    out[rows <= 0] = 0.0
    return out


# ---------------------------------------------------------------------------------------------
# all-reduce


def allreduce_bytes(lg: LayerGraph, layers: tuple[int, int]) -> int:
    """Bytes a stage's ALLREDUCE reduces: its gradients (one per weight) and its buffers."""
    lo, hi = layers
    return lg.param_bytes(lo, hi) + lg.buffer_bytes(lo, hi)


class Ring(NamedTuple):
    """A group's all-reduce ring: its edges in order (member i to member i + 1, the last to the
    first), each edge's (bandwidth, latency), the slowest edge's bandwidth, and the latency the
    ring pays (2 (g - 1) x its largest)."""

    size: int
    edges: tuple[tuple[str, str], ...]
    links: tuple[tuple[float, float], ...]
    bandwidth: float  # inf for a group of one
    latency: float

    def edge_bytes(self, nbytes):
        """What each member sends to the next for ``nbytes`` reduced (arrays too)."""
        g = self.size
        return 2.0 * (g - 1) / g * nbytes if g > 1 else 0.0 * nbytes

    def seconds(self, nbytes):
        """The ring's time for ``nbytes`` on otherwise idle links (arrays too)."""
        return self.edge_bytes(nbytes) / self.bandwidth + self.latency


def ring(cluster: Cluster, group: Sequence[str]) -> Ring:
    g = len(group)
    edges = tuple(zip(group, (*group[1:], *group[:1]))) if g > 1 else ()
    links = tuple(cluster.link(a, b) for a, b in edges)
    slowest = min((bw for bw, _ in links), default=math.inf)
    latency = 2.0 * (g - 1) * max((lat for _, lat in links), default=0.0)
    return Ring(g, edges, links, slowest, latency)


def ring_allreduce_s(cluster: Cluster, group: Sequence[str], nbytes: float) -> float:
    """Seconds to all-reduce ``nbytes`` over ``group``; none for one member or nothing to reduce."""
    if len(group) < 2 or nbytes <= 0:
        return 0.0
    return ring(cluster, group).seconds(nbytes)


def allreduce_s(lg: LayerGraph, cluster: Cluster, group: Sequence[str], layers: tuple[int, int]) -> float:
    """Seconds of the ALLREDUCE of stage ``layers`` over ``group``."""
    return ring_allreduce_s(cluster, group, allreduce_bytes(lg, layers))


def tensor_bytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of one tensor of ``dtype`` (torch's name) and ``shape``: a TIE's weight."""
    import torch

    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}; use a torch dtype name such as 'float32'")
    return torch.empty((), dtype=dt).element_size() * math.prod(shape)


def tie_s(cluster: Cluster, group: Sequence[str], nbytes: float) -> float:
    """Seconds of a TIE: the ring all-reduce of its weights' ``nbytes`` over the holders ``group``."""
    return ring_allreduce_s(cluster, group, nbytes)


# What a NORM all-reduces: one float64, the squared gradient norm each device brings.
NORM_BYTES = 8


def norm_s(cluster: Cluster, group: Sequence[str]) -> float:
    """Seconds of a NORM: the ring all-reduce of one float64 over ``group``, every device of the
    program (2 (g - 1) latencies, next to which its bytes are nothing)."""
    return ring_allreduce_s(cluster, group, NORM_BYTES)


def ties_s(lg: LayerGraph, cluster: Cluster, stages: Sequence) -> float:
    """Seconds of a plan's TIEs, one after another (``stages``: StagePlans, or anything with
    ``layers`` and ``devices``): per set of holder stages, the ring over their devices of the
    trained weights they share (what lower_comm emits one TIE for)."""
    bounds = tuple(st.layers for st in stages)
    by_holders: dict[tuple[int, ...], int] = {}
    for tie in lg.ties:
        held = tie.stages(bounds)
        if tie.kind == "param" and len(held) > 1:
            by_holders[held] = by_holders.get(held, 0) + tie.nbytes
    return sum(tie_s(cluster, [d for p in held for d in stages[p].devices], nbytes)
               for held, nbytes in by_holders.items())


# ---------------------------------------------------------------------------------------------
# transfer


def cut_bytes(lg: LayerGraph, cut: int, rows: float) -> float:
    """Bytes a message across cut ``cut`` carries for ``rows`` rows."""
    return lg.cuts[cut].bytes_per_row * rows


def wire_s(nbytes, bandwidth):
    """Seconds ``nbytes`` occupy a link of ``bandwidth`` bytes/s (arrays too)."""
    return nbytes / bandwidth


def message_s(nbytes, bandwidth, latency):
    """Seconds until a message of ``nbytes``, alone on its link, has arrived (arrays too)."""
    return latency + wire_s(nbytes, bandwidth)


def link_message_s(cluster: Cluster, src: str, dst: str, nbytes: float) -> float:
    bandwidth, latency = cluster.link(src, dst)
    return message_s(nbytes, bandwidth, latency)


# ---------------------------------------------------------------------------------------------
# memory


def in_flight(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at its peak."""
    depth = warmup_depth(schedule)
    if depth is None:
        return microbatches
    return min((stages - stage - 1) * (1 + depth) + 1, microbatches)


def state_memory(lg: LayerGraph, layers: tuple[int, int], opt_state_factor: float = ADAM_STATE_FACTOR) -> float:
    """Bytes of one copy of a stage's state, what a BACKUP carries and a rollback restores:
    weights, optimizer state and buffers (gradients are not part of it)."""
    lo, hi = layers
    return lg.param_bytes(lo, hi) * (1.0 + opt_state_factor) + lg.buffer_bytes(lo, hi)


def static_memory(lg: LayerGraph, layers: tuple[int, int], opt_state_factor: float = ADAM_STATE_FACTOR, *,
                  recovery: bool = False, held: Sequence[tuple[int, int]] = ()) -> float:
    """Bytes a device of the stage holds all iteration: weights, gradients, optimizer state, buffers;
    with ``recovery`` also its rollback point and two copies of each stage in ``held`` (the layer
    ranges of the stages whose backups it holds)."""
    lo, hi = layers
    own = lg.param_bytes(lo, hi) * (2.0 + opt_state_factor) + lg.buffer_bytes(lo, hi)
    if not recovery:
        if held:
            raise InputError("a device holds backups only in a run with recovery; pass recovery=True")
        return own
    return (own + state_memory(lg, layers, opt_state_factor)
            + 2 * sum(state_memory(lg, h, opt_state_factor) for h in held))


def chunk_memory(lg: LayerGraph, layers: tuple[int, int], chunks: int) -> tuple[float, float]:
    """(gradient bytes, buffer bytes) a device running its slot of the stage as ``chunks`` chunks
    holds beyond one chunk's: each further chunk's own gradient sum and buffers, and the buffers
    the iteration started from (what a chunk that has not run yet starts with). Its activations
    need nothing more: the chunks' rows add up to the slot's."""
    if chunks <= 1:
        return 0.0, 0.0
    lo, hi = layers
    return (chunks - 1) * lg.param_bytes(lo, hi), chunks * lg.buffer_bytes(lo, hi)


def activation_memory(lg: LayerGraph, layers: tuple[int, int], rows: int) -> float:
    """Bytes one micro-batch in flight holds on a device with ``rows`` rows: the activations kept
    for backward plus the stage's input and output slices."""
    lo, hi = layers
    return (lg.saved_bytes_per_row(lo, hi) + lg.cuts[lo].bytes_per_row + lg.cuts[hi].bytes_per_row) * rows


def device_memory(lg: LayerGraph, layers: tuple[int, int], rows: int, k_in_flight: int,
                  opt_state_factor: float = ADAM_STATE_FACTOR, *, recovery: bool = False,
                  held: Sequence[tuple[int, int]] = ()) -> int:
    """A device's peak: ``static_memory`` (``recovery`` and ``held`` as there) and ``k_in_flight``
    micro-batches of ``rows`` rows."""
    return int(static_memory(lg, layers, opt_state_factor, recovery=recovery, held=held)
               + k_in_flight * activation_memory(lg, layers, rows))


# ---------------------------------------------------------------------------------------------
# the model bound to one LayerGraph and Cluster


class StageCosts:
    """The model above for ``lg`` on ``cluster``, by device name, with each compute time kept once
    computed (a simulation or an emulated run asks for the same few many times)."""

    def __init__(self, lg: LayerGraph, cluster: Cluster, opt_state_factor: float = ADAM_STATE_FACTOR):
        self.lg, self.cluster, self.opt_state_factor = lg, cluster, opt_state_factor
        self._kind: dict[str, str] = {}
        self._compute: dict[tuple, float] = {}

    def kind(self, device: str) -> str:
        k = self._kind.get(device)
        if k is None:
            k = self._kind[device] = self.cluster.device(device).kind
        return k

    def compute_s(self, device: str, op: Op, layers: tuple[int, int], rows: int) -> float:
        key = (self.kind(device), op, layers, rows)
        t = self._compute.get(key)
        if t is None:
            t = self._compute[key] = compute_s(self.lg, key[0], op, layers, rows)
        return t

    def allreduce_s(self, group: Sequence[str], layers: tuple[int, int]) -> float:
        return allreduce_s(self.lg, self.cluster, group, layers)

    def state_bytes(self, layers: tuple[int, int]) -> float:
        return state_memory(self.lg, layers, self.opt_state_factor)


__all__ = ["ADAM_STATE_FACTOR", "NORM_BYTES", "Ring", "StageCosts", "activation_memory", "allreduce_bytes",
           "allreduce_s", "compute_s", "cut_bytes", "device_memory", "fit_at", "in_flight", "link_message_s",
           "message_s", "norm_s", "ring", "ring_allreduce_s", "state_memory", "static_memory", "step_s", "step_table",
           "tensor_bytes", "tie_s", "ties_s", "wire_s"]
