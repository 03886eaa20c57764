"""The local cluster backend: instances are worker processes on this machine.

Implements :class:`smss.ports.ClusterBackend`. Each instance is a child
process (``python -m smss.node.worker``) with its own Unix socket under a
private run directory and its own log file. The backend notices an exit as
soon as the process ends (one waiter task per process, owned by the backend)
and reports it through the exit callback, unless the platform asked for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec

from smss.errors import StartFailed
from smss.node.worker import Ready, WorkerConfig
from smss.ports import ExitCallback, InstanceInfo, StartedInstance, StartTimings
from smss.spec import FunctionSpec

log = logging.getLogger(__name__)

NODE = "local"


@dataclass
class _Proc:
    info: InstanceInfo
    process: asyncio.subprocess.Process
    waiter: asyncio.Task[None] | None = None
    stopping: bool = False


class LocalBackend:
    def __init__(self, log_dir: Path, *, start_timeout_s: float = 120.0) -> None:
        self._log_dir = log_dir
        self._log_dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to ~107 bytes, so they live in a short tmp dir.
        self._run_dir = Path(tempfile.mkdtemp(prefix="smss-"))
        self._start_timeout_s = start_timeout_s
        self._procs: dict[str, _Proc] = {}
        self._on_exit: ExitCallback = lambda _id, _code: None

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._on_exit = callback

    def nodes(self) -> list[str]:
        return [NODE]

    def pids(self) -> dict[str, int]:
        return {iid: p.info.pid for iid, p in self._procs.items()}

    async def start_instance(self, spec: FunctionSpec, artifact_dir: Path) -> StartedInstance:
        instance_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        socket_path = self._run_dir / f"{instance_id}.sock"
        config = WorkerConfig(
            instance_id=instance_id,
            spec=spec,
            artifact_dir=str(artifact_dir),
            socket_path=str(socket_path),
            threads=max(1, int(spec.resources.cpu)),
        )
        t0 = time.perf_counter()
        log_file = (self._log_dir / f"{instance_id}.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smss.node.worker",
                msgspec.json.encode(config).decode(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(config.threads)},
            )
        finally:
            log_file.close()
        spawned = time.perf_counter()
        ready = await self._await_ready(process, instance_id)
        info = InstanceInfo(
            id=instance_id,
            function=spec.name,
            node=NODE,
            address=f"unix:{socket_path}",
            pid=process.pid,
            started_at=time.time(),
        )
        proc = _Proc(info, process)
        self._procs[instance_id] = proc
        proc.waiter = asyncio.get_running_loop().create_task(self._watch(proc))
        total = (time.perf_counter() - t0) * 1000
        timings = StartTimings(spawn_ms=(spawned - t0) * 1000, load_ms=ready.load_ms, total_ms=total)
        log.info("instance %s ready in %.0f ms (load %.0f ms)", instance_id, total, ready.load_ms)
        return StartedInstance(info, timings)

    async def _await_ready(self, process: asyncio.subprocess.Process, instance_id: str) -> Ready:
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), self._start_timeout_s)
        except TimeoutError:
            line = b""
        except asyncio.CancelledError:
            await _kill(process)
            raise
        try:
            ready = msgspec.json.decode(line, type=Ready) if line else None
        except msgspec.DecodeError:
            ready = None
        if ready is None or not ready.ok:
            await _kill(process)
            reason = (
                ready.error
                if ready
                else f"no ready signal within {self._start_timeout_s:.0f} s or exited early"
            )
            raise StartFailed(f"instance {instance_id} failed to start: {reason}")
        return ready

    async def _watch(self, proc: _Proc) -> None:
        code = await proc.process.wait()
        self._procs.pop(proc.info.id, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(proc.info.address.partition(":")[2])
        if not proc.stopping:
            log.warning("instance %s exited unexpectedly (code %s)", proc.info.id, code)
            self._on_exit(proc.info.id, code if code >= 0 else None)

    async def stop_instance(self, instance_id: str, grace_s: float) -> None:
        proc = self._procs.get(instance_id)
        if proc is None:
            return
        proc.stopping = True
        with contextlib.suppress(ProcessLookupError):
            proc.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.process.wait()), grace_s)
        except TimeoutError:
            await _kill(proc.process)
        if proc.waiter is not None:
            await proc.waiter

    async def close(self) -> None:
        await asyncio.gather(*(self.stop_instance(i, 2.0) for i in list(self._procs)))
        shutil.rmtree(self._run_dir, ignore_errors=True)


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()
