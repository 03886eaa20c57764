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
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from smss import faults, heap
from smss.config import env_faults
from smss.errors import InvalidInput, SmssError, StartFailed
from smss.node import ipc
from smss.node.attach import Attached, HotCopy, verify
from smss.node.batching import Batcher, ModelFailure, Pending
from smss.node.mainthread import MainThreadExecutor
from smss.node.weights import DeviceTensors, Weights
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


def load_model(
    spec: FunctionSpec,
    artifact_dir: Path,
    segment: Path | None = None,
    *,
    hot: bool = False,
    on_device: DeviceTensors | None = None,
) -> Any:
    """Import the user's class from its file and call ``load(weights)``. With a
    weight-store ``segment`` the weights are zero-copy views of it, or, with
    ``hot``, of a huge-page copy of it that forked instances share (a template);
    ``on_device``: tensors already on a GPU (:mod:`smss.node.gpu.standby`)."""
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
        attached: Attached | HotCopy | DeviceTensors | None = on_device
        if segment is not None:
            attached = Attached(segment)
            if hot:
                shared = attached
                try:
                    attached = HotCopy(shared.data)
                    # Checked on the copy the template and its instances will serve from.
                    verify(attached.data, shared.checksum, segment.name)
                finally:
                    shared.close()
        weights = Weights(artifact_dir / spec.weights, spec.weights_format, attached=attached)
    instance.load(weights)
    with contextlib.suppress(AttributeError, TypeError):
        instance.__smss_weights__ = weights  # keeps the mapping alive, and lets the agent report it
    return instance


def warm_up(spec: FunctionSpec, model: Any) -> None:
    """One call on zeros so the first real request does not pay lazy initialisation."""
    inputs = {t.name: t.zeros() for t in spec.inputs}
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
                    task = asyncio.create_task(self._infer(message, payload, writer, time.perf_counter()))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except ipc.ProtocolError:
            log.warning("dropping a connection that sent a corrupt frame")
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def _infer(
        self, msg: ipc.Infer, payload: bytes, writer: asyncio.StreamWriter, arrived: float
    ) -> None:
        if self._draining:
            ipc.write_frame(writer, ipc.Failure(msg.id, "draining", "instance is draining"))
            return
        self._in_flight += 1
        self._idle.clear()
        try:
            inputs = ipc.unpack_tensors(msg.inputs, payload)
            future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
            pending = Pending(inputs, msg.outputs, future)
            self._batcher.submit(pending)
            outputs = await future
            metas, buffers = ipc.tensor_metas(outputs)
            faults.hit("instance.before_reply")
            queue_s = max(0.0, pending.started - arrived)
            ipc.write_frame(writer, ipc.Result(msg.id, metas, queue_s, pending.compute_s), buffers)
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


_libc: ctypes.CDLL | None = None


def process_alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def child_pids(pid: int) -> set[int]:
    """The pids of ``pid``'s children (empty when it is gone)."""
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def die_with_parent(parent: int | None = None) -> None:
    """Be killed when the parent dies. ``parent`` is the pid the parent had before
    it forked us: if it died in between, the death signal was never armed for
    it, so exit now rather than live on as an orphan."""
    global _libc
    with contextlib.suppress(OSError, AttributeError):
        if _libc is None:  # loaded once in a zygote, inherited by every fork
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os._exit(1)


async def serve(
    config: WorkerConfig,
    model: Any,
    listener: socket.socket,
    executor: Executor,
    stop: asyncio.Event,
    on_ready: Callable[[], None],
) -> None:
    """Serve ``model`` on an already-bound listening socket until ``stop`` is set, then drain."""
    batcher = Batcher(config.spec, model.predict, executor)
    server = Server(config, batcher)
    aserver = await asyncio.start_unix_server(server.handle, sock=listener)
    on_ready()
    async with asyncio.TaskGroup() as group:
        batch_task = group.create_task(batcher.run())
        await stop.wait()
        aserver.close()
        await server.drain()
        batch_task.cancel()


class LoopControl:
    """Stops a :func:`run_loop` from any thread, or from a signal handler: it drains
    and returns. Lock-free (a handler must not wait for a lock its own thread
    holds): a stop requested before the loop exists is applied when it attaches."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._requested = False

    def attach(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """On the loop's thread, before it serves."""
        self._stop = stop
        self._loop = loop
        if self._requested:
            stop.set()

    def request_stop(self) -> None:
        self._requested = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)


#: What a spare waits for before it serves: the instance's configuration and its
#: listening socket, or None when it is let go (see smss.node.spare).
Adoption = Callable[[], Awaitable["tuple[WorkerConfig, socket.socket] | None"]]


def run_loop(
    config: WorkerConfig,
    model: Any,
    listener: socket.socket | None,
    on_ready: Callable[[], None],
    control: LoopControl | None = None,
    adopt: Adoption | None = None,
) -> None:
    """Compute on this (main) thread, serve I/O on a second one; SIGTERM (or
    ``control.request_stop()``) drains and returns. With ``adopt`` (and no
    ``listener``), the loop runs first and serves once ``adopt()`` returns what to
    serve as: a spare's loop is up before its instance is asked for."""
    executor = MainThreadExecutor()
    control = control or LoopControl()

    async def io_main() -> None:
        stop = asyncio.Event()
        control.attach(asyncio.get_running_loop(), stop)
        serving, sock = config, listener
        if adopt is not None:
            adopted = await _unless_stopped(adopt(), stop)
            if adopted is None:
                return
            serving, sock = adopted
        if sock is None:
            raise StartFailed("nothing to serve on")
        await serve(serving, model, sock, executor, stop, on_ready)

    def io_thread() -> None:
        try:
            _run_async(io_main())
        except BaseException:
            log.exception("instance I/O loop failed")
        finally:
            executor.shutdown()

    def on_sigterm(signum: int, frame: object) -> None:
        control.request_stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    thread = threading.Thread(target=io_thread, name="io", daemon=True)
    _start_without_sigterm(thread)
    executor.run()
    thread.join(timeout=5)


async def _unless_stopped(
    adoption: Awaitable[tuple[WorkerConfig, socket.socket] | None], stop: asyncio.Event
) -> tuple[WorkerConfig, socket.socket] | None:
    adopting = asyncio.ensure_future(adoption)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((adopting, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not adopting.done():
        adopting.cancel()
        return None
    return adopting.result()


def rehearse(config: WorkerConfig, model: Any) -> None:
    """Serve one request on zeros over a private socket, then drain and return: the
    path an instance's first request takes (I/O thread, event loop, batcher, model)
    run once, so that the pages it writes are this process's own before any real
    request arrives (see :mod:`smss.node.spare`)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"\0smss-rehearsal-{os.getpid()}")  # abstract: nothing on disk
    listener.listen(1)
    address = listener.getsockname()
    inputs = {t.name: t.zeros() for t in config.spec.inputs}
    outputs = tuple(t.name for t in config.spec.outputs)
    control = LoopControl()

    async def ask() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        metas, buffers = ipc.tensor_metas(inputs)
        ipc.write_frame(writer, ipc.Infer(1, metas, outputs), buffers)
        await writer.drain()
        await ipc.read_frame(reader)
        writer.close()

    def client() -> None:
        try:
            asyncio.run(ask())
        except Exception:
            log.info("rehearsal of %s failed", config.spec.name, exc_info=True)
        control.request_stop()

    thread = threading.Thread(target=client, name="rehearsal", daemon=True)
    _start_without_sigterm(thread)
    run_loop(config, model, listener, lambda: None, control)
    thread.join()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start_without_sigterm(thread: threading.Thread) -> None:
    """Start ``thread`` (and so every thread it starts) with SIGTERM blocked. A
    process-directed signal goes to any thread that does not block it; the main
    thread, which alone runs Python signal handlers, may be asleep in the
    executor's queue, and only a signal delivered to it wakes it (EINTR)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _run_async(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(512)
    return sock


_PATH = re.compile(r"(?:/[^/\s'\"]+)+/([^/\s'\"]+)")


def public_reason(error: BaseException) -> str:
    """Why a model failed to load, fit for a client: the error type and message
    with file paths cut to their last part (full paths stay in the log)."""
    text = error.message if isinstance(error, SmssError) else f"{type(error).__name__}: {error}"
    return _PATH.sub(r"\1", text)


def start_child_process(label: str, *, die_with_agent: bool = True) -> int:
    """Common start of a process the agent spawns (worker or zygote): die with the
    agent (unless it is a zygote that may be adopted), keep the real stdout for the
    one readiness line (returned as an fd) and send everything else, user prints
    included, to stderr, the process's log."""
    if die_with_agent:
        die_with_parent()
    ready_fd = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {label} %(levelname)s %(name)s: %(message)s")
    return ready_fd


def set_threads(config: WorkerConfig) -> None:
    if config.spec.runtime == "torch":
        import torch

        torch.set_num_threads(max(1, config.threads))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    config = msgspec.json.decode(args[0], type=WorkerConfig)
    faults.install(env_faults())
    ready_fd = start_child_process(config.instance_id)
    started = time.perf_counter()
    try:
        set_threads(config)
        model = load_model(config.spec, Path(config.artifact_dir))
        warm_up(config.spec, model)
        heap.settle()  # the runtime and the model live as long as the instance
    except BaseException as e:
        reason = public_reason(e)
        log.exception("instance failed to load")
        os.write(ready_fd, msgspec.json.encode(Ready(False, os.getpid(), error=reason[:2000])) + b"\n")
        sys.exit(3)
    load_ms = (time.perf_counter() - started) * 1000

    def ready() -> None:
        os.write(ready_fd, msgspec.json.encode(Ready(True, os.getpid(), load_ms)) + b"\n")
        os.close(ready_fd)

    run_loop(config, model, listen(config.socket_path), ready)


if __name__ == "__main__":
    main()
