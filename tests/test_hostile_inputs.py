"""The hostile-inputs fuzz of benchmarks/hostile.py in the default run: 300 seeded mutations of
each kind of file (program text and JSON, plan, costs, cluster, device profile), each through the
readers and commands that take it, each bounded in time: every one a clean error or accepted with
the same meaning; no traceback, no hang, no verified program that then trains differently."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hostile  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return hostile.setup(tmp_path_factory.mktemp("hostile"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # absurd numbers overflow in the planner's arithmetic
@pytest.mark.parametrize("category", hostile.CATEGORIES)
def test_every_mutation_is_a_clean_error_or_means_the_same(setup, category):
    counts, bad = hostile.run(setup, category, 300, seed=0)
    assert not bad, "\n".join(f"{o}: {w}: {d}" for o, w, d in bad[:10])
    assert counts["clean"] > 150  # most mutations break the file, and each was refused, not run


def test_a_mutation_of_nothing_is_accepted_and_the_same(setup):
    for category in hostile.CATEGORIES:
        assert hostile.run_case(setup, category, None)[0] == "same"


def test_a_verified_program_that_trains_differently_would_be_counted_wrong(setup):
    # the oracle is live: the original program against other reference weights is "wrong"
    import dataclasses

    other = {k: v + 1 for k, v in setup.reference.items()}
    changed = dataclasses.replace(setup, reference=other)
    with pytest.raises(hostile.Wrong, match="trained .* to other values"):
        hostile._check_program(changed, setup.compiled.program)
