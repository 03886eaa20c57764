"""RELIABILITY 20: a weight segment corrupted in ``/dev/shm`` after it was made.

A real node agent, controller and worker processes serve a model with safetensors
weights. One byte of the model's segment is overwritten in place (``dd
conv=notrunc``), then its template and instance are killed, so the next start must
attach the segment again. The template finds the checksum wrong: that start fails
with a clear error (``CorruptWeights``) and a back-off, the controller keeps
running, the damaged segment is dropped, and the next start reloads the weights
file and serves the right answers. Nothing leaks (the suite's leak fixture).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from safetensors.numpy import save_file

from smss.config import ServingSettings
from smss.control.controller import Controller
from smss.control.keepalive import FixedKeepAlive
from smss.errors import SmssError
from smss.node.agent import NodeAgent
from smss.node.channel import UnixChannel
from smss.node.weightstore import HEADER_SIZE
from smss.packaging import load_class, package_class
from smss.ports import FunctionRecord, SystemClock
from smss.testing import inject
from smss.testing.fakes import NullMetrics

pytestmark = pytest.mark.slow

T = TypeVar("T")
MODEL = Path(__file__).parent.parent / "e2e" / "models" / "scale.py"
WAIT_S = 60.0
W = np.array([1.0, 2.0, 3.0, 4.0], np.float32)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 110.0))


def install(tmp_path: Path) -> FunctionRecord:
    weights = tmp_path / "w.safetensors"
    save_file({"w": W}, str(weights))
    path, cls = load_class(f"{MODEL}:Scale")
    package = package_class(path, cls, weights)
    directory = tmp_path / "fn"
    directory.mkdir()
    (directory / package.spec.entrypoint.partition(":")[0]).write_text(package.source)
    assert package.spec.weights is not None
    (directory / package.spec.weights).write_bytes(weights.read_bytes())
    return FunctionRecord(package.spec, str(directory), time.time())


def ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def test_a_corrupted_segment_fails_one_start_then_is_reloaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        backend = NodeAgent(tmp_path / "logs", start_timeout_s=60.0, spares=False)
        channels = functools.partial(UnixChannel.connect, write_timeout_s=5.0)
        controller = Controller(
            backend, channels, SystemClock(), ServingSettings(), NullMetrics(), FixedKeepAlive(300.0)
        )
        record = install(tmp_path)
        x = np.ones((1, 4), np.float32)
        try:
            async with controller.running():
                controller.deploy(record)
                runtime = controller.get("scale")

                async def infer() -> list[float]:
                    out = await runtime.dispatcher.infer({"x": x}, ("y",), time.monotonic() + WAIT_S)
                    return [float(v) for v in out["y"][0]]

                assert await infer() == W.tolist()
                (key,) = backend.store.keys()
                segment = backend.store.get(key)
                assert segment is not None
                damaged = segment.path
                inject.corrupt(damaged, HEADER_SIZE + segment.size - 1)  # the last byte of w[3]
                ((instance, slot),) = runtime.dispatcher.slots.items()
                template = ppid(slot.info.pid)
                inject.kill(template)  # the next start builds a new template: it attaches again
                inject.kill(slot.info.pid)

                answers: list[list[float]] = []
                refusals: set[str] = set()
                deadline = time.monotonic() + WAIT_S
                while not answers and time.monotonic() < deadline:
                    try:
                        answers.append(await infer())
                    except SmssError as e:  # 503 while the start failed and backs off
                        refusals.add(e.code)
                        await asyncio.sleep(0.1)
                assert refusals <= {"start_failed", "corrupt_weights", "instance_lost"}, refusals
                assert answers == [W.tolist()], "the model never served again"
                assert runtime.failures == 0  # reset by the start that worked
                assert instance not in runtime.dispatcher.slots
                assert not damaged.exists(), "the damaged segment is still there"
                fresh = backend.store.get(key)
                assert fresh is not None
                assert fresh.generation > segment.generation
                assert [await infer() for _ in range(3)] == [W.tolist()] * 3
        finally:
            await backend.close()

    with caplog.at_level(logging.ERROR):
        run(main())
    assert any("corrupt" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
