"""An instance: one worker process serving one function over a Unix socket.

Started by the node agent as ``python -m smss.node.worker CONFIG_JSON``. It
loads the model, warms it with one call, listens, then writes one JSON line
(:class:`Ready`) to its original stdout; the user's own prints go to stderr
(the instance log). It dies with its parent (``PR_SET_PDEATHSIG``) so a killed
platform leaves no orphans. On SIGTERM it stops taking requests, finishes the
ones in flight, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from smss.errors import InvalidInput, SmssError, StartFailed
from smss.node import ipc
from smss.node.batching import Batcher, ModelFailure, Pending
from smss.node.weights import Weights
from smss.spec import FunctionSpec

log = logging.getLogger(__name__)


class WorkerConfig(msgspec.Struct, frozen=True):
    instance_id: str
    spec: FunctionSpec
    artifact_dir: str
    socket_path: str
    threads: int = 1


class Ready(msgspec.Struct, frozen=True):
    ok: bool
    pid: int
    load_ms: float = 0.0
    error: str = ""


def load_model(spec: FunctionSpec, artifact_dir: Path) -> Any:
    """Import the user's class from its file and call ``load(weights)``."""
    file_name, _, class_name = spec.entrypoint.partition(":")
    path = artifact_dir / file_name
    module_spec = importlib.util.spec_from_file_location(f"smss_user_{spec.name}", path)
    if module_spec is None or module_spec.loader is None:
        raise StartFailed(f"cannot import {file_name}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise StartFailed(f"{file_name} has no class {class_name}")
    instance = cls()
    weights = None
    if spec.weights is not None and spec.weights_format is not None:
        weights = Weights(artifact_dir / spec.weights, spec.weights_format)
    instance.load(weights)
    return instance


def warm_up(spec: FunctionSpec, model: Any) -> None:
    """One call on zeros so the first real request does not pay lazy initialisation."""
    inputs = {t.name: np.zeros([1 if d == -1 else d for d in t.shape], t.dtype) for t in spec.inputs}
    try:
        model.predict(inputs)
    except Exception:
        log.info("warm-up call of %s failed; continuing without it", spec.name, exc_info=True)


class Server:
    def __init__(self, config: WorkerConfig, batcher: Batcher) -> None:
        self._config = config
        self._batcher = batcher
        self._in_flight = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    message, payload = await ipc.read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if isinstance(message, ipc.Ping):
                    ipc.write_frame(writer, ipc.Pong(message.id, self._in_flight))
                elif isinstance(message, ipc.Infer):
                    task = asyncio.create_task(self._infer(message, payload, writer))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except ipc.ProtocolError:
            log.warning("dropping a connection that sent a corrupt frame")
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def _infer(self, msg: ipc.Infer, payload: bytes, writer: asyncio.StreamWriter) -> None:
        if self._draining:
            ipc.write_frame(writer, ipc.Failure(msg.id, "draining", "instance is draining"))
            return
        self._in_flight += 1
        self._idle.clear()
        try:
            inputs = ipc.unpack_tensors(msg.inputs, payload)
            future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
            self._batcher.submit(Pending(inputs, msg.outputs, future))
            outputs = await future
            metas, buffers = ipc.tensor_metas(outputs)
            ipc.write_frame(writer, ipc.Result(msg.id, metas), buffers)
        except ModelFailure as e:
            ipc.write_frame(writer, ipc.Failure(msg.id, "model_error", str(e), e.traceback))
        except (InvalidInput, ipc.ProtocolError) as e:
            ipc.write_frame(writer, ipc.Failure(msg.id, "invalid_input", str(e)))
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def drain(self) -> None:
        self._draining = True
        await self._idle.wait()


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def _serve(config: WorkerConfig, model: Any, ready_fd: int, load_ms: float) -> None:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
    batcher = Batcher(config.spec, model.predict, executor)
    server = Server(config, batcher)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    listener = await asyncio.start_unix_server(server.handle, path=config.socket_path)
    os.write(ready_fd, msgspec.json.encode(Ready(True, os.getpid(), load_ms)) + b"\n")
    os.close(ready_fd)
    async with asyncio.TaskGroup() as group:
        batch_task = group.create_task(batcher.run())
        await stop.wait()
        listener.close()
        await server.drain()
        batch_task.cancel()
    executor.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    config = msgspec.json.decode(args[0], type=WorkerConfig)
    _die_with_parent()
    # Keep the real stdout for the one Ready line; user prints go to the log.
    ready_fd = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {config.instance_id} %(levelname)s %(message)s"
    )
    started = time.perf_counter()
    try:
        if config.spec.runtime == "torch":
            import torch

            torch.set_num_threads(max(1, config.threads))
        model = load_model(config.spec, Path(config.artifact_dir))
        warm_up(config.spec, model)
    except BaseException as e:
        reason = e.message if isinstance(e, SmssError) else f"{type(e).__name__}: {e}"
        log.exception("instance failed to load")
        os.write(ready_fd, msgspec.json.encode(Ready(False, os.getpid(), error=reason[:2000])) + b"\n")
        sys.exit(3)
    load_ms = (time.perf_counter() - started) * 1000
    try:
        import uvloop

        uvloop.run(_serve(config, model, ready_fd, load_ms))
    except ImportError:
        asyncio.run(_serve(config, model, ready_fd, load_ms))


if __name__ == "__main__":
    main()
