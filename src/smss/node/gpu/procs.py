"""The agent's side of its GPU processes: start one, talk to it, stop it.

Both kinds (:mod:`~smss.node.gpu.owner`, :mod:`~smss.node.gpu.standby`) are started
with ``python -m`` (never forked from the agent: the agent itself never touches
CUDA, and a fresh process is the only sound way to get a CUDA context), see their
one GPU alone (:func:`smss.node.gpu.shares.process_env`), answer requests on their
stdin / stdout one at a time (a lock per process), log to ``<log_dir>/<name>.log``
and die with the agent. Exits are watched by pidfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import msgspec

from smss.errors import CorruptWeights, StartFailed
from smss.node.gpu import proto
from smss.node.worker import WorkerConfig
from smss.node.zygotes import watch_exit

log = logging.getLogger(__name__)


class GpuProcess:
    """One started GPU process and its request channel."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        if process.stdin is None or process.stdout is None:
            raise StartFailed(f"{name} has no pipes")
        self.name = name
        self.pid = process.pid
        self._process = process
        self._writer = process.stdin
        self._reader = process.stdout
        self._lock = asyncio.Lock()
        self.exited = asyncio.Event()
        self._cancel_watch = watch_exit(process.pid, self.exited.set)

    @classmethod
    async def start(
        cls,
        name: str,
        module: str,
        config: msgspec.Struct,
        env: Mapping[str, str],
        log_dir: Path,
        timeout_s: float,
    ) -> tuple[GpuProcess, proto.Reply]:
        """Start ``python -m module CONFIG`` and wait for its first message (its ready
        report, or a :class:`~smss.node.gpu.proto.Failed`, raised as StartFailed)."""
        with (log_dir / f"{name}.log").open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                msgspec.json.encode(config).decode(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            )
        proc = cls(name, process)
        try:
            first = await proc._reply(timeout_s)
        except BaseException:
            await proc.kill()
            raise
        if isinstance(first, proto.Failed):
            await proc.kill()
            raise StartFailed(f"{name} failed to start: {first.message} (see {name}.log)")
        return proc, first

    async def call(self, request: proto.Request, timeout_s: float) -> proto.Reply:
        """One request and its reply; a Failed reply is raised (StartFailed, or
        CorruptWeights when the weights failed their checksum)."""
        async with self._lock:
            try:
                self._writer.write(proto.encode(request))
                await self._writer.drain()
            except (ConnectionError, RuntimeError) as e:
                raise StartFailed(f"{self.name} is gone: {e}") from None
            reply = await self._reply(timeout_s)
        if isinstance(reply, proto.Failed):
            raise (CorruptWeights if reply.corrupt_weights else StartFailed)(reply.message)
        return reply

    async def _reply(self, timeout_s: float) -> proto.Reply:
        try:
            return await asyncio.wait_for(proto.read_reply(self._reader), timeout_s)
        except TimeoutError:
            raise StartFailed(f"{self.name} did not answer within {timeout_s:.0f} s") from None
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError):
            raise StartFailed(f"{self.name} exited (see {self.name}.log)") from None

    def detach(self) -> None:
        """Stop talking to it (it serves as an instance now); its exit is still watched."""
        self._writer.close()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    async def stop(self, grace_s: float) -> None:
        """Close its stdin (an owner or an unbound standby exits), SIGTERM, then SIGKILL."""
        with contextlib.suppress(Exception):
            self._writer.close()
        try:
            await asyncio.wait_for(self.exited.wait(), grace_s / 2)
        except TimeoutError:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), grace_s / 2)
            except TimeoutError:
                await self.kill()
                return
        await self._reap()

    async def kill(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self.signal(signal.SIGKILL)
        await self._reap()

    async def _reap(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._process.wait(), 10.0)
        self._cancel_watch()
        self.exited.set()


class OwnerProcess:
    """The client of one GPU's owner (:mod:`smss.node.gpu.owner`)."""

    def __init__(self, process: GpuProcess, ready: proto.OwnerReady, timeout_s: float) -> None:
        self.process = process
        self.ready = ready
        self._timeout_s = timeout_s

    @classmethod
    async def start(
        cls, config: proto.OwnerConfig, env: Mapping[str, str], log_dir: Path, timeout_s: float
    ) -> OwnerProcess:
        # The owner's buffers are shared by CUDA IPC, which expandable segments do not allow.
        process, ready = await GpuProcess.start(
            f"gpu{config.gpu}-owner",
            "smss.node.gpu.owner",
            config,
            {**env, "PYTORCH_CUDA_ALLOC_CONF": ""},
            log_dir,
            timeout_s,
        )
        if not isinstance(ready, proto.OwnerReady):
            await process.kill()
            raise StartFailed("the GPU owner sent an unexpected first message")
        log.info("GPU %d owner ready (pid %d): %d MiB", config.gpu, ready.pid, ready.total_mb)
        return cls(process, ready, timeout_s)

    async def load(self, key: str, segment: Path) -> proto.Loaded:
        reply = await self.process.call(proto.Load(key, str(segment)), self._timeout_s)
        if not isinstance(reply, proto.Loaded):
            raise StartFailed("the GPU owner sent an unexpected reply")
        return reply

    async def share(self, key: str) -> proto.SharedWeights:
        reply = await self.process.call(proto.Share(key), self._timeout_s)
        if not isinstance(reply, proto.Shared):
            raise StartFailed("the GPU owner sent an unexpected reply")
        return reply.weights

    async def evict(self, key: str) -> None:
        await self.process.call(proto.Evict(key), self._timeout_s)

    def alive(self) -> bool:
        return not self.process.exited.is_set()


class Standby:
    """The client of one standby (:mod:`smss.node.gpu.standby`), until it serves."""

    def __init__(self, process: GpuProcess, ready: proto.StandbyReady, gpu: int, threads: int | None) -> None:
        self.process = process
        self.ready = ready
        self.gpu = gpu
        #: Its MPS thread percentage (None: none set), fixed when its context was made.
        self.threads = threads
        #: For a spare: the function key it was bound to, and the Bind's result.
        self.bound_to: str | None = None
        self.bound: proto.Bound | None = None

    @classmethod
    async def start(
        cls,
        config: proto.StandbyConfig,
        threads: int | None,
        env: Mapping[str, str],
        log_dir: Path,
        timeout_s: float,
        name: str,
    ) -> Standby:
        process, ready = await GpuProcess.start(
            name, "smss.node.gpu.standby", config, env, log_dir, timeout_s
        )
        if not isinstance(ready, proto.StandbyReady):
            await process.kill()
            raise StartFailed("the standby sent an unexpected first message")
        return cls(process, ready, config.gpu, threads)

    async def bind(
        self,
        config: WorkerConfig,
        weights: proto.SharedWeights | None,
        share_mb: int,
        rehearse: bool,
        timeout_s: float,
    ) -> proto.Bound:
        reply = await self.process.call(proto.Bind(config, weights, share_mb, rehearse), timeout_s)
        if not isinstance(reply, proto.Bound):
            raise StartFailed("the standby sent an unexpected reply")
        self.bound = reply
        return reply

    async def serve(self, config: WorkerConfig, timeout_s: float) -> proto.Serving:
        reply = await self.process.call(proto.Serve(config), timeout_s)
        if not isinstance(reply, proto.Serving):
            raise StartFailed("the standby sent an unexpected reply")
        self.process.detach()
        return reply

    def alive(self) -> bool:
        return not self.process.exited.is_set()
