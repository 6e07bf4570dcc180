"""The canonical text and JSON forms of a Program (the schedule IR).

The text is what people read in bug reports and what golden tests compare, so it is one action per
line, with every field spelled the same way everywhere::

    asteroid-program v1
    schedule 1f1b
    microbatches 4
    microbatch_rows 16
    stage 0 layers 0:5 nano0[0:10] tx20[10:16]
    stage 1 layers 5:9 xavier0[0:16]

    device nano0
      F s0 mb0 r0:10
      SEND act s0 mb0 r0:10 -> xavier0 : f32(64,8,8) i64(16)
      ALLREDUCE s0 [nano0 tx20]
      ...

An action line is ``OP [PAYLOAD] sSTAGE [mbMB] [rLO:HI] [ARROW PEER] [[GROUP ...]] [: SPEC ...]``:
a field at its ``Action`` default is left out, so each op prints only what it uses. The arrow says
which way data flows (``->`` for SEND and BACKUP, ``<-`` for RECV and RESTORE). A SPEC is the
dtype's short name (or torch's name) and the shape of one row: ``f32(64,8,8)``, ``i64()``.

Names (devices, the schedule) that are not plain words are written as JSON strings, so
``parse_program(format_program(p)) == p`` holds for every Program, whatever its names. The parser
also takes ``#`` comments, blank lines and any spacing between tokens.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from asteroid_fx.ir.program import FORMAT_VERSION, Action, Op, Program, StageInfo, StageSlot, TensorSpec

FORMAT_NAME = "asteroid-program"

# Short dtype names keep spec lists readable; a dtype not listed prints as torch's own name.
DTYPE_SHORT: Mapping[str, str] = {
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "float64": "f64",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "b8",
}
_DTYPE_LONG: Mapping[str, str] = {short: long for long, short in DTYPE_SHORT.items()}

# Which way an op's data moves relative to its peer; an op without an entry (a peer on F, say,
# which verify rejects but the text must still carry) uses the neutral default.
PEER_ARROW: Mapping[Op, str] = {Op.SEND: "->", Op.BACKUP: "->", Op.RECV: "<-", Op.RESTORE: "<-"}
DEFAULT_PEER_ARROW = "@"
_ARROWS = frozenset(PEER_ARROW.values()) | {DEFAULT_PEER_ARROW}

# Payloads that print as bare words; any other payload string is quoted.
PAYLOADS = ("act", "grad")

_BARE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@/+\-]*")
_OP_NAMES = frozenset(o.value for o in Op)
_INT = r"-?\d+"
_STAGE_WORD = re.compile(rf"s({_INT})")
_MB_WORD = re.compile(rf"mb({_INT})")
_ROWS_WORD = re.compile(rf"r({_INT}):({_INT})")
_RANGE_WORD = re.compile(rf"({_INT}):({_INT})")
_INT_WORD = re.compile(_INT)
_VERSION_WORD = re.compile(r"v(\d+)")


class ProgramParseError(ValueError):
    """A program text or JSON document that cannot be read; ``line`` is 1-based (None for JSON)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class ProgramLayout(NamedTuple):
    """The canonical text and where each part of the program landed in it (1-based lines)."""

    text: str
    stage_lines: tuple[int, ...]  # one per entry of Program.stages
    device_lines: Mapping[str, int]  # the `device NAME` line of each device
    action_lines: Mapping[tuple[str, int], int]  # (device, action index) -> line


# ---------------------------------------------------------------------------------------------
# printing


def _name(s: str) -> str:
    # ensure_ascii keeps the quoted form on one line whatever characters the name holds
    return s if _BARE_NAME.fullmatch(s) else json.dumps(s, ensure_ascii=True)


@functools.cache
def _torch_dtype_names() -> frozenset[str]:
    import torch  # only needed for dtypes outside the short table

    # vars(), not getattr: looking a word up must not trigger torch's lazy submodule imports
    return frozenset(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))


def _is_torch_dtype(name: str) -> bool:
    return name in _torch_dtype_names()


def _format_dtype(dtype: str) -> str:
    if dtype in DTYPE_SHORT:
        return DTYPE_SHORT[dtype]
    if dtype not in _DTYPE_LONG and _BARE_NAME.fullmatch(dtype) and _is_torch_dtype(dtype):
        return dtype
    return json.dumps(dtype, ensure_ascii=True)  # not a torch dtype: kept, but visibly quoted


def format_spec(spec: TensorSpec) -> str:
    return f"{_format_dtype(spec.dtype)}({','.join(str(d) for d in spec.shape)})"


def format_action(a: Action, *, short: bool = False) -> str:
    """One action as its text line (without indentation).

    ``short`` leaves out rows, group and specs: the form schedule grids use for their cells.
    """
    op = Op(a.op)
    parts = [op.value]
    if a.payload is not None:
        parts.append(a.payload if a.payload in PAYLOADS else json.dumps(a.payload, ensure_ascii=True))
    parts.append(f"s{a.stage}")
    if a.mb is not None:
        parts.append(f"mb{a.mb}")
    if a.rows is not None and not short:
        parts.append(f"r{a.rows[0]}:{a.rows[1]}")
    if a.peer is not None:
        parts += [PEER_ARROW.get(op, DEFAULT_PEER_ARROW), _name(a.peer)]
    if a.group and not short:
        parts.append("[" + " ".join(_name(d) for d in a.group) + "]")
    if a.specs and not short:
        parts += [":", *(format_spec(s) for s in a.specs)]
    return " ".join(parts)


def _format_stage(st: StageInfo) -> str:
    slots = "".join(f" {_name(s.device)}[{s.lo}:{s.hi}]" for s in st.slots)
    return f"stage {st.index} layers {st.layers[0]}:{st.layers[1]}{slots}"


def layout_program(p: Program) -> ProgramLayout:
    """The canonical text of ``p`` together with the line of every stage, device and action."""
    lines = [
        f"{FORMAT_NAME} v{p.version}",
        f"schedule {_name(p.schedule)}",
        f"microbatches {p.microbatches}",
        f"microbatch_rows {p.microbatch_rows}",
    ]
    stage_lines: list[int] = []
    for st in p.stages:
        lines.append(_format_stage(st))
        stage_lines.append(len(lines))
    lines.append("")  # the stage table and the device blocks read better apart
    device_lines: dict[str, int] = {}
    action_lines: dict[tuple[str, int], int] = {}
    for device, acts in p.actions:
        lines.append(f"device {_name(device)}")
        device_lines.setdefault(device, len(lines))
        for i, a in enumerate(acts):
            lines.append("  " + format_action(a))
            action_lines.setdefault((device, i), len(lines))
    return ProgramLayout("\n".join(lines) + "\n", tuple(stage_lines), device_lines, action_lines)


def format_program(p: Program) -> str:
    """The canonical text of ``p``; ``parse_program`` reads it back to an equal Program."""
    return layout_program(p).text


def format_program_lines(p: Program) -> tuple[str, dict[tuple[str, int], int]]:
    """The canonical text and the 1-based line of every (device, action index) in it."""
    layout = layout_program(p)
    return layout.text, dict(layout.action_lines)


# ---------------------------------------------------------------------------------------------
# parsing

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#.*)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<punct>[\[\](),])
    | (?P<word>[^\s"\#\[\](),]+)
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
    if tok.kind == "word" and tok.text in _DTYPE_LONG:
        return _DTYPE_LONG[tok.text]
    if tok.kind == "word" and _BARE_NAME.fullmatch(tok.text) and _is_torch_dtype(tok.text):
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
    if tok is not None and tok.kind == "word" and tok.text in _ARROWS:
        arrow = cur.word("an arrow")
        expected = PEER_ARROW.get(op, DEFAULT_PEER_ARROW)
        if arrow != expected:
            raise _Bad(f"{op.value} names its peer after {expected!r}, not {arrow!r}")
        peer = cur.name(f"a device name after {arrow!r}")

    group: list[str] = []
    if cur.peek_punct("["):
        while not cur.peek_punct("]"):
            group.append(cur.name("a device name or ']' to close the group"))

    specs: list[TensorSpec] = []
    tok = cur.peek()
    if tok is not None and tok.kind == "word" and tok.text == ":":
        cur.take(":")
        specs.append(_parse_spec(cur))
        while cur.peek() is not None:
            specs.append(_parse_spec(cur))
    cur.end()
    return Action(op, stage, mb, rows, peer, payload, tuple(specs), tuple(group))


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
        while cur.peek() is not None:
            device = cur.name("a device slot NAME[LO:HI]")
            cur.punct("[", f"after {device!r} to give its rows, e.g. {device}[0:8]")
            lo, hi = cur.span(_RANGE_WORD, "the row range LO:HI")
            cur.punct("]", "to close the row range")
            slots.append(StageSlot(device, lo, hi))
        self.stages.append(StageInfo(index, layers, tuple(slots)))

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


# ---------------------------------------------------------------------------------------------
# JSON

# Action fields past op and stage; JSON leaves out those at their default, as the text does.
_ACTION_JSON_FIELDS = ("mb", "rows", "peer", "payload", "specs", "group")


def _action_to_json(a: Action) -> dict[str, Any]:
    out: dict[str, Any] = {"op": Op(a.op).value, "stage": a.stage}
    if a.mb is not None:
        out["mb"] = a.mb
    if a.rows is not None:
        out["rows"] = list(a.rows)
    if a.peer is not None:
        out["peer"] = a.peer
    if a.payload is not None:
        out["payload"] = a.payload
    if a.specs:
        out["specs"] = [{"dtype": s.dtype, "shape": list(s.shape)} for s in a.specs]
    if a.group:
        out["group"] = list(a.group)
    return out


def program_to_json(p: Program) -> dict[str, Any]:
    """A JSON-ready dict; ``program_from_json`` reads it back to an equal Program."""
    return {
        "format": FORMAT_NAME,
        "version": p.version,
        "schedule": p.schedule,
        "microbatches": p.microbatches,
        "microbatch_rows": p.microbatch_rows,
        "stages": [
            {
                "index": st.index,
                "layers": list(st.layers),
                "slots": [{"device": s.device, "lo": s.lo, "hi": s.hi} for s in st.slots],
            }
            for st in p.stages
        ],
        "devices": [{"device": d, "actions": [_action_to_json(a) for a in acts]} for d, acts in p.actions],
    }


def _json_error(path: str, what: str) -> ProgramParseError:
    return ProgramParseError(f"program JSON at {path}: {what}")


def _obj(v: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise _json_error(path, f"expected an object, found {type(v).__name__}")
    unknown = [k for k in v if k not in required and k not in optional]
    if unknown:
        raise _json_error(path, f"unknown field {unknown[0]!r} (expected {', '.join(required + optional)})")
    missing = [k for k in required if k not in v]
    if missing:
        raise _json_error(path, f"missing field {missing[0]!r}")
    return v


def _int(v: Any, path: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _json_error(path, f"expected an integer, found {v!r}")
    return v


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _json_error(path, f"expected a string, found {v!r}")
    return v


def _list(v: Any, path: str) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise _json_error(path, f"expected a list, found {v!r}")
    return list(v)


def _pair(v: Any, path: str) -> tuple[int, int]:
    items = _list(v, path)
    if len(items) != 2:
        raise _json_error(path, f"expected [lo, hi], found {v!r}")
    return _int(items[0], f"{path}[0]"), _int(items[1], f"{path}[1]")


def _action_from_json(v: Any, path: str) -> Action:
    d = _obj(v, path, ("op", "stage"), _ACTION_JSON_FIELDS)
    try:
        op = Op(_str(d["op"], f"{path}.op"))
    except ValueError:
        raise _json_error(f"{path}.op", f"unknown op {d['op']!r} (expected one of {' '.join(o.value for o in Op)})") from None

    def opt(key: str, read: Any) -> Any:
        return None if d.get(key) is None else read(d[key], f"{path}.{key}")

    specs = tuple(
        TensorSpec(
            _str(_obj(s, f"{path}.specs[{i}]", ("dtype", "shape"))["dtype"], f"{path}.specs[{i}].dtype"),
            tuple(_int(x, f"{path}.specs[{i}].shape[{j}]") for j, x in enumerate(_list(s["shape"], f"{path}.specs[{i}].shape"))),
        )
        for i, s in enumerate(opt("specs", _list) or ())
    )
    group = tuple(_str(g, f"{path}.group[{i}]") for i, g in enumerate(opt("group", _list) or ()))
    return Action(
        op=op,
        stage=_int(d["stage"], f"{path}.stage"),
        mb=opt("mb", _int),
        rows=opt("rows", _pair),
        peer=opt("peer", _str),
        payload=opt("payload", _str),
        specs=specs,
        group=group,
    )


def program_from_json(d: Mapping[str, Any]) -> Program:
    """Read what ``program_to_json`` writes; raises ProgramParseError naming the JSON path."""
    top = _obj(d, "$", ("format", "version", "schedule", "microbatches", "microbatch_rows", "stages", "devices"))
    if top["format"] != FORMAT_NAME:
        raise _json_error("$.format", f"this is not an asteroid program: format is {top['format']!r} (expected {FORMAT_NAME!r})")
    version = _int(top["version"], "$.version")
    if version != FORMAT_VERSION:
        raise _json_error(
            "$.version",
            f"unsupported version {version} (this build reads version {FORMAT_VERSION}); "
            "write it with a matching asteroid_fx or upgrade this one",
        )
    stages = []
    for i, sv in enumerate(_list(top["stages"], "$.stages")):
        path = f"$.stages[{i}]"
        s = _obj(sv, path, ("index", "layers", "slots"))
        slots = tuple(
            StageSlot(
                _str(slot["device"], f"{path}.slots[{j}].device"),
                _int(slot["lo"], f"{path}.slots[{j}].lo"),
                _int(slot["hi"], f"{path}.slots[{j}].hi"),
            )
            for j, slot in enumerate(
                _obj(x, f"{path}.slots[{k}]", ("device", "lo", "hi")) for k, x in enumerate(_list(s["slots"], f"{path}.slots"))
            )
        )
        stages.append(StageInfo(_int(s["index"], f"{path}.index"), _pair(s["layers"], f"{path}.layers"), slots))
    actions = []
    for i, dv in enumerate(_list(top["devices"], "$.devices")):
        path = f"$.devices[{i}]"
        dev = _obj(dv, path, ("device", "actions"))
        acts = tuple(
            _action_from_json(a, f"{path}.actions[{j}]") for j, a in enumerate(_list(dev["actions"], f"{path}.actions"))
        )
        actions.append((_str(dev["device"], f"{path}.device"), acts))
    return Program(
        schedule=_str(top["schedule"], "$.schedule"),
        microbatches=_int(top["microbatches"], "$.microbatches"),
        microbatch_rows=_int(top["microbatch_rows"], "$.microbatch_rows"),
        stages=tuple(stages),
        actions=tuple(actions),
        version=version,
    )
