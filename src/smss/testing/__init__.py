"""Fakes for tests and the simulator, each typed against a Protocol in ``smss.ports``."""

from smss.testing.clock import FakeClock
from smss.testing.registry import MemoryRegistry

__all__ = ["FakeClock", "MemoryRegistry"]
