"""A :class:`smss.ports.TierBackend` that keeps the tiers of readiness in memory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from smss.errors import StartFailed
from smss.inventory import Tier
from smss.ports import ResidentReading
from smss.spec import FunctionSpec

if TYPE_CHECKING:
    from smss.ports import TierBackend
    from smss.testing.fakes import FakeBackend


class FakeTiers:
    """What each function holds (``held``: ``standby`` or ``resident``), the runtimes
    whose zygote runs (``running``), every step asked for (``steps``: function, tier),
    spares set (``spares``), runtimes stopped (``stopped``); ``fail_builds``: that many
    next builds raise :class:`StartFailed`. ``readings`` reports
    ``standby_mb`` per template, ``weights_mb`` per function holding weights and
    ``runtime_mb`` per running zygote. With a ``backend``, a release of a function that
    has an instance running there is refused (as the node refuses it)."""

    def __init__(
        self,
        backend: FakeBackend | None = None,
        *,
        standby_mb: float = 10.0,
        weights_mb: float = 5.0,
        runtime_mb: float = 100.0,
    ) -> None:
        self._backend = backend
        self.standby_mb, self.weights_mb, self.runtime_mb = standby_mb, weights_mb, runtime_mb
        self.held: dict[str, Tier] = {}
        self.running: set[str] = set()
        self.steps: list[tuple[str, Tier]] = []
        self.spares: dict[str, int] = {}
        self.stopped: list[str] = []
        self.fail_builds = 0
        self._runtime_of: dict[str, str] = {}

    def holdings(self) -> dict[str, Tier]:
        return dict(self.held)

    def runtimes(self) -> list[str]:
        return sorted(self.running)

    async def step(self, spec: FunctionSpec, artifact_dir: Path, to: Tier) -> None:
        self.steps.append((spec.name, to))
        self._runtime_of[spec.name] = spec.runtime
        if to >= Tier.STANDBY:
            if self.fail_builds > 0:
                self.fail_builds -= 1
                raise StartFailed(f"model {spec.name!r} failed to load")
            self.running.add(spec.runtime)
            self.held[spec.name] = Tier.STANDBY
            return
        if self._backend is not None and any(i.function == spec.name for i in self._backend.running.values()):
            return
        if to == Tier.RESIDENT:
            self.held[spec.name] = Tier.RESIDENT
        else:
            self.held.pop(spec.name, None)

    async def set_spares(self, function: str, spares: int) -> None:
        self.spares[function] = spares

    async def stop_runtime(self, runtime: str) -> bool:
        if runtime not in self.running:
            return False
        self.running.discard(runtime)
        self.stopped.append(runtime)
        for name in [
            n for n, t in self.held.items() if t == Tier.STANDBY and self._runtime_of.get(n) == runtime
        ]:
            del self.held[name]  # templates die with their zygote; weights stay in the store
        return True

    def readings(self) -> list[ResidentReading]:
        out = []
        for name, tier in self.held.items():
            if tier >= Tier.STANDBY:
                out.append(ResidentReading(f"template:{name}", name, self.standby_mb))
            out.append(ResidentReading(f"weights:{name}", name, self.weights_mb))
        out += [ResidentReading(f"zygote:{r}", f"runtime:{r}", self.runtime_mb) for r in self.running]
        return out


if TYPE_CHECKING:  # it satisfies the port (checked by mypy, never run)
    _tiers: TierBackend = FakeTiers()
