"""A virtual clock for tests and the simulator: time moves only when told to."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smss.ports import Clock


class FakeClock:
    """:class:`smss.ports.Clock` on virtual time. ``monotonic`` starts at ``start``;
    ``time`` is the wall clock ``wall_start`` seconds plus the same advance."""

    def __init__(self, start: float = 0.0, wall_start: float = 1_700_000_000.0) -> None:
        self._mono = float(start)
        self._offset = float(wall_start) - self._mono

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._offset

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (>= 0); returns the new monotonic time."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a clock only moves forward: advance({seconds})")
        self._mono += seconds
        return self._mono


if TYPE_CHECKING:  # FakeClock satisfies the port (checked by mypy, never run)
    _check: Clock = FakeClock()
