"""Messages between the node agent and its GPU processes (msgpack frames, never pickle).

The agent talks to each GPU owner and each standby over the process's stdin (its
requests) and its original stdout (the replies); the process's own prints go to
stderr, its log. A frame is a u32 length and a msgpack body; one request and one
reply at a time. A CUDA IPC handle crosses as its bytes and numbers
(:class:`CudaHandle`), never as a pickled tensor.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Literal

import msgspec

from smss.node.gpu.layout import Layout
from smss.node.worker import WorkerConfig

_LEN = struct.Struct("<I")
MAX_FRAME = 1 << 24
Backend = Literal["cuda", "host"]


class OwnerConfig(msgspec.Struct, frozen=True):
    """``gpu``: the GPU's index as NVML gives it (the process sees it as device 0).
    ``backend``: ``cuda``, or ``host``, the same processes and messages on host
    shared memory (CPU-only machines; ``memory_mb`` then stands for the GPU's).
    ``prefix``: the names of the host backend's ``/dev/shm`` buffers start with it."""

    gpu: int
    backend: Backend
    prefix: str
    memory_mb: int = 0


class StandbyConfig(msgspec.Struct, frozen=True):
    gpu: int
    backend: Backend
    memory_mb: int = 0


# ---------------------------------------------------------------- handles


class CudaHandle(msgspec.Struct, tag="cuda", frozen=True):
    """What ``UntypedStorage._share_cuda_()`` returns, field by field: what
    ``UntypedStorage._new_shared_cuda(...)`` opens in another process."""

    device: int
    handle: bytes
    size: int
    offset: int
    ref_counter: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class HostHandle(msgspec.Struct, tag="host", frozen=True):
    """A buffer of the host backend: a file under ``/dev/shm``, mapped read-only."""

    path: str
    size: int


Handle = CudaHandle | HostHandle


class SharedWeights(msgspec.Struct, frozen=True):
    """A model's weights on a device: the handle of its one buffer and where each tensor lies."""

    handle: Handle
    layout: Layout


# ---------------------------------------------------------------- owner


class OwnerReady(msgspec.Struct, tag="owner_ready", frozen=True):
    pid: int
    total_mb: int
    #: Where its start went: interpreter and imports, device initialisation.
    import_ms: float
    init_ms: float


class Load(msgspec.Struct, tag="load", frozen=True):
    """Put the weights of ``key`` on the device, from a weight-store segment."""

    key: str
    segment: str


class Loaded(msgspec.Struct, tag="loaded", frozen=True):
    nbytes: int
    load_ms: float


class Share(msgspec.Struct, tag="share", frozen=True):
    """A handle to ``key``'s buffer for one more process (each gets its own reference)."""

    key: str


class Shared(msgspec.Struct, tag="shared", frozen=True):
    weights: SharedWeights


class Evict(msgspec.Struct, tag="evict", frozen=True):
    key: str


class Done(msgspec.Struct, tag="done", frozen=True):
    pass


# ---------------------------------------------------------------- standby


class StandbyReady(msgspec.Struct, tag="standby_ready", frozen=True):
    """A standby is up: ``context_mb`` is its CUDA context's size as measured (None:
    not measurable here), ``total_mb`` the device's memory."""

    pid: int
    total_mb: int
    context_mb: int | None
    import_ms: float
    init_ms: float
    warm_ms: float


class Bind(msgspec.Struct, tag="bind", frozen=True):
    """Become an instance of ``config.spec``: cap the process to ``share_mb`` (and
    nothing when 0), open ``weights``, build the model and warm it. ``rehearse``:
    also serve one request on zeros through the whole path (a spare)."""

    config: WorkerConfig
    weights: SharedWeights | None
    share_mb: int
    rehearse: bool = False


class Bound(msgspec.Struct, tag="bound", frozen=True):
    attach_ms: float
    build_ms: float
    warm_ms: float
    cap_mb: int
    fraction: float


class Serve(msgspec.Struct, tag="serve", frozen=True):
    """Listen on ``config.socket_path`` and serve as ``config.instance_id``."""

    config: WorkerConfig


class Serving(msgspec.Struct, tag="serving", frozen=True):
    pid: int


class Failed(msgspec.Struct, tag="failed", frozen=True):
    message: str
    corrupt_weights: bool = False


Request = Load | Share | Evict | Bind | Serve
Reply = OwnerReady | StandbyReady | Loaded | Shared | Done | Bound | Serving | Failed

_enc = msgspec.msgpack.Encoder()
_requests = msgspec.msgpack.Decoder(Request)
_replies = msgspec.msgpack.Decoder(Reply)


def encode(message: Request | Reply) -> bytes:
    body = _enc.encode(message)
    return _LEN.pack(len(body)) + body


# ---- blocking side (owner, standby): plain file descriptors


def send(fd: int, message: Reply) -> None:
    data = memoryview(encode(message))
    while data:
        data = data[os.write(fd, data) :]


def recv(fd: int) -> Request | None:
    """The next request, or None when the agent closed its end."""
    head = _read_exactly(fd, _LEN.size)
    if head is None:
        return None
    (length,) = _LEN.unpack(head)
    if length > MAX_FRAME:
        return None
    body = _read_exactly(fd, length)
    return None if body is None else _requests.decode(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


# ---- async side (agent)


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if length > MAX_FRAME:
        raise ConnectionError("oversized control frame")
    reply: Reply = _replies.decode(await reader.readexactly(length))
    return reply


async def call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request) -> Reply:
    writer.write(encode(request))
    await writer.drain()
    return await read_reply(reader)
