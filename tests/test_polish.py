"""The planner's polish (passes/planners/polish.py): its moves keep every device within memory and
keep what the caller pinned; run to the end, its result is a local optimum of the simulated
iteration under those moves; the planner's plan is never slower than the search's best before it."""

from __future__ import annotations

import pytest

from asteroid_fx.cost.estimate import ADAM_STATE_FACTOR, CostTable
from asteroid_fx.ir import catalog
from asteroid_fx.ir.cluster import Cluster
from asteroid_fx.passes.planners import hpp, polish
from asteroid_fx.passes.planners.candidates import Candidate
from tests.test_planner import _layer_graph, check_sound

CASES = [  # (model, layers, kinds, bandwidth, batch)
    ("gpt", 12, ("jetson-nano", "jetson-tx2", "laptop-i7", "raspberry-pi-5"), 12.5e6, 16),
    ("resnet18", 10, ("jetson-orin-nano", "jetson-nano", "jetson-tx2"), 125e6, 12),
    ("bert", 12, ("jetson-xavier-nx", "jetson-nano", "raspberry-pi-5", "jetson-tx2", "laptop-i7"), 37.5e6, 32),
]


@pytest.fixture(scope="module")
def graphs():
    return {(m, n): _layer_graph(m, n) for m, n, *_ in CASES}


def _tools(lg, cluster):
    tables = {}

    def table_for(R):
        if R not in tables:
            tables[R] = CostTable(lg, cluster, R, ADAM_STATE_FACTOR, False)
        return tables[R]

    def simulated(c):
        return hpp._simulated_s(c, lg, cluster, ADAM_STATE_FACTOR, "asteroid", False)

    return table_for, simulated


def _candidate(plan):
    return Candidate(plan.stages, plan.microbatches, plan.microbatch_rows, 0.0, plan.schedule)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_move_fits_memory_and_keeps_the_pins(graphs, case):
    model, layers, kinds, bw, batch = case
    lg = graphs[model, layers]
    cluster = Cluster.from_kinds(kinds, bw, 1e-3)
    table_for, _ = _tools(lg, cluster)
    plan = hpp.plan(lg, cluster, batch=batch)
    c = _candidate(plan)
    free = list(polish.moves(c, table_for, cluster.names, polish.Pins(batch)))
    assert free
    for what, m in free:
        assert m.key != c.key, what
        assert table_for(m.rows).fits(m.stages, m.microbatches, m.schedule), what
        assert sum(m.stages[0].rows) == m.rows and m.rows * m.microbatches == batch, what
    pinned = polish.Pins(batch, microbatches=True, stages=len(c.stages), deepen=False)
    for what, m in polish.moves(c, table_for, cluster.names, pinned):
        assert (m.microbatches, len(m.stages), m.schedule) == (c.microbatches, len(c.stages), c.schedule), what


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_polish_run_to_the_end_is_a_local_optimum(graphs, case):
    """From the search's start (the planner's plan with its polish undone is not at hand, so from a
    plain one: every layer on one stage of its group), the descent with no budget left over ends
    where no single move simulates faster."""
    model, layers, kinds, bw, batch = case
    lg = graphs[model, layers]
    cluster = Cluster.from_kinds(kinds, bw, 1e-3)
    table_for, simulated = _tools(lg, cluster)
    start = _candidate(hpp.plan(lg, cluster, batch=batch, stages=2, local=False))
    pins = polish.Pins(batch)
    end, seconds = polish.polish(start, simulated(start), simulated, table_for, cluster.names, pins, 10_000)
    assert seconds <= simulated(start)
    assert seconds == pytest.approx(simulated(end), rel=1e-12)
    for what, m in polish.moves(end, table_for, cluster.names, pins):
        assert simulated(m) >= seconds * (1 - 1e-9), f"{what} is faster: {simulated(m)} < {seconds}"


def test_the_plan_is_no_slower_than_the_search_before_its_polish(graphs):
    model, layers, kinds, bw, batch = CASES[0]
    lg = graphs[model, layers]
    cluster = Cluster.from_kinds(kinds, bw, 1e-3)
    _, simulated = _tools(lg, cluster)
    cands = hpp.search(lg, cluster, batch=batch)
    before, before_s = hpp.fastest(hpp.to_simulate(cands, 4), lg, cluster, ADAM_STATE_FACTOR, "asteroid")
    plan = hpp.plan(lg, cluster, batch=batch)
    check_sound(plan, lg, cluster, batch)
    assert plan.prediction.iteration_s <= before_s * (1 + 1e-12)


def test_the_budget_shrinks_with_the_cluster():
    assert polish.budget(4) == polish.SIMULATIONS
    assert polish.budget(64) * 64 <= polish.SIMULATED_DEVICES and polish.budget(1000) >= 4


def test_twins_are_devices_that_trade_places_without_changing_anything():
    cluster = Cluster.from_kinds(("jetson-nano", "jetson-nano", "jetson-tx2", "jetson-nano"), 125e6, 1e-3)
    a, b, c, d = cluster.names
    assert hpp.twins(cluster) == {a: a, b: a, c: c, d: a}
    bw = [list(r) for r in cluster.bandwidth]
    bw[3][2] = bw[2][3] = 12.5e6  # the last nano has a slow link to the tx2: no longer a twin
    slow = Cluster(cluster.devices, bandwidth=bw, latency=cluster.latency)
    assert hpp.twins(slow) == {a: a, b: a, c: c, d: d}


def test_candidates_that_only_trade_twins_are_simulated_once(graphs):
    lg = graphs["gpt", 12]
    cluster = Cluster.from_kinds(("jetson-nano", "jetson-nano", "laptop-i7"), 12.5e6, 1e-3)
    cands = hpp.search(lg, cluster, batch=16)
    kept = hpp.distinct(cands, cluster)
    assert kept == [c for c in cands if c in kept]  # order kept, the best of each class first
    cls = hpp.twins(cluster)
    shapes = [(c.microbatches, c.schedule, tuple((st.layers, tuple(cls[d] for d in st.devices), st.rows)
                                                 for st in c.stages)) for c in kept]
    assert len(shapes) == len(set(shapes))
    assert len(kept) < len(cands)  # the two nanos make twins of many candidates


def test_devices_of_different_stages_trade_places_once_per_twin_class(graphs):
    """A swap move for every pair of devices of two stages; two twins (same kind, memory and links)
    trading with the same device make one neighbour, not two."""
    lg = graphs["gpt", 12]
    cluster = Cluster.from_kinds(("jetson-nano", "jetson-nano", "jetson-tx2", "jetson-xavier-nx"), 12.5e6, 1e-3)
    nano0, nano1, tx2, xnx = cluster.names
    table_for, _ = _tools(lg, cluster)
    c = polish.exact(table_for(4), [0, 6, 12], [[nano0, nano1, xnx], [tx2]], 4, "1f1b")
    assert c is not None
    swaps = lambda classes: sorted(w for w, _ in polish.moves(c, table_for, cluster.names, polish.Pins(16),  # noqa: E731
                                                             classes) if "<->" in w)
    assert swaps(None) == sorted([f"{nano0} <-> {tx2}", f"{nano1} <-> {tx2}", f"{xnx} <-> {tx2}"])
    assert swaps(hpp.twins(cluster)) == sorted([f"{nano0} <-> {tx2}", f"{xnx} <-> {tx2}"])
    for what, m in polish.moves(c, table_for, cluster.names, polish.Pins(16)):
        if what == f"{xnx} <-> {tx2}":
            assert [sorted(st.devices) for st in m.stages] == [sorted((nano0, nano1, tx2)), [xnx]]


NEVER_LOSES = [  # (kinds, bandwidth, batch): small clusters, where the planner searches every micro-batching alone too
    (("jetson-nano", "jetson-tx2", "laptop-i7", "raspberry-pi-5"), 12.5e6, 16),
    (("jetson-orin-nano", "jetson-nano", "jetson-xavier-nx"), 125e6, 32),
]


@pytest.mark.parametrize("case", NEVER_LOSES, ids=["4 devices", "3 devices"])
def test_no_pinned_micro_batch_count_beats_the_unpinned_plan(graphs, case):
    kinds, bw, batch = case
    lg = graphs["gpt", 12]
    cluster = Cluster.from_kinds(kinds, bw, 1e-3)
    free = hpp.plan(lg, cluster, batch=batch).prediction.iteration_s
    for M, _ in hpp.microbatch_choices(batch, None, None):
        try:
            pinned = hpp.plan(lg, cluster, batch=batch, microbatches=M).prediction.iteration_s
        except hpp.NoPlanError:
            continue
        assert free <= pinned * (1 + 1e-12), f"{M} micro-batches pinned: {pinned} < {free}"


def test_a_finer_graph_never_plans_slower_than_its_coarsening(graphs):
    """The graph with every allowed cut (gpt small: more layers than compile's 48) plans at least as
    fast as the 48-layer graph linearize makes of it, that plan mapped onto the fine layers."""
    from asteroid_fx.ir.layer_graph import DEFAULT_MAX_LAYERS
    from asteroid_fx.ir.plan import StagePlan

    fine = _layer_graph("gpt", None)
    coarse = _layer_graph("gpt", DEFAULT_MAX_LAYERS)
    assert len(fine.allowed_cuts()) + 1 > DEFAULT_MAX_LAYERS
    at = {layer.nodes[0]: layer.index for layer in fine.layers}
    assert tuple(at[layer.nodes[0]] for layer in coarse.layers) + (len(fine),) == fine.coarsening(DEFAULT_MAX_LAYERS)
    for kinds, bw, batch in NEVER_LOSES:
        cluster = Cluster.from_kinds(kinds, bw, 1e-3)
        table_for, simulated = _tools(fine, cluster)
        p = hpp.plan(coarse, cluster, batch=batch)
        mapped = Candidate(tuple(StagePlan((at[coarse.layers[st.layers[0]].nodes[0]],
                                            len(fine) if st.layers[1] == len(coarse)
                                            else at[coarse.layers[st.layers[1]].nodes[0]]), st.devices, st.rows)
                                 for st in p.stages), p.microbatches, p.microbatch_rows, 0.0, p.schedule)
        got = hpp.plan(fine, cluster, batch=batch)
        check_sound(got, fine, cluster, batch)
        assert got.prediction.iteration_s <= simulated(mapped) * (1 + 1e-9), kinds
