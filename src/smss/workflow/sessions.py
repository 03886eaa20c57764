"""Sessions' state as the engine sees it: one stateful stage of a session at a time,
and the state each next turn starts from, including writes not yet durable.

The engine does not wait for a stateful stage's completion (and its state write) to
be durable before the session's next turn reads the new state: the write is queued
on the log, :class:`SessionStates` remembers it, and the next turn's write is
conditional on it (:class:`~smss.workflow.events.StateWrite` names the version and
the tensors it read). If the earlier write does not take effect (another process
moved the session on), the later one cannot either: the log refuses it, the engine
forgets what it remembered (:meth:`SessionStates.forget`) and the runs concerned
re-run their stage on the state the log holds. Outputs are returned only once the
run's end is durable, so nobody sees a turn whose state was not written.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from smss.workflow.events import SessionState

Key = tuple[str, str]  # (workflow, session)

#: Sessions whose latest state is kept in memory; older ones are read from the log again.
MAX_REMEMBERED = 10_000


@dataclass(frozen=True)
class Remembered:
    state: SessionState
    arrays: dict[str, np.ndarray]  # by blob ref


class SessionLocks:
    """One holder per session key; waiters are served in order. Unlike
    :class:`asyncio.Lock`, a free key is taken without a suspension point
    (:meth:`try_acquire`), so the engine can prepare a stage and queue its log
    records in the same step as the completion that made it ready."""

    def __init__(self) -> None:
        self._held: set[Key] = set()
        self._waiters: dict[Key, collections.deque[asyncio.Future[None]]] = {}

    def try_acquire(self, key: Key) -> bool:
        if key in self._held or self._waiters.get(key):
            return False
        self._held.add(key)
        return True

    async def acquire(self, key: Key) -> None:
        if self.try_acquire(key):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, collections.deque()).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # handed over just as we were cancelled: pass it on
            else:
                self._drop(key, waiter)
            raise

    def release(self, key: Key) -> None:
        queue = self._waiters.get(key)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # ownership passes to the waiter: stays held
                return
        self._waiters.pop(key, None)
        self._held.discard(key)

    def held(self, key: Key) -> bool:
        return key in self._held

    def _drop(self, key: Key, waiter: asyncio.Future[None]) -> None:
        queue = self._waiters.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                self._waiters.pop(key, None)


class SessionStates:
    """The newest state of each session as this engine wrote or read it (LRU bounded),
    and the state writes still on their way to the log.

    ``read`` returns the remembered state, or the log's; ``wrote`` records a write
    the moment it is queued; ``forget`` drops a session once a write of it was
    refused (what is remembered may derive from it). Reading the log is right only
    once no write of the session is on its way: ``ready`` says whether a read may
    happen now, ``settle`` waits until it may. A run calls both holding the
    session's lock, so no new write can be queued meanwhile."""

    def __init__(self, read_log: Callable[[str, str], SessionState], limit: int = MAX_REMEMBERED) -> None:
        self._read_log = read_log
        self._limit = limit
        self._states: collections.OrderedDict[Key, Remembered] = collections.OrderedDict()
        self._writing: dict[Key, list[asyncio.Future[object]]] = {}

    def ready(self, key: Key) -> bool:
        return key in self._states or not self._in_flight(key)

    async def settle(self, key: Key) -> None:
        """Wait until every queued write of the session has been answered (whatever
        the answer: a refusal is the writer's to handle). Never cancels them."""
        if writes := self._in_flight(key):
            await asyncio.wait(writes)
        self._in_flight(key)

    def read(self, key: Key) -> Remembered:
        found = self._states.get(key)
        if found is not None:
            self._states.move_to_end(key)
            return found
        return Remembered(self._read_log(*key), {})

    def wrote(
        self,
        key: Key,
        state: SessionState,
        arrays: dict[str, np.ndarray],
        write: asyncio.Future[object],
    ) -> None:
        self._states[key] = Remembered(state, arrays)
        self._states.move_to_end(key)
        self._writing.setdefault(key, []).append(write)
        while len(self._states) > self._limit:
            evicted, _ = self._states.popitem(last=False)
            self._in_flight(evicted)

    def forget(self, key: Key) -> None:
        self._states.pop(key, None)

    def _in_flight(self, key: Key) -> list[asyncio.Future[object]]:
        writes = [w for w in self._writing.get(key, ()) if not w.done()]
        if writes:
            self._writing[key] = writes
        else:
            self._writing.pop(key, None)
        return writes


class ExpiringStates:
    """Session state kept in memory only (non-durable runs), bounded: at most
    ``capacity`` sessions, the least recently used dropped first, and any unused
    for ``ttl_s`` (on the caller's clock) dropped too. A dropped session starts
    again from zeros, as a new one: its state was never promised to last."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self._capacity = capacity
        self._ttl_s = ttl_s
        # Oldest use first: expired entries are always at the front.
        self._entries: collections.OrderedDict[Key, tuple[float, dict[str, np.ndarray]]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key, now: float) -> dict[str, np.ndarray]:
        self._expire(now)
        entry = self._entries.get(key)
        return {} if entry is None else entry[1]

    def put(self, key: Key, state: dict[str, np.ndarray], now: float) -> None:
        self._entries[key] = (now, state)
        self._entries.move_to_end(key)
        self._expire(now)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._entries:
            used, _ = next(iter(self._entries.values()))
            if now - used < self._ttl_s:
                return
            self._entries.popitem(last=False)
