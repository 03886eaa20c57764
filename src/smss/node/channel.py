"""The gateway's end of the data plane to one instance (``InstanceChannel``).

One connection per instance, multiplexed by request id. A reader task owned
by the channel resolves each request's future; when the connection ends (the
instance died) every pending request fails with :class:`InstanceLost` at once,
so a dead instance is noticed as soon as the kernel closes its socket.

Writes are bounded: a frame is written only once what is already queued for the
instance is below ``buffer_bytes`` (one writer at a time), so at most that plus
one frame waits in this process for an instance to read it. An instance that
takes nothing for ``write_timeout_s`` (stopped, or wedged) ends the channel: its
requests fail with :class:`InstanceLost`, and the dispatcher has it replaced.

A request's future stays pending until the instance answers, whether or not
anyone still waits for it (:meth:`UnixChannel.send`): the instance is still
computing it, and the dispatcher counts it against the instance's concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from smss.errors import InstanceDraining, InstanceLost, InvalidInput, ModelError
from smss.node import ipc, relay
from smss.ports import InstanceInfo, Reply, Tensors

log = logging.getLogger(__name__)

#: What may wait in this process for an instance to read it, beyond one frame.
BUFFER_BYTES = 4 * 1024 * 1024
#: How long an instance may take nothing from its connection before it counts as gone.
WRITE_TIMEOUT_S = 5.0

Decode = Callable[[ipc.Message, bytes], Any]


class UnixChannel:
    def __init__(
        self,
        info: InstanceInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        buffer_bytes: int = BUFFER_BYTES,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.info = info
        self._reader = reader
        self._writer = writer
        self._write_timeout_s = write_timeout_s
        # drain() waits while more than this is queued (until a quarter of it is left).
        writer.transport.set_write_buffer_limits(high=buffer_bytes)
        self._low = buffer_bytes // 4
        self._write_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Any], Decode]] = {}
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls,
        info: InstanceInfo,
        *,
        buffer_bytes: int = BUFFER_BYTES,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> UnixChannel:
        scheme, _, path = info.address.partition(":")
        if scheme != "unix":
            raise InstanceLost(f"unsupported instance address scheme {scheme!r}")
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        except OSError as e:
            raise InstanceLost(f"cannot connect to instance {info.id}: {e.strerror}") from None
        return cls(info, reader, writer, buffer_bytes=buffer_bytes, write_timeout_s=write_timeout_s)

    @classmethod
    async def connect_relay(
        cls,
        info: InstanceInfo,
        host: str,
        port: int,
        secret: str,
        *,
        buffer_bytes: int = BUFFER_BYTES,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> UnixChannel:
        """The same channel to an instance on another node, over TCP through that node's
        relay (:mod:`smss.node.relay`): the same frames, spliced to the instance's socket."""
        try:
            reader, writer = await relay.open_relay(host, port, relay.Hello(secret, info.id))
        except (OSError, TimeoutError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            raise InstanceLost(f"cannot reach instance {info.id} on node {info.node}: {reason}") from None
        return cls(info, reader, writer, buffer_bytes=buffer_bytes, write_timeout_s=write_timeout_s)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet (including those nobody waits for any more)."""
        return len(self._pending)

    @property
    def buffered(self) -> int:
        """Bytes written to the connection that the instance has not taken yet."""
        return 0 if self._closed else self._writer.transport.get_write_buffer_size()

    async def infer(self, inputs: Tensors, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        answer = await self.send(inputs, outputs)
        return (await answer).outputs

    async def send(self, inputs: Tensors, outputs: tuple[str, ...]) -> asyncio.Future[Reply]:
        metas, buffers = ipc.tensor_metas(inputs)
        return await self._send(lambda rid: ipc.Infer(rid, metas, outputs), buffers, _infer_answer)

    async def ping(self) -> None:
        await (await self._send(ipc.Ping, [], _pong))

    async def _send(
        self, make: Callable[[int], ipc.Message], buffers: list[memoryview], decode: Decode
    ) -> asyncio.Future[Any]:
        """Write one request once there is room for it; the future of its answer.
        Cancelled while it waits for room: nothing was sent."""
        self._check_open()
        if not self._write_lock.locked() and self._writer.transport.get_write_buffer_size() <= self._low:
            # Nobody waits for room and there is room: drain() would not wait.
            return self._write(make, buffers, decode)
        async with self._write_lock:
            self._check_open()  # it may have ended while this waited for the lock
            await self._room()
            self._check_open()
            return self._write(make, buffers, decode)

    def _write(
        self, make: Callable[[int], ipc.Message], buffers: list[memoryview], decode: Decode
    ) -> asyncio.Future[Any]:
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            ipc.write_frame(self._writer, make(rid), buffers)
        except (ConnectionError, RuntimeError):
            # The transport closed before the reader noticed: the instance is gone.
            self._fail_all(f"instance {self.info.id} is gone")
            raise InstanceLost(f"instance {self.info.id} is gone") from None
        self._pending[rid] = (future, decode)
        return future

    async def _room(self) -> None:
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await self._writer.drain()
        except TimeoutError:
            reason = (
                f"instance {self.info.id} took none of its {self.buffered} queued request bytes "
                f"for {self._write_timeout_s:g} s"
            )
            log.warning("%s; dropping its connection", reason)
            self._fail_all(reason)
            raise InstanceLost(reason) from None
        except ConnectionError:
            self._fail_all(f"instance {self.info.id} is gone")
            raise InstanceLost(f"instance {self.info.id} is gone") from None

    def _check_open(self) -> None:
        if self._closed or self._writer.is_closing():
            self._fail_all(f"instance {self.info.id} is gone")
            raise InstanceLost(f"instance {self.info.id} is gone")

    async def _read_loop(self) -> None:
        try:
            while True:
                message, payload = await ipc.read_frame(self._reader)
                entry = self._pending.pop(message.id, None)
                if entry is None:
                    continue
                future, decode = entry
                if future.done():  # its caller went away (an infer() cancelled)
                    continue
                try:
                    future.set_result(decode(message, payload))
                except Exception as e:  # an error answer, or one that does not decode
                    future.set_exception(e)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except ipc.ProtocolError:
            log.warning("instance %s sent a corrupt frame; dropping it", self.info.id)
        finally:
            self._fail_all(f"instance {self.info.id} exited with the request in flight")

    def _fail_all(self, reason: str) -> None:
        self._closed = True
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(InstanceLost(reason))
        self._writer.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._fail_all(f"instance {self.info.id} exited with the request in flight")


def _infer_answer(message: ipc.Message, payload: bytes) -> Reply:
    if isinstance(message, ipc.Result):
        try:
            outputs = ipc.unpack_tensors(message.outputs, payload)
        except ipc.ProtocolError as e:
            raise ModelError(f"instance returned malformed outputs: {e}") from None
        return Reply(outputs, message.queue_s, message.compute_s)
    if isinstance(message, ipc.Failure):
        if message.kind == "invalid_input":
            raise InvalidInput(message.message)
        if message.kind == "draining":
            raise InstanceDraining("instance is draining")
        err = ModelError(f"predict() failed: {message.message}")
        err.traceback = message.traceback  # type: ignore[attr-defined]
        raise err
    raise InstanceLost(f"unexpected reply {type(message).__name__}")


def _pong(message: ipc.Message, payload: bytes) -> None:
    if not isinstance(message, ipc.Pong):
        raise InstanceLost(f"unexpected reply {type(message).__name__} to a ping")
