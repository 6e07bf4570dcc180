"""passes/remainder.py: the plan and program of an epoch's smaller last batch, and the backends'
swap to it and back (the training runs are in tests/test_jobs.py)."""

from __future__ import annotations

import pytest

from asteroid_fx.ir.errors import InputError
from asteroid_fx.passes.remainder import (RemainderError, proportional_rows, remainder_plan, remainder_program,
                                         same_stages)
from tests.plans import check_roundtrip_and_verify, layer_per_stage


class Layers:
    """What remainder_plan reads of a LayerGraph: the least rows of a device of each stage (two
    where a stage holds the normalizing layer ``normalizes``)."""

    def __init__(self, normalizes: int | None = None):
        self.normalizes = normalizes

    def min_rows(self, lo: int, hi: int) -> int:
        return 2 if self.normalizes is not None and lo <= self.normalizes < hi else 1


# 4 micro-batches of 8 rows: stage 0 on a alone, stage 1 split 3 : 5 over b and c
PLAN = layer_per_stage([("a",), ("b", "c")], [(8,), (3, 5)], 4, "1f1b")


@pytest.mark.parametrize("rows, microbatches, split", [
    (32, 4, (3, 5)),  # a whole batch: the plan itself
    (24, 4, (2, 4)),  # 4 micro-batches of 6: 2.25 and 3.75 rounded to the nearest that add up to 6
    (20, 4, (2, 3)),  # 4 micro-batches of 5: 1.875 and 3.125
    (6, 3, (1, 1)),  # fewer rows than 4 micro-batches of 2: 3 of 2 (one row each)
    (3, 1, (1, 2)),  # fewer rows than micro-batches: one micro-batch
    (7, 1, (3, 4)),  # no count above 1 divides 7
    (2, 1, (1, 1)),  # the least the group of two can share
])
def test_the_remainder_keeps_the_stages_and_splits_its_rows_as_the_plan_does(rows, microbatches, split):
    got = remainder_plan(PLAN, rows, Layers())
    assert got.batch == rows and got.microbatches == microbatches
    assert [st.layers for st in got.stages] == [st.layers for st in PLAN.stages]
    assert [st.devices for st in got.stages] == [st.devices for st in PLAN.stages]
    assert got.stages[0].rows == (rows // microbatches,) and got.stages[1].rows == split
    assert got.schedule == PLAN.schedule and got.prediction is None


@pytest.mark.parametrize("total, shares, least, rows", [
    (5, (3, 5), 1, (2, 3)),
    (1, (7,), 1, (1,)),
    (3, (1, 1, 6), 1, (1, 1, 1)),  # the least each, whatever the shares
    (9, (1, 1, 6), 2, (2, 2, 5)),  # two each, and the rest to the largest share
    (10, (1, 2, 2), 1, (2, 4, 4)),
])
def test_rows_are_split_in_proportion_with_the_least_each(total, shares, least, rows):
    assert proportional_rows(total, shares, least) == rows


def test_a_remainder_too_small_for_a_group_says_which_and_what_to_do():
    with pytest.raises(RemainderError, match=r"has 1 row, fewer than the 2 that stage 1's group of 2 devices \(b, c\) "
                                             r"needs \(1 row each\); use last_batch='drop'"):
        remainder_plan(PLAN, 1, Layers())
    # a stage that normalizes over its rows gives each device two: b and c need four together
    with pytest.raises(RemainderError, match=r"fewer than the 4 that stage 1's group .* \(2 rows each\)"):
        remainder_plan(PLAN, 3, Layers(normalizes=1))
    got = remainder_plan(PLAN, 6, Layers(normalizes=1))  # 6 rows: one micro-batch (3 of 2 would leave b 1 row)
    assert got.microbatches == 1 and got.stages[1].rows == (2, 4)
    with pytest.raises(RemainderError, match="give 1 to 32 rows"):
        remainder_plan(PLAN, 33, Layers())


def test_the_remainder_program_has_the_compiled_stages_and_swaps_in_without_moving_state():
    import dataclasses

    import torch

    from asteroid_fx.runtime.spec import compile_spec
    from tests.test_jobs import CLUSTER, SPEC

    compiled = compile_spec(SPEC, CLUSTER)
    program = remainder_program(compiled, 5)
    check_roundtrip_and_verify(program)
    assert same_stages(compiled.program, program) is None
    assert (program.microbatches, program.microbatch_rows) == (1, 5)
    assert [tuple(s[1:] for s in st.slots) for st in program.stages] == [((0, 5),), ((0, 2), (2, 5))]
    assert "NORM" in str(program)  # the job's clipping, as the compiled program's

    runner = compiled.runner()
    before = {k: v.clone() for k, v in runner.state_dict().items()}
    runner.swap(program)
    assert runner.state_dict().keys() == before.keys()
    assert all(torch.equal(runner.state_dict()[k], v) for k, v in before.items())  # nothing moved or changed
    with pytest.raises(InputError, match="rows"):  # the running program is the smaller one now
        runner.step((torch.zeros(16, 12),), torch.zeros(16, dtype=torch.long))
    runner.swap(compiled.program)

    other = compile_spec(dataclasses.replace(SPEC, groups=(("a", "b"), ("c",)), rows=((3, 5), (8,))), CLUSTER)
    assert "its stage 0 runs layers 0:3 on a, b, the running program's layers 0:2 on a" in same_stages(
        compiled.program, other.program)
    with pytest.raises(InputError, match="cannot swap in a program that moves stages"):
        runner.swap(other.program)
