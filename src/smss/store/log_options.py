"""Options of the workflow log, whichever database holds it: retention (compaction)
and the named fault points tests switch on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from smss import faults


@dataclass(frozen=True)
class Retention:
    """Log compaction (:mod:`smss.store._log_compact`): finished runs last updated more
    than ``age_s`` ago are removed, with the blobs only they referred to, by the
    writer after a commit at most every ``every_s``, ``max_runs`` at a time."""

    age_s: float
    every_s: float = 60.0
    max_runs: int = 1000


@dataclass(frozen=True)
class FaultHooks:
    """Named fault points, for tests only (:func:`log_hooks` builds them from the points
    of :mod:`smss.faults`). Each runs on the writer thread; an exception it raises
    counts as a failure of the step it is attached to (SQLite: a failed COMMIT or
    checkpoint, fatal; PostgreSQL: a failed COMMIT, which fails its batch alone). The
    checkpoint points are SQLite's only."""

    before_commit: Callable[[], None] | None = None
    after_commit: Callable[[], None] | None = None
    before_checkpoint: Callable[[], None] | None = None
    #: Called only when a checkpoint completed (the ``-wal`` file was emptied).
    after_checkpoint: Callable[[], None] | None = None


def log_hooks(lookup: Callable[[str], Callable[[], None] | None] = faults.point) -> FaultHooks:
    """The log's hooks from ``lookup`` (point name -> action): by default the points
    installed in this process (:func:`smss.faults.install`)."""
    return FaultHooks(
        before_commit=lookup("log.before_commit"),
        after_commit=lookup("log.after_commit"),
        before_checkpoint=lookup("log.before_checkpoint"),
        after_checkpoint=lookup("log.after_checkpoint"),
    )


def call(hook: Callable[[], None] | None) -> None:
    if hook is not None:
        hook()
