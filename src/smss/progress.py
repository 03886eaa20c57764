"""How a long-running job says how far it got: a :class:`Progress` it is handed.

Jobs (benchmarks, replays) call :meth:`Progress.phase` when they start a new part and
:meth:`Progress.advance` as it goes; what is shown, and where, is the caller's
business (the CLI draws a bar on stderr, see :mod:`smss.cli.progress`). The
:data:`SILENT` one shows nothing.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def phase(self, what: str, total: float | None = None) -> None:
        """A new part of the job began: ``what`` it does, and how many steps it has
        (None: unknown, shown as a spinner)."""

    def advance(self, done: float) -> None:
        """``done`` steps of the current part are finished (not an increment)."""


class _Silent:
    def phase(self, what: str, total: float | None = None) -> None:
        pass

    def advance(self, done: float) -> None:
        pass


SILENT: Progress = _Silent()
