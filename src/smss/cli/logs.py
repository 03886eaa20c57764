"""``smss logs NAME [--follow]``: the platform's, a function's or an instance's log, read
from the data directory of a platform on this machine.

Where logs live (``DATA`` is ``smss serve --data-dir``, default ``~/.smss``):

* ``DATA/logs/platform.log``: the gateway, controller and node agent (what ``smss serve``
  also writes to stderr), rotated at 10 MiB with three old files kept;
* ``DATA/logs/zygote-RUNTIME.log``: each runtime's zygote, and the templates and
  instances forked from it (their stdout and stderr: a model's prints and tracebacks);
* ``DATA/logs/INSTANCE.log``: an instance started with ``--start-mode exec``.

``NAME`` is ``platform``; an instance id (its own file where it has one); or a function,
whose log is the lines of those files that name it (with ``--log-format`` either way,
records about a function or instance carry its name).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

PLATFORM = "platform"
POLL_S = 0.5


def sources(logs: Path, name: str) -> tuple[list[Path], re.Pattern[str] | None]:
    """The files holding ``name``'s log and, where they hold others' lines too, the
    pattern its lines match."""
    if name == PLATFORM:
        return [logs / "platform.log"], None
    own = logs / f"{name}.log"
    if own.is_file() and not name.startswith("zygote-"):
        return [own], None
    pattern = re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w.])")
    return [logs / "platform.log", *sorted(logs.glob("zygote-*.log"))], pattern


def tail(paths: list[Path], pattern: re.Pattern[str] | None, lines: int) -> list[str]:
    """The last ``lines`` lines of each file (that match ``pattern``), file by file."""
    out: list[str] = []
    for path in paths:
        if not path.is_file():
            continue
        with path.open(errors="replace") as f:
            kept = deque((ln.rstrip("\n") for ln in f if pattern is None or pattern.search(ln)), maxlen=lines)
        out.extend(kept)
    return out


def follow(
    paths: list[Path], pattern: re.Pattern[str] | None, stop: Callable[[], bool] = lambda: False
) -> Iterator[str]:
    """Lines appended to the files from now on (that match ``pattern``), until ``stop()``;
    a file rotated or truncated is read again from its start."""
    offsets = {p: p.stat().st_size if p.is_file() else 0 for p in paths}
    while not stop():
        for path in paths:
            if not path.is_file():
                continue
            size = path.stat().st_size
            if size < offsets[path]:
                offsets[path] = 0  # rotated: a new file
            if size == offsets[path]:
                continue
            with path.open("rb") as f:
                f.seek(offsets[path])
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
            offsets[path] += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                if pattern is None or pattern.search(line):
                    yield line
        time.sleep(POLL_S)
