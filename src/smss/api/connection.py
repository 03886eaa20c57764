"""How an HTTP connection is held and ended: slow clients closed, early answers readable.

uvicorn reads requests with no deadline: a client that sends its headers a
byte at a time (slowloris), or stops half way through a body, holds a
connection and its task forever. And when a route answers before the whole
body arrived (a 413 from Content-Length alone) and the connection then closes,
the kernel resets it over the unread bytes: the client, still sending, reads
ECONNRESET instead of the answer. :func:`protocol_class` makes uvicorn's
httptools protocol with:

* a **header timeout**: a request's headers must be complete within
  ``header_timeout_s`` of its first byte (of the connection, for the first);
  otherwise 408 and close;
* a **body timeout**: while a body is being received, at most ``body_timeout_s``
  may pass with no byte of it arriving; otherwise 408 and close. Time the
  application itself is not reading (its buffer full, a pending
  ``100-continue``) does not count against the client;
* a **lingering close**: a connection closed while its request body is still
  arriving is half-closed instead (the answer, then FIN), and what the client
  still sends is read and dropped until it stops sending or closes, ``linger_s``
  at most; only then is the socket closed, so the client reads the answer;
* a **connection cap**: a connection past ``max_connections`` open at once is
  answered 503 with ``Retry-After`` at once (before its request is read) and
  ended by a lingering close; it does not count against the cap, and the
  connections already open are served as before.

:class:`CloseEarlyAnswers` (ASGI) adds ``Connection: close`` to an answer sent
before its request's large body was read: such a connection is not reused, so
the rest of its body is not drained without bound; the lingering close ends it.
A small body (64 KiB at most) is dropped and the connection kept.

The protocol subclasses uvicorn's ``HttpToolsProtocol`` and relies on its parser
callbacks, ``transport``, ``flow`` and ``cycle``: tests/security/test_slow_clients.py
exercises each of them through a real socket.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any, ClassVar, cast

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from smss.api.errors import error_response
from smss.config import ServingSettings
from smss.errors import RequestTimeout, SmssError, Unavailable

log = logging.getLogger(__name__)

#: A connection whose answer came before its body was read stays open (uvicorn drops the
#: rest of the body, then reads the next request) when the body is at most this large.
SMALL_BODY_BYTES = 64 * 1024
#: Writes held for one send are sent at once when they reach this size.
COALESCE_BYTES = 64 * 1024
#: While lingering, how long the client may send nothing before the socket is closed.
LINGER_IDLE_S = 2.0


def _raw_response(error: SmssError) -> bytes:
    """An error answer as bytes on the wire, for the protocol to write itself."""
    response = error_response(error)
    status = HTTPStatus(response.status_code)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}".encode()]
    lines += [name + b": " + value for name, value in response.raw_headers]
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + bytes(response.body)


class _LingeringTransport(asyncio.Transport):
    """The socket as the protocol and uvicorn see it: ``close`` lingers while a body
    arrives, and the writes of one loop iteration go out as one.

    uvicorn writes an answer's status line and headers, then its body: two sends, two
    TCP segments, two wake-ups of the client. Writes are held until the end of the
    loop iteration (or until ``COALESCE_BYTES`` are held, or the socket is closed) and
    sent together, so an answer is one send."""

    def __init__(self, inner: asyncio.Transport, protocol: _GuardedProtocol) -> None:
        super().__init__()
        self._inner = inner
        self._protocol = protocol
        self._held: list[bytes] = []
        self._held_bytes = 0

    def _flush(self) -> None:
        if self._held:
            held, self._held, self._held_bytes = self._held, [], 0
            if not self._inner.is_closing():
                self._inner.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        if self._protocol.body_arriving() and not self._inner.is_closing():
            self._protocol.linger()
        else:
            self._inner.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._inner.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._protocol.loop.call_soon(self._flush)
        self._held.append(bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes >= COALESCE_BYTES:
            self._flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self._flush()
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def abort(self) -> None:
        self._held, self._held_bytes = [], 0
        self._inner.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size() + self._held_bytes

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def close_now(self) -> None:
        self._flush()
        self._inner.close()


class _GuardedProtocol(HttpToolsProtocol):
    header_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 60.0
    linger_s: ClassVar[float] = 30.0
    max_connections: ClassVar[int] = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._body_arriving = False
        self.lingering = False
        self._linger_until = 0.0
        self._socket: _LingeringTransport | None = None

    # -- what the transport asks
    def body_arriving(self) -> bool:
        return self._body_arriving

    def linger(self) -> None:
        """Half-close after the answer, then drop what the client still sends (bounded)."""
        self.lingering = True
        self._body_arriving = False
        self._linger_until = self.loop.time() + self.linger_s
        if self._socket is not None and self._socket.can_write_eof():
            self._socket.write_eof()
        self.flow.resume_reading()
        self._arm(min(LINGER_IDLE_S, self.linger_s), self._linger_done)

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport (uvloop's are not asyncio.Transport subclasses).
        self._socket = _LingeringTransport(cast(asyncio.Transport, transport), self)
        super().connection_made(self._socket)
        if len(self.connections) > self.max_connections:
            self._refuse()
            return
        self._arm(self.header_timeout_s, self._headers_late)

    def _refuse(self) -> None:
        """Past the cap: 503 now, then a lingering close (the request the client is
        sending is read and dropped, so it reads the answer, not a reset)."""
        self.connections.discard(self)
        log.warning("refusing a connection from %s: %d connections open", self.client, self.max_connections)
        if self._socket is not None:
            error = Unavailable("too many connections; try again later", retry_after_s=1.0)
            self._socket.write(_raw_response(error))
        self.linger()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._body_arriving = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            remaining = self._linger_until - self.loop.time()
            if remaining <= 0:
                self._linger_done()
            else:
                self._arm(min(LINGER_IDLE_S, remaining), self._linger_done)
            return
        super().data_received(data)

    def shutdown(self) -> None:
        # The server is stopping: a connection no answer is owed to closes now, not after a linger.
        if self.lingering and self._socket is not None:
            self._socket.close_now()
            return
        if self.cycle is None or self.cycle.response_complete:
            self._body_arriving = False
        super().shutdown()

    def eof_received(self) -> None:
        # The client finished (while lingering: the rest of its body is in): close our end too.
        self._disarm()

    # -- parser callbacks (httptools)
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:
            self._arm(self.header_timeout_s, self._headers_late)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._body_arriving = True
        self._arm(self.body_timeout_s, self._body_late)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._body_arriving:
            self._arm(self.body_timeout_s, self._body_late)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_arriving = False
        self._disarm()

    # -- timers
    def _arm(self, delay_s: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        self._give_up(None if busy else "request headers not received in time")

    def _body_late(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._arm(self.body_timeout_s, self._body_late)  # the application is not reading yet
            return
        started = cycle is not None and cycle.response_started
        self._give_up(None if started else "request body stalled")

    def _linger_done(self) -> None:
        self._timer = None
        if self._socket is not None:
            self._socket.close_now()

    def _give_up(self, reason: str | None) -> None:
        """408 (unless an answer is already under way) and close: the client is too slow."""
        self._body_arriving = False
        if self._socket is None or self._socket.is_closing():
            return
        log.info("closing a slow client connection from %s: %s", self.client, reason or "stalled")
        if reason is not None:
            self._socket.write(_raw_response(RequestTimeout(f"{reason}; connection closed")))
        self._socket.close_now()


def protocol_class(serving: ServingSettings) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with this server's slow-client timeouts and connection cap."""

    class Protocol(_GuardedProtocol):
        header_timeout_s = serving.header_timeout_s
        body_timeout_s = serving.body_timeout_s
        linger_s = serving.linger_s
        max_connections = serving.max_connections

    return Protocol


class CloseEarlyAnswers:
    """ASGI middleware: ``Connection: close`` on an answer that starts before its request's
    large body was read to the end (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _large_body(scope):
            await self._app(scope, receive, send)
            return
        body_done = False

        async def receive_tracked() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self._app(scope, receive_tracked, send_marked)


def _large_body(scope: Scope) -> bool:
    """Whether the request's body may be too large to drain for a reused connection:
    chunked (size unknown) or declared over :data:`SMALL_BODY_BYTES`."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            raw = bytes(value).strip()
            return not raw.isdigit() or int(raw) > SMALL_BODY_BYTES
    return False
