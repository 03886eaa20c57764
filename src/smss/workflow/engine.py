"""The workflow engine: drives runs of a DAG of stages, on the log.

Guarantees (with an :class:`~smss.ports.EventLog` that keeps its promises):

* write-ahead: a run is acknowledged only once ``RunStarted`` is durable; its
  outputs are returned only once ``RunCompleted`` is durable, and with it every
  record the run made; a record computed from a completion is written only if
  that completion is the one recorded (``requires``), so the engine goes on
  while records are still being written (:mod:`smss.workflow.driver`) and a
  crash never keeps an effect while losing what it was computed from;
* a stage's recorded effect happens once: the log keeps the first
  ``StageCompleted`` of a stage; a session state write is committed in the
  same transaction, conditional on the version the stage read;
* stages of one session that carry state run one at a time (a lock per
  session in this process; across processes, the write is conditional on the
  version and tensors read), so no update is lost; the next turn reads a write
  not yet durable (:mod:`smss.workflow.sessions`), and a conflict re-runs the
  stage on the state the log holds;
* after a crash, ``recover`` resumes every unfinished run with the same pure
  decisions (:mod:`smss.workflow.replay`): completed stages are read back,
  in-flight ones are dispatched again; a run whose workflow definition changed
  since it started is parked, not re-executed against the new definition;
* with several engines on one log (PostgreSQL), ``recover`` resumes the runs the log
  hands this engine (:meth:`~smss.ports.EventLog.claim_runs`: its own, and those of
  engines that died), and with ``rescan_s`` it asks again that often: the
  runs of an engine that died are resumed by one that is alive, and a run this engine
  stopped because the log failed (the database was down) is resumed once it is back;
* a failing stage is retried per its ``retries`` with back-off; then the run
  fails with the stage, attempt, instance, error type, message and traceback
  in the log;
* bounded: at most ``max_runs`` runs are driven at once (a run started past it,
  waited for or not, is refused with :class:`Overloaded`, 429; recovery is never
  refused), and non-durable runs keep at most ``max_direct_sessions`` sessions'
  state, each for ``direct_state_ttl_s`` unused;
* the log reads a request needs (an idempotent retry, a resume, a replay) run in
  a worker thread, not on the event loop.

Every run is driven by a task in the engine's task group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from smss import logcontext
from smss.config import WorkflowLimits
from smss.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    Overloaded,
    SmssError,
    StorageUnavailable,
)
from smss.ports import Clock, EventLog, FunctionCaller
from smss.workflow.blobs import to_blobs
from smss.workflow.driver import Driver, Plan, Run, RunOutcome, Shared, outcome_of
from smss.workflow.events import (
    Event,
    Record,
    RunCompleted,
    RunParked,
    RunResumed,
    RunStarted,
    StageCompleted,
)
from smss.workflow.ids import new_run_id
from smss.workflow.replay import RunView, apply, replay
from smss.workflow.sessions import ExpiringStates, SessionLocks, SessionStates
from smss.workflow.spec import WorkflowSpec, dependencies, spec_hash, topological_order

__all__ = ["Engine", "RunOutcome"]

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        log_: EventLog,
        caller: FunctionCaller,
        workflows: Callable[[str], WorkflowSpec],
        clock: Clock,
        limits: WorkflowLimits | None = None,
        *,
        rescan_s: float | None = None,
    ) -> None:
        self._limits = limits or WorkflowLimits()
        self._rescan_s = rescan_s
        self._log = log_
        self._caller = caller
        self._workflows = workflows
        self._shared = Shared(log_, caller, clock, SessionLocks(), SessionStates(log_.get_state))
        self._runs: dict[str, Run] = {}
        self._plans: dict[str, Plan] = {}
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._direct_state = ExpiringStates(self._limits.max_direct_sessions, self._limits.direct_state_ttl_s)

    # ------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        async with asyncio.TaskGroup() as group:
            self._group = group
            rescan = None
            try:
                await self.recover()
                if self._rescan_s is not None:
                    rescan = group.create_task(self._rescan(self._rescan_s))
                yield self
            finally:
                if rescan is not None:
                    rescan.cancel()
                for run in self._runs.values():
                    run.finish(RunOutcome(run.run_id, "running"))
                for task in list(self._tasks):
                    task.cancel()
        self._group = None

    async def _rescan(self, every_s: float) -> None:
        while True:
            await self._shared.clock.sleep(every_s)
            try:
                # Off the loop: the database may be slow to answer, or down.
                await self._resume(await asyncio.to_thread(self._log.claim_runs), off_loop=True)
            except SmssError as e:  # the log is down: the next scan tries again
                log.warning("scan for runs to resume failed: %s", e)

    async def recover(self) -> int:
        """Resume every unfinished run the log hands this engine that it does not drive
        already; returns how many."""
        return await self._resume(self._log.claim_runs())

    async def _resume(self, run_ids: list[str], *, off_loop: bool = False) -> int:
        resumed = 0
        for run_id in run_ids:
            if run_id in self._runs:
                continue
            records = await self._read_run(run_id) if off_loop else self._log.read_run(run_id)
            if run_id in self._runs:  # adopted while it was read
                continue
            view = replay(records)
            try:
                spec = self._workflows(view.started.workflow)
            except NotFound:
                spec = None
            if spec is None or spec_hash(spec) != view.started.spec_hash:
                reason = "its workflow was deleted" if spec is None else "its workflow definition changed"
                await self._log.append(run_id, [RunParked(f"parked at recovery: {reason}")])
                log.warning("run %s parked: %s", run_id, reason)
                continue
            self._adopt(view, spec)
            resumed += 1
        if resumed:
            log.info("recovered %d unfinished runs", resumed)
        return resumed

    def _adopt(
        self, view: RunView, spec: WorkflowSpec, start: Callable[[], Awaitable[Any]] | None = None
    ) -> Run:
        """Drive ``view`` to its end in a task of the engine; ``start`` makes the run's
        start, which the driver's first records queue behind."""
        if self._group is None:
            raise StorageUnavailable("the workflow engine is not running")
        existing = self._runs.get(view.run_id)
        if existing is not None:
            # Adopted meanwhile (a scan found it between its start and this call): one driver.
            return existing
        run = Run(view, self._plan(spec))
        driver = Driver(self._shared, run)
        self._runs[view.run_id] = run
        task = self._group.create_task(self._drive(driver, run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if start is not None:
            # Asked for after the task was created, so it is made after the task's first
            # step has sent the first stage (and before anything that step queues).
            driver.later(start)
        return run

    def _admit(self) -> None:
        """Refuse a new run when the engine drives as many as it may."""
        limit = self._limits.max_runs
        if len(self._runs) >= limit:
            raise Overloaded(f"the workflow engine is running {limit} runs, its limit", retry_after_s=1.0)

    async def _read_run(self, run_id: str) -> list[Record]:
        """The run's records, read off the event loop (a read may wait on the store)."""
        return await asyncio.to_thread(self._log.read_run, run_id)

    def _plan(self, spec: WorkflowSpec) -> Plan:
        """The DAG indexed once per definition (specs are immutable)."""
        key = spec_hash(spec)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 256:
                self._plans.clear()
            plan = self._plans[key] = Plan(spec)
        return plan

    async def _drive(self, driver: Driver, run: Run) -> None:
        logcontext.set_ids(run=run.run_id)  # this task drives this run only
        try:
            await driver.drive()
        finally:
            self._runs.pop(run.run_id, None)

    # ------------------------------------------------------------ requests

    async def submit(
        self,
        workflow: str,
        inputs: Mapping[str, np.ndarray],
        *,
        session: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = True,
        timeout_s: float = 300.0,
    ) -> RunOutcome:
        spec = self._workflows(workflow)
        _check_inputs(spec, inputs)
        self._admit()
        refs, blobs = to_blobs(inputs)
        started = RunStarted(workflow, spec_hash(spec), session, refs, idempotency_key)
        run_id = new_run_id(self._shared.clock.time())
        if wait and idempotency_key is None:
            # Nothing to decide from the log: drive the run while its start is committed.
            # Every later append of the run is queued behind it, and the outputs are
            # returned only once the run's end (so its start too) is durable.
            run = self._adopt(
                RunView(run_id, started), spec, lambda: self._log.start_run(run_id, started, blobs, lazy=True)
            )
            run.blobs.update({refs[name]: array for name, array in inputs.items()})
            return await self._await(run, timeout_s)
        run_id, created = await self._log.start_run(run_id, started, blobs)
        if not created:
            existing = replay(await self._read_run(run_id)).started
            if (existing.workflow, existing.session, existing.inputs) != (workflow, session, refs):
                raise Conflict("this Idempotency-Key was used for a different request")
            return await self._outcome_of(run_id, wait, timeout_s)
        run = self._adopt(RunView(run_id, started), spec)
        for name, array in inputs.items():
            run.blobs[refs[name]] = array
        if not wait:
            return RunOutcome(run_id, "running")
        return await self._await(run, timeout_s)

    async def _outcome_of(self, run_id: str, wait: bool, timeout_s: float) -> RunOutcome:
        run = self._runs.get(run_id)
        if run is not None and wait:
            return await self._await(run, timeout_s)
        return await asyncio.to_thread(lambda: outcome_of(replay(self._log.read_run(run_id)), {}, self._log))

    async def _await(self, run: Run, timeout_s: float) -> RunOutcome:
        if run.outcome is not None:
            return run.result()
        # A future of this caller's own: when it goes away, only this is cancelled.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[RunOutcome | None] = loop.create_future()
        run.waiters.add(waiter)
        timer = loop.call_later(timeout_s, _resolve, waiter, None)
        try:
            outcome = await waiter
        finally:
            timer.cancel()
            run.waiters.discard(waiter)
        return outcome if outcome is not None else RunOutcome(run.view.run_id, "running")

    def outcome(self, records: list[Record]) -> RunOutcome:
        """A run's outcome as its log tells it (outputs read back from blobs)."""
        return outcome_of(replay(records), {}, self._log)

    async def resume(self, run_id: str) -> RunOutcome:
        """Resume a failed run (or adopt a running one nobody drives)."""
        if run_id in self._runs:
            return RunOutcome(run_id, "running")
        records = await self._read_run(run_id)
        if not records:
            raise NotFound(f"unknown run {run_id!r}")
        view = replay(records)
        if isinstance(view.terminal, RunCompleted):
            raise Conflict(f"run {run_id} already completed")
        spec = self._workflows(view.started.workflow)
        if spec_hash(spec) != view.started.spec_hash:
            raise Conflict(f"run {run_id} cannot resume: its workflow definition changed since it started")
        self._admit()
        if view.terminal is not None:
            event = RunResumed()
            await self._log.append(run_id, [event])
            apply(view, event)
        self._adopt(view, spec)
        return RunOutcome(run_id, "running")

    async def replay_from(self, run_id: str, stage: str, *, wait: bool = True) -> RunOutcome:
        """A new run with the old run's inputs, re-executing ``stage`` and what
        depends on it; the other stages' logged outputs are copied. Stateful
        stages re-run on their logged state and do not write the session."""
        records = await self._read_run(run_id)
        if not records:
            raise NotFound(f"unknown run {run_id!r}")
        old = replay(records)
        spec = self._workflows(old.started.workflow)
        if stage not in {s.name for s in spec.stages}:
            raise InvalidInput(f"workflow {spec.name!r} has no stage {stage!r}")
        rerun = _downstream(spec, stage)
        copied: list[Event] = []
        for s in spec.stages:
            if s.name in rerun:
                continue
            progress = old.stages.get(s.name)
            if progress is None or progress.completed is None:
                raise Conflict(f"stage {s.name!r} of run {run_id} never completed; replay from it instead")
            c = progress.completed
            copied.append(StageCompleted(s.name, 0, c.outputs, "replayed", "", None, 0.0))
        self._admit()
        started = RunStarted(
            old.started.workflow, spec_hash(spec), old.started.session, old.started.inputs, None, run_id
        )
        new_id, _ = await self._log.start_run(new_run_id(self._shared.clock.time()), started, {})
        if copied:
            await self._log.append(new_id, copied)
        run = self._adopt(replay(await self._read_run(new_id)), spec)
        return await self._await(run, 300.0) if wait else RunOutcome(new_id, "running")

    async def run_direct(
        self, workflow: str, inputs: Mapping[str, np.ndarray], session: str | None = None
    ) -> RunOutcome:
        """The same stages called one after another through the dispatchers, with no
        log, no blobs and no recovery: the baseline the log's overhead is measured
        against (``durable: false``). State lives in memory only, bounded (see the
        module's docstring): a session whose state was dropped starts from zeros."""
        spec = self._workflows(workflow)
        _check_inputs(spec, inputs)
        values: dict[str, np.ndarray] = {f"request.{k}": v for k, v in inputs.items()}
        for name in topological_order(spec):
            stage = next(s for s in spec.stages if s.name == name)
            fn = self._caller.spec_of(stage.function)
            args = {k: values[src] for k, src in stage.inputs.items()}
            key = (spec.name, session or "")
            if stage.state:
                saved = self._direct_state.get(key, self._shared.clock.monotonic())
                for t in fn.inputs:
                    if t.name not in stage.inputs:
                        args[t.name] = saved[t.name] if t.name in saved else t.zeros()
            result = await self._caller.call(
                stage.function, args, tuple(t.name for t in fn.outputs), stage.timeout_s
            )
            if stage.state:
                state = {k: v for k, v in result.outputs.items() if k in args}
                self._direct_state.put(key, state, self._shared.clock.monotonic())
            values.update({f"{name}.{k}": v for k, v in result.outputs.items()})
        outputs = {k: values[src] for k, src in spec.outputs.items()}
        return RunOutcome("direct", "completed", outputs)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _check_inputs(spec: WorkflowSpec, inputs: Mapping[str, np.ndarray]) -> None:
    wanted = {t.name: t for t in spec.inputs}
    for name in inputs:
        if name not in wanted:
            raise InvalidInput(f"workflow {spec.name!r} has no input {name!r}")
    for name, decl in wanted.items():
        array = inputs.get(name)
        if array is None:
            raise InvalidInput(f"workflow {spec.name!r}: missing input {name!r}")
        if array.dtype != decl.dtype or not decl.accepts(tuple(array.shape)):
            raise InvalidInput(
                f"input {name!r}: expected {decl.datatype} {list(decl.shape)}, "
                f"got {array.dtype} {list(array.shape)}"
            )


def _downstream(spec: WorkflowSpec, stage: str) -> set[str]:
    deps = dependencies(spec)
    out = {stage}
    changed = True
    while changed:
        changed = False
        for s in spec.stages:
            if s.name not in out and deps[s.name] & out:
                out.add(s.name)
                changed = True
    return out
