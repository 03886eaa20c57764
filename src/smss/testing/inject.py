"""Real faults for tests: signals to real processes, damage to real files.

Every helper acts on the operating system's objects the way an operator's tool
would (``kill -9``, ``kill -STOP``/``-CONT``, ``dd conv=notrunc``, ``truncate``,
``fallocate``), so what a test sees is what a crash, a stall, a bad disk or a full
filesystem does to SMSS. Fault points inside the code are :mod:`smss.faults`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path


def kill(pid: int) -> None:
    """SIGKILL ``pid`` (nothing happens if it is gone already)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stop(pid: int) -> None:
    """SIGSTOP ``pid``: it stays alive and does nothing until :func:`resume`."""
    os.kill(pid, signal.SIGSTOP)


def resume(pid: int) -> None:
    """SIGCONT ``pid`` (nothing happens if it is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def state(pid: int) -> str | None:
    """The process's state letter from ``/proc`` (``T`` when stopped), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2]


def wait_state(pid: int, letters: str, timeout_s: float = 10.0) -> None:
    """Wait until ``pid``'s state is one of ``letters`` (signals are delivered later)."""
    deadline = time.monotonic() + timeout_s
    while (s := state(pid)) is not None and s not in letters:
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still in state {s!r}, not one of {letters!r}")
        time.sleep(0.01)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """``pid`` is stopped (state ``T``) inside the block and resumed after it."""
    stop(pid)
    try:
        wait_state(pid, "Tt")
        yield
    finally:
        resume(pid)


def corrupt(path: Path, offset: int, length: int = 1, *, seed: int = 0) -> bytes:
    """Overwrite ``length`` bytes of ``path`` at ``offset`` in place (``dd conv=notrunc``)
    with bytes that each differ from the old ones; returns the old bytes."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, length, offset)
        if len(old) != length:
            raise ValueError(f"{path} has no {length} bytes at offset {offset}")
        new = bytes((b + rng.randrange(1, 256)) % 256 for b in old)
        os.pwrite(fd, new, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return old


def truncate(path: Path, size: int) -> None:
    """Cut ``path`` to ``size`` bytes (``truncate -s``)."""
    os.truncate(path, size)


@contextlib.contextmanager
def filled(directory: Path, *, leave_bytes: int = 0, chunk_bytes: int = 64 << 20) -> Iterator[Path]:
    """Fill ``directory``'s filesystem with one reserved file (``fallocate``) until at
    most ``leave_bytes`` are free; the file is removed after the block. Use it on a
    small filesystem of the test's own (a tmpfs mount, a loop device), never on one
    other programs need."""
    path = directory / f".smss-fill-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = 0
        while (free := free_bytes(directory) - leave_bytes) > 0:
            step = min(chunk_bytes, free)
            try:
                os.posix_fallocate(fd, size, step)
            except OSError as e:
                if e.errno != errno.ENOSPC or step <= 4096:
                    if e.errno == errno.ENOSPC:
                        break
                    raise
                chunk_bytes = max(4096, step // 2)
                continue
            size += step
        yield path
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still allocate on ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
