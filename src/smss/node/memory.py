"""How much memory a process really holds: its PSS, and its children, from /proc.

PSS (proportional set size) charges each shared page to the processes that map
it in equal parts, so the PSS of a template and of the instances forked from it
add up to what they hold together, shared weights counted once. Reading
``smaps_rollup`` of a large process walks its page tables, so what the node keeps
resident is read off the event loop (:class:`ResidentReadings`), at most every few
seconds, and the control loop uses the last readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")


def pss_bytes(pid: int, proc: Path = PROC) -> int | None:
    """The process's PSS in bytes, or None when it is gone or unreadable."""
    fields = _rollup(pid, proc)
    return None if fields is None else fields.get("Pss")


def own_bytes(pid: int, proc: Path = PROC) -> int | None:
    """The process's PSS less its share of shared memory (``Pss_Shmem``: the weight
    segments it maps, which the store counts whole), or None when it is gone."""
    fields = _rollup(pid, proc)
    if fields is None or "Pss" not in fields:
        return None
    return max(fields["Pss"] - fields.get("Pss_Shmem", 0), 0)


def _rollup(pid: int, proc: Path) -> dict[str, int] | None:
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0]) * 1024
    return out


def children(pid: int, proc: Path = PROC) -> list[int]:
    """The process's children (from each thread's ``children`` file)."""
    out: list[int] = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out.extend(int(x) for x in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class Reading:
    """One template process: its PSS, and its children other than instances (its
    spares), each with its PSS (0 when unreadable)."""

    pss: int
    spares: tuple[tuple[int, int], ...] = ()


def read_templates(
    pids: Collection[int], instances: Collection[int], proc: Path = PROC, others: Collection[int] = ()
) -> dict[int, Reading]:
    """A :class:`Reading` of each template pid, and of each of ``others`` (processes
    read alone: zygotes, the platform's own), without the weight segments they map
    (:func:`own_bytes`; blocking: /proc reads)."""
    out = {}
    for pid in pids:
        spares = tuple((c, own_bytes(c, proc) or 0) for c in children(pid, proc) if c not in instances)
        out[pid] = Reading(own_bytes(pid, proc) or 0, spares)
    for pid in others:
        out[pid] = Reading(own_bytes(pid, proc) or 0)
    return out


@dataclass
class ResidentReadings:
    """The last :func:`read_templates` of a node's templates, refreshed in a worker
    thread at most every ``refresh_s`` seconds, when asked (:meth:`latest`): the
    control loop never waits on /proc. A template not read yet counts 0 until the
    next refresh (a few seconds). The refresh task is owned here: :meth:`close`
    cancels it, and a failed refresh is logged and retried at the next ask."""

    refresh_s: float = 5.0
    proc: Path = PROC
    clock: Callable[[], float] = time.monotonic
    readings: dict[int, Reading] = field(default_factory=dict)
    _read_at: float = -float("inf")
    _task: asyncio.Task[None] | None = None

    def latest(
        self, templates: Collection[int], instances: Collection[int], others: Collection[int] = ()
    ) -> dict[int, Reading]:
        """The last readings; starts a refresh when they are older than ``refresh_s``
        (outside a running loop: reads now)."""
        now = self.clock()
        if now - self._read_at >= self.refresh_s and (self._task is None or self._task.done()):
            self._read_at = now
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.readings = read_templates(templates, instances, self.proc, others)
            else:
                self._task = loop.create_task(
                    self._refresh(tuple(templates), frozenset(instances), tuple(others))
                )
        return self.readings

    async def _refresh(
        self, templates: tuple[int, ...], instances: frozenset[int], others: tuple[int, ...] = ()
    ) -> None:
        try:
            self.readings = await asyncio.to_thread(read_templates, templates, instances, self.proc, others)
        except Exception:
            log.exception("could not read what the node keeps resident")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
