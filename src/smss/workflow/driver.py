"""Driving one run of a workflow: decide (pure :mod:`~smss.workflow.replay`), record,
call, repeat. Part of :mod:`smss.workflow.engine`, which owns the lifecycle.

**Pipelined, optimistic recording.** A driver does not wait for a record to be
durable before acting on it. Each round it queues one append holding what the
round produced (the completions that came back, the starts of the stages they made
ready) and goes on. Every append names the completions it was computed from
(``requires``), and the log writes it only if those are exactly the completions it
recorded (one writer, in order, so they normally are); a result of an attempt
older than the stage's latest start is fenced off (the stage was reassigned to
another process, which recovered the run). The run's end is appended
the same way, and the outputs are returned only once it, and so everything before
it, is durable. A run therefore pays one commit's latency, at its end, not one
per stage.

**When the log disagrees.** An append can be refused: a session's state moved on
under a stateful stage (``state_conflict``), a completion it relied on was refused
(``void``), the stage was reassigned (``fenced``), or another writer recorded the
stage first (a dropped completion). The
driver then stops what it is running, waits for its queued appends, forgets the
session's remembered state, rebuilds the run's view from the log (as recovery does)
and carries on from there: a stage whose completion was refused runs again on what
the log holds, so each stage's effect is still recorded exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smss import faults
from smss.errors import InvalidInput, InvalidSpec, NotFound, Overloaded, SmssError, StorageUnavailable
from smss.ports import AppendResult, CallResult, Clock, EventLog, FunctionCaller, Tensors
from smss.workflow.blobs import decode_tensor, to_blobs
from smss.workflow.events import (
    Event,
    RunCompleted,
    RunFailed,
    RunParked,
    SessionState,
    StageCompleted,
    StageFailed,
    StageScheduled,
    StageStarted,
    StateWrite,
    TensorRefs,
)
from smss.workflow.replay import Dispatch, RunView, apply, next_steps, replay
from smss.workflow.sessions import Key, SessionLocks, SessionStates
from smss.workflow.spec import StageSpec, WorkflowSpec, dependencies

log = logging.getLogger("smss.workflow.engine")

MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: str
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    #: A failed run's last error's type (e.g. ``Overloaded``, ``ModelError``).
    error_type: str | None = None


@dataclass(frozen=True)
class Shared:
    """What every driver of an engine uses."""

    log: EventLog
    caller: FunctionCaller
    clock: Clock
    locks: SessionLocks
    states: SessionStates


class Plan:
    """A workflow's DAG, indexed once per run."""

    def __init__(self, spec: WorkflowSpec) -> None:
        self.spec = spec
        self.by_name = {s.name: s for s in spec.stages}
        self.deps = dependencies(spec)
        self.dependents = {
            s.name: [d for d in spec.stages if s.name in self.deps[d.name]] for s in spec.stages
        }


@dataclass
class Run:
    view: RunView
    plan: Plan
    #: Tensors by blob ref that this process holds (inputs, outputs, state).
    blobs: dict[str, np.ndarray] = field(default_factory=dict)
    #: Appends not yet known durable; the run's end waits for all of them.
    pending: list[asyncio.Future[Any]] = field(default_factory=list)
    #: How the run ended here (or the error that stopped it); None while it runs.
    outcome: RunOutcome | BaseException | None = None
    #: Callers waiting for the outcome (``None`` tells one its wait timed out).
    waiters: set[asyncio.Future[RunOutcome | None]] = field(default_factory=set)

    @property
    def spec(self) -> WorkflowSpec:
        return self.plan.spec

    @property
    def run_id(self) -> str:
        return self.view.run_id

    def finish(self, outcome: RunOutcome | BaseException) -> None:
        """The run's outcome, or the error that stopped it; the first one stands, and
        every waiter has it at once."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        for waiter in self.waiters:
            if waiter.done():
                continue
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

    def result(self) -> RunOutcome:
        """The outcome of a finished run; raises the error that stopped it."""
        assert self.outcome is not None, "the run has not finished"
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@dataclass
class _Prepared:
    """A stage attempt ready to call: its inputs and its start records."""

    stage: StageSpec
    attempt: int
    inputs: dict[str, np.ndarray]
    starting: list[Event]
    blobs: dict[str, bytes]
    #: The session this attempt writes (its lock is held), and the state it read.
    key: Key | None = None
    base: SessionState | None = None
    state_names: tuple[str, ...] = ()


@dataclass
class _Result:
    prepared: _Prepared
    event: StageCompleted | StageFailed
    blobs: dict[str, bytes] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    state: StateWrite | None = None


@dataclass
class _Batch:
    """What one round appends: one request to the log."""

    events: list[Event] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)
    state: StateWrite | None = None
    remember: tuple[Key, SessionState, dict[str, np.ndarray]] | None = None
    release: list[Key] = field(default_factory=list)


class _Diverged(Exception):
    """The log refused an append of this run: rebuild the view from the log."""


class Driver:
    def __init__(self, shared: Shared, run: Run) -> None:
        self._s = shared
        self._run = run
        self._calls: dict[str, asyncio.Task[_Result]] = {}
        self._waiting: dict[str, asyncio.Task[None]] = {}
        self._turns: dict[str, Dispatch] = {}  # what each waiting stage will run
        self._ready: list[_Prepared] = []  # started (records queued), not yet called
        self._held: dict[str, Key] = {}  # stage -> session whose lock it holds
        self._batch = _Batch()
        self._alarm: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Appends to make once the current step has reached its next await (``later``).
        self._later: list[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]]] = []

    # ------------------------------------------------------------ the loop

    async def drive(self) -> None:
        run = self._run
        try:
            while True:
                try:
                    if await self._round():
                        return
                except _Diverged:
                    await self._resync()
        except asyncio.CancelledError:
            await self._stop_all(discard=True)
            await asyncio.gather(*run.pending, return_exceptions=True)
            raise
        except Exception as e:
            await self._stop_all(discard=True)
            await asyncio.gather(*run.pending, return_exceptions=True)
            # A run that cannot continue (the log failed) stops; the engine and other runs go on.
            log.error("run %s stopped: %s", run.run_id, e, exc_info=not isinstance(e, SmssError))
            run.finish(e if isinstance(e, SmssError) else StorageUnavailable(str(e)))

    async def _round(self) -> bool:
        """One decision and what follows from it; True once the run has ended."""
        run = self._run
        if self._alarm.done():
            raise _Diverged
        if run.view.terminal is not None:
            # Another process finished the run (this one's attempt was fenced off): what
            # the log holds is the outcome.
            await self._stop_all(discard=False)
            run.finish(outcome_of(run.view, run.blobs, self._s.log))
            return True
        running = self._calls.keys() | self._waiting.keys() | {p.stage.name for p in self._ready}
        steps = next_steps(run.view, run.spec, running=running)
        if steps.complete is not None or steps.fail is not None:
            await self._stop_all(discard=False)  # a failed run's other branches stop
            end: RunCompleted | RunFailed
            if steps.complete is not None:
                end = RunCompleted(steps.complete)
            else:
                f = steps.fail
                assert f is not None
                end = RunFailed(f.stage, f.error_type, f.message)
            self._batch.events.append(end)
            self._flush()
            if not await self._settle():
                raise _Diverged
            apply(run.view, end)
            if run.outcome is None:
                run.finish(outcome_of(run.view, run.blobs, self._s.log))
            return True
        for d in steps.dispatch:
            self._dispatch(d)
        self._flush()
        if len(self._ready) == 1 and not self._calls and not self._waiting:
            # One stage to run and nothing else in flight (a chain): call it in this task.
            self._record(await self._call(self._ready.pop()))
            return False
        for prepared in self._ready:
            self._calls[prepared.stage.name] = asyncio.create_task(self._call(prepared))
        self._ready.clear()
        if not self._calls and not self._waiting:
            raise StorageUnavailable(f"run {run.run_id} is stuck: nothing to dispatch")
        waits: list[asyncio.Future[Any]] = [*self._calls.values(), *self._waiting.values(), self._alarm]
        finished, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for name in [n for n, t in self._waiting.items() if t in finished]:
            self._waiting.pop(name).result()
            self._start(self._prepare(self._turns.pop(name)))
        for name in [n for n, t in self._calls.items() if t in finished]:
            self._record(self._calls.pop(name).result())
        return False

    def _dispatch(self, d: Dispatch) -> None:
        stage = self._run.plan.by_name[d.stage]
        key = self._session_key(stage)
        failures = len(self._run.view.stage(d.stage).failures)
        locked = False
        if failures == 0 and (key is None or (locked := self._s.locks.try_acquire(key))):
            if key is not None:
                self._held[d.stage] = key
            if key is None or self._s.states.ready(key):
                self._start(self._prepare(d))
                return
        # A retry waits its back-off; a stateful stage waits for its session, and for
        # the session's writes in flight when it must read the state from the log.
        delay = min(MAX_BACKOFF_S, 0.05 * 2**failures) if failures else 0.0
        self._turns[d.stage] = d
        self._waiting[d.stage] = asyncio.create_task(self._wait_turn(d.stage, key, delay, locked))

    async def _wait_turn(self, stage: str, key: Key | None, delay: float, locked: bool) -> None:
        if delay:
            await asyncio.sleep(delay)
        if key is not None:
            if not locked:
                await self._s.locks.acquire(key)
                self._held[stage] = key
            if not self._s.states.ready(key):
                await self._s.states.settle(key)

    def _start(self, prepared: _Prepared) -> None:
        for event in prepared.starting:
            apply(self._run.view, event)
        self._add(prepared.starting, prepared.blobs)
        self._ready.append(prepared)  # called by the round

    def _record(self, result: _Result) -> None:
        run = self._run
        key = self._held.pop(result.prepared.stage.name, None)
        writes = key is not None and result.state is not None and isinstance(result.event, StageCompleted)
        if writes and self._batch.state is not None:
            self._flush()  # one state write per append, with its own completion
        apply(run.view, result.event)
        run.blobs.update(result.arrays)
        self._add([result.event], result.blobs)
        if key is None:
            return
        if writes and result.state is not None:
            self._batch.state = result.state
            new = SessionState(result.state.expected + 1, dict(result.state.tensors))
            arrays = {ref: run.blobs[ref] for ref in new.tensors.values()}
            self._batch.remember = (key, new, arrays)
        self._batch.release.append(key)

    # ------------------------------------------------------------ one stage attempt

    def _session_key(self, stage: StageSpec) -> Key | None:
        view = self._run.view
        if stage.state and view.started.session is not None and view.started.replay_of is None:
            return (self._run.spec.name, view.started.session)
        return None

    def _prepare(self, d: Dispatch) -> _Prepared:
        run = self._run
        stage = run.plan.by_name[d.stage]
        for dependent in run.plan.dependents[stage.name]:
            self._s.caller.prewarm(dependent.function)
        refs = self._input_refs(stage)
        inputs = self._load(refs)
        prepared = _Prepared(stage, d.attempt, inputs, [], {})
        state_version: int | None = None
        if stage.state:
            fn = self._s.caller.spec_of(stage.function)
            names = tuple(t.name for t in fn.inputs if t.name not in stage.inputs)
            key = self._held.get(stage.name)
            replayed = self._replayed_state(stage) if run.view.started.replay_of is not None else None
            stored: TensorRefs = {}
            if replayed is not None:  # a replay re-runs on the logged state and leaves the session alone
                stored = replayed
            elif key is not None:
                remembered = self._s.states.read(key)
                run.blobs.update(remembered.arrays)
                prepared.key, prepared.base, prepared.state_names = key, remembered.state, names
                stored = remembered.state.tensors
                state_version = remembered.state.version
            else:
                state_version = 0
            fresh = {}
            for name in names:
                decl = fn.input(name)
                if name in stored:
                    refs[name] = stored[name]
                elif decl is not None:  # the session's first turn: zero state
                    fresh[name] = decl.zeros()
            inputs.update(self._load({n: stored[n] for n in names if n in stored}))
            fresh_refs, prepared.blobs = to_blobs(fresh)
            inputs.update(fresh)
            refs.update(fresh_refs)
            run.blobs.update({fresh_refs[n]: a for n, a in fresh.items()})
        prepared.starting = [
            StageScheduled(stage.name, d.attempt),
            StageStarted(stage.name, d.attempt, stage.function, refs, state_version),
        ]
        return prepared

    async def _admitted(self, stage: StageSpec, inputs: Tensors, outputs: tuple[str, ...]) -> CallResult:
        """The stage's call. A call its function refused at admission (queue full:
        nothing ran, so no effect to repeat) is tried again after a growing back-off
        (at most :data:`MAX_BACKOFF_S`) within the stage's ``timeout_s``, rather than
        spending one of the stage's retries, or failing the run, on overload."""
        clock = self._s.clock
        deadline = clock.monotonic() + stage.timeout_s
        refusals = 0
        while True:
            left = deadline - clock.monotonic()
            try:
                return await self._s.caller.call(stage.function, inputs, outputs, max(left, 0.001))
            except Overloaded:
                refusals += 1
                wait = min(0.05 * 2**refusals, MAX_BACKOFF_S)
                if clock.monotonic() + wait >= deadline:
                    raise
                await clock.sleep(wait)

    async def _call(self, p: _Prepared) -> _Result:
        stage = p.stage
        fn = self._s.caller.spec_of(stage.function)
        t0 = self._s.clock.monotonic()
        try:
            faults.hit("stage.before_call")
            result: CallResult = await self._admitted(stage, p.inputs, tuple(t.name for t in fn.outputs))
        except Exception as e:
            if not isinstance(e, SmssError):
                log.exception("run %s stage %s: unexpected error", self._run.run_id, stage.name)
            failed = StageFailed(
                stage.name,
                p.attempt,
                type(e).__name__,
                e.message if isinstance(e, SmssError) else str(e) or type(e).__name__,
                getattr(e, "traceback", ""),
                getattr(e, "instance", ""),
                getattr(e, "node", ""),
                retryable=not isinstance(e, InvalidInput | InvalidSpec | NotFound),
            )
            return _Result(p, failed)
        faults.hit("stage.after_effect")  # done, not yet recorded
        out_refs, blobs = to_blobs(result.outputs)
        state = None
        if p.key is not None and p.base is not None:
            new_state = {n: out_refs[n] for n in p.state_names if n in out_refs}
            state = StateWrite(p.key[0], p.key[1], p.base.version, new_state, base=dict(p.base.tensors))
        completed = StageCompleted(
            stage.name,
            p.attempt,
            out_refs,
            result.instance,
            result.node,
            None if state is None else state.expected + 1,
            (self._s.clock.monotonic() - t0) * 1000,
        )
        arrays = {out_refs[name]: array for name, array in result.outputs.items()}
        return _Result(p, completed, blobs, arrays, state)

    # ------------------------------------------------------------ appends

    def _add(self, events: list[Event], blobs: dict[str, bytes]) -> None:
        self._batch.events.extend(events)
        self._batch.blobs.update(blobs)

    def _flush(self) -> None:
        """Queue this round's records as one append (not awaited). Only the run's end is
        made at once (and waited for); the others are made ``later``, after the stage
        the round starts has been sent, and may share the end's commit."""
        b, self._batch = self._batch, _Batch()
        if not b.events:
            self._release(b.release)
            return
        requires = self._requires(b.events)
        final = isinstance(b.events[-1], RunCompleted | RunFailed)

        def make() -> Awaitable[Any]:
            try:
                return self._s.log.append(
                    self._run.run_id,
                    b.events,
                    blobs=b.blobs,
                    state=b.state,
                    requires=requires,
                    lazy=not final,
                )
            finally:  # the session's next turn queues its records behind these
                self._release(b.release)

        written = self.later(make)
        if b.remember is not None:
            self._s.states.wrote(*b.remember, write=written)
        if b.state is not None:
            written.add_done_callback(_state_recorded)
        if final:
            self._make_later()

    def _release(self, keys: list[Key]) -> None:
        for key in keys:
            self._s.locks.release(key)

    def later(self, make: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
        """Make an append (``make()``) once the task running now reaches its next await:
        when a round has just sent the stage it started, its records are encoded and
        queued while that stage computes, not before it is sent. Appends are made in
        the order they were asked for, and before any later one is made at once. The
        returned future has the append's answer; the run's end waits for it."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        # The alarm of the view it was computed from: one rebuilt since is not its concern.
        answer.add_done_callback(functools.partial(_watch, alarm=self._alarm))
        if not self._later:
            loop.call_soon(self._make_later)
        self._later.append((make, answer))
        return answer

    def _make_later(self) -> None:
        later, self._later = self._later, []
        for make, answer in later:
            try:
                made = asyncio.ensure_future(make())
            except Exception as e:  # the log refused it at once (failed or closed)
                answer.set_exception(e)
                self._run.pending.append(answer)
                continue
            made.add_done_callback(functools.partial(_forward, answer=answer))
            # The run's end waits on the log's own future: answered with the commit,
            # not one loop iteration later through ``_forward``.
            self._run.pending.append(made)

    def _requires(self, events: list[Event]) -> list[StageCompleted]:
        """The completions these events were computed from, beyond those they carry."""
        plan, view = self._run.plan, self._run.view
        carried = {e.stage for e in events if isinstance(e, StageCompleted)}
        needed: set[str] = set()
        for e in events:
            if isinstance(e, RunCompleted):
                needed.update(src.partition(".")[0] for src in plan.spec.outputs.values())
            elif isinstance(e, RunFailed):
                needed.update(plan.deps.get(e.stage or "", ()))
            elif isinstance(e, StageScheduled | StageStarted | StageCompleted | StageFailed):
                needed.update(plan.deps[e.stage])
        out = []
        for name in sorted(needed - carried):
            completed = view.stages[name].completed
            assert completed is not None, f"{name} relied on before it completed"
            out.append(completed)
        return out

    async def _settle(self) -> bool:
        """Wait for every queued append; whether all were written as asked. A storage
        failure raises."""
        self._make_later()
        pending, self._run.pending = self._run.pending, []
        clean, error = True, None
        # One by one, not gathered: one commit answers them together, so this task wakes
        # once, for the first, and finds the others answered.
        for made in pending:
            try:
                result = await made
            except Exception as e:
                error = error or e
                continue
            clean = clean and (not isinstance(result, AppendResult) or result.clean)
        if error is not None:
            raise error
        return clean

    async def _resync(self) -> None:
        run = self._run
        await self._stop_all(discard=True)
        await self._settle()
        if run.view.started.session is not None:
            self._s.states.forget((run.spec.name, run.view.started.session))
        log.info("run %s: the log refused a record; continuing from what it holds", run.run_id)
        run.view = replay(self._s.log.read_run(run.run_id))
        self._alarm = asyncio.get_running_loop().create_future()

    async def _stop_all(self, *, discard: bool) -> None:
        """Cancel what runs (its start records stay: replay dispatches it again) and
        release the sessions this run holds; with ``discard``, also drop the records
        not yet queued (they were computed from a view about to be rebuilt, or the
        engine is stopping: as in a crash, replay does their work again)."""
        self._make_later()
        tasks = [*self._calls.values(), *self._waiting.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._calls.clear()
        self._waiting.clear()
        self._turns.clear()
        self._ready.clear()
        if discard:
            dropped, self._batch = self._batch, _Batch()
            for key in dropped.release:
                self._s.locks.release(key)
        for key in self._held.values():
            self._s.locks.release(key)
        self._held.clear()

    # ------------------------------------------------------------ tensors

    def _replayed_state(self, stage: StageSpec) -> TensorRefs:
        """For a replay: the state tensors the original run's stage started with."""
        origin = self._run.view.started.replay_of
        assert origin is not None
        progress = replay(self._s.log.read_run(origin)).stages.get(stage.name)
        started = progress.started if progress is not None else None
        if started is None:
            return {}
        return {k: v for k, v in started.inputs.items() if k not in stage.inputs}

    def _input_refs(self, stage: StageSpec) -> TensorRefs:
        refs: TensorRefs = {}
        view = self._run.view
        for name, source in stage.inputs.items():
            origin, _, tensor = source.partition(".")
            refs[name] = (
                view.started.inputs[tensor] if origin == "request" else view.stage_outputs(origin)[tensor]
            )
        return refs

    def _load(self, refs: dict[str, str]) -> dict[str, np.ndarray]:
        return load(refs, self._run.blobs, self._s.log)


def _watch(future: asyncio.Future[Any], alarm: asyncio.Future[None]) -> None:
    """Raise ``alarm`` when an append failed or was refused."""
    if future.cancelled():
        return
    error = future.exception()
    result = None if error is not None else future.result()
    if (error is not None or (isinstance(result, AppendResult) and not result.clean)) and not alarm.done():
        alarm.set_result(None)


def _state_recorded(future: asyncio.Future[Any]) -> None:
    """Fault point ``state.after_record``: a session's new state is durable (its append
    was committed as asked), nothing after it is yet."""
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if not isinstance(result, AppendResult) or result.clean:
        faults.hit("state.after_record")


def _forward(made: asyncio.Future[Any], answer: asyncio.Future[Any]) -> None:
    if answer.done():
        return
    if made.cancelled():
        answer.cancel()
    elif (error := made.exception()) is not None:
        answer.set_exception(error)
    else:
        answer.set_result(made.result())


def load(refs: dict[str, str], cache: dict[str, np.ndarray], event_log: EventLog) -> dict[str, np.ndarray]:
    out = {}
    for name, ref in refs.items():
        array = cache.get(ref)
        if array is None:
            array = decode_tensor(event_log.get_blob(ref), ref)
            cache[ref] = array
        out[name] = array
    return out


def outcome_of(view: RunView, cache: dict[str, np.ndarray], event_log: EventLog) -> RunOutcome:
    t = view.terminal
    if isinstance(t, RunCompleted):
        return RunOutcome(view.run_id, "completed", load(dict(t.outputs), cache, event_log))
    if isinstance(t, RunFailed):
        return RunOutcome(
            view.run_id, "failed", error=f"{t.error_type}: {t.message}", error_type=t.error_type
        )
    if isinstance(t, RunParked):
        return RunOutcome(view.run_id, "parked", error=t.reason)
    return RunOutcome(view.run_id, "running")
