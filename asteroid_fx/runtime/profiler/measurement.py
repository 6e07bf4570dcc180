"""measure: a captured graph and its LayerGraph -> DeviceProfile, by running every layer on this
device (CPU or CUDA) forward and backward at each row count.

Expects the ``Captured`` graph and the ``LayerGraph`` that ``linearize`` made of it with the
``max_layers`` compile will use (the profile is keyed to that graph). Guarantees:
  - every layer runs as its own stage (``split`` with one stage per layer), on inputs that are the
    previous layer's outputs for ``rows`` rows of the example (rows repeated to any count), with
    gradients where the backend would send them and ones as the backward seed: the same calls the
    local backend makes, so a stage's time is what is measured, not an op-by-op sum;
  - per cell: one untimed warm-up run that also measures the activation bytes saved for backward
    (saved-tensor hooks), which of them are the layer's inputs or outputs, by value name, and
    which of those share a storage (so a stage of several layers counts a tensor two of them save
    once: ``Cell.boundary``), and the peak memory, then timed repeats (at least ``min_repeats``,
    more until ``budget_s`` of timing or ``max_repeats``) spread over ``rounds`` passes through the
    model, summarised by an outlier-robust median; where the layer's weights, gradients and saved
    activations would fit in ``CACHE_COLD_FROM`` caches, as many repeats again with the cache
    flushed before forward and before backward (the cell's cold timing; else cold is warm);
  - after the requested row counts, a layer whose time bends down at one of them (``probe_rows``)
    is timed at the row count just below it too, in one pass with the cell's whole quota;
  - per layer: gradient bytes and the optimizer's state bytes after one step;
  - every cheap pair of adjacent layers is timed as one stage at the smallest row counts, and each
    layer's call overhead is fitted from how much the pair's sum overshoots the pair
    (``fit_overhead``);
  - ``checkpoint`` gets the partial profile every few seconds, after each row count and when
    interrupted, and ``resume`` skips the cells it already holds: a cell is finished when its
    row count's rounds are, so an interrupted run loses at most the row count in progress;
  - the captured module's parameters, buffers and device are as before when it returns.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from asteroid_fx.ir import catalog
from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.profile import (CACHE_COLD_FROM, Block, BoundaryStorage, Cell, DeviceInfo, DeviceProfile,
                                    LayerProfile, Method, Overhead, ProfileError, Timing, graph_key)
from asteroid_fx.passes.annotate_costs import annotate_costs
from asteroid_fx.passes.capture import Captured, capture
from asteroid_fx.passes.linearize import linearize
from asteroid_fx.passes.split import Stage
from asteroid_fx.runtime.profiler.memory import MemoryProbe, optimizer_bytes, unique_bytes
from asteroid_fx.runtime.profiler.timing import (BlockRunner, CacheFlush, example_rows, resolve_clock, restore_state,
                                                 round_quota, snapshot_state, stages_for)

CHECKPOINT_EVERY_S = 2.0
GAP_ROW_COUNTS = 2  # coarse blocks are timed at this many of the smallest row counts


@dataclasses.dataclass(frozen=True)
class Progress:
    done: int  # (cell, round) pairs measured, resumed cells included
    total: int
    rows: int
    layer: int
    layers: int
    round: int
    rounds: int
    fwd_s: float
    bwd_s: float
    elapsed_s: float
    eta_s: float | None


def prepare(model: torch.nn.Module, example: Any, kind: str | None, max_layers: int | None,
            kwargs: dict | None = None) -> tuple[Captured, LayerGraph]:
    """capture -> annotate_costs -> linearize, as compile does (analytic costs only for ``kind``)."""
    captured = capture(model, example if isinstance(example, tuple) else (example,), kwargs)
    annotate_costs(captured, [kind] if kind else [])
    return captured, linearize(captured, max_layers=max_layers)



# GPU names (as torch reports them) that say which catalog kind they are; others need --kind.
GPU_KINDS: dict[str, str] = {
    "H100": "h100-sxm",
    "A100-SXM4-40GB": "a100-40gb",
    "A100-PCIE-40GB": "a100-40gb",
    "RTX 3060 Laptop": "rtx-3060-laptop",
}


def _device_info(device: torch.device, kind: str | None) -> DeviceInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, int(props.total_memory)
        cache = int(getattr(props, "L2_cache_size", 0))
        if kind is None:
            kind = next((k for pattern, k in GPU_KINDS.items() if pattern in name), None)
        if kind is None:
            raise ProfileError(f"say which catalog kind this GPU ({name}) stands for with --kind (one of "
                               f"{', '.join(catalog.kind_names())}); add a DeviceKind for new hardware")
    else:
        name = catalog.host_cpu_name()
        try:
            memory = catalog._host_memory_bytes()
        except RuntimeError:
            memory = 0
        cache = _cpu_cache_bytes()
    kind = kind or catalog.HOST_CPU
    if not catalog.is_known(kind):
        raise ProfileError(f"unknown device kind {kind!r}; known kinds: {', '.join(catalog.kind_names())}")
    return DeviceInfo(kind=kind, torch_device=str(device), name=name, threads=torch.get_num_threads(),
                      torch_version=torch.__version__, memory_bytes=int(memory), cache_bytes=cache)


def _cpu_cache_bytes(level: int = 2) -> int:
    """Size of the measuring core's level-2 cache (Linux sysfs; 0 where unknown)."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if int((index / "level").read_text()) == level and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
                return int(size.rstrip("KMG")) * scale
    except (OSError, ValueError):
        pass
    return 0


NO_WORK_S = 1e-6  # a direction faster than this ran nothing (a layer with nothing to differentiate)
CHEAP_BLOCK = 20.0  # a block estimates a layer's overhead when it takes less than this many overheads
PAIR_LIMIT_S = 2e-3  # pairs slower than this are not timed: 1% noise there is more than any overhead


def fit_overhead(layers: Sequence[LayerProfile], blocks: Sequence[Block]) -> tuple[Overhead, tuple[Overhead, ...]]:
    """The call overhead per direction: the typical one, and each layer's.

    A layer timed alone is a stage and pays the call overhead o (module call, autograd's start,
    gradients of its inputs); inside a stage only the first layer pays it, so a stage [lo, hi)
    takes sum(T_i) - sum(o_i for lo < i < hi). A block of layers (a, a + 1) therefore measures
    o_{a+1} = T_a + T_{a+1} - block. The estimate is only as good as the block is cheap: next to a
    millisecond layer, o is below the timing noise (and irrelevant). So the typical o is the
    median estimate over the cheaper half of the blocks, and a layer keeps its own estimate
    (median over row counts) where its block took under ``CHEAP_BLOCK`` typical overheads; both
    are at least 0 and at most the layer's fastest time.
    """
    typical, per_layer = {}, {}
    for direction in ("fwd", "bwd"):
        estimates: list[tuple[float, float]] = []  # (block time, estimate)
        own: dict[int, list[tuple[float, float]]] = {}
        for b in blocks:
            cells = [layers[i].cell(b.rows) for i in range(b.lo, b.hi)]
            if any(c is None for c in cells):
                continue
            times = [getattr(c, direction).median for c in cells]
            block = getattr(b, direction).median
            if sum(t > NO_WORK_S for t in times) >= 2 and block > NO_WORK_S:
                estimates.append((block, (sum(times) - block) / (b.hi - b.lo - 1)))
                if b.hi - b.lo == 2:
                    own.setdefault(b.hi - 1, []).append((block, sum(times) - block))
        cheap = sorted(estimates)[: max(1, (len(estimates) + 1) // 2)]
        c = max(0.0, statistics.median(e for _, e in cheap)) if estimates else 0.0
        typical[direction] = c
        per_layer[direction] = []
        for i, layer in enumerate(layers):
            fastest = min((getattr(cell, direction).median for cell in layer.cells), default=0.0)
            good = [e for block, e in own.get(i, []) if block < CHEAP_BLOCK * c]
            o = statistics.median(good) if good else c
            per_layer[direction].append(min(max(0.0, o), fastest))
    return (Overhead(typical["fwd"], typical["bwd"]),
            tuple(Overhead(f, b) for f, b in zip(per_layer["fwd"], per_layer["bwd"])))



def measure(captured: Captured, lg: LayerGraph, rows: Sequence[int], *, device: str | torch.device = "cpu",
            kind: str | None = None, model: str = "", max_layers: int | None = None, method: Method = Method(),
            resume: DeviceProfile | None = None, checkpoint: Callable[[DeviceProfile], Any] | None = None,
            progress: Callable[[Progress], Any] | None = None,
            checkpoint_every_s: float = CHECKPOINT_EVERY_S) -> DeviceProfile:
    """Measure a DeviceProfile of ``lg`` on ``device`` (see the module docstring)."""
    dev = torch.device(device)
    method = resolve_clock(method, dev)
    info = _device_info(dev, kind if kind else (resume.kind if resume else None))
    key = graph_key(lg, max_layers)
    rows = tuple(sorted(set(rows) | set(resume.rows if resume else ())))
    if resume is not None:
        _check_resumable(resume, key, info, method)
    L = len(lg)
    cells: dict[tuple[int, int], Cell] = {}
    static: dict[int, tuple[int, int]] = {}  # layer -> (grad bytes, optimizer bytes)
    blocks: dict[tuple[int, int, int], Block] = {}
    if resume is not None:
        for la in resume.layers:
            for c in la.cells:
                cells[(la.index, c.rows)] = c
            if la.cells:
                static[la.index] = (la.grad_bytes, la.optimizer_bytes)
        blocks = {(b.lo, b.hi, b.rows): b for b in resume.blocks}
    previous_s = resume.elapsed_s if resume else 0.0
    started = time.perf_counter()

    def snapshot(complete: bool) -> DeviceProfile:
        layers = tuple(
            LayerProfile(index=i, first=la.nodes[0] if la.nodes else "", last=la.nodes[-1] if la.nodes else "",
                         nodes=len(la.nodes), param_bytes=la.param_bytes, buffer_bytes=la.buffer_bytes,
                         grad_bytes=static.get(i, (0, 0))[0], optimizer_bytes=static.get(i, (0, 0))[1],
                         cells=tuple(cells[k] for k in sorted(k for k in cells if k[0] == i)))
            for i, la in enumerate(lg.layers))
        block_list = tuple(blocks[k] for k in sorted(blocks))
        typical, per_layer = fit_overhead(layers, block_list)
        layers = tuple(dataclasses.replace(la, overhead=o) for la, o in zip(layers, per_layer))
        return DeviceProfile(model=model, graph=key, device=info, method=method, rows=rows, layers=layers,
                             blocks=block_list, overhead=typical, complete=complete,
                             source="measured", elapsed_s=previous_s + time.perf_counter() - started)

    gm = captured.module
    home = next(iter(gm.parameters()), torch.empty(0)).device
    saved = snapshot_state(gm)
    gm.to(dev)
    last_save = time.monotonic()
    rounds = max(1, method.rounds)
    quota = round_quota(method)
    # progress counts (cell, round) pairs and grows when probes are decided
    count = {"done": len(cells) * rounds, "total": L * len(rows) * rounds, "work_total": sum(rows) * L * rounds,
             "work_done": 0.0, "work_measured": 0.0, "measured_s": 0.0}

    def save_now() -> None:
        nonlocal last_save
        if checkpoint is not None:
            checkpoint(snapshot(False))
            last_save = time.monotonic()

    def one_row_count(r: int, todo: list[int], todo_blocks: list[tuple[int, int]], passes: int = rounds,
                      quota: tuple[int, int, float] = quota) -> None:
        """Time the ``todo`` layers (and ``todo_blocks``) at ``r`` rows, in ``passes`` passes over
        the model, cache-warm and, where the layer's data would fit the cache, flushed from it.
        Records their cells."""
        fwd: dict[Any, list[float]] = {k: [] for k in (*todo, *todo_blocks)}
        bwd: dict[Any, list[float]] = {k: [] for k in (*todo, *todo_blocks)}
        cold_fwd: dict[int, list[float]] = {}
        cold_bwd: dict[int, list[float]] = {}
        memory: dict[int, tuple[int, int]] = {}
        boundary: dict[int, tuple[BoundaryStorage, ...]] = {}
        # rounds: every layer gets some of its repeats in each pass over the model, so a burst
        # of load from other processes touches one round of a cell, not all of its repeats
        for k in range(passes):
            x = example_rows(captured, r, dev)
            inputs: tuple[Any, ...] = tuple(x[name] for name in singles[0].stage.inputs)
            at_cut: dict[int, tuple[Any, ...]] = {}
            last = max(todo, default=-1)
            for i, runner in enumerate(singles):
                if i > last and not any(lo >= i for lo, _ in todo_blocks):
                    break  # nothing left to time in this pass
                if any(lo == i for lo, _ in todo_blocks):
                    at_cut[i] = inputs
                if i not in fwd:
                    inputs = runner.forward_only(inputs)
                    count["work_done"] += r
                    continue
                t0 = time.perf_counter()
                try:
                    if k == 0:
                        probe = MemoryProbe(dev, [*gm.parameters(), *gm.buffers()],
                                             [t for t in inputs if isinstance(t, torch.Tensor)])
                        outputs = runner.warm(inputs, method, probe)
                        memory[i] = (probe.saved_bytes, probe.peak_bytes)
                        boundary[i] = probe.boundary(_boundary(runner.stage, inputs, outputs))
                        if i not in static:  # the warm-up left this layer's gradients
                            grads = unique_bytes(p.grad for p in runner.params if p.grad is not None)
                            static[i] = (grads, optimizer_bytes(runner.params, method.optimizer))
                    f, b, outputs = runner.samples(inputs, *quota)
                    working_set = 2 * lg.layers[i].param_bytes + memory[i][0]
                    if working_set < CACHE_COLD_FROM * info.cache_bytes:  # warm and cold can differ
                        cf, cb, _ = runner.samples(inputs, *quota, before=flush)
                        cold_fwd.setdefault(i, []).extend(cf)
                        cold_bwd.setdefault(i, []).extend(cb)
                    inputs = outputs
                except (RuntimeError, ValueError) as e:
                    raise ProfileError(f"layer {i} (nodes {lg.layers[i].nodes[0]}..{lg.layers[i].nodes[-1]}) "
                                       f"fails on {r} rows: {e}; profile other --rows (e.g. start at 2 when "
                                       "BatchNorm sees one value per channel)") from e
                fwd[i] += f
                bwd[i] += b
                count["measured_s"] += time.perf_counter() - t0
                count["done"] += 1
                count["work_done"] += r
                count["work_measured"] += r
                if progress is not None:
                    rate = count["measured_s"] / count["work_measured"]
                    progress(Progress(done=count["done"], total=count["total"], rows=r, layer=i, layers=L,
                                      round=k, rounds=passes, fwd_s=statistics.median(fwd[i]),
                                      bwd_s=statistics.median(bwd[i]),
                                      elapsed_s=previous_s + time.perf_counter() - started,
                                      eta_s=rate * max(0.0, count["work_total"] - count["work_done"])))
                if checkpoint is not None and time.monotonic() - last_save >= checkpoint_every_s:
                    save_now()
            if k == 0:  # only a cheap pair can tell an overhead from noise: time those
                todo_blocks = [b for b in todo_blocks if _pair_s(b, r, cells, fwd, bwd) < PAIR_LIMIT_S]
            for b in todo_blocks:
                runner = coarse[b]
                if k == 0:
                    runner.warm(at_cut[b[0]], method)
                f, bw, _ = runner.samples(at_cut[b[0]], *quota)
                fwd[b] += f
                bwd[b] += bw
        for i in todo:
            warm = Timing.of(fwd[i], method.outlier_mads), Timing.of(bwd[i], method.outlier_mads)
            # a layer whose data outgrows the cache on its own runs as cold alone as in any stage
            cold = ((Timing.of(cold_fwd[i], method.outlier_mads), Timing.of(cold_bwd[i], method.outlier_mads))
                    if i in cold_fwd else warm)
            cells[(i, r)] = Cell(r, *warm, *memory[i], cold_fwd=cold[0], cold_bwd=cold[1],
                                 boundary=boundary[i])
        for lo, hi in todo_blocks:
            blocks[(lo, hi, r)] = Block(lo, hi, r, Timing.of(fwd[(lo, hi)], method.outlier_mads),
                                        Timing.of(bwd[(lo, hi)], method.outlier_mads))
        save_now()

    try:
        flush = CacheFlush(dev, info.cache_bytes)
        singles = [BlockRunner(s, dev, method.clock) for s in stages_for(captured, lg, range(L + 1))]
        # every pair of adjacent layers run as one stage: what fit_overhead reads
        coarse = {}
        for start in (0, 1):
            bounds = sorted({0, *range(start, L, 2), L})
            coarse.update({st.layers: BlockRunner(st, dev, method.clock)
                           for st in stages_for(captured, lg, bounds) if st.layers[1] - st.layers[0] == 2})
        for r in rows:
            todo = [i for i in range(L) if (i, r) not in cells]
            todo_blocks = [b for b in coarse if r in rows[:GAP_ROW_COUNTS] and (*b, r) not in blocks]
            if not todo:
                todo_blocks = [b for b in todo_blocks if _pair_s(b, r, cells, {}, {}) < PAIR_LIMIT_S]
            if not todo and not todo_blocks:
                count["work_done"] += r * L * rounds
                continue  # finished before an interruption
            one_row_count(r, todo, todo_blocks)
        # a kernel that changes at a profiled row count (a faster algorithm from 16 rows on, say)
        # bends the layer's time there: the rows just below it still cost what the slower one does
        probes = {p: [i for i in layers if (i, p) not in cells] for p, layers in probe_rows(cells, rows, L).items()}
        # one pass with the whole quota: a pass re-runs every earlier layer's forward to reach the
        # probed one, and probes are few cells whose job is the size of a bend, not a fine median
        count["total"] += sum(len(v) for v in probes.values())
        count["work_total"] += sum(p * len(v) for p, v in probes.items())
        whole = (method.min_repeats, method.max_repeats, method.budget_s)
        for p, todo in probes.items():
            if todo:
                one_row_count(p, todo, [], passes=1, quota=whole)
    except BaseException:
        if checkpoint is not None:
            checkpoint(snapshot(False))
        raise
    finally:
        restore_state(gm, saved, home)
    return snapshot(True)


def _boundary(stage: Stage, inputs: Sequence[Any], outputs: Sequence[Any]) -> dict[str, Any]:
    """The layer's boundary values by name: the inputs it received and the outputs it sends on
    (only the inputs where its outputs hold constants, which have no name: the last layer's flat
    outputs may, and no layer receives those)."""
    named = dict(zip(stage.inputs, inputs))
    if len(outputs) == len(stage.outputs):
        named.update(zip(stage.outputs, outputs))
    return named


PROBE_BEND = 0.1  # probe a layer below a row count where its time bends down by more than this share


def probe_rows(cells: dict[tuple[int, int], Cell], rows: Sequence[int], layers: int) -> dict[int, list[int]]:
    """{row count: layers} to time at one row below a profiled count ``b`` where the layer's time
    bends down: had it kept the slope it had up to the count ``a`` before, it would take more at
    ``b - 1`` than the line from ``a`` to ``b`` says, by over ``PROBE_BEND`` of its time at ``b``.
    Straight and upward-bending layers (the usual, and cache effects) are left alone."""
    out: dict[int, list[int]] = {}
    for z, a, b in zip(rows, rows[1:], rows[2:]):
        if b - a < 2:
            continue
        for i in range(layers):
            c0, ca, cb = cells.get((i, z)), cells.get((i, a)), cells.get((i, b))
            if c0 is None or ca is None or cb is None:
                continue
            t0, ta, tb = (c.fwd.median + c.bwd.median for c in (c0, ca, cb))
            before, after = (ta - t0) / (a - z), (tb - ta) / (b - a)
            if (before - after) * (b - 1 - a) > PROBE_BEND * tb:
                out.setdefault(b - 1, []).append(i)
    return out


def _pair_s(pair: tuple[int, int], rows: int, cells: dict[tuple[int, int], Cell],
            fwd: dict[Any, list[float]], bwd: dict[Any, list[float]]) -> float:
    """Forward + backward seconds of the layers of ``pair`` timed alone (finished cells, or the
    samples of the row count in progress)."""
    total = 0.0
    for i in range(*pair):
        cell = cells.get((i, rows))
        total += (cell.fwd.median + cell.bwd.median if cell is not None
                  else statistics.median(fwd[i]) + statistics.median(bwd[i]))
    return total


def _check_resumable(resume: DeviceProfile, key: Any, info: DeviceInfo, method: Method) -> None:
    if resume.graph.fingerprint != key.fingerprint:
        raise ProfileError(f"cannot resume: the unfinished profile is of graph {resume.graph.fingerprint}, "
                           f"this is {key.fingerprint}; start afresh")
    have, want = resume.device, info
    for field in ("kind", "torch_device", "name", "threads", "torch_version"):
        if getattr(have, field) != getattr(want, field):
            raise ProfileError(f"cannot resume: the unfinished profile was measured with {field} "
                               f"{getattr(have, field)!r}, this run has {getattr(want, field)!r}; mixing them "
                               "would mix two devices' numbers, so start afresh")
    if resume.method.clock != method.clock:
        raise ProfileError(f"cannot resume: the unfinished profile was timed with the {resume.method.clock!r} "
                           f"clock, this run uses {method.clock!r}; pass the same --clock or start afresh")
