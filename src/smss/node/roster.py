"""A node's processes written down in its run directory, so a restarted agent adopts them.

With an adoption window (``adopt_window_s > 0``) a zygote does not die with the
agent that started it: it waits that long for a new agent to connect to its
control socket, and exits (its templates and their instances die with it, by
``PR_SET_PDEATHSIG``) when none does. A restarted ``smss serve`` on the same data
directory finds the run directory through ``<data>/node.json``, reads the roster
(one JSON file per zygote, template and instance, replaced atomically), and takes
over the processes still alive: it reconnects to the zygotes and templates and
hands the instances to the controller, which adopts them or stops them.

A pid is trusted only while the process's start time (``/proc/PID/stat``) is the
one recorded, so a recycled pid is never adopted or signalled.

Known gap: an instance (or template) forked in the moment between its parent's
reply and the agent's record of it (the agent killed just then) is not in the
roster; it is not adopted and lives until its template (or zygote) is stopped:
at the latest when the adopting platform shuts down, or the window ends unadopted.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import msgspec

from smss.node import zygote_proto as proto
from smss.ports import InstanceInfo

POINTER_VERSION = 1


class NodePointer(msgspec.Struct, frozen=True):
    """``<data>/node.json``: the run directory of the node serving this data directory."""

    run_dir: str
    version: int = POINTER_VERSION


class ZygoteEntry(msgspec.Struct, frozen=True, tag="zygote"):
    runtime: str
    pid: int
    started: int
    control_path: str


class TemplateEntry(msgspec.Struct, frozen=True, tag="template"):
    key: str
    pid: int
    started: int
    control_path: str
    prepared: proto.Prepared


class InstanceEntry(msgspec.Struct, frozen=True, tag="instance"):
    info: InstanceInfo
    started: int
    artifact_dir: str
    #: The weight-store key and file of its weights (None: the model has none).
    weights_key: str | None = None
    weights_source: str | None = None


Entry = ZygoteEntry | TemplateEntry | InstanceEntry
_decoder = msgspec.json.Decoder(Entry)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is not
    running (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def alive(pid: int, started: int) -> bool:
    """The recorded process is still running (not a later one with its pid)."""
    return start_time(pid) == started


class Roster:
    """The entries of one run directory (``<run_dir>/roster``)."""

    def __init__(self, run_dir: Path) -> None:
        self._dir = run_dir / "roster"
        self._dir.mkdir(exist_ok=True)

    def _path(self, entry: Entry) -> Path:
        if isinstance(entry, ZygoteEntry):
            return self._dir / f"zygote-{entry.runtime}.json"
        if isinstance(entry, TemplateEntry):
            return self._dir / f"template-{Path(entry.control_path).stem}.json"
        return self._dir / f"instance-{entry.info.id}.json"

    def put(self, entry: Entry) -> None:
        path = self._path(entry)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(entry))
        os.replace(tmp, path)

    def drop(self, entry: Entry) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(entry).unlink()

    def entries(self) -> list[Entry]:
        """Every readable entry (a torn or foreign file is removed)."""
        out: list[Entry] = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                out.append(_decoder.decode(path.read_bytes()))
            except (OSError, msgspec.DecodeError):
                with contextlib.suppress(OSError):
                    path.unlink()
        return out


def live_zygotes(run_dir: Path) -> list[ZygoteEntry]:
    """The zygotes of a run directory still running (without creating anything)."""
    if not (run_dir / "roster").is_dir():
        return []
    return [e for e in Roster(run_dir).entries() if isinstance(e, ZygoteEntry) and alive(e.pid, e.started)]


def read_pointer(path: Path) -> Path | None:
    try:
        pointer = msgspec.json.decode(path.read_bytes(), type=NodePointer)
    except (OSError, msgspec.DecodeError):
        return None
    return Path(pointer.run_dir) if pointer.version == POINTER_VERSION else None


def write_pointer(path: Path, run_dir: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(NodePointer(str(run_dir))))
    os.replace(tmp, path)
