"""A gateway's routing on a cluster node: its own dispatchers, fed by the controller's view.

Every node's gateway routes requests itself, with the same
:class:`~smss.control.dispatcher.FunctionDispatcher` the controller uses (queue,
retries, deadlines, concurrency limits), over the instances the controller's
:class:`~smss.cluster.view.ClusterView` lists. :meth:`Edge.apply` brings the
dispatchers in line with a view: a new function gets a dispatcher (a redeployed one a
fresh one, the old one closed), a new instance a channel (a Unix socket on this node,
else TCP through its node's relay: the same frames, raw tensor bytes), an instance
being stopped is drained, one gone is dropped at once and its channel closed, so its
requests in flight are retried elsewhere (idempotent functions) or answered 503. A
start failure the controller reports fails this gateway's waiting requests as it does
the controller's.

Routing is by proximity (:func:`smss.control.router.choose_near`): this node's
instances first, then the nearest by the RTTs the agents measured, yielding to a
farther one when the near one is much busier.

The gateway reports its load (:class:`~smss.control.gateways.GatewayReport`) a few
times a second, and at once when a request finds no free instance, so the controller
scales on the demand of every gateway. Guarantees: a request never waits longer than
its deadline here; an instance the view no longer lists takes no new request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from smss.app.platform import Answer, Described
from smss.cluster.reach import Reach
from smss.cluster.view import ClusterView, FunctionEntry
from smss.config import ServingSettings
from smss.control.dispatcher import DispatchHooks, FunctionDispatcher, Slot
from smss.control.gateways import FunctionLoad, GatewayReport, InstanceLoad
from smss.control.router import Proximity
from smss.errors import InstanceLost, NotFound, StartFailed
from smss.ports import Clock, InstanceInfo, Tensors
from smss.spec import internal_name, public_name

log = logging.getLogger(__name__)

_PLATFORMS = {"torch": "pytorch", "onnx": "onnxruntime", "python": "python"}
#: Reports at most this often while load changes; at least every ``heartbeat_s``.
MIN_REPORT_INTERVAL_S = 0.02

SendReport = Callable[[GatewayReport], Awaitable[None]]


@dataclass
class _Function:
    entry: FunctionEntry
    dispatcher: FunctionDispatcher
    arrivals: int = 0
    started: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    connecting: set[str] = field(default_factory=set)
    #: The start failure last applied (message, back-off), so each is applied once.
    applied_error: tuple[str | None, float | None] = (None, 0.0)

    @property
    def name(self) -> str:
        return self.entry.record.spec.name

    def listed(self) -> dict[str, bool]:
        """Instance id -> draining, as the latest view lists them."""
        return {e.info.id: e.draining for e in self.entry.instances}


class Edge:
    def __init__(
        self,
        node: str,
        gateway: str,
        clock: Clock,
        serving: ServingSettings,
        send_report: SendReport,
        *,
        heartbeat_s: float = 0.5,
    ) -> None:
        self.node = node
        self.gateway = gateway
        self._clock = clock
        self._serving = serving
        self._send_report = send_report
        self._heartbeat_s = heartbeat_s
        self.view = ClusterView()
        self._fns: dict[str, _Function] = {}
        self._dirty = asyncio.Event()
        self._seq = 0
        self._group: asyncio.TaskGroup | None = None
        self._proximity = Proximity(here=node)
        self._reach = Reach(node, write_timeout_s=serving.write_timeout_s)

    # ------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Edge]:
        async with asyncio.TaskGroup() as group:
            self._group = group
            reporter = group.create_task(self._report_loop())
            try:
                yield self
            finally:
                reporter.cancel()
                for fn in list(self._fns.values()):
                    self._close_function(fn, "the gateway is shutting down")
                self._group = None

    def _spawn(self, coro: Awaitable[None]) -> None:
        if self._group is None:
            if asyncio.iscoroutine(coro):
                coro.close()
            return
        self._group.create_task(_guarded(coro))

    # ------------------------------------------------------------ the view

    def apply(self, view: ClusterView) -> None:
        """Bring the dispatchers in line with ``view`` (see the module docstring)."""
        self.view = view
        self._reach.relays = {n.node: n.relay for n in view.nodes}
        self._reach.secret = view.secret
        row = view.rtt_ms.get(self.node, {})
        self._proximity = Proximity(here=self.node, rtt_s={n: ms / 1000 for n, ms in row.items()})
        wanted = {f.record.spec.name: f for f in view.functions}
        for name, fn in list(self._fns.items()):
            entry = wanted.get(name)
            if entry is None:
                self._close_function(fn, f"model {name!r} was deleted")
                del self._fns[name]
            elif entry.record.generation != fn.entry.record.generation or entry.record != fn.entry.record:
                self._close_function(fn, f"model {name!r} was redeployed")
                del self._fns[name]
        for name, entry in wanted.items():
            known = self._fns.get(name)
            fn = known if known is not None else self._new_function(entry)
            self._fns[name] = fn
            fn.entry = entry
            self._sync_instances(fn)
            self._sync_errors(fn)
        self._dirty.set()

    def _new_function(self, entry: FunctionEntry) -> _Function:
        fn: _Function

        def lost(slot: Slot, reason: str) -> None:
            log.info("instance %s lost here (%s)", slot.info.id, reason)
            fn.lost.append(slot.info.id)
            self._spawn(slot.channel.close())
            self._dirty.set()

        def count(table: dict[str, int]) -> Callable[[str], None]:
            def bump(iid: str) -> None:
                table[iid] = table.get(iid, 0) + 1

            return bump

        started: dict[str, int] = {}
        finished: dict[str, int] = {}

        def arrived() -> None:
            fn.arrivals += 1

        hooks = DispatchHooks(
            on_arrival=arrived,
            on_demand_change=lambda _demand: self._dirty.set(),
            on_start=count(started),
            on_finish=count(finished),
            on_lost=lost,
        )
        dispatcher = FunctionDispatcher(
            entry.record.spec,
            self._clock,
            self._serving,
            self._dirty.set,
            hooks=hooks,
            proximity=lambda: self._proximity,
        )
        fn = _Function(entry, dispatcher, started=started, finished=finished)
        return fn

    def _sync_instances(self, fn: _Function) -> None:
        d = fn.dispatcher
        listed = fn.listed()
        for iid in list(d.slots):
            if iid not in listed:
                slot = d.remove(iid)
                if slot is not None:
                    self._spawn(slot.channel.close())  # its requests fail over to others
            elif listed[iid]:
                d.drain(iid)
        for e in fn.entry.instances:
            iid = e.info.id
            if e.draining or iid in d.slots or iid in fn.connecting:
                continue
            fn.connecting.add(iid)
            self._spawn(self._connect(fn, e.info))

    def _sync_errors(self, fn: _Function) -> None:
        e = fn.entry
        d = fn.dispatcher
        d.waiting_for = e.waiting_for
        applied = (e.start_error, e.backoff_s)
        if applied == fn.applied_error:
            return
        fn.applied_error = applied
        if e.start_error is None:
            d.start_error = None
            d.retry_starts()
        elif not d.slots:
            d.start_failed(StartFailed(e.start_error), float("inf") if e.backoff_s is None else e.backoff_s)

    async def _connect(self, fn: _Function, info: InstanceInfo) -> None:
        try:
            channel = await self._reach(info)
        except InstanceLost as e:
            fn.connecting.discard(info.id)
            log.warning("cannot reach instance %s: %s", info.id, e.message)
            fn.lost.append(info.id)
            self._dirty.set()
            return
        fn.connecting.discard(info.id)
        if self._fns.get(fn.name) is not fn or fn.listed().get(info.id, True):
            await channel.close()  # gone, draining, or redeployed while connecting
            return
        fn.dispatcher.add(info, channel)
        self._dirty.set()

    def _close_function(self, fn: _Function, reason: str) -> None:
        fn.dispatcher.close(reason)
        for iid in list(fn.dispatcher.slots):
            slot = fn.dispatcher.remove(iid)
            if slot is not None:
                self._spawn(slot.channel.close())

    # ------------------------------------------------------------ reports

    def report(self) -> GatewayReport:
        """This gateway's load now (see :mod:`smss.control.gateways`); each lost instance
        is reported once."""
        now = self._clock.monotonic()
        self._seq += 1
        functions = []
        for fn in self._fns.values():
            d = fn.dispatcher
            instances = []
            for iid in sorted(set(fn.started) | set(d.slots)):
                slot = d.slots.get(iid)
                started, finished = fn.started.get(iid, 0), fn.finished.get(iid, 0)
                if slot is not None:
                    idle = None if slot.in_flight or slot.idle_since is None else now - slot.idle_since
                    instances.append(InstanceLoad(iid, slot.in_flight, idle, started, finished))
                else:  # gone from rotation: what it held is still finishing
                    instances.append(InstanceLoad(iid, max(0, started - finished), None, started, finished))
                    if started <= finished:
                        fn.started.pop(iid, None)
                        fn.finished.pop(iid, None)
            functions.append(
                FunctionLoad(
                    fn.name,
                    fn.entry.record.generation,
                    d.queued,
                    fn.arrivals,
                    tuple(instances),
                    tuple(fn.lost),
                )
            )
            fn.lost.clear()
        return GatewayReport(self.gateway, self.node, self._seq, tuple(functions))

    async def _report_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with self._clock.timeout(self._heartbeat_s):
                    await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._send_report(self.report())
            except Exception as e:  # the controller is away: report again next round
                log.warning("could not report to the controller: %s", e)
                await self._clock.sleep(self._heartbeat_s)
            await self._clock.sleep(MIN_REPORT_INTERVAL_S)

    # ------------------------------------------------------------ what the inference routes ask

    def routes_locally(self, name: str) -> bool:
        """Whether requests for ``name`` are served here (a function), not by the controller."""
        return name in self._fns

    def _function(self, name: str, version: str | None) -> _Function:
        fn = self._fns.get(name) if public_name(name)[1] is None else None
        if fn is None:
            raise NotFound(f"unknown model {name!r}")
        if version is not None and version != fn.entry.record.spec.version:
            # another version lives beside the plain name (see smss.app.versions); the
            # unversioned route reaches the plain name here (no canary split at the edge)
            fn = self._fns.get(internal_name(name, version))
            if fn is None:
                raise NotFound(f"model {name!r} has no version {version!r}")
        return fn

    def describe(self, name: str, version: str | None = None) -> Described:
        spec = self._function(name, version).entry.record.spec
        spec = msgspec.structs.replace(spec, name=public_name(spec.name)[0])
        return Described(spec, _PLATFORMS[spec.runtime], workflow=False)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self._function(name, version).dispatcher.ready

    async def infer_named(
        self,
        name: str,
        version: str | None,
        inputs: Tensors,
        outputs: tuple[str, ...],
        timeout_s: float,
        *,
        session: str | None = None,
        idempotency_key: str | None = None,
        retry_after_s: float = 1.0,
    ) -> Answer:
        fn = self._function(name, version)
        wanted = outputs or tuple(t.name for t in fn.entry.record.spec.outputs)
        deadline = self._clock.monotonic() + timeout_s
        result, served = await fn.dispatcher.infer_traced(inputs, wanted, deadline)
        return Answer(result, served.cold, served, version=fn.entry.record.spec.version)


async def _guarded(coro: Awaitable[None]) -> None:
    try:
        await coro
    except Exception:
        log.exception("a gateway task failed")
