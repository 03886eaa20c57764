"""The workflow log's request queue, shared by both backends: what callers submit,
when the writer may apply and must commit each request, the writer's waits, the
bounded queue, the counters, and the failure state. (The writer threads, which
differ in how they commit and how they fail, live with their backends.)

A request is made on the caller's event loop and answered there (through
:mod:`smss.store._log_batch`); the queue's own order is the order of the calls.
A *lazy* request (its caller will wait for a later one anyway) is due
``lazy_delay_s`` after it was made, or with the next request that is not lazy:
a run's records share the commit of its end instead of costing a commit each.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from smss.errors import Overloaded, SmssError, StorageUnavailable
from smss.store import _log_ops as ops
from smss.store._log_batch import MAX_BATCH_BYTES, MAX_BATCH_ITEMS, Item, OpenBatch, settle
from smss.workflow.events import Event, RunStarted, StageCompleted, StateWrite

#: How long a lazy request may wait for a commit to share: its records become durable
#: this long after it was made at the latest, or with the next request that is not lazy.
LAZY_DELAY_S = 0.02
#: A lazy request larger than this waits only ``BULKY_DELAY_S`` (see ``submit``).
LAZY_MAX_BYTES = 1024 * 1024
BULKY_DELAY_S = 0.002
#: A lazy request is applied (not committed) this long after it was made.
APPLY_DELAY_S = 0.001
#: Requests waiting for the writer past which a new run is refused.
MAX_QUEUED = 10_000

COUNTERS = (
    "appends",
    "events",
    "commits",
    "dropped_completions",
    "state_conflicts",
    "voided",
    "fenced",
    "runs_started",
    "compacted_runs",
    "compacted_events",
    "compacted_blobs",
)

_EVENT_TYPES: tuple[type, ...] = typing.get_args(Event)


def start_request(run_id: str, started: RunStarted, blobs: Mapping[str, bytes]) -> tuple[ops.StartRun, int]:
    """The request of ``EventLog.start_run`` and its size; TypeError on a wrong argument."""
    if not isinstance(started, RunStarted):
        raise TypeError(f"start_run needs a RunStarted, not {type(started).__name__}")
    row = ops.row_of(started)
    blob_rows = ops.blob_rows(blobs)
    return ops.StartRun(run_id, started, row, blob_rows), len(row.body) + ops.size_of(blob_rows)


def append_request(
    run_id: str,
    events: Sequence[Event],
    blobs: Mapping[str, bytes] | None,
    state: StateWrite | None,
    requires: Sequence[StageCompleted],
) -> tuple[ops.Append, int]:
    """The request of ``EventLog.append`` and its size; TypeError on a wrong argument."""
    rows = []
    for event in events:
        if isinstance(event, RunStarted) or not isinstance(event, _EVENT_TYPES):
            raise TypeError(f"cannot append {type(event).__name__}: RunStarted is written by start_run")
        rows.append(ops.row_of(event))
    if state is not None and not isinstance(state, StateWrite):
        raise TypeError(f"state must be a StateWrite, not {type(state).__name__}")
    needed = []
    for completion in requires:
        if not isinstance(completion, StageCompleted):
            raise TypeError(f"requires holds StageCompleted events, not {type(completion).__name__}")
        needed.append((completion.stage, ops.encode(completion)))
    blob_rows = ops.blob_rows(blobs or {})
    op = ops.Append(run_id, rows, blob_rows, state, ops.encode(dict(state.tensors)) if state else b"", needed)
    return op, sum(len(r.body) for r in rows) + ops.size_of(blob_rows)


class RequestQueue:
    """Requests waiting for the writer, under one condition variable (``cond``), with
    the log's failure state and counters. ``failure`` set: every request is refused."""

    def __init__(self, *, lazy_delay_s: float = LAZY_DELAY_S, max_queued: int = MAX_QUEUED) -> None:
        self.cond = threading.Condition()
        self.items: collections.deque[Item] = collections.deque()
        self.lazy_delay_s = lazy_delay_s
        self.max_queued = max_queued
        self.earliest = float("inf")  # the earliest ``ready_at`` in the queue
        #: When the writer's wait ends (inf: when notified); -inf while it is awake.
        self.wake_at = -float("inf")
        self.closing = False
        self.failure: str | None = None
        self.counters = dict.fromkeys(COUNTERS, 0)

    def submit(self, op: ops.StartRun | ops.Append, size: int, lazy: bool) -> asyncio.Future[Any]:
        """Queue a request now; its answer comes in the returned future. Raises at once
        when the log cannot take it. Call with ``cond`` held."""
        now = time.monotonic()
        if not lazy:
            due = ready_at = now
        elif size > LAZY_MAX_BYTES:
            # Very large blobs get a commit of their own soon, in the background (after
            # the caller's next step, not in its way), so that the commit that ends a
            # run is never a large one.
            due = ready_at = now + BULKY_DELAY_S
        else:
            # Applied soon (uncommitted, while the caller waits on something else), so
            # that the commit that takes it has only its COMMIT left to do.
            due, ready_at = now + self.lazy_delay_s, now + APPLY_DELAY_S
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.failure is not None:
            raise StorageUnavailable(self.failure)
        if self.closing:
            raise StorageUnavailable("the workflow log is closed")
        if isinstance(op, ops.StartRun) and len(self.items) >= self.max_queued:
            raise Overloaded(
                f"the workflow log is behind: {len(self.items)} writes are waiting", retry_after_s=1.0
            )
        self.items.append(Item(op, size, loop, future, due, ready_at))
        self.earliest = min(self.earliest, ready_at)
        # Woken only when its wait must end sooner than planned. (SQLite applies a lazy
        # request on the caller's loop: its writer need only be up by its ``due``.)
        if (due if lazy else ready_at) < self.wake_at:
            self.cond.notify()
        return future

    def wait(self, open_: OpenBatch) -> bool | None:
        """The writer's wait until there is work: True once a queued request is ready to
        be applied, False once the open transaction is due; None once closing and drained."""
        with self.cond:
            while True:
                now = time.monotonic()
                if self.items and (self.closing or self.earliest <= now or open_.full()):
                    return True
                if open_.items and (open_.due <= now or self.closing):
                    return False
                if not self.items and not open_.items and self.closing:
                    return None
                wake = min(self.earliest if self.items else float("inf"), open_.due)
                self.wake_at = wake
                self.cond.wait(None if wake == float("inf") else max(0.0, wake - now))
                self.wake_at = -float("inf")  # awake: it looks at the queue before it waits again

    def pop_ready(self, open_: OpenBatch) -> list[Item]:
        """What is queued now, up to the batch limits (perhaps nothing)."""
        with self.cond:
            return self.pop_batch(open_) if self.items else []

    def pop_batch(self, open_: OpenBatch) -> list[Item]:
        """The head of the (non-empty) queue, up to the batch limits; under ``cond``."""
        items = [self.items.popleft()]
        size = open_.size + items[0].size
        while (
            self.items
            and len(open_.items) + len(items) < MAX_BATCH_ITEMS
            and size + self.items[0].size <= MAX_BATCH_BYTES
        ):
            items.append(self.items.popleft())
            size += items[-1].size
        self.earliest = min((item.ready_at for item in self.items), default=float("inf"))
        return items

    def fail(self, message: str) -> None:
        """From now on every request is refused with ``message`` (set once)."""
        with self.cond:
            if self.failure is None:
                self.failure = message

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    def committed(self, answers: list[tuple[Item, ops.Outcome]]) -> None:
        """Count a commit and what its requests did."""
        with self.cond:
            self.counters["commits"] += 1
            for _, outcome in answers:
                for name, value in vars(outcome.counts).items():
                    self.counters[name] += value

    def count(self, **counts: int) -> None:
        with self.cond:
            for name, value in counts.items():
                self.counters[name] += value

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {**self.counters, "queued": len(self.items)}


def fail_all(items: list[Item], error: SmssError) -> None:
    """Answer every request of ``items`` with ``error`` (one exception object each, so
    each waiter gets its own traceback)."""
    kind, retry = type(error), error.retry_after_s
    settle([(item, ops.Outcome(error=kind(error.message, retry_after_s=retry))) for item in items])
