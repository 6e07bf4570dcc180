"""The run's secret, and the store every runtime value passes through: signed on write, checked on read.

A TCPStore has no authentication: anyone who reaches its port can write any key. So every value the
runtime writes carries an HMAC-SHA256 over (key, writer, payload) keyed by a per-run secret, and
every value it reads is checked against that HMAC and against the schema of its key (``SCHEMAS``)
before anything uses it. A value that fails is a ``StoreValueRejected`` naming the key and the
writer it claims: never a crash deep in a reader, never a silently different run.

The launcher makes the secret (``new_secret``) and gives it to its own workers in the environment
(``SECRET_ENV``), never on a command line, which ``ps`` shows to every user of the machine. A remote
``asteroid worker`` is given it by the user: the same variable, or a file named by ``SECRET_FILE_ENV``.

Wire format of a signed value: ``a1.<hex mac>.<writer>\\n<payload>``; the mac covers the key too,
so a signed value copied to another key is refused.

gloo's rendezvous goes through the same signing: a process group is built over ``c10d()``, a
``torch.distributed.Store`` whose ``set``/``get`` sign and check like the runtime's, so the address
records gloo's C++ side parses (``epoch<k>.../<n>/<rank>``) are never a stranger's. What stays
unsigned is the ``add`` counters (gloo's and the runtime's check-in and join counts): a stranger can
move one, which makes a wait end early or time out (a clear error, no other value changes), and can
list and delete keys (a delete is a wait that times out).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from asteroid_fx.ir.errors import InputError
from asteroid_fx.runtime.errors import StoreValueRejected

SECRET_ENV = "ASTEROID_RUN_SECRET"
SECRET_FILE_ENV = "ASTEROID_RUN_SECRET_FILE"
_TAG = b"a1."
_MAX_SECRET_FILE = 4096


def new_secret() -> str:
    """A fresh per-run secret (256 bits, hex)."""
    return secrets.token_hex(32)


def secret_from_env(environ=os.environ) -> str:
    """The run's secret as the user or the launcher gave it: ``SECRET_ENV``, else the file
    ``SECRET_FILE_ENV`` names; an error saying how to give it when neither is set."""
    if environ.get(SECRET_ENV):
        return environ[SECRET_ENV].strip()
    path = environ.get(SECRET_FILE_ENV)
    if path:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{SECRET_FILE_ENV}={path}: not a file; name the file that holds the run's secret")
        text = p.read_bytes()[:_MAX_SECRET_FILE + 1]
        if len(text) > _MAX_SECRET_FILE:
            raise InputError(f"{SECRET_FILE_ENV}={path}: larger than {_MAX_SECRET_FILE} bytes; it should hold "
                             "only the run's secret as `asteroid launch` wrote it")
        secret = text.decode(errors="replace").strip()
        if secret:
            return secret
        raise InputError(f"{SECRET_FILE_ENV}={path} is empty; write the run's secret into it")
    raise InputError(f"the run's store needs the run's secret: set {SECRET_ENV} to it, or {SECRET_FILE_ENV} to "
                     "a file that holds it (`asteroid launch` writes it to store.secret in its run folder)")


def write_secret(out, secret: str) -> Path:
    """The secret into ``out``/store.secret, readable by its owner only: what a remote worker's
    ``SECRET_FILE_ENV`` names once the user has copied it there."""
    path = Path(out) / "store.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT
    return path


# --- schemas: what each key's payload must be, checked on every read --------------------------------

def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{v} is not finite")
    return v


def _count(text: str) -> int:
    if not re.fullmatch(r"\d{1,18}", text):
        raise ValueError("not a non-negative integer")
    return int(text)


def _beat(text: str) -> str:
    if text in ("dead", "left") or re.fullmatch(r"\d{1,18}", text):
        return text
    raise ValueError("not a heartbeat count, 'dead' or 'left'")


def _json_of(kind: type, fields: tuple[str, ...] = ()) -> Callable[[str], object]:
    def check(text: str):
        v = json.loads(text)
        if not isinstance(v, kind):
            raise ValueError(f"JSON {type(v).__name__}, expected {kind.__name__}")
        missing = [f for f in fields if f not in v]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return v
    return check


def _failures(text: str):
    v = json.loads(text)
    if not (isinstance(v, list) and all(isinstance(r, dict) and "device" in r for r in v)):
        raise ValueError("not a list of failure records with a device")
    return v


def _done(text: str):
    v = json.loads(text)
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) and n >= 0 for n in v)):
        raise ValueError("not [iterations, actions] of two non-negative integers")
    return v


def _text(text: str) -> str:
    return text


def _spec(text: str):
    from asteroid_fx.runtime.spec import RunSpec  # spec imports the compiler; only readers of the spec pay
    spec = RunSpec.from_json(text)
    if spec.faults:  # the launcher hands them to its own workers by environment (runtime/faults.py)
        raise ValueError("it carries RunSpec.faults, and fault injection never travels through the store")
    return spec


def _opaque(payload: bytes) -> bytes:
    """gloo's rendezvous records: bytes only its C++ side reads; the signature is their check."""
    return payload


# (key pattern, what its payload must be): first match wins; a key no pattern matches is refused.
SCHEMAS: tuple[tuple[re.Pattern, Callable[[str], object]], ...] = tuple((re.compile(p), f) for p, f in (
    (r"spec", _spec),
    (r"cluster", _json_of(dict)),
    (r"program", _text),
    (r"build", _json_of(dict, ("digest", "asteroid_fx", "torch", "stages"))),
    (r"claim/[^/]+", _json_of(dict, ("device", "host", "pid", "token"))),
    (r"refused", _json_of(dict, ("device", "reason"))),
    (r"result/[^/]+", _json_of(dict)),
    (r"loss/[^/]+/\d+", float),  # a diverged run's loss is nan or inf, and still its loss
    (r"seconds/[^/]+/\d+", _finite_float),
    (r"ft/epoch", _count),
    (r"ft/hb/[^/]+", _beat),
    (r"ft/fail/\d+", _json_of(dict, ("device", "reason"))),
    (r"ft/failed/\d+", _failures),
    (r"ft/\d+/done/[^/]+", _done),
    (r"ft/killed_at/[^/]+", _finite_float),
    (r"join/\d+", _text),
    (r"admit/[^/]+", _json_of(dict)),
    (r"switch/\d+", _json_of(dict)),
    (r"switch/\d+/outcome", _text),
    (r"ckpt/\d+/\d+", _json_of(dict)),
    (r"epoch\d+[^/]*(/[^/]+)+", _opaque),  # a process group's rendezvous (backends/torch_dist/gloo.py)
))


def check_schema(key: str, payload: str | bytes) -> None:
    """Raise ``ValueError`` when ``payload`` is not what ``key`` holds (``SCHEMAS``)."""
    for pattern, check in SCHEMAS:
        if pattern.fullmatch(key):
            if check is not _opaque:
                check(payload.decode() if isinstance(payload, bytes) else payload)
            return
    raise ValueError("no such key in the run's protocol (runtime/store.py)")


class SignedStore:
    """A run's store whose values are signed and checked: ``set``/``compare_set`` sign, ``get``
    checks the signature and the key's schema and returns the payload (bytes, as a store does).
    ``raw`` is the store underneath (for torch.distributed, whose own keys are its business);
    ``add`` counters are passed through (a counter is not a value the runtime trusts for content)."""

    def __init__(self, raw, secret: str, writer: str):
        if not secret:
            raise InputError("the run's secret is empty")
        self.raw = raw
        self._key = secret.encode()
        self.writer = writer

    def over(self, raw, writer: str | None = None) -> "SignedStore":
        """Another connection to the same run (``raw``), signing with the same secret."""
        return SignedStore(raw, self._key.decode(), writer or self.writer)

    def __getattr__(self, name):  # host, port, num_keys, ...: the raw store's
        return getattr(self.raw, name)

    def _mac(self, key: str, writer: str, payload: bytes) -> str:
        msg = key.encode() + b"\0" + writer.encode() + b"\0" + payload
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def seal(self, key: str, value) -> bytes:
        payload = value.encode() if isinstance(value, str) else bytes(value)
        return _TAG + self._mac(key, self.writer, payload).encode() + b"." + self.writer.encode() + b"\n" + payload

    def open(self, key: str, blob: bytes) -> bytes:
        """The payload of ``blob`` read at ``key``, or ``StoreValueRejected``."""
        head, nl, payload = bytes(blob).partition(b"\n")
        parts = head.split(b".", 2) if head.startswith(_TAG) else []
        writer = parts[2].decode(errors="replace")[:80] if len(parts) == 3 else None
        from_ = f" (claims to be from {writer!r})" if writer else ""
        if not nl or len(parts) != 3 or not hmac.compare_digest(parts[1], self._mac(key, writer, payload).encode()):
            raise _rejected(
                key, writer, True,
                f"store key {key!r}{from_}: the value is not signed with this run's secret ({bytes(blob)[:40]!r}); "
                "something other than this run's launcher and workers wrote it. Keep the store's port to the "
                "run's machines, and give every worker the launcher's secret")
        try:
            check_schema(key, payload)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, InputError) as e:
            raise _rejected(key, writer, False, f"store key {key!r} from {writer!r}: signed, but not what the key "
                            f"holds ({e}); the writer runs another build of asteroid_fx?") from None
        return payload

    def set(self, key: str, value) -> None:
        self.raw.set(key, self.seal(key, value))

    def get(self, key: str) -> bytes:
        return self.open(key, self.raw.get(key))

    def compare_set(self, key: str, expected, desired) -> bytes:
        """As a store's compare_set with ``expected`` "" (absent): the value now at ``key``, checked."""
        if expected not in ("", b""):
            raise ValueError("SignedStore.compare_set only claims an absent key (expected '')")
        return self.open(key, self.raw.compare_set(key, "", self.seal(key, desired)))

    def multi_get(self, keys) -> list[bytes]:
        return [self.open(k, blob) for k, blob in zip(keys, self.raw.multi_get(list(keys)))]

    def add(self, key: str, n: int) -> int:
        return self.raw.add(key, n)

    def check(self, keys) -> bool:
        return self.raw.check(keys)

    def wait(self, keys, *args) -> None:
        self.raw.wait(keys, *args)

    def delete_key(self, key: str) -> bool:
        return self.raw.delete_key(key)

    def c10d(self) -> "C10dStore":
        """This store as a ``torch.distributed.Store``, for a process group's rendezvous (whose C++
        side reads its values). The caller keeps the object for as long as the group lives: the
        group holds the C++ half only."""
        return C10dStore(self)


def _rejected(key: str, writer: str | None, unsigned: bool, message: str) -> StoreValueRejected:
    e = StoreValueRejected(message)
    e.key, e.writer, e.unsigned = key, writer, unsigned
    return e


class C10dStore(dist.Store):
    """A ``SignedStore`` that torch.distributed's C++ side can use (a process group over
    ``PrefixStore(prefix, this)``): what gloo sets is signed, what it gets is checked, and a value
    that fails raises ``StoreValueRejected`` out of the group's construction."""

    def __init__(self, signed: SignedStore):
        super().__init__()
        self.signed = signed

    def set(self, key, value) -> None:
        self.signed.set(key, value)

    def get(self, key) -> bytes:
        return self.signed.get(key)

    def multi_get(self, keys) -> list[bytes]:
        return self.signed.multi_get(keys)

    def multi_set(self, keys, values) -> None:
        for k, v in zip(keys, values):
            self.signed.set(k, v)

    def compare_set(self, key, expected, desired) -> bytes:
        return self.signed.compare_set(key, expected, desired)

    def add(self, key, n) -> int:
        return self.signed.add(key, n)

    def check(self, keys) -> bool:
        return self.signed.check(keys)

    def wait(self, keys, *timeout) -> None:
        self.signed.wait(keys, *timeout)

    def delete_key(self, key) -> bool:
        return self.signed.delete_key(key)

    def num_keys(self) -> int:
        return self.signed.raw.num_keys()
