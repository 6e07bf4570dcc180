"""LayerGraph: the planner's view of a model, a chain of layers separated by cuts.

Layer i is a run of fx nodes in topological order. Cut k sits before layer k (cut 0 carries the
model inputs, cut L the outputs); it lists every value live across it, skip connections included,
and says whether a stage boundary may be placed there.
"""

from __future__ import annotations

import dataclasses

from asteroid_fx.costs import Cost, TimeFit


@dataclasses.dataclass(frozen=True)
class Layer:
    index: int
    nodes: tuple[str, ...]  # fx node names, in graph order
    costs: tuple[tuple[str, Cost], ...]  # (device kind, cost) for every kind of the cluster
    param_bytes: int  # trainable parameters owned by this layer
    buffer_bytes: int  # buffers (BatchNorm statistics, masks) owned by this layer
    saved_bytes_per_row: float  # activations kept for backward, per row
    params: tuple[str, ...] = ()  # qualified names of the parameters and buffers it owns

    def cost(self, kind: str) -> Cost:
        for k, c in self.costs:
            if k == kind:
                return c
        raise KeyError(f"layer {self.index} has no cost for device kind {kind!r}; annotate costs for it")


@dataclasses.dataclass(frozen=True)
class Cut:
    index: int
    values: tuple[str, ...]  # names of the values live across the cut, in graph order
    bytes_per_row: float  # bytes of those values per row (what a stage boundary here transfers)
    allowed: bool
    why_not: str = ""  # when not allowed: the value or parameter that forbids it


@dataclasses.dataclass(frozen=True)
class LayerGraph:
    layers: tuple[Layer, ...]
    cuts: tuple[Cut, ...]  # len(layers) + 1
    blocked: tuple[str, ...] = ()  # distinct reasons why cuts inside layers were not allowed

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.layers[0].costs) if self.layers else ()

    def fwd(self, kind: str, lo: int, hi: int) -> TimeFit:
        out = TimeFit.zero()
        for layer in self.layers[lo:hi]:
            out = out + layer.cost(kind).fwd
        return out

    def bwd(self, kind: str, lo: int, hi: int) -> TimeFit:
        out = TimeFit.zero()
        for layer in self.layers[lo:hi]:
            out = out + layer.cost(kind).bwd
        return out

    def stage_time(self, kind: str, lo: int, hi: int, rows: float) -> float:
        """Forward + backward seconds of layers [lo, hi) for ``rows`` rows on ``kind``."""
        return sum(layer.cost(kind).fwd(rows) + layer.cost(kind).bwd(rows) for layer in self.layers[lo:hi])

    def param_bytes(self, lo: int, hi: int) -> int:
        return sum(layer.param_bytes for layer in self.layers[lo:hi])

    def buffer_bytes(self, lo: int, hi: int) -> int:
        return sum(layer.buffer_bytes for layer in self.layers[lo:hi])

    def saved_bytes_per_row(self, lo: int, hi: int) -> float:
        return sum(layer.saved_bytes_per_row for layer in self.layers[lo:hi])

    def allowed_cuts(self) -> tuple[int, ...]:
        return tuple(c.index for c in self.cuts[1:-1] if c.allowed)

    def __str__(self) -> str:
        kinds = self.kinds
        head = f"LayerGraph: {len(self.layers)} layers, {len(self.allowed_cuts())} allowed cuts"
        rows = [head, f"{'layer':>5}  {'nodes':>5}  {'params':>10}  {'cut bytes/row':>13}  first node"]
        for layer in self.layers:
            cut = self.cuts[layer.index]
            mark = "" if cut.allowed else " x"
            rows.append(f"{layer.index:>5}  {len(layer.nodes):>5}  {layer.param_bytes:>10}  "
                        f"{cut.bytes_per_row:>11.0f}{mark:2}  {layer.nodes[0] if layer.nodes else ''}")
        if kinds:
            rows.append("kinds: " + ", ".join(kinds))
        return "\n".join(rows)
