"""Named fault points, switched on by a spec string in tests only.

A spec lists ``point:action`` pairs separated by commas, e.g. ``SMSS_FAULT=
"log.before_commit:kill"`` (read by the entry point, never by the library), or
``log.after_commit:eio@3`` to fire on the third pass only. Points of the workflow
log (:class:`smss.store.sqlite_log.FaultHooks`):

* ``log.before_commit`` / ``log.after_commit``: around the COMMIT of a group commit;
* ``log.before_checkpoint`` / ``log.after_checkpoint``: around a completed checkpoint.

Actions: ``kill`` (SIGKILL this process: a crash at exactly that point), ``eio``
(an ``OSError(EIO)``, as from a failed fsync), ``enospc`` (disk full).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable

from smss.errors import InvalidSpec
from smss.store.sqlite_log import FaultHooks

_POINTS = {
    "log.before_commit": "before_commit",
    "log.after_commit": "after_commit",
    "log.before_checkpoint": "before_checkpoint",
    "log.after_checkpoint": "after_checkpoint",
}


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raiser(code: int) -> Callable[[], None]:
    def fail() -> None:
        raise OSError(code, os.strerror(code))

    return fail


_ACTIONS: dict[str, Callable[[], None]] = {
    "kill": _kill,
    "eio": _raiser(errno.EIO),
    "enospc": _raiser(errno.ENOSPC),
}


def on_pass(n: int, action: Callable[[], None]) -> Callable[[], None]:
    """``action`` on the n-th call only (1-based); the other calls do nothing."""
    calls = 0

    def hook() -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            action()

    return hook


def log_faults(spec: str) -> FaultHooks:
    """The log's hooks for ``spec``; :class:`InvalidSpec` naming a bad entry."""
    hooks: dict[str, Callable[[], None]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        point, _, action = entry.partition(":")
        action, _, nth = action.partition("@")
        if point not in _POINTS or action not in _ACTIONS or (nth and not nth.isdigit()):
            raise InvalidSpec(
                f"bad fault {entry!r}: expected one of {sorted(_POINTS)} : {sorted(_ACTIONS)}[@n]"
            )
        fire = _ACTIONS[action]
        hooks[_POINTS[point]] = on_pass(int(nth), fire) if nth else fire
    return FaultHooks(**hooks)
