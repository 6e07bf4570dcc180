"""roofline: an fx node's analytic cost on a device kind from its FLOPs and bytes (NodeStats)."""

from __future__ import annotations

from asteroid_fx.ir.costs import Cost, NodeStats, TimeFit


# Backward of a node costs about twice its forward: one product for the input gradient and one
# for the weight gradient (the usual 1:2 forward:backward FLOP ratio, e.g. Kaplan et al. 2020).
BACKWARD_FLOP_RATIO = 2.0


def roofline(stats: NodeStats, peak_flops: float, memory_bandwidth: float, efficiency: float,
             overhead_s: float) -> Cost:
    """Analytic cost: max(compute, memory) per direction plus a fixed per-op launch overhead."""
    flops_rate = peak_flops * efficiency
    bytes_rate = memory_bandwidth * efficiency

    def fwd(rows: float) -> float:
        compute = (stats.flops_per_row * rows + stats.flops_fixed) / flops_rate
        memory = (stats.bytes_per_row * rows + stats.param_bytes) / bytes_rate
        return overhead_s + max(compute, memory)

    def bwd(rows: float) -> float:
        compute = BACKWARD_FLOP_RATIO * (stats.flops_per_row * rows + stats.flops_fixed) / flops_rate
        memory = 2.0 * (stats.bytes_per_row * rows + stats.param_bytes) / bytes_rate
        return overhead_s + max(compute, memory)

    return Cost(TimeFit.sample(fwd), TimeFit.sample(bwd), "analytic")
