"""Zygotes and model templates: instances are forked, never started from scratch.

A *zygote* is a process per runtime kind (torch, onnx, python) that has
already imported its heavy modules and SMSS's own worker code. For each model
it forks a *template*: a process that attaches the model's weights from the
node's weight store, builds the model, warms it with one call, and then waits.
An instance is a fork of its model's template, so a cold start pays a fork and
the first request, not an interpreter, ``import torch``, a weight load or a
lazy first call. Templates live as long as their weights stay in the store.

Fork safety (why forking here is sound):

* neither zygote nor template ever starts a thread: no asyncio loop, no
  executor, no logging handlers with threads; the control loop is blocking
  ``socket.recv`` on one connection. The agent starts them with
  ``OMP_NUM_THREADS=1`` and ``OPENBLAS_NUM_THREADS=1`` and a template runs its
  warm-up with ``torch.set_num_threads(1)``, so neither OpenMP nor OpenBLAS
  has a thread pool to lose across ``fork``; the instance sizes its pool after
  the fork. A template checks ``/proc/self/task`` before each fork and refuses
  to fork with more than one thread;
* no sockets cross the fork except the instance's own listening socket: the
  child closes the control listener and connection first thing;
* no CUDA context exists in a zygote or template (CPU runtimes only; a CUDA
  context is created after the fork, by the instance);
* every process dies with its parent (``PR_SET_PDEATHSIG``): agent -> zygote ->
  template -> instance, so a killed platform leaves no orphans. With ``linger_s``
  the first link is a wait instead: the zygote outlives a killed agent by that long
  for a restarted one to adopt it (:mod:`smss.node.roster`), then exits, and the
  rest follows. Children are reaped automatically (``SIGCHLD`` ignored); the agent
  watches each instance with a pidfd.

``python -m smss.node.zygote CONFIG_JSON`` runs a zygote.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from smss import faults
from smss.config import env_faults
from smss.errors import CorruptWeights
from smss.node import zygote_proto as proto
from smss.node.spare import Spare, fork_spare
from smss.node.worker import (
    WorkerConfig,
    die_with_parent,
    listen,
    load_model,
    process_alive,
    public_reason,
    run_loop,
    set_threads,
    start_child_process,
    warm_up,
)

log = logging.getLogger(__name__)


#: A template forks its spare once no request came for this long.
IDLE_S = 0.2


class ZygoteConfig(msgspec.Struct, frozen=True):
    runtime: str
    control_path: str
    prepare_timeout_s: float = 120.0
    #: None: die with the agent (``PR_SET_PDEATHSIG``). Seconds: outlive it, waiting
    #: this long for a restarted agent to connect (:mod:`smss.node.roster`); exit,
    #: and so end its templates and their instances, when none does.
    linger_s: float | None = None


def preload(runtime: str) -> None:
    """Import what instances of this runtime need, once, before any fork."""
    import concurrent.futures  # noqa: F401

    import numpy  # noqa: F401

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401
    if runtime == "torch":
        import torch

        torch.set_num_threads(1)
        torch.zeros(1).add_(1)  # initialise the dispatcher without starting a pool
    elif runtime == "onnx":
        import onnxruntime  # noqa: F401

        with contextlib.suppress(ImportError):
            import onnx  # noqa: F401  (finds the initializers to share: smss.node.attach.onnx_views)


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _serve_control(
    listener: socket.socket,
    handle: Any,
    on_idle: Callable[[socket.socket, socket.socket | None], None] | None = None,
    linger_s: float | None = None,
    on_alone: Callable[[], None] | None = None,
) -> None:
    """Blocking request/reply loop: one agent connection at a time. ``on_idle`` runs
    once whenever no request came for ``IDLE_S`` (with the sockets a fork must close).
    With ``linger_s``, returns when no agent connects for that long (``on_alone`` runs
    as each connection ends). An agent that goes away mid-request (killed) ends its
    connection, not the loop."""
    while True:
        if linger_s is not None and not _readable(listener, linger_s):
            return
        if on_idle is not None and not _readable(listener, IDLE_S):
            on_idle(listener, None)
        conn, _ = listener.accept()
        with conn:
            try:
                while True:
                    if on_idle is not None and not _readable(conn, IDLE_S):
                        on_idle(listener, conn)
                    if (request := proto.recv_request(conn)) is None:
                        break
                    conn.sendall(proto.encode(handle(request, listener, conn)))
            except OSError:
                log.warning("the agent's control connection broke", exc_info=True)
        if on_alone is not None:
            on_alone()


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout_s)
    return bool(readable)


# ------------------------------------------------------------------ zygote


def _prepare(
    config: ZygoteConfig, request: proto.Request, listener: socket.socket, conn: socket.socket
) -> Any:
    if not isinstance(request, proto.Prepare):
        return proto.Failed("a zygote only prepares templates")
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # template
        os.close(read_end)
        listener.close()
        conn.close()
        _template_main(request, write_end, parent)
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], config.prepare_timeout_s)
        line = os.read(read_end, 1 << 16) if ready else b""
    finally:
        os.close(read_end)
    if not line:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return proto.Failed("the model template exited or timed out while loading")
    try:
        reply: proto.Prepared | proto.Failed = msgspec.json.decode(line, type=proto.Prepared | proto.Failed)
    except msgspec.DecodeError:
        reply = proto.Failed("the model template sent a malformed reply")
    return reply


# ------------------------------------------------------------------ template


def _template_main(request: proto.Prepare, report_fd: int, parent: int) -> None:
    die_with_parent(parent)
    config = request.config
    try:
        t0 = time.perf_counter()
        segment = Path(request.segment) if request.segment else None
        model = load_model(config.spec, Path(config.artifact_dir), segment, hot=True)
        t1 = time.perf_counter()
        warm_up(config.spec, model)
        t2 = time.perf_counter()
        control = listen(request.control_path)
    except BaseException as e:
        reason = public_reason(e)
        log.exception("template for %s failed to load", config.spec.name)
        failed = proto.Failed(reason[:2000], corrupt_weights=isinstance(e, CorruptWeights))
        os.write(report_fd, msgspec.json.encode(failed) + b"\n")
        os._exit(3)
    # Attach and build are measured together: load() builds the module on the
    # shared tensors; the split is reported as attach 0 when weights are views.
    # Objects that exist now are never collected in instances: without this, the
    # first collection in each instance would write to (and so copy) every page
    # of the template's heap that holds a tracked object.
    gc.freeze()
    # Give the warm-up's freed heap back to the kernel: in an instance, reusing those
    # addresses then costs a zero-page fault instead of a copy-on-write copy.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
    hot = getattr(getattr(model, "__smss_weights__", None), "attached", None)
    report = proto.Prepared(
        os.getpid(),
        attach_ms=0.0,
        build_ms=(t1 - t0) * 1000,
        warm_ms=(t2 - t1) * 1000,
        weights_address=getattr(hot, "address", 0),
        weights_bytes=len(hot.data) if hot is not None else 0,
    )
    os.write(report_fd, msgspec.json.encode(report) + b"\n")
    os.close(report_fd)

    spares: list[Spare] = []
    target = [max(request.spares, 0) if request.spare else 0]

    def handle(req: proto.Request, listener: socket.socket, conn: socket.socket) -> Any:
        if isinstance(req, proto.SetSpares):
            target[0] = max(req.spares, 0)
            while len(spares) > target[0]:
                spares.pop().discard()
            return proto.Done()
        if not isinstance(req, proto.Spawn):
            return proto.Failed("a template only spawns instances")
        spare = next((s for s in spares if s.is_ready()), None)
        if spare is not None:
            spares.remove(spare)
            if spare.hand_over(req.config):
                spare.close()
                return proto.Spawned(spare.pid, fork_ms=0.0, spare=True)
            spare.discard()  # it died: fork as without spares
        # No spare, or none rehearsed yet (kept for the next starts): fork.
        return _spawn(req.config, model, listener, conn)

    def on_idle(listener: socket.socket, conn: socket.socket | None) -> None:
        for dead in [s for s in spares if not process_alive(s.pid) or s.overdue()]:
            dead.discard()
            spares.remove(dead)
        if len(spares) < target[0] and thread_count() == 1:
            inherited = [listener] if conn is None else [listener, conn]
            while len(spares) < target[0]:
                spares.append(fork_spare(config, model, inherited))

    _serve_control(control, handle, on_idle)


def _spawn(config: WorkerConfig, model: Any, listener: socket.socket, conn: socket.socket) -> Any:
    threads = thread_count()
    if threads != 1:
        return proto.Failed(f"refusing to fork: the template has {threads} threads")
    t0 = time.perf_counter()
    try:
        instance_listener = listen(config.socket_path)
    except OSError as e:
        return proto.Failed(f"cannot listen on the instance socket: {e.strerror}")
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # instance
        listener.close()
        conn.close()
        _instance_main(config, model, instance_listener, parent)
        os._exit(0)
    instance_listener.close()
    return proto.Spawned(pid, fork_ms=(time.perf_counter() - t0) * 1000)


def _instance_main(config: WorkerConfig, model: Any, sock: socket.socket, parent: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Logging stays as the zygote configured it (reconfiguring costs ~1 ms of every
    # cold start); the instance's lines carry its pid, which `smss status` shows.
    set_threads(config)
    try:
        run_loop(config, model, sock, lambda: None)
    except BaseException:
        log.exception("instance %s crashed", config.instance_id)
        os._exit(1)
    os._exit(0)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    config = msgspec.json.decode(args[0], type=ZygoteConfig)
    faults.install(env_faults())  # inherited by the templates and instances it forks
    ready_fd = start_child_process("pid %(process)d", die_with_agent=config.linger_s is None)
    t0 = time.perf_counter()
    preload(config.runtime)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    listener = listen(config.control_path)
    preload_ms = (time.perf_counter() - t0) * 1000
    os.write(
        ready_fd, msgspec.json.encode({"ok": True, "pid": os.getpid(), "preload_ms": preload_ms}) + b"\n"
    )
    os.close(ready_fd)

    def handle(req: proto.Request, lst: socket.socket, conn: socket.socket) -> Any:
        return _prepare(config, req, lst, conn)

    def alone() -> None:
        # The run directory's owner is this zygote while no agent holds it: a node
        # starting meanwhile leaves the directory alone instead of removing it.
        run_dir = Path(config.control_path).parent
        with contextlib.suppress(OSError):
            (run_dir / "owner.tmp").write_text(str(os.getpid()))
            os.replace(run_dir / "owner.tmp", run_dir / "owner")
        log.info("the agent went away: waiting %.0f s for another to adopt this node", config.linger_s)

    _serve_control(listener, handle, linger_s=config.linger_s, on_alone=alone if config.linger_s else None)
    if config.linger_s is not None:
        log.info("no agent connected within %.0f s: exiting with templates and instances", config.linger_s)


if __name__ == "__main__":
    main()
