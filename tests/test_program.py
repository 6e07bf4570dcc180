"""The Program's text and JSON forms: goldens, exact round trips, and errors that point at lines."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asteroid_fx.ir.program import Action, Op, Program, StageInfo, StageSlot, TensorSpec
from asteroid_fx.ir.program_text import (
    ProgramParseError,
    format_action,
    format_program,
    format_program_lines,
    layout_program,
    parse_action,
    parse_program,
    program_from_json,
    program_to_json,
)

CUT = (TensorSpec("float32", (64, 8, 8)), TensorSpec("int64", (16,)))


def tiny_program() -> Program:
    return Program(
        schedule="1f1b",
        microbatches=4,
        microbatch_rows=16,
        stages=(
            StageInfo(0, (0, 5), (StageSlot("nano0", 0, 10), StageSlot("tx20", 10, 16))),
            StageInfo(1, (5, 9), (StageSlot("xavier0", 0, 16),)),
        ),
        actions=(
            (
                "nano0",
                (
                    Action(Op.F, 0, 0, (0, 10)),
                    Action(Op.SEND, 0, 0, (0, 10), peer="xavier0", payload="act", specs=CUT),
                    Action(Op.RECV, 0, 0, (0, 10), peer="xavier0", payload="grad", specs=CUT),
                    Action(Op.B, 0, 0, (0, 10)),
                    Action(Op.ALLREDUCE, 0, group=("nano0", "tx20")),
                    Action(Op.STEP, 0),
                    Action(Op.BACKUP, 0, peer="tx20"),
                    Action(Op.RESTORE, 0, peer="tx20"),
                ),
            ),
            ("xavier0", (Action(Op.RECV, 0, 0, (0, 10), peer="nano0", payload="act", specs=CUT),)),
        ),
    )


TINY_TEXT = """\
asteroid-program v1
schedule 1f1b
microbatches 4
microbatch_rows 16
stage 0 layers 0:5 nano0[0:10] tx20[10:16]
stage 1 layers 5:9 xavier0[0:16]

device nano0
  F s0 mb0 r0:10
  SEND act s0 mb0 r0:10 -> xavier0 : f32(64,8,8) i64(16)
  RECV grad s0 mb0 r0:10 <- xavier0 : f32(64,8,8) i64(16)
  B s0 mb0 r0:10
  ALLREDUCE s0 [nano0 tx20]
  STEP s0
  BACKUP s0 -> tx20
  RESTORE s0 <- tx20
device xavier0
  RECV act s0 mb0 r0:10 <- nano0 : f32(64,8,8) i64(16)
"""


def test_golden_text_of_a_tiny_program() -> None:
    assert format_program(tiny_program()) == TINY_TEXT
    assert str(tiny_program()) == TINY_TEXT
    assert parse_program(TINY_TEXT) == tiny_program()


def test_lines_point_at_each_action() -> None:
    p = tiny_program()
    text, lines = format_program_lines(p)
    rows = text.split("\n")
    assert lines[("nano0", 0)] == 9 and lines[("xavier0", 0)] == 18
    for (device, i), n in lines.items():
        assert rows[n - 1] == "  " + format_action(p.of(device)[i])
    layout = layout_program(p)
    assert [rows[n - 1].split()[:2] for n in layout.stage_lines] == [["stage", "0"], ["stage", "1"]]
    assert rows[layout.device_lines["xavier0"] - 1] == "device xavier0"


def test_json_form_is_versioned_and_round_trips() -> None:
    p = tiny_program()
    d = program_to_json(p)
    assert d["format"] == "asteroid-program" and d["version"] == 1
    assert d["devices"][0]["actions"][0] == {"op": "F", "stage": 0, "mb": 0, "rows": [0, 10]}
    assert program_from_json(json.loads(json.dumps(d))) == p


def test_comments_blank_lines_and_spacing_are_accepted() -> None:
    text = """
# a program written by hand
asteroid-program v1      # header

schedule   1f1b
microbatches 4
microbatch_rows 16
stage 0 layers 0:5   nano0 [0:10]  tx20[10:16]   # uneven group
stage 1 layers 5:9 xavier0[0:16]
device nano0
F s0 mb0 r0:10
\tSEND  act s0 mb0 r0:10 -> xavier0 :  f32( 64, 8,8 )  i64(16)
    RECV grad s0 mb0 r0:10 <- xavier0 : f32(64,8,8) i64(16)   # from the last stage

  B s0 mb0 r0:10
  ALLREDUCE s0 [ nano0 tx20 ]
  STEP s0
  BACKUP s0 -> tx20
  RESTORE s0 <- tx20
device xavier0
  RECV act s0 mb0 r0:10 <- nano0 : f32(64,8,8) i64(16)
"""
    assert parse_program(text) == tiny_program()


def test_dtypes_use_short_names_and_scalars_print_empty_shapes() -> None:
    a = Action(
        Op.SEND, 1, 2, (0, 3), peer="x", payload="act",
        specs=(TensorSpec("bfloat16", ()), TensorSpec("bool", (2,)), TensorSpec("complex64", (1, 2))),
    )
    assert format_action(a) == "SEND act s1 mb2 r0:3 -> x : bf16() b8(2) complex64(1,2)"
    assert parse_action(format_action(a)) == a
    assert format_action(a, short=True) == "SEND act s1 mb2 -> x"


def test_odd_names_are_quoted_and_round_trip() -> None:
    p = Program(
        schedule="my schedule",
        microbatches=1,
        microbatch_rows=2,
        stages=(StageInfo(0, (0, 1), (StageSlot("gpu 0", 0, 1), StageSlot('a"b[#]', 1, 2))),),
        actions=(("gpu 0", (Action(Op.ALLREDUCE, 0, group=("gpu 0", 'a"b[#]')),)), ('a"b[#]', ())),
    )
    text = format_program(p)
    assert 'schedule "my schedule"' in text and 'device "gpu 0"' in text
    assert parse_program(text) == p


# --- parse errors: every message is `line N: <what>: <the line>` ---------------------------------

HEAD = "asteroid-program v1\nschedule 1f1b\nmicrobatches 2\nmicrobatch_rows 8\n"


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("", 1, "missing header"),
        ("schedule 1f1b\n", 1, "missing header: the first line must be 'asteroid-program v1'"),
        ("asteroid-program v7\n", 1, 'unsupported version "asteroid-program v7" (this build reads v1)'),
        ("asteroid-program 1\n", 1, "expected the version"),
        (HEAD + "  F s0 mb0 r0:8\n", 5, "action before any 'device NAME' line"),
        (HEAD + "device a\n  FWD s0 mb0 r0:8\n", 6, "unknown op 'FWD'"),
        (HEAD + "device a\n  F s0 mb0 r0-8\n", 6, "unexpected 'r0-8'"),
        (HEAD + "stage 0 layers 0:2 a[0:x]\n", 5, "expected the row range LO:HI, found '0:x'"),
        (HEAD + "stage 0 layers 0:2 a\n", 5, "to give its rows"),
        (HEAD + "device a\ndevice b\ndevice a\n", 7, "device 'a' listed twice (first on line 5)"),
        (HEAD + "device a\n  SEND act s0 mb0 r0:8 <- b : f32()\n", 6, "SEND names its peer after '->'"),
        (HEAD + "device a\n  SEND actt s0\n", 6, "expected a payload (act or grad)"),
        (HEAD + "device a\n  RECV act s0 mb0 r0:8 <- b : f23(4)\n", 6, "unknown dtype 'f23'"),
        (HEAD + "device a\n  RECV act s0 mb0 r0:8 <- b :\n", 6, "expected a tensor spec"),
        (HEAD + "device a\n  ALLREDUCE s0 [a b\n", 6, "expected a device name or ']'"),
        (HEAD + 'device "a\n', 5, "unterminated string"),
        (HEAD + "schedule gpipe\n", 5, "'schedule' given twice (first on line 2)"),
        (HEAD + "device a\nstage 0 layers 0:1 a[0:8]\n", 6, "stage lines come before the first device line"),
        ("asteroid-program v1\nschedule x\nmicrobatches 2\ndevice a\n", 4, "the header lacks 'microbatch_rows ...'"),
        ("asteroid-program v1\nschedule x\nmicrobatch 2\n", 3, "unknown line 'microbatch'"),
    ],
)
def test_parse_errors_name_the_line_and_what_was_expected(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ProgramParseError) as info:
        parse_program(text)
    message = str(info.value)
    assert message.startswith(f"line {line}: "), message
    assert fragment in message, message
    assert info.value.line == line
    bad_line = text.split("\n")[line - 1].strip()
    assert message.endswith(f": {bad_line}"), message


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda d: d.update(format="something-else"), "$.format: this is not an asteroid program"),
        (lambda d: d.update(version=7), "$.version: unsupported version 7 (this build reads version 1)"),
        (lambda d: d.pop("microbatches"), "$: missing field 'microbatches'"),
        (lambda d: d.update(microbatches="4"), "$.microbatches: expected an integer"),
        (lambda d: d["devices"][0]["actions"][0].pop("stage"), "$.devices[0].actions[0]: missing field 'stage'"),
        (lambda d: d["devices"][0]["actions"][1].update(op="SENDX"), "$.devices[0].actions[1].op: unknown op 'SENDX'"),
        (lambda d: d["stages"][1]["slots"][0].update(rows=3), "$.stages[1].slots[0]: unknown field 'rows'"),
        (lambda d: d["stages"][0].update(layers=[0]), "$.stages[0].layers: expected [lo, hi]"),
    ],
)
def test_json_errors_name_the_path(edit, fragment: str) -> None:
    d = json.loads(json.dumps(program_to_json(tiny_program())))
    edit(d)
    with pytest.raises(ProgramParseError, match="program JSON at ") as info:
        program_from_json(d)
    assert fragment in str(info.value)


# --- properties: the text and JSON forms are exact inverses for every Program --------------------

names = st.one_of(
    st.sampled_from(["nano0", "tx20", "xavier0", "cuda:0", "10.0.0.2:29500", "@", "s0", "device", "->"]),
    st.text(max_size=8),
)
small_ints = st.integers(-3, 40)
dtypes = st.sampled_from(
    ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
     "complex64", "float8_e4m3fn", "uint16", "f32", "not a dtype", ""]
)
specs = st.builds(TensorSpec, dtypes, st.lists(st.integers(0, 512), max_size=4).map(tuple))
ranges = st.tuples(small_ints, small_ints)
actions = st.builds(
    Action,
    op=st.sampled_from(list(Op)),
    stage=small_ints,
    mb=st.none() | small_ints,
    rows=st.none() | ranges,
    peer=st.none() | names,
    payload=st.none() | st.sampled_from(["act", "grad"]) | st.text(max_size=5),
    specs=st.lists(specs, max_size=3).map(tuple),
    group=st.lists(names, max_size=3).map(tuple),
    params=st.lists(names, max_size=3).map(tuple),
    # NaN is left out: it equals nothing, itself included, so no program holding it compares equal
    max_norm=st.none() | st.floats(allow_nan=False),
)
stage_infos = st.builds(
    StageInfo,
    index=small_ints,
    layers=ranges,
    slots=st.lists(st.builds(StageSlot, names, small_ints, small_ints), max_size=3).map(tuple),
)
programs = st.builds(
    Program,
    schedule=names,
    microbatches=small_ints,
    microbatch_rows=small_ints,
    stages=st.lists(stage_infos, max_size=3).map(tuple),
    actions=st.lists(
        st.tuples(names, st.lists(actions, max_size=6).map(tuple)), max_size=4, unique_by=lambda t: t[0]
    ).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(programs)
def test_text_round_trip_is_exact(p: Program) -> None:
    assert parse_program(format_program(p)) == p


@settings(max_examples=200, deadline=None)
@given(programs)
def test_json_round_trip_is_exact(p: Program) -> None:
    assert program_from_json(json.loads(json.dumps(program_to_json(p)))) == p


@settings(max_examples=100, deadline=None)
@given(programs, st.text(alphabet=' \t#"[]x', max_size=6))
def test_comments_and_spacing_never_change_the_program(p: Program, comment: str) -> None:
    noisy = "\n".join(f"   {line}   # {comment}\n" for line in format_program(p).split("\n"))
    assert parse_program(noisy) == p
