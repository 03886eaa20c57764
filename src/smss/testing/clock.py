"""A virtual clock for tests and the simulator: time moves only when told to.

``FakeClock(autojump=True)`` is asyncio's counterpart of Trio's ``MockClock`` with
``autojump_threshold=0``: whenever every task waits (the event loop has nothing
ready to run) and some task sleeps on this clock, virtual time jumps to the
earliest such wake-up. A test then runs minutes of controller ticks, keep-alive
windows and deadlines in milliseconds, with no polling of wall time, and in an
order decided by virtual time alone. Only waits made through the clock
(:meth:`FakeClock.sleep`, :meth:`FakeClock.timeout`) are virtual; real I/O and
``asyncio.sleep`` still take real time, and the clock does not wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smss.ports import Clock

#: Loop iterations with nothing ready before the clock jumps (callbacks that
#: schedule callbacks settle first).
_SETTLE_ROUNDS = 3


class _Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """:class:`smss.ports.Clock` on virtual time. ``monotonic`` starts at ``start``;
    ``time`` is the wall clock ``wall_start`` seconds plus the same advance."""

    def __init__(
        self, start: float = 0.0, wall_start: float = 1_700_000_000.0, *, autojump: bool = False
    ) -> None:
        self._mono = float(start)
        self._offset = float(wall_start) - self._mono
        self.autojump = autojump
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._driver: asyncio.Task[None] | None = None

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._offset

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (>= 0), firing every wake-up now due;
        returns the new monotonic time."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a clock only moves forward: advance({seconds})")
        target = self._mono + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            self._mono = max(self._mono, when)
            if not timer.cancelled:
                timer.callback()
        self._mono = target
        return self._mono

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self._mono + max(delay, 0.0), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        if self.autojump and (self._driver is None or self._driver.done()):
            with contextlib.suppress(RuntimeError):  # no running loop: advance() drives it
                self._driver = asyncio.get_running_loop().create_task(self._drive())
        return timer

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        timer = self.call_later(seconds, wake)
        try:
            await fut
        finally:
            timer.cancel()

    def timeout(self, seconds: float) -> contextlib.AbstractAsyncContextManager[object]:
        return self._timeout(seconds)

    @contextlib.asynccontextmanager
    async def _timeout(self, seconds: float) -> AsyncIterator[object]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as cm:
            timer = self.call_later(seconds, lambda: cm.reschedule(loop.time()))
            try:
                yield cm
            finally:
                timer.cancel()

    async def _drive(self) -> None:
        """Jump to the next wake-up each time the loop has nothing else to run."""
        loop = asyncio.get_running_loop()
        while True:
            settled = 0
            while settled < _SETTLE_ROUNDS:
                await asyncio.sleep(0)
                settled = 0 if getattr(loop, "_ready", None) else settled + 1
            while self._timers and self._timers[0][2].cancelled:
                heapq.heappop(self._timers)
            if not self._timers:
                return
            self.advance(max(0.0, self._timers[0][0] - self._mono))


if TYPE_CHECKING:  # FakeClock satisfies the port (checked by mypy, never run)
    _check: Clock = FakeClock()
