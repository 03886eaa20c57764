"""Admission, queueing and routing of requests for one function, in the gateway.

A request takes a free slot on a ready instance (chosen by
:func:`smss.control.router.choose`), or waits in a bounded FIFO queue until a
slot frees or a new instance is ready. Guarantees:

* an instance never holds more than its spec's ``concurrency`` requests;
* a full queue answers :class:`Overloaded` (429) at once; a request still
  queued at its deadline gets :class:`Unavailable` (503), both with Retry-After;
* a request whose instance dies mid-flight is retried once on another
  instance when the function is idempotent, else answered 503;
* a request in flight past its deadline gets :class:`DeadlineExceeded` (504),
  and so does one whose caller went away, but the instance's slot stays taken
  until the instance answers it or is lost: the instance is still computing, so
  its concurrency is never exceeded by requests sent behind an abandoned one;
* an instance with a request in flight past that request's deadline plus
  ``stall_grace_s`` is *stalled* (:meth:`FunctionDispatcher.stalled`): the
  controller takes it out of rotation and replaces it, and the requests it held
  are retried or answered 503 as for any lost instance;
* an instance found lost (its connection ended or stopped taking requests) is
  taken out of rotation at once and reported (``DispatchHooks.on_lost``), so the
  controller makes sure its process is gone;
* a request that found no free slot and was then taken by an instance that had
  just become ready is a *cold start* (:attr:`Served.cold`): it waited for that
  instance's start, the simulator's definition too; one that waited only for a
  busy instance to finish is not;
* when starting an instance fails and none is left, queued requests get
  :class:`StartFailed` (503) naming the model, and new ones fail fast while
  the start back-off runs, or for good once the controller gave up starting it;
* on a cluster (a ``proximity`` given) the choice is by proximity and load
  (:func:`smss.control.router.choose_near`): an instance on this gateway's node
  first, then on the node holding the request's data (``near``), then the nearest,
  yielding to a farther one when the near one's queue costs much more than the trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from smss import faults, logcontext
from smss.config import ServingSettings
from smss.control.router import Candidate, Ewma, Proximity, choose, choose_near
from smss.control.scaling import InstanceView
from smss.errors import (
    DeadlineExceeded,
    InstanceDraining,
    InstanceLost,
    NotFound,
    Overloaded,
    SmssError,
    StartFailed,
    Unavailable,
)
from smss.ports import Clock, InstanceChannel, InstanceInfo, Reply, Tensors
from smss.spec import FunctionSpec


@dataclass(frozen=True)
class DispatchHooks:
    """What the controller learns from the data path: arrivals (keep-alive
    policies learn from them) and each request's start and end on an instance
    (metering of busy time and invocations), and every change of its demand, in
    flight plus queued (the autoscaler observes each, as the simulator's does)."""

    on_arrival: Callable[[], None] = lambda: None
    on_demand_change: Callable[[int], None] = lambda _demand: None
    on_start: Callable[[str], None] = lambda _instance: None
    on_finish: Callable[[str], None] = lambda _instance: None
    #: An instance was found lost and taken out of rotation (with why): its process
    #: may still run (stopped, wedged), so whoever started it stops it.
    on_lost: Callable[[Slot, str], None] = lambda _slot, _reason: None


@dataclass(frozen=True)
class Served:
    """Who answered a request, whether it waited for that instance to start, and
    where its time went: ``queued_s`` waiting for a slot (for an instance to start
    or to free one), ``instance_s`` from sending it to the answer's arrival, of
    which ``batch_s`` waiting in the instance for its batch to start and
    ``compute_s`` in predict; the rest of ``instance_s`` is :attr:`transfer_s`."""

    instance: InstanceInfo
    cold: bool
    queued_s: float = 0.0
    instance_s: float = 0.0
    batch_s: float = 0.0
    compute_s: float = 0.0

    @property
    def transfer_s(self) -> float:
        """Frames both ways, the instance's decoding and scheduling: never negative
        (the instance's clock and the gateway's are measured apart)."""
        return max(0.0, self.instance_s - self.batch_s - self.compute_s)


@dataclass(eq=False)
class Slot:
    info: InstanceInfo
    channel: InstanceChannel
    limit: int
    idle_since: float | None
    #: Requests the instance holds, answered or not by it yet (abandoned ones included).
    in_flight: int = 0
    served: int = 0
    draining: bool = False
    #: Requests still on the instance whose callers stopped waiting (deadline, disconnect).
    abandoned: int = 0
    ewma: Ewma = field(default_factory=Ewma)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    #: When each request in flight makes the instance stalled (its deadline plus grace).
    stall_at: dict[int, float] = field(default_factory=dict)

    def view(self) -> InstanceView:
        return InstanceView(self.info.id, self.in_flight, self.idle_since)

    def stalled_since(self) -> float:
        """When the oldest request in flight passed its health deadline (inf: none)."""
        return min(self.stall_at.values(), default=math.inf)


class FunctionDispatcher:
    def __init__(
        self,
        spec: FunctionSpec,
        clock: Clock,
        settings: ServingSettings,
        on_demand: Callable[[], None],
        rng: random.Random | None = None,
        hooks: DispatchHooks | None = None,
        proximity: Callable[[], Proximity] | None = None,
    ) -> None:
        """``proximity``: where this dispatcher routes from, asked at each choice (its
        measured distances change); None: one node, power of two choices alone."""
        self._hooks = hooks or DispatchHooks()
        self._proximity = proximity
        self.spec = spec
        self._clock = clock
        self._settings = settings
        self._on_demand = on_demand
        self._rng = rng or random.Random(0)
        self.slots: dict[str, Slot] = {}
        self._waiters: deque[asyncio.Future[Slot]] = deque()
        #: Waiters handed a slot of an instance that had just become ready (cold starts).
        self._cold: set[asyncio.Future[Slot]] = set()
        self._tokens = itertools.count()
        self.starting = 0
        self.start_error: StartFailed | None = None
        self.backoff_until = 0.0
        self.closed_reason: str | None = None
        #: Why a start it needs is not being made now (no capacity), for the 503 of a
        #: request that waited for it in vain; None: nothing is waiting on capacity.
        self.waiting_for: str | None = None

    # ------------------------------------------------------------ observations

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.slots.values())

    @property
    def demand(self) -> int:
        return self.in_flight + self.queued

    @property
    def ready(self) -> bool:
        """Ready to take requests: an instance serves, or the last start did not fail
        (the next one starts on demand)."""
        return bool(self.slots) or self.start_error is None

    def ready_views(self) -> list[InstanceView]:
        return [s.view() for s in self.slots.values() if not s.draining]

    # ------------------------------------------------------------ requests

    async def infer(
        self, inputs: Tensors, outputs: tuple[str, ...], deadline: float
    ) -> dict[str, np.ndarray]:
        result, _ = await self.infer_traced(inputs, outputs, deadline)
        return result

    async def infer_traced(
        self, inputs: Tensors, outputs: tuple[str, ...], deadline: float, *, near: str | None = None
    ) -> tuple[dict[str, np.ndarray], Served]:
        """Like :meth:`infer`, also naming the instance that answered and whether the
        request waited for it to start. An error raised from an instance carries its
        ``instance`` and ``node`` attributes. ``near``: the node holding the request's
        data (a session's state, a previous stage's output), preferred on a cluster."""
        attempts = 2 if self.spec.idempotent else 1
        self._hooks.on_arrival()
        clock = self._clock
        queued = 0.0
        lost = 0
        # Each refusal by a draining instance takes that instance out of rotation, so
        # the loop ends: on another instance, a start, or the deadline.
        while True:
            asked = clock.monotonic()
            slot, cold = await self._acquire(deadline, near)
            sent = clock.monotonic()
            queued += sent - asked
            try:
                with logcontext.bound(function=self.spec.name, instance=slot.info.id):
                    reply = await self._call(slot, inputs, outputs, deadline)
                took = clock.monotonic() - sent
                return reply.outputs, Served(slot.info, cold, queued, took, reply.queue_s, reply.compute_s)
            except InstanceDraining:
                # Nothing ran: send it elsewhere, idempotent or not. The instance is not
                # replaced: its requests in flight finish, then it exits (see _on_exit).
                self.drain(slot.info.id)
                self._demand_changed()
                continue
            except InstanceLost as e:
                self._lost(slot, e.message)
                lost += 1
                if lost < attempts:
                    continue
                raise _located(
                    Unavailable(
                        f"model {self.spec.name!r}: its instance was lost while serving the request "
                        f"({e.message})",
                        retry_after_s=self._settings.retry_after_s,
                    ),
                    slot.info,
                ) from None
            except TimeoutError:
                raise _located(
                    DeadlineExceeded(f"model {self.spec.name!r} did not answer before the deadline"),
                    slot.info,
                ) from None
            except SmssError as e:
                raise _located(e, slot.info) from None

    async def _call(self, slot: Slot, inputs: Tensors, outputs: tuple[str, ...], deadline: float) -> Reply:
        """The request on ``slot``'s instance, awaited until ``deadline``. The slot is
        given back when the instance has answered: at once when the caller got the
        answer, else (a deadline passed, the caller went away) when it comes."""
        started = self._clock.monotonic()
        token = next(self._tokens)
        slot.stall_at[token] = deadline + self._settings.stall_grace_s
        self._hooks.on_start(slot.info.id)
        answer: asyncio.Future[Reply] | None = None
        try:
            # A timeout, not wait_for: on 3.11 wait_for runs the call in a task of its
            # own, which sends the request only one loop iteration later.
            async with self._clock.timeout(max(deadline - started, 0.001)):
                faults.hit("request.before_dispatch")
                answer = await slot.channel.send(inputs, outputs)
                # shielded: the answer is still coming when this wait ends early
                return await asyncio.shield(answer)
        finally:
            if answer is not None and not answer.done():
                slot.abandoned += 1
                answer.add_done_callback(functools.partial(self._answered_late, slot, token, started))
            else:
                if answer is not None and not answer.cancelled():
                    answer.exception()  # retrieved: its error, if any, was raised or is moot
                self._finish(slot, token, started)

    def _answered_late(self, slot: Slot, token: int, started: float, answer: asyncio.Future[Reply]) -> None:
        slot.abandoned -= 1
        error = None if answer.cancelled() else answer.exception()
        self._finish(slot, token, started)
        if isinstance(error, InstanceLost):
            self._lost(slot, error.message)

    def _finish(self, slot: Slot, token: int, started: float) -> None:
        slot.stall_at.pop(token, None)
        self._hooks.on_finish(slot.info.id)
        self._release(slot, self._clock.monotonic() - started)

    def _lost(self, slot: Slot, reason: str) -> None:
        if self.slots.get(slot.info.id) is slot:
            del self.slots[slot.info.id]
            self._hooks.on_lost(slot, reason)

    async def _acquire(self, deadline: float, near: str | None = None) -> tuple[Slot, bool]:
        """A slot, and whether it came from an instance that became ready while the
        request waited (a cold start)."""
        if self.closed_reason is not None:
            raise NotFound(self.closed_reason)
        slot = self._pick(near)
        if slot is not None:
            self._demand_changed()
            return slot, False
        retry = self._settings.retry_after_s
        now = self._clock.monotonic()
        if self.start_error is not None and not self.slots and now < self.backoff_until:
            left = self.backoff_until - now  # inf: no start will be tried again
            raise StartFailed(
                self.start_error.message, retry_after_s=max(retry, left) if left < math.inf else None
            )
        if self.queued >= self._settings.queue_limit:
            raise Overloaded(f"model {self.spec.name!r} is overloaded: queue full", retry_after_s=retry)
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._demand_changed()
        self._on_demand()
        try:
            with contextlib.suppress(TimeoutError):
                async with self._clock.timeout(max(deadline - now, 0.0)):
                    # shielded: a slot handed over as the deadline passes is kept, not lost
                    await asyncio.shield(waiter)
        except asyncio.CancelledError:
            # The caller went away (a client disconnect): a slot handed over meanwhile
            # goes back, and a waiter nobody awaits must never be handed one.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._free(waiter.result())
            elif not waiter.done():
                waiter.cancel()
                self._demand_changed()
            raise
        finally:
            cold = waiter in self._cold
            self._cold.discard(waiter)
        if waiter.done() and not waiter.cancelled():
            return waiter.result(), cold  # raises the error it was failed with, if any
        waiter.cancel()
        self._demand_changed()
        if self.waiting_for is not None:
            raise Unavailable(f"{self.waiting_for}; the deadline passed", retry_after_s=retry)
        raise Unavailable(
            f"model {self.spec.name!r}: no instance became free before the deadline", retry_after_s=retry
        )

    def _pick(self, near: str | None = None) -> Slot | None:
        live = [s for s in self.slots.values() if not s.draining]
        candidates = [Candidate(s.info.id, s.in_flight, s.limit, s.ewma.value, s.info.node) for s in live]
        if self._proximity is None:
            chosen = choose(candidates, self._rng)
        else:
            where = self._proximity()
            if near is not None:
                where = dataclasses.replace(where, near=near)
            chosen = choose_near(candidates, self._rng, where)
        if chosen is None:
            return None
        slot = self.slots[chosen]
        slot.in_flight += 1
        slot.idle_since = None
        return slot

    def _release(self, slot: Slot, seconds: float) -> None:
        slot.served += 1
        slot.ewma.update(seconds)
        self._free(slot)

    def _free(self, slot: Slot) -> None:
        slot.in_flight -= 1
        if slot.in_flight == 0:
            slot.idle_since = self._clock.monotonic()
            if slot.draining:
                slot.drained.set()
        self._hand_over()
        self._demand_changed()

    def _demand_changed(self) -> None:
        self._hooks.on_demand_change(self.demand)

    def _hand_over(self, fresh: Slot | None = None) -> None:
        """Free slots to the longest-waiting requests; those handed ``fresh`` (an
        instance that has just become ready) are cold starts."""
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            slot = self._pick()
            if slot is None:
                return
            self._waiters.popleft()
            waiter.set_result(slot)
            if slot is fresh:
                self._cold.add(waiter)

    # ------------------------------------------------------------ instances

    def add(self, info: InstanceInfo, channel: InstanceChannel) -> None:
        self.start_error = None
        slot = Slot(info, channel, self.spec.scaling.concurrency, self._clock.monotonic())
        self.slots[info.id] = slot
        self._hand_over(fresh=slot)

    def drain(self, instance_id: str) -> Slot | None:
        slot = self.slots.get(instance_id)
        if slot is not None:
            slot.draining = True
            if slot.in_flight == 0:
                slot.drained.set()
        return slot

    def remove(self, instance_id: str) -> Slot | None:
        return self.slots.pop(instance_id, None)

    def start_failed(self, error: StartFailed, backoff_s: float) -> None:
        """A start failed; the next is tried in ``backoff_s`` (inf: never, until
        :meth:`retry_starts`). Queued requests fail unless an instance may yet serve them."""
        self.start_error = error
        self.backoff_until = self._clock.monotonic() + backoff_s
        if not self.slots and self.starting == 0:
            retry_after = backoff_s if backoff_s < math.inf else None
            self._fail_waiters(StartFailed(error.message, retry_after_s=retry_after))

    @property
    def gave_up(self) -> bool:
        """No start will be tried (the controller gave up after repeated failures)."""
        return self.backoff_until == math.inf

    def retry_starts(self) -> None:
        """End a back-off (or a given-up state): the next start may be tried at once."""
        self.backoff_until = 0.0

    def stalled(self, now: float) -> list[Slot]:
        """Instances in rotation holding a request past its deadline plus ``stall_grace_s``
        (oldest first): the instance stopped answering (a hung predict, a stopped process)."""
        late = [s for s in self.slots.values() if s.stalled_since() <= now]
        return sorted(late, key=Slot.stalled_since)

    def close(self, reason: str) -> None:
        self.closed_reason = reason
        self._fail_waiters(NotFound(reason))

    def _fail_waiters(self, error: SmssError) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        self._demand_changed()


def _located(error: SmssError, info: InstanceInfo) -> SmssError:
    """Attach where an error happened (for the workflow log's error location)."""
    error.instance = info.id  # type: ignore[attr-defined]
    error.node = info.node  # type: ignore[attr-defined]
    return error
