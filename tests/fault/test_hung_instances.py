"""Hung instances with real worker processes: a stopped process (SIGSTOP) and a
predict that never returns are taken out of rotation, killed and replaced, and the
function serves again; a stopped peer never makes the gateway buffer without bound.

A real :class:`NodeAgent` forks the instances; the real controller, dispatcher
and Unix channels serve them, on the system clock, with health settings short
enough for a test. Nothing is timed: each wait has a generous bound, and the
checks are on outcomes (answers, errors, which process is alive).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from smss.config import ServingSettings
from smss.control.controller import Controller, FunctionRuntime
from smss.control.keepalive import FixedKeepAlive
from smss.errors import DeadlineExceeded, InstanceLost
from smss.node.agent import NodeAgent
from smss.node.channel import UnixChannel
from smss.packaging import load_class, package_class
from smss.ports import FunctionRecord, SystemClock
from smss.testing.fakes import NullMetrics

pytestmark = pytest.mark.slow

T = TypeVar("T")
MODEL = Path(__file__).parent / "models" / "stubborn.py"
#: Bound on anything expected to happen (a replacement, a process exiting).
WAIT_S = 60.0
SETTINGS = ServingSettings(
    health_interval_s=0.2,
    ping_timeout_s=1.0,
    stall_grace_s=1.0,
    write_timeout_s=1.0,
    drain_grace_s=1.0,
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 110.0))


def install(directory: Path) -> FunctionRecord:
    """The model's code laid out as a deploy installs it (one instance at most)."""
    path, cls = load_class(f"{MODEL}:Stubborn")
    package = package_class(path, cls, None)
    directory.mkdir(parents=True)
    (directory / package.spec.entrypoint.partition(":")[0]).write_text(package.source)
    return FunctionRecord(package.spec, str(directory), time.time())


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


async def until(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


class Platform:
    def __init__(self, controller: Controller, record: FunctionRecord) -> None:
        self.controller = controller
        self.record = record

    @property
    def runtime(self) -> FunctionRuntime:
        return self.controller.get("stubborn")

    async def infer(self, value: float, timeout_s: float = WAIT_S) -> float:
        deadline = time.monotonic() + timeout_s
        x = np.array([value, 1.0], dtype=np.float32)
        out = await self.runtime.dispatcher.infer({"x": x}, ("y",), deadline)
        return float(out["y"][1])

    def pids(self) -> dict[str, int]:
        return {iid: s.info.pid for iid, s in self.runtime.dispatcher.slots.items()}


@asynccontextmanager
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    backend = NodeAgent(tmp_path / "logs", start_timeout_s=60.0, spares=False)
    channels = functools.partial(UnixChannel.connect, write_timeout_s=SETTINGS.write_timeout_s)
    controller = Controller(backend, channels, SystemClock(), SETTINGS, NullMetrics(), FixedKeepAlive(300.0))
    record = install(tmp_path / "fn")
    try:
        async with controller.running():
            controller.deploy(record)
            yield Platform(controller, record)
    finally:
        await backend.close()


def test_a_stopped_instance_is_replaced_and_its_request_served(tmp_path: Path) -> None:
    async def main() -> None:
        async with platform(tmp_path) as p:
            assert await p.infer(0.0) == 2.0
            ((first, pid),) = p.pids().items()
            task = asyncio.ensure_future(p.infer(2.0))  # predict sleeps 2 s: surely in flight
            await until(lambda: p.runtime.dispatcher.in_flight == 1, "the request to reach the instance")
            os.kill(pid, signal.SIGSTOP)
            assert await task == 2.0  # retried once, on the replacement
            assert first not in p.pids()
            await until(lambda: not alive(pid), "the stopped instance to be killed")
            assert p.runtime.replaced == 1
            assert [await p.infer(0.0) for _ in range(3)] == [2.0, 2.0, 2.0]

    run(main())


def test_a_predict_that_never_returns_is_504_then_its_instance_is_replaced(tmp_path: Path) -> None:
    async def main() -> None:
        async with platform(tmp_path) as p:
            assert await p.infer(0.0) == 2.0
            ((first, pid),) = p.pids().items()
            with pytest.raises(DeadlineExceeded):
                await p.infer(-1.0, timeout_s=1.0)
            # The only instance is still computing it: this one waits, and is served
            # by the instance that replaces the hung one.
            assert await p.infer(0.0) == 2.0
            assert first not in p.pids()
            await until(lambda: not alive(pid), "the hung instance to be killed")
            assert p.runtime.replaced == 1
            assert [await p.infer(0.0) for _ in range(3)] == [2.0, 2.0, 2.0]

    run(main())


def test_a_stopped_peer_never_makes_the_gateway_buffer_without_bound(tmp_path: Path) -> None:
    """Requests of 4 MiB each to an instance that reads nothing (stopped): what waits
    in the gateway for it stays under the channel's bound plus one frame, and the
    channel gives up (every request fails as lost) instead of buffering them all."""
    frame = 4 << 20
    bound = 1 << 20

    async def main() -> None:
        backend = NodeAgent(tmp_path / "logs", start_timeout_s=60.0, spares=False)
        try:
            record = install(tmp_path / "fn")
            started = await backend.start_instance(record.spec, Path(record.artifact_dir))
            info = started.info
            channel = await UnixChannel.connect(info, buffer_bytes=bound, write_timeout_s=1.0)
            x = np.ones(frame // 4, np.float32)
            assert float((await channel.infer({"x": x[:2]}, ("y",)))["y"][0]) == 2.0
            os.kill(info.pid, signal.SIGSTOP)
            peak = 0

            async def send() -> asyncio.Future[dict[str, np.ndarray]]:
                nonlocal peak
                try:
                    return await channel.send({"x": x}, ("y",))
                finally:
                    peak = max(peak, channel.buffered)

            sent = await asyncio.gather(*(send() for _ in range(16)), return_exceptions=True)
            assert peak <= bound + frame + 4096  # one frame (and its header) beyond the bound
            answers = [s for s in sent if isinstance(s, asyncio.Future)]
            assert len(answers) < len(sent)  # the channel gave up before taking them all
            results: list[object] = [s for s in sent if not isinstance(s, asyncio.Future)]
            results += await asyncio.gather(*answers, return_exceptions=True)
            assert all(isinstance(r, InstanceLost) for r in results), results
            assert channel.closed
            await channel.close()
            await backend.stop_instance(info.id, 0.0)
            assert not alive(info.pid)
        finally:
            await backend.close()

    run(main())
