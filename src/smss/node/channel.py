"""The gateway's end of the data plane to one instance (``InstanceChannel``).

One connection per instance, multiplexed by request id. A reader task owned
by the channel resolves each request's future; when the connection ends (the
instance died) every pending request fails with :class:`InstanceLost` at once,
so a dead instance is noticed as soon as the kernel closes its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

import numpy as np

from smss.errors import InstanceLost, InvalidInput, ModelError
from smss.node import ipc
from smss.ports import InstanceInfo, Tensors

log = logging.getLogger(__name__)


class UnixChannel:
    def __init__(
        self, info: InstanceInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.info = info
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[ipc.Message, bytes]]] = {}
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, info: InstanceInfo) -> UnixChannel:
        scheme, _, path = info.address.partition(":")
        if scheme != "unix":
            raise InstanceLost(f"unsupported instance address scheme {scheme!r}")
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        except OSError as e:
            raise InstanceLost(f"cannot connect to instance {info.id}: {e.strerror}") from None
        return cls(info, reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def infer(self, inputs: Tensors, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        metas, buffers = ipc.tensor_metas(inputs)
        message, payload = await self._call(lambda rid: ipc.Infer(rid, metas, outputs), buffers)
        if isinstance(message, ipc.Result):
            try:
                return ipc.unpack_tensors(message.outputs, payload)
            except ipc.ProtocolError as e:
                raise ModelError(f"instance returned malformed outputs: {e}") from None
        if isinstance(message, ipc.Failure):
            if message.kind == "invalid_input":
                raise InvalidInput(message.message)
            if message.kind == "draining":
                raise InstanceLost("instance is draining")
            err = ModelError(f"predict() failed: {message.message}")
            err.traceback = message.traceback  # type: ignore[attr-defined]
            raise err
        raise InstanceLost(f"unexpected reply {type(message).__name__}")

    async def ping(self) -> int:
        message, _ = await self._call(ipc.Ping, [])
        return message.in_flight if isinstance(message, ipc.Pong) else -1

    async def _call(
        self, make: Callable[[int], ipc.Message], buffers: list[memoryview]
    ) -> tuple[ipc.Message, bytes]:
        if self._closed or self._writer.is_closing():
            self._fail_all()
            raise InstanceLost(f"instance {self.info.id} is gone")
        rid = next(self._ids)
        future: asyncio.Future[tuple[ipc.Message, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            try:
                ipc.write_frame(self._writer, make(rid), buffers)
            except (ConnectionError, RuntimeError):
                # The transport closed before the reader noticed: the instance is gone.
                self._fail_all()
                raise InstanceLost(f"instance {self.info.id} is gone") from None
            return await future
        finally:
            self._pending.pop(rid, None)

    async def _read_loop(self) -> None:
        try:
            while True:
                message, payload = await ipc.read_frame(self._reader)
                future = self._pending.get(message.id)
                if future is not None and not future.done():
                    future.set_result((message, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except ipc.ProtocolError:
            log.warning("instance %s sent a corrupt frame; dropping it", self.info.id)
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        self._closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(
                    InstanceLost(f"instance {self.info.id} exited with the request in flight")
                )
        self._writer.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._fail_all()
