"""What a running platform holds, read from /proc: its processes (the ``smss serve``
process and every descendant: zygotes, templates, spares, instances), their memory,
file descriptors and threads, and its ``/dev/shm`` segments. For benchmarks that
watch a platform over time (``bench load``, ``bench soak``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Proc:
    pid: int
    role: str  # gateway | zygote | forked (a template, spare or instance)
    rss_kb: int
    pss_kb: int
    fds: int
    threads: int


def _ppids(proc: Path = PROC) -> dict[int, int]:
    out = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(root: int, proc: Path = PROC) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids(proc).items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _field_kb(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    return 0


def read_proc(pid: int, role: str, proc: Path = PROC) -> Proc | None:
    base = proc / str(pid)
    try:
        status = (base / "status").read_text()
        rollup = (base / "smaps_rollup").read_text()
        fds = len(os.listdir(base / "fd"))
    except OSError:
        return None
    return Proc(
        pid, role, _field_kb(status, "VmRSS:"), _field_kb(rollup, "Pss:"), fds, _field_kb(status, "Threads:")
    )


def platform_procs(root: int, proc: Path = PROC) -> list[Proc]:
    """Every process of the platform whose ``smss serve`` process is ``root``."""
    out = []
    for pid in descendants(root, proc):
        try:
            cmdline = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        role = "gateway" if pid == root else ("zygote" if b"smss.node.zygote" in cmdline else "forked")
        p = read_proc(pid, role, proc)
        if p is not None:
            out.append(p)
    return out


def shm_segments(shm: Path = Path("/dev/shm")) -> int:
    """The platform's weight segments in ``/dev/shm`` (named ``smss-*``)."""
    try:
        return sum(1 for p in shm.iterdir() if p.name.startswith("smss-"))
    except OSError:
        return 0


def growth_pct(before: list[Proc], after: list[Proc]) -> list[dict[str, object]]:
    """RSS growth of each process alive at both readings, largest first."""
    then = {p.pid: p for p in before}
    rows = []
    for p in after:
        b = then.get(p.pid)
        if b is None or b.rss_kb == 0:
            continue
        rows.append(
            {
                "pid": p.pid,
                "role": p.role,
                "rss_mb_before": round(b.rss_kb / 1024, 1),
                "rss_mb_after": round(p.rss_kb / 1024, 1),
                "rss_growth_pct": round(100.0 * (p.rss_kb - b.rss_kb) / b.rss_kb, 2),
            }
        )
    rows.sort(key=lambda r: -float(r["rss_growth_pct"]))  # type: ignore[arg-type]
    return rows
