"""Reading a Program's canonical text back (the grammar is in ``program_text``'s docstring).

The parser also takes ``#`` comments, blank lines and any spacing between tokens; every error
names the line, what was expected there and the line's text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from asteroid_fx.ir import ops
from asteroid_fx.ir.errors import InputError
from asteroid_fx.ir.ops import ARROWS, PAYLOADS, Op
from asteroid_fx.ir.program import FORMAT_VERSION, Action, Program, StageInfo, StageSlot, TensorSpec
from asteroid_fx.ir.program_format import BARE_NAME, DTYPE_LONG, DTYPE_SHORT, FORMAT_NAME, is_torch_dtype

_OP_NAMES = frozenset(o.value for o in Op)
_INT = r"-?\d+"
_STAGE_WORD = re.compile(rf"s({_INT})")
_MB_WORD = re.compile(rf"mb({_INT})")
_ROWS_WORD = re.compile(rf"r({_INT}):({_INT})")
_RANGE_WORD = re.compile(rf"({_INT}):({_INT})")
_EDGES_WORD = re.compile(rf"{_INT}(?::{_INT})+")  # a slot's rows, with its chunk boundaries between
_INT_WORD = re.compile(_INT)
_VERSION_WORD = re.compile(r"v(\d+)")
_MAX_NORM_WORD = re.compile(r"max_norm=(.*)")


class ProgramParseError(InputError):
    """A program text or JSON document that cannot be read; ``line`` is 1-based (None for JSON)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#.*)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<punct>[\[\](),{}])
    | (?P<word>[^\s"\#\[\](),{}]+)
    | (?P<bad>")
    """,
    re.VERBOSE,
)


class _Token(NamedTuple):
    kind: str  # "word" | "string" | "punct"
    text: str


class _Bad(Exception):
    """What is wrong with the current line; the line loop adds the line number and the text."""


def _tokenize(line: str) -> list[_Token]:
    tokens: list[_Token] = []
    for m in _TOKEN.finditer(line):
        kind = m.lastgroup
        if kind == "comment":
            break
        if kind == "bad":
            raise _Bad('unterminated string (a quoted name needs its closing ")')
        if kind != "space":
            tokens.append(_Token(kind, m.group()))
    return tokens


class _Cursor:
    """Reads the tokens of one line left to right; every ``expect`` names what it wanted."""

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._i = 0

    def peek(self) -> _Token | None:
        return self._tokens[self._i] if self._i < len(self._tokens) else None

    def take(self, what: str) -> _Token:
        tok = self.peek()
        if tok is None:
            raise _Bad(f"expected {what}, found the end of the line")
        self._i += 1
        return tok

    def word(self, what: str) -> str:
        tok = self.take(what)
        if tok.kind != "word":
            raise _Bad(f"expected {what}, found {tok.text!r}")
        return tok.text

    def match(self, pattern: re.Pattern[str], what: str) -> re.Match[str]:
        text = self.word(what)
        m = pattern.fullmatch(text)
        if m is None:
            raise _Bad(f"expected {what}, found {text!r}")
        return m

    def peek_match(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        tok = self.peek()
        if tok is None or tok.kind != "word":
            return None
        m = pattern.fullmatch(tok.text)
        if m is not None:
            self._i += 1
        return m

    def peek_punct(self, ch: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == "punct" and tok.text == ch:
            self._i += 1
            return True
        return False

    def punct(self, ch: str, what: str) -> None:
        tok = self.take(f"{ch!r} {what}")
        if tok.kind != "punct" or tok.text != ch:
            raise _Bad(f"expected {ch!r} {what}, found {tok.text!r}")

    def name(self, what: str) -> str:
        tok = self.take(what)
        if tok.kind == "string":
            return _string_value(tok.text)
        if tok.kind != "word":
            raise _Bad(f"expected {what}, found {tok.text!r}")
        return tok.text

    def integer(self, what: str) -> int:
        return int(self.match(_INT_WORD, what).group())

    def span(self, pattern: re.Pattern[str], what: str) -> tuple[int, int]:
        m = self.match(pattern, what)
        return int(m.group(1)), int(m.group(2))

    def end(self) -> None:
        tok = self.peek()
        if tok is not None:
            raise _Bad(f"unexpected {tok.text!r} (expected the end of the line)")


def _string_value(text: str) -> str:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad(f"bad quoted name {text} ({e.msg}; quoted names use JSON string escapes)") from None


def _parse_dtype(cur: _Cursor) -> str:
    tok = cur.take("a tensor spec such as f32(64,8,8)")
    if tok.kind == "string":
        return _string_value(tok.text)
    if tok.kind == "word" and tok.text in DTYPE_LONG:
        return DTYPE_LONG[tok.text]
    if tok.kind == "word" and BARE_NAME.fullmatch(tok.text) and is_torch_dtype(tok.text):
        return tok.text
    known = " ".join(DTYPE_SHORT.values())
    raise _Bad(f"unknown dtype {tok.text!r} (expected one of {known}, or a torch dtype name such as complex64)")


def _parse_spec(cur: _Cursor) -> TensorSpec:
    dtype = _parse_dtype(cur)
    cur.punct("(", "to open the row shape, e.g. f32(64,8,8) or f32() for a scalar row")
    dims: list[int] = []
    if not cur.peek_punct(")"):
        while True:
            dims.append(cur.integer("a dimension of the row shape"))
            if cur.peek_punct(")"):
                break
            cur.punct(",", "between dimensions (or ')' to close the shape)")
    return TensorSpec(dtype, tuple(dims))


def _parse_action_tokens(cur: _Cursor) -> Action:
    op_word = cur.word("an op")
    try:
        op = Op(op_word)
    except ValueError:
        raise _Bad(f"unknown op {op_word!r} (expected one of {' '.join(o.value for o in Op)})") from None

    payload: str | None = None
    tok = cur.peek()
    if tok is not None and tok.kind == "string":
        payload = cur.name("a payload")
    elif tok is not None and tok.kind == "word" and tok.text in PAYLOADS:
        payload = cur.word("a payload")
    elif tok is not None and tok.kind == "word" and not _STAGE_WORD.fullmatch(tok.text):
        raise _Bad(f"expected a payload ({' or '.join(PAYLOADS)}) or the stage as s<N>, found {tok.text!r}")

    stage = int(cur.match(_STAGE_WORD, "the stage as s<N>, e.g. s0").group(1))
    m = cur.peek_match(_MB_WORD)
    mb = int(m.group(1)) if m else None
    m = cur.peek_match(_ROWS_WORD)
    rows = (int(m.group(1)), int(m.group(2))) if m else None

    peer: str | None = None
    tok = cur.peek()
    if tok is not None and tok.kind == "word" and tok.text in ARROWS:
        arrow = cur.word("an arrow")
        expected = ops.info(op).arrow
        if arrow != expected:
            raise _Bad(f"{op.value} names its peer after {expected!r}, not {arrow!r}")
        peer = cur.name(f"a device name after {arrow!r}")

    group: list[str] = []
    if cur.peek_punct("["):
        while not cur.peek_punct("]"):
            group.append(cur.name("a device name or ']' to close the group"))

    params: list[str] = []  # a TIE's tied weights
    if cur.peek_punct("{"):
        while not cur.peek_punct("}"):
            params.append(cur.name("a weight name or '}' to close the weights"))

    max_norm: float | None = None  # a NORM's threshold
    m = cur.peek_match(_MAX_NORM_WORD)
    if m:
        try:
            max_norm = float(m.group(1))
        except ValueError:
            raise _Bad(f"expected max_norm=<a number>, e.g. max_norm=1.0, found {m.group()!r}") from None

    specs: list[TensorSpec] = []
    tok = cur.peek()
    if tok is not None and tok.kind == "word" and tok.text == ":":
        cur.take(":")
        specs.append(_parse_spec(cur))
        while cur.peek() is not None:
            specs.append(_parse_spec(cur))
    cur.end()
    return Action(op, stage, mb, rows, peer, payload, tuple(specs), tuple(group), tuple(params), max_norm)


def parse_action(text: str) -> Action:
    """One action line (as ``format_action`` writes it) back to an Action."""
    try:
        return _parse_action_tokens(_Cursor(_tokenize(text)))
    except _Bad as e:
        raise ProgramParseError(f"{e}: {text.strip()}") from None


class _Reader:
    """The state of ``parse_program`` between lines: what the header said, stages, devices."""

    def __init__(self) -> None:
        self.header_line: int | None = None
        self.version = FORMAT_VERSION
        self.fields: dict[str, tuple[Any, int]] = {}  # header field -> (value, line)
        self.stages: list[StageInfo] = []
        self.devices: list[tuple[str, list[Action]]] = []
        self.device_line: dict[str, int] = {}

    def header(self, cur: _Cursor, n: int) -> None:
        if self.header_line is not None:
            raise _Bad(f"second header (the first is on line {self.header_line})")
        m = cur.match(_VERSION_WORD, f"the version after {FORMAT_NAME}, e.g. v{FORMAT_VERSION}")
        cur.end()
        version = int(m.group(1))
        if version != FORMAT_VERSION:
            raise _Bad(
                f"unsupported version \"{FORMAT_NAME} v{version}\" (this build reads v{FORMAT_VERSION}); "
                "write it with a matching asteroid_fx or upgrade this one"
            )
        self.header_line, self.version = n, version

    def field(self, key: str, value: Any, n: int) -> None:
        if key in self.fields:
            raise _Bad(f"{key!r} given twice (first on line {self.fields[key][1]})")
        if self.stages or self.devices:
            raise _Bad(f"{key!r} belongs in the header, before the first stage or device line")
        self.fields[key] = (value, n)

    def require_fields(self) -> None:
        missing = [k for k in _HEADER_FIELDS if k not in self.fields]
        if missing:
            lines = ", ".join(f"'{k} ...'" for k in missing)
            raise _Bad(
                f"the header lacks {lines} (expected after '{FORMAT_NAME} v{FORMAT_VERSION}', before any stage or device)"
            )

    def stage(self, cur: _Cursor, n: int) -> None:
        if self.devices:
            raise _Bad("stage lines come before the first device line")
        self.require_fields()
        index = cur.integer("the stage index")
        if cur.word("'layers'") != "layers":
            raise _Bad("expected 'layers LO:HI' after the stage index")
        layers = cur.span(_RANGE_WORD, "the layer range LO:HI")
        slots: list[StageSlot] = []
        splits: list[int] = []
        while cur.peek() is not None:
            device = cur.name("a device slot NAME[LO:HI]")
            cur.punct("[", f"after {device!r} to give its rows, e.g. {device}[0:8]")
            edges = [int(x) for x in cur.match(_EDGES_WORD, "the row range LO:HI")
                     .group(0).split(":")]
            cur.punct("]", "to close the row range")
            slots.append(StageSlot(device, edges[0], edges[-1]))
            splits += edges[1:-1]
        self.stages.append(StageInfo(index, layers, tuple(slots), tuple(splits)))

    def device(self, cur: _Cursor, n: int) -> None:
        self.require_fields()
        device = cur.name("the device name")
        cur.end()
        if device in self.device_line:
            raise _Bad(f"device {device!r} listed twice (first on line {self.device_line[device]}); merge the two blocks")
        self.device_line[device] = n
        self.devices.append((device, []))

    def action(self, cur: _Cursor, n: int) -> None:
        if not self.devices:
            first = cur.peek()
            if first is not None and first.text not in _OP_NAMES:
                kinds = ", ".join([FORMAT_NAME, *_HEADER_FIELDS, *_BODY_LINES])
                raise _Bad(f"unknown line {first.text!r} (expected one of {kinds}, or an action inside a device block)")
            raise _Bad("action before any 'device NAME' line (every action belongs to a device block)")
        self.devices[-1][1].append(_parse_action_tokens(cur))

    def program(self) -> Program:
        return Program(
            schedule=self.fields["schedule"][0],
            microbatches=self.fields["microbatches"][0],
            microbatch_rows=self.fields["microbatch_rows"][0],
            stages=tuple(self.stages),
            actions=tuple((d, tuple(acts)) for d, acts in self.devices),
            version=self.version,
        )


# How each header line's value is read.
_HEADER_FIELDS: Mapping[str, Callable[[_Cursor], Any]] = {
    "schedule": lambda cur: cur.name("the schedule name"),
    "microbatches": lambda cur: cur.integer("the number of micro-batches"),
    "microbatch_rows": lambda cur: cur.integer("the rows of every micro-batch"),
}

# Lines that build the program's body; any other line must be an action.
_BODY_LINES: Mapping[str, Callable[[_Reader, _Cursor, int], None]] = {
    "stage": _Reader.stage,
    "device": _Reader.device,
}


def parse_program(text: str) -> Program:
    """Read the text ``format_program`` writes (plus comments, blank lines, any spacing).

    Raises ProgramParseError ``line N: <what is wrong>: <the line>``.
    """
    reader = _Reader()
    last_line = 1
    for n, raw in enumerate(text.split("\n"), start=1):
        try:
            tokens = _tokenize(raw)
            if not tokens:
                continue
            last_line = n
            cur = _Cursor(tokens)
            first = tokens[0]
            is_header = first.kind == "word" and first.text == FORMAT_NAME
            if reader.header_line is None and not is_header:
                raise _Bad(f"missing header: the first line must be '{FORMAT_NAME} v{FORMAT_VERSION}'")
            if is_header:
                cur.take(FORMAT_NAME)
                reader.header(cur, n)
            elif first.kind == "word" and first.text in _HEADER_FIELDS:
                cur.take(first.text)
                value = _HEADER_FIELDS[first.text](cur)
                cur.end()
                reader.field(first.text, value, n)
            elif first.kind == "word" and first.text in _BODY_LINES:
                cur.take(first.text)
                _BODY_LINES[first.text](reader, cur, n)
            else:
                reader.action(cur, n)
        except _Bad as e:
            raise ProgramParseError(f"line {n}: {e}: {raw.strip()}", line=n) from None
    if reader.header_line is None:
        raise ProgramParseError(
            f"line 1: missing header: the text holds nothing but blanks and comments; "
            f"a program starts with '{FORMAT_NAME} v{FORMAT_VERSION}': ",
            line=1,
        )
    try:
        reader.require_fields()
    except _Bad as e:
        line = text.split("\n")[last_line - 1].strip()
        raise ProgramParseError(f"line {last_line}: {e}: {line}", line=last_line) from None
    return reader.program()
