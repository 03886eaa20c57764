"""The workflow log's queue: a request waiting for the writer, the batch applied to
the open transaction, and answering the callers' event loops once it is settled.
(Part of :mod:`smss.store.sqlite_log`.)"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from smss.store import _log_ops as ops

#: A batch closes at this many requests or this many bytes of bodies and blobs.
MAX_BATCH_ITEMS = 1024
MAX_BATCH_BYTES = 64 * 1024 * 1024


@dataclass
class Item:
    op: ops.StartRun | ops.Append
    size: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    due: float  # monotonic time by which a commit holding it must start
    ready_at: float  # monotonic time from which the writer may apply it (uncommitted)


class OpenBatch:
    """Requests applied to the writer's open transaction, not yet committed."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.outcomes: list[ops.Outcome] = []
        self.due = float("inf")
        self.size = 0

    def add(self, item: Item, outcome: ops.Outcome) -> None:
        self.items.append(item)
        self.outcomes.append(outcome)
        self.due = min(self.due, item.due)
        self.size += item.size

    def full(self) -> bool:
        return len(self.items) >= MAX_BATCH_ITEMS or self.size >= MAX_BATCH_BYTES

    def take(self) -> list[Item]:
        return [item for item, _ in self.take_with_outcomes()]

    def take_with_outcomes(self) -> list[tuple[Item, ops.Outcome]]:
        answers = list(zip(self.items, self.outcomes, strict=True))
        self.items, self.outcomes, self.due, self.size = [], [], float("inf"), 0
        return answers


def settle(answers: list[tuple[Item, ops.Outcome]]) -> None:
    """Answer the waiters: one wake-up of each event loop for the whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Item, ops.Outcome]]] = {}
    for item, outcome in answers:
        by_loop.setdefault(item.loop, []).append((item, outcome))
    for loop, mine in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody waits
            loop.call_soon_threadsafe(answer, mine)


def answer(answers: list[tuple[Item, ops.Outcome]]) -> None:
    for item, outcome in answers:
        if item.future.done():  # the caller was cancelled
            continue
        if outcome.error is not None:
            item.future.set_exception(outcome.error)
        else:
            item.future.set_result(outcome.result)
