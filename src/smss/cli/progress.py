"""Progress of long commands on stderr (rich): a bar per phase, with elapsed time.

Shown only when stderr is a terminal and ``--json`` was not given on the command
line, so that a command's stdout stays what it prints and logs stay clean. Every
bench command prints JSON whatever its flags say, so for them it is ``--json``
typed on the command line that silences it, not the default.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress

from smss.progress import SILENT, Progress


def wanted(argv: list[str] | None = None) -> bool:
    """Whether to show progress: stderr is a terminal and ``--json`` is not on the command line."""
    args = sys.argv[1:] if argv is None else argv
    return sys.stderr.isatty() and "--json" not in args


class _Bars:
    def __init__(self, bars: RichProgress) -> None:
        self._bars = bars
        self._task: TaskID | None = None

    def phase(self, what: str, total: float | None = None) -> None:
        self.finish()
        self._task = self._bars.add_task(what, total=total)

    def finish(self) -> None:
        """Mark the current phase done."""
        if self._task is not None:
            task = self._bars.tasks[-1]
            self._bars.update(self._task, completed=task.total or 1, total=task.total or 1)

    def advance(self, done: float) -> None:
        if self._task is not None:
            self._bars.update(self._task, completed=done)


@contextlib.contextmanager
def shown(what: str | None = None) -> Iterator[Progress]:
    """A :class:`~smss.progress.Progress` drawn on stderr while the block runs (or the
    silent one when progress is not wanted); ``what``: a first phase, e.g. the command."""
    if not wanted():
        yield SILENT
        return
    bars = RichProgress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with bars:
        progress = _Bars(bars)
        if what is not None:
            progress.phase(what)
        yield progress
        progress.finish()
