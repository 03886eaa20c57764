"""The live side of the tiers of readiness: the reconcile's tier decisions, applied.

:func:`~smss.control.reconcile.reconcile` decides, purely, what a function with no
instance should hold (``step_to``) and how many spares its template keeps
(``spares``); the simulator applies that to its virtual node
(:mod:`smss.sim.readiness`), and the controller hands it to a :class:`TierKeeper`,
which applies it through the :class:`~smss.ports.TierBackend` port and keeps, per
function, what it holds:

* **holds** - what the function holds of its own (``standby``: its template,
  ``resident``: its weights), read back from the backend at every tick (a weight
  store's budget may evict, a template may die), and its *claim* on its runtime's
  zygote: ``cold`` while it claims it (it started, or stepped to cold or more),
  ``no_runtime`` once it stepped below. That is the ``holds`` the reconcile sees;
* **steps** run as tasks of the controller's task group; while one runs the function
  is taken to hold the tier stepped to (no second step is asked for). A failed build
  is logged and no build ahead of demand is tried again for ``RETRY_BUILD_S`` (a
  start, which builds too, still may: its failures have the controller's back-off);
* **runtimes** - after every function was reconciled, a zygote of a runtime that no
  function claims, and that no function is starting or running on, is stopped
  (:func:`~smss.control.tiers.runtime_wanted`);
* **metering** - what the node keeps resident (:meth:`TierBackend.readings`: templates,
  spares, segments, zygotes, the platform's own process) is held in the
  :class:`~smss.control.metering.Meter`, each under its owner, so that standby memory
  and overhead are metered as they are measured.

Every method but the step tasks is synchronous and does no I/O beyond the port's
in-memory answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smss.control.metering import Meter
from smss.control.reconcile import Commands
from smss.control.tiers import Tier, runtime_wanted
from smss.errors import Conflict
from smss.ports import TierBackend
from smss.spec import FunctionSpec

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], object]
#: After a build ahead of demand failed, how long until the next is tried.
RETRY_BUILD_S = 30.0


@dataclass
class _Function:
    runtime: str
    holds: Tier = Tier.NO_RUNTIME
    claims: bool = False
    stepping: bool = False
    spares: int = 1
    #: When a build ahead of demand last failed (-inf: never).
    failed_at: float = float("-inf")


class TierKeeper:
    """What each function keeps resident, stepped as the reconcile decides (module
    docstring). ``spawn`` runs a coroutine in the controller's task group; ``now`` is
    the controller's clock (what a step releases is metered no more from its end)."""

    def __init__(
        self, backend: TierBackend, meter: Meter, spawn: Spawn, now: Callable[[], float] | None = None
    ) -> None:
        self._backend = backend
        self._meter = meter
        self._spawn = spawn
        self._now = now
        self._functions: dict[str, _Function] = {}
        self._metered: dict[str, tuple[str, float]] = {}
        self._stopping: set[str] = set()

    # ------------------------------------------------------------ registry

    def track(self, spec: FunctionSpec) -> None:
        """``spec``'s function is deployed (again): what it holds is read back."""
        fn = self._functions.get(spec.name)
        if fn is None or fn.runtime != spec.runtime:
            self._functions[spec.name] = _Function(spec.runtime)
        self.refresh()

    def forget(self, name: str) -> None:
        self._functions.pop(name, None)

    def holds(self, name: str) -> Tier:
        """What the function holds besides instances, as the reconcile sees it."""
        fn = self._functions.get(name)
        return Tier.NO_RUNTIME if fn is None else fn.holds

    def tier(self, name: str) -> Tier:
        """The tier a start of the function would begin from now (for status)."""
        fn = self._functions.get(name)
        if fn is None:
            return Tier.NO_RUNTIME
        if fn.holds >= Tier.RESIDENT:
            return fn.holds
        return Tier.COLD if fn.runtime in self._backend.runtimes() else Tier.NO_RUNTIME

    def started(self, name: str) -> None:
        """An instance of it started: it holds its template and claims its runtime."""
        fn = self._functions.get(name)
        if fn is not None:
            fn.holds, fn.claims = Tier.STANDBY, True

    # ------------------------------------------------------------ each tick

    def refresh(self) -> None:
        """Read back what every function holds (those not stepping)."""
        held = self._backend.holdings()
        running = set(self._backend.runtimes())
        for name, fn in self._functions.items():
            if fn.stepping:
                continue
            own = held.get(name)
            if own is not None:
                fn.holds, fn.claims = own, True
            else:
                fn.holds = Tier.COLD if fn.claims and fn.runtime in running else Tier.NO_RUNTIME

    def apply(self, spec: FunctionSpec, artifact_dir: Path, commands: Commands) -> None:
        """The tier part of one function's reconcile."""
        fn = self._functions.get(spec.name)
        if fn is None:
            return
        if commands.spares != fn.spares:
            fn.spares = commands.spares
            self._spawn(self._set_spares(spec.name, commands.spares))
        to = commands.step_to
        if to is None or fn.stepping:
            return
        if to > fn.holds and self._now is not None and self._now() < fn.failed_at + RETRY_BUILD_S:
            return
        fn.stepping = True
        fn.holds, fn.claims = to, to >= Tier.COLD
        self._spawn(self._step(fn, spec, artifact_dir, to))

    def settle_runtimes(self, busy: Iterable[str]) -> None:
        """Stop the zygote of every runtime no function wants: none claims it, steps,
        or has an instance ready or starting (``busy`` names those with one)."""
        busy = set(busy)
        wanted: dict[str, list[Tier]] = {}
        for name, fn in self._functions.items():
            claim = (
                Tier.WARM if (name in busy or fn.stepping) else (fn.holds if fn.claims else Tier.NO_RUNTIME)
            )
            wanted.setdefault(fn.runtime, []).append(claim)
        for runtime in self._backend.runtimes():
            if not runtime_wanted(wanted.get(runtime, [])) and runtime not in self._stopping:
                self._stopping.add(runtime)
                self._spawn(self._stop_runtime(runtime))

    def meter(self, now: float) -> None:
        """Hold what the node keeps resident, as last measured, in the meter."""
        seen: dict[str, tuple[str, float]] = {}
        for r in self._backend.readings():
            seen[r.key] = (r.owner, r.mb)
            if self._metered.get(r.key) != seen[r.key]:
                self._meter.hold(r.key, r.owner, r.mb, now)
        for key, (owner, _) in self._metered.items():
            if key not in seen:
                self._meter.hold(key, owner, 0.0, now)
        self._metered = seen

    async def force(self, spec: FunctionSpec, artifact_dir: Path, to: Tier, busy: Iterable[str]) -> None:
        """Step ``spec``'s function (with no instance) to ``to`` now and wait for it;
        ``no_runtime`` also stops its runtime's zygote, which ends the templates of the
        other functions of the runtime (none of which may be in ``busy``)."""
        fn = self._functions.get(spec.name)
        if fn is None:
            return
        if to is Tier.NO_RUNTIME:
            users = [n for n in busy if n in self._functions and self._functions[n].runtime == fn.runtime]
            if users:
                raise Conflict(f"the {fn.runtime} runtime has instances ({', '.join(sorted(users))})")
        fn.stepping = True
        fn.holds, fn.claims = to, to >= Tier.COLD
        try:
            await self._backend.step(spec, artifact_dir, to)
            if to is Tier.NO_RUNTIME:
                await self._backend.stop_runtime(fn.runtime)
        finally:
            fn.stepping = False
            self._settled()

    def _settled(self) -> None:
        """A step ended: read back what is held, and meter it from now."""
        self.refresh()
        if self._now is not None:
            self.meter(self._now())

    # ------------------------------------------------------------ effects

    async def _step(self, fn: _Function, spec: FunctionSpec, artifact_dir: Path, to: Tier) -> None:
        try:
            await self._backend.step(spec, artifact_dir, to)
            log.info("%s stepped to %s", spec.name, to.label)
        except Exception as e:
            if self._now is not None:
                fn.failed_at = self._now()
            log.warning("%s could not step to %s: %s", spec.name, to.label, getattr(e, "message", e))
        finally:
            fn.stepping = False
            self._settled()

    async def _set_spares(self, name: str, spares: int) -> None:
        try:
            await self._backend.set_spares(name, spares)
        except Exception as e:
            log.warning("%s: could not set its spares to %d: %s", name, spares, getattr(e, "message", e))

    async def _stop_runtime(self, runtime: str) -> None:
        try:
            await self._backend.stop_runtime(runtime)
        finally:
            self._stopping.discard(runtime)
            self._settled()
