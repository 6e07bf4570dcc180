"""Running and timing a block of layers as one stage, the way the local backend runs it: the stage
modules, their inputs for a row count, the clocks, and the cache flush between cold runs."""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable, Sequence

import torch

from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.plan import Plan, StagePlan
from asteroid_fx.ir.profile import Method, ProfileError, Timing
from asteroid_fx.passes.capture import Captured
from asteroid_fx.passes.split import Stage, split
from asteroid_fx.runtime.profiler.memory import MemoryProbe


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def resolve_clock(method: Method, device: torch.device) -> Method:
    """``method`` with clock "auto" resolved: this thread's CPU time when it alone computes (CPU,
    one intra-op thread), else wall time."""
    clock = method.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if clock == "cpu" and device.type != "cpu":
        raise ProfileError(f"clock 'cpu' cannot time work on {device} (it runs asynchronously); use 'wall'")
    if clock not in ("cpu", "wall"):
        raise ProfileError(f"unknown clock {clock!r}; use 'auto', 'wall' or 'cpu'")
    return dataclasses.replace(method, clock=clock)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


class BlockRunner:
    """Runs one stage module forward and backward the way the local backend does, and times it."""

    def __init__(self, stage: Stage, device: torch.device, clock: str = "wall"):
        self.stage = stage
        self.device = device
        self.sync = _sync(device)
        self.clock = CLOCKS[clock]
        self.params = [p for p in stage.module.parameters() if p.requires_grad]

    def _inputs(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(t.detach().requires_grad_(g and t.is_floating_point())
                     for t, g in zip(inputs, self.stage.input_grads))

    def _seeded(self, outputs: Sequence[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outs = [o for o, g in zip(outputs, self.stage.output_grads)
                if g and isinstance(o, torch.Tensor) and o.requires_grad]
        return outs, [torch.ones_like(o) for o in outs]

    def run(self, inputs: Sequence[torch.Tensor],
            before: Callable[[], Any] | None = None) -> tuple[float, float, tuple[Any, ...]]:
        """One forward + backward: (forward s, backward s, detached outputs); ``before`` runs,
        untimed, before each of the two."""
        x = self._inputs(inputs)
        for p in self.params:
            p.grad = None  # every run starts like an iteration's first micro-batch
        clock = self.clock
        if before is not None:
            before()
        self.sync()
        t0 = clock()
        out = self.stage.module(*x)
        self.sync()
        t1 = clock()
        outs, seeds = self._seeded(out)
        if before is not None:
            before()
        self.sync()
        t2 = clock()
        if outs:
            torch.autograd.backward(outs, seeds)
        self.sync()
        t3 = clock()
        return t1 - t0, t3 - t2, tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)

    def forward_only(self, inputs: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        with torch.no_grad():
            return tuple(self.stage.module(*[t.detach() for t in inputs]))

    def warm(self, inputs: Sequence[torch.Tensor], method: Method,
             probe: MemoryProbe | None = None) -> tuple[Any, ...]:
        """Untimed runs (the first inside ``probe``, if given): allocator, kernel choice and caches
        settle before anything is timed. Returns the first run's outputs (what ``probe`` saw)."""
        first: tuple[Any, ...] = ()
        for i in range(max(1, method.warmup)):
            if i == 0 and probe is not None:
                with probe:
                    out = self.run(inputs)[2]
            else:
                out = self.run(inputs)[2]
            if i == 0:
                first = out
        return first

    def samples(self, inputs: Sequence[torch.Tensor], min_repeats: int, max_repeats: int, budget_s: float,
                before: Callable[[], Any] | None = None) -> tuple[list[float], list[float], tuple[Any, ...]]:
        """Timed runs, at least ``min_repeats`` and then more until ``budget_s`` was timed or
        ``max_repeats`` ran; (forward samples, backward samples, outputs of the last run)."""
        fwd: list[float] = []
        bwd: list[float] = []
        spent = 0.0
        out: tuple[Any, ...] = ()
        gc.disable()  # a collection inside a timed run is noise, not the device
        try:
            while len(fwd) < max(1, max_repeats) and (len(fwd) < min_repeats or spent < budget_s):
                f, b, out = self.run(inputs, before)
                fwd.append(f)
                bwd.append(b)
                spent += f + b
        finally:
            gc.enable()
        return fwd, bwd, out

    def time(self, inputs: Sequence[torch.Tensor], method: Method) -> tuple[Timing, Timing, tuple[Any, ...]]:
        """Warm-up, then ``method.rounds`` rounds of timed runs back to back: the Timings of all
        samples and the last outputs (``measure`` spreads a layer's rounds over passes instead)."""
        self.warm(inputs, method)
        fwd: list[float] = []
        bwd: list[float] = []
        out: tuple[Any, ...] = ()
        for _ in range(method.rounds):
            f, b, out = self.samples(inputs, *round_quota(method))
            fwd += f
            bwd += b
        return Timing.of(fwd, method.outlier_mads), Timing.of(bwd, method.outlier_mads), out


class CacheFlush:
    """Writes a buffer twice the size of the cache, so what a layer kept there is gone: as inside
    a stage whose other layers ran since (see ``DeviceProfile.cold_share``)."""

    def __init__(self, device: torch.device, cache_bytes: int):
        self.buffer = torch.empty(max(2 * cache_bytes, 1 << 20), dtype=torch.uint8, device=device)
        self.value = 0

    def __call__(self) -> None:
        self.value = (self.value + 1) % 251
        self.buffer.fill_(self.value)


def round_quota(method: Method) -> tuple[int, int, float]:
    """(min repeats, max repeats, seconds) of one round: the method's totals spread over its rounds."""
    rounds = max(1, method.rounds)
    return -(-method.min_repeats // rounds), -(-method.max_repeats // rounds), method.budget_s / rounds


def stages_for(captured: Captured, lg: LayerGraph, bounds: Sequence[int]) -> tuple[Stage, ...]:
    """Stage modules for the layer ranges between consecutive ``bounds`` (0 ... len(lg))."""
    plan = Plan(tuple(StagePlan((lo, hi), (f"s{i}",), (1,)) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))),
                microbatches=1, microbatch_rows=1, schedule="1f1b", planner="measure")
    return split(captured, lg, plan)


def example_rows(captured: Captured, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's batch-first inputs for ``rows`` rows, by placeholder name: the example's rows,
    repeated as often as needed."""
    out = {}
    placeholders = [n for n in captured.module.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, captured.example_inputs):
        if isinstance(value, torch.Tensor) and captured.is_batched(node.meta.get("val")):
            reps = -(-rows // value.shape[0])
            out[node.name] = torch.cat([value] * reps)[:rows].to(device).clone()
    return out


def stage_inputs(captured: Captured, lg: LayerGraph, lo: int, rows: int,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    """The tensors live across cut ``lo`` for ``rows`` rows, computed by running layers [0, lo)."""
    first = stages_for(captured, lg, [0, lo, len(lg)] if 0 < lo < len(lg) else [0, len(lg)])[0]
    x = example_rows(captured, rows, device)
    inputs = tuple(x[name] for name in first.inputs)
    if lo == 0:
        return inputs
    with torch.no_grad():
        return tuple(t.detach() for t in first.module(*inputs))


def snapshot_state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.state_dict(keep_vars=True).items()}


def restore_state(gm: torch.nn.Module, saved: dict[str, torch.Tensor], device: torch.device) -> None:
    gm.to(device)
    with torch.no_grad():
        for k, v in gm.state_dict(keep_vars=True).items():
            v.copy_(saved[k])
    for p in gm.parameters():
        p.grad = None


def time_stage(captured: Captured, lg: LayerGraph, lo: int, hi: int, rows: int, *, device: str = "cpu",
               method: Method = Method()) -> tuple[Timing, Timing]:
    """Forward and backward Timing of layers [lo, hi) run as one stage (what a profile predicts);
    leaves the captured module's weights and buffers as they were."""
    dev = torch.device(device)
    method = resolve_clock(method, dev)
    gm = captured.module
    home = next(iter(gm.parameters()), torch.empty(0)).device
    saved = snapshot_state(gm)
    gm.to(dev)
    try:
        bounds = sorted({0, lo, hi, len(lg)})
        stage = next(s for s in stages_for(captured, lg, bounds) if s.layers == (lo, hi))
        inputs = stage_inputs(captured, lg, lo, rows, dev)
        fwd, bwd, _ = BlockRunner(stage, dev, method.clock).time(inputs, method)
        return fwd, bwd
    finally:
        restore_state(gm, saved, home)


