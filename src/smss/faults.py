"""Named fault points: a crash, a stall or an I/O error at exactly one place in the
code, switched on for tests only.

A *spec* lists ``point:action`` entries separated by commas, e.g.
``SMSS_FAULT="stage.after_effect:kill@3,log.before_commit:eio"``. ``@n`` fires on
the n-th pass of that point only (1-based); without it, on every pass. Actions:

* ``kill``: SIGKILL this process (a crash at exactly that point);
* ``stop``: SIGSTOP this process (a stall; ``SIGCONT`` resumes it where it stopped);
* ``eio`` / ``enospc``: raise ``OSError(EIO)`` (a failed fsync) / ``OSError(ENOSPC)``;
* ``delay:MS``: block the calling thread for MS milliseconds (on an event loop, the
  whole loop stalls: a stalled process, seen from outside).

Points (where the code calls :func:`hit`):

==========================  ===========================================================
``request.before_dispatch``  the gateway, before a request is sent to an instance
``instance.before_reply``    an instance, after ``predict`` returned, before its reply
``stage.before_call``        the workflow engine, before a stage's function is called
``stage.after_effect``       the engine, after a stage's call returned (its effect is
                             done), before its completion is recorded
``state.after_record``       the engine, once the append that carries a session's new
                             state (a stateful stage's completion) is committed
``log.before_commit``        the workflow log's writer, before a group COMMIT
``log.after_commit``         ... after it
``log.before_checkpoint``    ... before a checkpoint
``log.after_checkpoint``     ... after a completed checkpoint
``probe.before_reply``       a cluster node's relay, before it answers another node's
                             RTT probe (run in a thread: ``delay:MS`` slows the probes
                             to this node alone, a test's injected latency)
==========================  ===========================================================

**Who switches them on.** Only an entry point, by :func:`install` with the spec that
:func:`smss.config.env_faults` read from ``SMSS_FAULT``; ``smss serve`` refuses to
start with a spec unless ``--allow-faults`` is also given (the test kit passes it), so
a stray variable in a production shell cannot crash the platform. Worker processes
inherit the variable and install it at their own entry.

**Cost when off.** :func:`hit` is one dictionary lookup on an empty dict. The table is
process-wide, like logging's handlers, because the points sit in layers (engine,
dispatcher, worker) that share nothing else; it is written once, at startup.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping

from smss.errors import InvalidSpec

Action = Callable[[], None]

POINTS = frozenset(
    {
        "request.before_dispatch",
        "instance.before_reply",
        "stage.before_call",
        "stage.after_effect",
        "state.after_record",
        "log.before_commit",
        "log.after_commit",
        "log.before_checkpoint",
        "log.after_checkpoint",
        "probe.before_reply",
    }
)


def _signal_self(sig: signal.Signals) -> Action:
    def send() -> None:
        # To the calling thread, not the process: a process-directed SIGSTOP is taken
        # by the main thread, and the caller (an event loop in another thread) would
        # run on past the point until the group stop reaches it.
        signal.pthread_kill(threading.get_ident(), sig)

    return send


def _raiser(code: int) -> Action:
    def fail() -> None:
        raise OSError(code, os.strerror(code))

    return fail


def _delay(ms: float) -> Action:
    def wait() -> None:
        time.sleep(ms / 1000)

    return wait


def on_pass(n: int, action: Action) -> Action:
    """``action`` on the n-th call only (1-based); the other calls do nothing."""
    calls = 0

    def hook() -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            action()

    return hook


def _action(entry: str, name: str, arg: str) -> Action:
    simple: dict[str, Action] = {
        "kill": _signal_self(signal.SIGKILL),
        "stop": _signal_self(signal.SIGSTOP),
        "eio": _raiser(errno.EIO),
        "enospc": _raiser(errno.ENOSPC),
    }
    if name in simple and not arg:
        return simple[name]
    if name == "delay":
        try:
            ms = float(arg)
        except ValueError:
            ms = -1.0
        if ms >= 0:
            return _delay(ms)
    raise InvalidSpec(
        f"bad fault {entry!r}: expected POINT:ACTION[@n], ACTION one of kill, stop, eio, enospc, delay:MS"
    )


def parse(spec: str) -> dict[str, Action]:
    """Point -> action for ``spec``; :class:`InvalidSpec` naming a bad entry."""
    actions: dict[str, Action] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        body, _, nth = entry.partition("@")
        point, _, action = body.partition(":")
        name, _, arg = action.partition(":")
        if point not in POINTS:
            raise InvalidSpec(
                f"bad fault {entry!r}: unknown point {point!r}, expected one of {sorted(POINTS)}"
            )
        if nth and not (nth.isdigit() and int(nth) > 0):
            raise InvalidSpec(f"bad fault {entry!r}: @n needs a positive whole number")
        fire = _action(entry, name, arg)
        actions[point] = on_pass(int(nth), fire) if nth else fire
    return actions


_ACTIVE: dict[str, Action] = {}


def install(spec: str | None) -> None:
    """Switch on the points of ``spec`` in this process (None or "" switches all off).
    Called by entry points only."""
    table = parse(spec or "")
    _ACTIVE.clear()
    _ACTIVE.update(table)


def hit(point: str) -> None:
    """Pass the fault point ``point``: runs its action if one is installed."""
    action = _ACTIVE.get(point)
    if action is not None:
        action()


def point(name: str) -> Action | None:
    """The installed action of ``name`` (for a component that takes its hooks as callables)."""
    return _ACTIVE.get(name)


def active() -> Mapping[str, Action]:
    return dict(_ACTIVE)
