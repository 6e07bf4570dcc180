"""What travels between torch_dist workers, and how a transport of tagged tensor messages
carries it (``TaggedMessages``, the ``backends.base.Comm`` message methods over ``send``/``recv``
by peer and tag).

Tags keep messages apart: (stage, micro-batch, payload, tensor index) -> one int per message, the
same on both sides; backups have a tag space of their own (``BACKUP_TAG``).

A backup is one message: a header of float64 fields (what it is, the iteration tag, the emulated
arrival time, the length of a layout), then the state packed by its ``StateLayout``. The holder
posts the receive ahead, which needs its size: both ends keep the layout of the last copy on the
link (process group, stage, peer), and a copy whose layout differs is preceded by a LAYOUT notice
of the size the holder expects, then the layout as JSON. The layout thus travels once per link.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import struct
from typing import Any, Sequence

import torch

from asteroid_fx.ir.program import Action

DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32",
                                                  "int16", "int8", "uint8", "bool")}


def message_tag(a: Action, index: int) -> int:
    """One tag per tensor of a message; identical on the sending and the receiving side."""
    payload = 0 if a.payload == "act" else 1
    return ((a.stage * 4096 + a.mb) * 2 + payload) * 64 + index  # below BACKUP_TAG for < 2048 stages


BACKUP_TAG = 1 << 30  # BACKUP/RESTORE messages: a tag space apart from SEND/RECV's (gloo tags are int32)


def message_bytes(a: Action) -> int:
    """The bytes a SEND or RECV moves: its rows of every tensor of its specs."""
    return (a.rows[1] - a.rows[0]) * sum(math.prod(spec.shape) * DTYPES[spec.dtype].itemsize for spec in a.specs)


HEADER_BYTES = 64
COPY, LAYOUT = 1.0, 2.0


def write_header(buf: torch.Tensor, fields: Sequence[float]) -> None:
    struct.pack_into(f"<{len(fields)}d", buf.numpy(), 0, *fields)


def read_header(buf: torch.Tensor) -> tuple[float, float, float, float]:
    what, tag, arrive, body_bytes = struct.unpack_from("<4d", buf.numpy(), 0)
    return what, tag, arrive, body_bytes


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where a state copy's tensors lie in a backup message: after the header, one segment per
    dtype (64-byte aligned) with that dtype's tensors back to back, in ``meta`` order. A function
    of ``meta`` alone, so the sender and the holder compute the same one from the same list."""

    meta: tuple[tuple, ...]
    # per segment: dtype, byte offset, elements, and the indices (among the tensors) it holds
    segments: tuple[tuple[torch.dtype, int, int, tuple[int, ...]], ...]
    shapes: tuple[tuple[int, ...], ...]  # per tensor
    nbytes: int

    @classmethod
    def of(cls, meta: Sequence[Sequence]) -> StateLayout:
        meta = tuple((kind, name, key, dtype, tuple(shape) if kind != "v" else shape)
                     for kind, name, key, dtype, shape in meta)
        shapes = tuple(e[4] for e in meta if e[0] != "v")
        members: dict[str, list[int]] = {}
        for i, dtype in enumerate(e[3] for e in meta if e[0] != "v"):
            members.setdefault(dtype, []).append(i)
        segments, offset = [], HEADER_BYTES
        for name, indices in members.items():
            dtype = DTYPES[name]
            count = sum(math.prod(shapes[i]) for i in indices)
            segments.append((dtype, offset, count, tuple(indices)))
            offset += -(-count * dtype.itemsize // 64) * 64
        return cls(meta, tuple(segments), shapes, offset)

    def pack(self, tensors: Sequence[torch.Tensor], header: Sequence[float]) -> torch.Tensor:
        """One buffer: ``header``, then a copy of ``tensors`` (laid out by ``meta``)."""
        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        write_header(buf, header)
        for dtype, offset, count, indices in self.segments:
            if count:
                out = buf[offset:offset + count * dtype.itemsize].view(dtype)
                torch.cat([tensors[i].reshape(-1) for i in indices], out=out)
        return buf

    def unpack(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """The tensors of a packed buffer, as views of it (in ``meta`` order)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.shapes)
        for dtype, offset, count, indices in self.segments:
            segment = buf[offset:offset + count * dtype.itemsize].view(dtype)
            at = 0
            for i in indices:
                n = math.prod(self.shapes[i])
                out[i] = segment[at:at + n].view(self.shapes[i])
                at += n
        return out


class TaggedMessages(abc.ABC):
    """The message methods of ``backends.base.Comm`` over a transport that sends and receives
    single tensors by peer and tag (``send``/``recv``, with the channel flags ``grads`` and
    ``backups``): what ``gloo.Comm`` and a test's loopback share. A transport implements the two
    abstract methods; a class that forgets one cannot be instantiated."""

    @abc.abstractmethod
    def send(self, t: torch.Tensor, peer: str, tag: int, *, grads: bool = False, backups: bool = False) -> Any:
        """Start sending ``t`` to ``peer`` under ``tag``; returns a work handle to wait on."""

    @abc.abstractmethod
    def recv(self, t: torch.Tensor, peer: str, tag: int, *, grads: bool = False, backups: bool = False) -> Any:
        """Start receiving into ``t`` from ``peer`` under ``tag``; returns a work handle to wait on."""

    def send_rows(self, a: Action, tensors: Sequence[torch.Tensor], arrive: torch.Tensor | None = None) -> list[Any]:
        grads = a.payload == "grad"
        works = [] if arrive is None else [self.send(arrive, a.peer, message_tag(a, 63), grads=grads)]
        works.extend(self.send(t, a.peer, message_tag(a, i), grads=grads) for i, t in enumerate(tensors))
        return works

    def recv_rows(self, a: Action, bufs: Sequence[torch.Tensor], arrive: torch.Tensor | None = None) -> list[Any]:
        grads = a.payload == "grad"
        works = [self.recv(b, a.peer, message_tag(a, i), grads=grads) for i, b in enumerate(bufs)]
        if arrive is not None:
            works.append(self.recv(arrive, a.peer, message_tag(a, 63), grads=grads))
        return works

    def send_state(self, peer: str, stage: int, buf: torch.Tensor, part: int = 0) -> Any:
        return self.send(buf, peer, state_tag(stage, part), backups=True)

    def recv_state(self, peer: str, stage: int, buf: torch.Tensor, part: int = 0) -> Any:
        return self.recv(buf, peer, state_tag(stage, part), backups=True)


def state_tag(stage: int, part: int) -> int:
    """The tag of part ``part`` of a backup of ``stage`` (0: the header or the copy, 1: a layout)."""
    return BACKUP_TAG + stage * 65536 + part
