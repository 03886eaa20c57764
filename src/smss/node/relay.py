"""The node's TCP face: instance frames from gateways on other nodes, and RTT probes.

A gateway on another node reaches an instance of this node through the relay. It
opens a TCP connection and introduces itself with one handshake frame::

    b"SMSR" | u8 version | u32 header length | header (msgpack: Hello or Probe)

The relay answers one status byte (``OK`` or ``REFUSED``, then closes). After a
``Hello`` the connection carries the instance's own frames (:mod:`smss.node.ipc`)
both ways, byte for byte: the relay splices it to the instance's Unix socket without
decoding a frame, so tensor bytes stay raw (no pickling, no re-encoding; one read and
one write here, with flow control both ways). After a ``Probe`` it echoes 8-byte
nonces, which is how agents measure their round trips to each other.

Both carry the cluster's secret, compared in constant time: the relay speaks only to
the platform's own gateways and agents. A ``Hello`` names an instance by id and the
relay resolves it through its agent (``resolve``), never a path taken from the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import struct
import time
import typing
from collections.abc import Callable

import msgspec

log = logging.getLogger(__name__)

MAGIC = b"SMSR"
VERSION = 1
OK, REFUSED = b"\x00", b"\x01"
_PREFIX = struct.Struct("<4sBI")
MAX_HELLO = 4096
NONCE = 8
#: How long a client may take to send its handshake.
HANDSHAKE_TIMEOUT_S = 5.0


class Hello(msgspec.Struct, tag="hello", frozen=True):
    secret: str
    instance: str


class Probe(msgspec.Struct, tag="probe", frozen=True):
    secret: str


Handshake = Hello | Probe
_decoder = msgspec.msgpack.Decoder(Handshake)
_encoder = msgspec.msgpack.Encoder()

#: Instance id -> its Unix socket path, or None when this node has no such instance.
Resolve = Callable[[str], str | None]


def encode_handshake(message: Handshake) -> bytes:
    header = _encoder.encode(message)
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header


async def read_handshake(reader: asyncio.StreamReader) -> Handshake | None:
    """The client's handshake, or None when it is not one (the connection is dropped)."""
    try:
        magic, version, length = _PREFIX.unpack(await reader.readexactly(_PREFIX.size))
        if magic != MAGIC or version != VERSION or length > MAX_HELLO:
            return None
        return _decoder.decode(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None


class Relay:
    """A TCP server on ``host``:``port`` (0: any free port) relaying to this node's
    instances and answering probes. ``probe_hook``: run (in a thread) before each probe
    answer, a test's injected latency (the ``probe.before_reply`` fault point)."""

    def __init__(
        self,
        secret: str,
        resolve: Resolve,
        *,
        probe_hook: Callable[[], None] | None = None,
    ) -> None:
        self._secret = secret.encode()
        self._resolve = resolve
        self._probe_hook = probe_hook
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, limit=1 << 16)
        bound = self._server.sockets[0].getsockname()
        return host, int(bound[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._pipes):
            transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _allowed(self, secret: str) -> bool:
        return hmac.compare_digest(secret.encode(), self._secret)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Closed by close(): the connection ends here. Not re-raised: asyncio's stream
            # callback would report a cancelled handler as an error.
            writer.close()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                hello = await read_handshake(reader)
        except TimeoutError:
            hello = None
        if hello is None or not self._allowed(hello.secret):
            log.warning(
                "relay: refused a connection from %s (no valid handshake)", writer.get_extra_info("peername")
            )
            await _refuse(writer)
            return
        if isinstance(hello, Probe):
            writer.write(OK)
            await self._echo(reader, writer)
            return
        path = self._resolve(hello.instance)
        if path is None:
            log.info("relay: no instance %s here", hello.instance)
            await _refuse(writer)
            return
        try:
            await self._splice(reader, writer, path)
        except OSError as e:
            log.info("relay to instance %s refused: %s", hello.instance, e.strerror)
            await _refuse(writer)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                nonce = await reader.readexactly(NONCE)
                if self._probe_hook is not None:
                    await asyncio.to_thread(self._probe_hook)
                writer.write(nonce)
                await writer.drain()
        writer.close()

    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> None:
        loop = asyncio.get_running_loop()
        # A stream's transport (asyncio's, or uvloop's, which is not its subclass).
        tcp = typing.cast(asyncio.Transport, writer.transport)
        # A client sends nothing past its handshake before the OK: nothing is buffered
        # in ``reader`` that the splice would miss.
        tcp.pause_reading()
        done: asyncio.Future[None] = loop.create_future()
        unix, _ = await loop.create_unix_connection(lambda: _Pipe(tcp, done), path)
        self._pipes.update((tcp, unix))
        try:
            tcp.write(OK)
            tcp.set_protocol(_Pipe(unix, done))
            tcp.resume_reading()
            await done
        finally:
            self._pipes.discard(tcp)
            self._pipes.discard(unix)
            tcp.close()
            unix.close()


class _Pipe(asyncio.Protocol):
    """The protocol of one side of a splice: what its transport reads goes to ``sink``
    (the other side). When its own transport is full (the other pipe writes into it
    faster than its peer reads), the other side's reading pauses until it drains."""

    def __init__(self, sink: asyncio.Transport, done: asyncio.Future[None]) -> None:
        self.sink = sink
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.sink.write(data)

    def pause_writing(self) -> None:
        self.sink.pause_reading()

    def resume_writing(self) -> None:
        self.sink.resume_reading()

    def eof_received(self) -> bool | None:
        self.sink.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self.sink.close()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _refuse(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        writer.write(REFUSED)
        await writer.drain()
    writer.close()


# ---------------------------------------------------------------- the client side


async def open_relay(
    host: str, port: int, hello: Handshake, *, timeout_s: float = 5.0, limit: int = 1 << 20
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to a relay past its handshake; raises ConnectionError when refused
    and OSError / TimeoutError when unreachable."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port, limit=limit)
        _nodelay(writer)
        writer.write(encode_handshake(hello))
        status = await reader.read(1)
    if status != OK:
        writer.close()
        raise ConnectionRefusedError(f"relay {host}:{port} refused the connection")
    return reader, writer


class Prober:
    """Round trips to one peer's relay over a kept connection; ``probe`` returns one
    sample in seconds, or raises (OSError, TimeoutError) when the peer is unreachable."""

    def __init__(self, host: str, port: int, secret: str, *, timeout_s: float = 2.0) -> None:
        self._address = (host, port)
        self._secret = secret
        self._timeout_s = timeout_s
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._count = 0

    async def probe(self) -> float:
        try:
            if self._conn is None:
                self._conn = await open_relay(*self._address, Probe(self._secret), timeout_s=self._timeout_s)
            reader, writer = self._conn
            self._count += 1
            nonce = self._count.to_bytes(NONCE, "little")
            started = time.perf_counter()
            async with asyncio.timeout(self._timeout_s):
                writer.write(nonce)
                echoed = await reader.readexactly(NONCE)
            if echoed != nonce:
                raise ConnectionResetError("probe answered out of order")
            return time.perf_counter() - started
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None
