"""An executor that runs work on the process's main thread.

An instance computes on its main thread and runs its I/O loop on a second
one. Why: a forked instance inherits the main thread of its template, whose
runtime state (torch's thread-locals, allocator caches) the template's warm-up
call already initialised; a fresh compute thread would pay that again on the
first request (about 5 ms for the demo CNN here). The main thread also gets
the signals, so SIGTERM reaches the instance even while the loop is busy.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_STOP = object()


class MainThreadExecutor(Executor):
    def __init__(self) -> None:
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._closed:
            raise RuntimeError("executor is shut down")
        future: Future[T] = Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        self._work.put(_STOP)

    def run(self) -> None:
        """Run submitted work on the calling (main) thread until :meth:`shutdown`."""
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:
                future.set_exception(e)
            else:
                future.set_result(result)
