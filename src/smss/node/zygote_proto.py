"""Messages between the node agent and its zygotes / model templates (msgpack, never pickle).

A frame is a u32 length and a msgpack body. The agent sends one request and
reads one reply at a time on each control connection.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import msgspec

from smss.node.worker import WorkerConfig

_LEN = struct.Struct("<I")
MAX_FRAME = 1 << 24


class Prepare(msgspec.Struct, tag="prepare", frozen=True):
    """Zygote: fork a template that loads ``config``'s model (weights from ``segment``),
    warms it, and listens for :class:`Spawn` on ``control_path``."""

    config: WorkerConfig
    segment: str | None
    control_path: str
    #: Keep a spare (:mod:`smss.node.spare`): the next instance, forked when idle.
    spare: bool = False
    #: How many spares, with ``spare`` (:class:`SetSpares` changes it later).
    spares: int = 1


class Prepared(msgspec.Struct, tag="prepared", frozen=True):
    """``weights_address`` / ``weights_bytes``: where the template's shared copy of the
    weights lives; every instance forked from it sees the same pages there."""

    pid: int
    attach_ms: float
    build_ms: float
    warm_ms: float
    weights_address: int = 0
    weights_bytes: int = 0


class Spawn(msgspec.Struct, tag="spawn", frozen=True):
    """Template: fork an instance serving on ``config.socket_path``."""

    config: WorkerConfig


class SetSpares(msgspec.Struct, tag="set_spares", frozen=True):
    """Template: keep ``spares`` spares from now on (forked when idle; extras stop)."""

    spares: int


class Done(msgspec.Struct, tag="done", frozen=True):
    pass


class Spawned(msgspec.Struct, tag="spawned", frozen=True):
    """``spare``: the instance is the template's spare, which took over (no fork)."""

    pid: int
    fork_ms: float
    spare: bool = False


class Failed(msgspec.Struct, tag="failed", frozen=True):
    message: str
    #: The weight segment failed its checksum (:class:`smss.errors.CorruptWeights`).
    corrupt_weights: bool = False


Request = Prepare | Spawn | SetSpares
Reply = Prepared | Spawned | Failed | Done

_enc = msgspec.msgpack.Encoder()
_requests = msgspec.msgpack.Decoder(Request)
_replies = msgspec.msgpack.Decoder(Reply)


def encode(message: Request | Reply) -> bytes:
    body = _enc.encode(message)
    return _LEN.pack(len(body)) + body


# ---- blocking side (zygote, template): no asyncio, no threads before fork


def recv_request(sock: socket.socket) -> Request | None:
    """The next request, or None when the agent closed the connection."""
    head = _recv_exactly(sock, _LEN.size)
    if head is None:
        return None
    (length,) = _LEN.unpack(head)
    if length > MAX_FRAME:
        return None
    body = _recv_exactly(sock, length)
    return None if body is None else _requests.decode(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


# ---- async side (agent)


async def call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request) -> Reply:
    writer.write(encode(request))
    await writer.drain()
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if length > MAX_FRAME:
        raise ConnectionError("oversized control frame")
    reply: Reply = _replies.decode(await reader.readexactly(length))
    return reply
