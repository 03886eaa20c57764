"""How much memory a process really holds: its PSS, and its children, from /proc.

PSS (proportional set size) charges each shared page to the processes that map
it in equal parts, so the PSS of a template and of the instances forked from it
add up to what they hold together, shared weights counted once. Readings are
cached for ``ttl_s`` (reading ``smaps_rollup`` of a large process walks its page
tables).
"""

from __future__ import annotations

import time
from pathlib import Path

PROC = Path("/proc")


def pss_bytes(pid: int, proc: Path = PROC) -> int | None:
    """The process's PSS in bytes, or None when it is gone or unreadable."""
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


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


class PssCache:
    """:func:`pss_bytes` per pid, re-read at most every ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float = 5.0, proc: Path = PROC) -> None:
        self._ttl_s = ttl_s
        self._proc = proc
        self._cache: dict[int, tuple[float, int | None]] = {}

    def get(self, pid: int) -> int | None:
        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        value = pss_bytes(pid, self._proc)
        self._cache[pid] = (now, value)
        if len(self._cache) > 4096:
            self._cache = {p: v for p, v in self._cache.items() if now - v[0] < self._ttl_s}
        return value
