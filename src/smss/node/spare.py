"""A template's *spare*: the next instance of its model, forked ahead of demand.

A fork of a template answers its first request slowly, and not because of the
fork: the first request writes to some 1,700 pages the child shares with its
template (Python objects' reference counts, allocator state, the I/O thread's
and event loop's structures), and each write is a copy-on-write fault, which
costs several microseconds in a virtual machine. A spare pays that before any
request needs it: it is forked when the template is idle, *rehearses* (serves
one request on zeros over a private socket, through the same thread, loop,
batcher and model as an instance, and stops), and then waits. A cold start that
finds a ready spare hands it the instance's configuration: it listens on the
instance's socket and serves, with its pages already its own and its I/O loop
already running (the go message is read on that loop). The template forks
the next spare the next time it is idle.

Cost: one process per model with a template, holding the pages it wrote while
rehearsing (a few MB; the weights stay shared). ``spares=False`` on the backend
turns spares off. A spare that died, or has not finished rehearsing, is passed
over (one still rehearsing is kept for the next start): the cold start forks
from the template as it would without spares.

Fork safety is the template's (:mod:`smss.node.zygote`): the spare is forked
only while the template has one thread, closes the template's control sockets
first thing, and dies with the template (``PR_SET_PDEATHSIG``). Messages on the
two pipes are single lines: ``ready`` (rehearsed), the instance's
:class:`~smss.node.worker.WorkerConfig` as JSON (go), ``serving`` (listening).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from smss.node.worker import WorkerConfig, die_with_parent, listen, rehearse, run_loop, set_threads

log = logging.getLogger(__name__)

#: How long a cold start waits for a spare to take over before forking instead.
HAND_OVER_TIMEOUT_S = 2.0
#: A spare not ready this long after its fork is replaced.
REHEARSAL_TIMEOUT_S = 60.0
MAX_LINE = 1 << 20


@dataclass
class Spare:
    pid: int
    go_fd: int  # template -> spare
    reply_fd: int  # spare -> template
    ready: bool = False
    born: float = field(default_factory=time.monotonic)

    def overdue(self) -> bool:
        """Still not ready long after it was forked: stuck in its rehearsal."""
        return not self.is_ready() and time.monotonic() - self.born > REHEARSAL_TIMEOUT_S

    def is_ready(self) -> bool:
        """Whether it has rehearsed (never blocks)."""
        if not self.ready:
            readable, _, _ = select.select([self.reply_fd], [], [], 0)
            if readable:
                self.ready = _read_line(self.reply_fd) == b"ready"
        return self.ready

    def hand_over(self, config: WorkerConfig, timeout_s: float = HAND_OVER_TIMEOUT_S) -> bool:
        """Make it the instance ``config`` describes; True once it listens."""
        try:
            os.write(self.go_fd, msgspec.json.encode(config) + b"\n")
        except OSError:  # it died: the pipe is broken
            return False
        readable, _, _ = select.select([self.reply_fd], [], [], timeout_s)
        return bool(readable) and _read_line(self.reply_fd) == b"serving"

    def close(self) -> None:
        for fd in (self.go_fd, self.reply_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def discard(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.close()


def fork_spare(config: WorkerConfig, model: Any, inherited: Iterable[socket.socket]) -> Spare:
    """Fork a spare from this (single-threaded) template; ``inherited``: the
    template's sockets, closed in the child."""
    go_r, go_w = os.pipe()
    reply_r, reply_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        for sock in inherited:
            sock.close()
        os.close(go_w)
        os.close(reply_r)
        _spare_main(config, model, go_r, reply_w, parent)
        os._exit(0)
    os.close(go_r)
    os.close(reply_w)
    return Spare(pid, go_w, reply_r)


def _spare_main(config: WorkerConfig, model: Any, go_fd: int, reply_fd: int, parent: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        set_threads(config)
        rehearse(config, model)
    except BaseException:
        log.exception("spare of %s failed", config.spec.name)
        os._exit(1)

    async def adopt() -> tuple[WorkerConfig, socket.socket] | None:
        # The instance's I/O loop is already running: the go message is read on it.
        line = await _read_line_async(go_fd)
        if not line:  # the template let it go (or died)
            return None
        instance = msgspec.json.decode(line, type=WorkerConfig)
        if instance.threads != config.threads:  # its compute thread is sized already
            os.write(reply_fd, b"declined\n")
            return None
        sock = listen(instance.socket_path)
        os.write(reply_fd, b"serving\n")
        return instance, sock

    os.write(reply_fd, b"ready\n")
    try:
        run_loop(config, model, None, lambda: None, adopt=adopt)
    except BaseException:
        log.exception("spare of %s failed", config.spec.name)
        os._exit(1)
    os._exit(0)


async def _read_line_async(fd: int) -> bytes:
    """One line from a pipe on the running loop (b"" at EOF)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError):
        return b""
    finally:
        transport.close()
    return line.rstrip(b"\n") if line.endswith(b"\n") else b""


def _read_line(fd: int) -> bytes:
    """One line from a pipe (b"" at EOF); the peer writes whole lines with one write."""
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_LINE:
        try:
            chunk = os.read(fd, MAX_LINE)
        except OSError:
            return b""
        if not chunk:
            return b""
        data += chunk
    return data.rstrip(b"\n")
