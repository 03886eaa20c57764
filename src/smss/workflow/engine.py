"""The workflow engine: drives runs of a DAG of stages, on the log.

Guarantees (with an :class:`~smss.ports.EventLog` that keeps its promises):

* write-ahead: a run is acknowledged only once ``RunStarted`` is durable; its
  outputs are returned only once ``RunCompleted`` is durable; a stage's
  outputs feed the next stage only once its ``StageCompleted`` is durable;
* a stage's recorded effect happens once: the log keeps the first
  ``StageCompleted`` of a stage; a session state write is committed in the
  same transaction, conditional on the version the stage read;
* stages of one session that carry state run one at a time (a lock per
  session in this process, the version check across processes), so no update
  is lost; a version conflict re-runs the stage on the newer state;
* after a crash, ``recover`` resumes every unfinished run with the same pure
  decisions (:mod:`smss.workflow.replay`): completed stages are read back,
  in-flight ones are dispatched again; a run whose workflow definition changed
  since it started is parked, not re-executed against the new definition;
* a failing stage is retried per its ``retries`` with back-off; then the run
  fails with the stage, attempt, instance, error type, message and traceback
  in the log.

Every run is driven by a task in the engine's task group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from smss.errors import (
    Conflict,
    InvalidInput,
    InvalidSpec,
    NotFound,
    SmssError,
    StorageUnavailable,
)
from smss.ports import Clock, EventLog, FunctionCaller
from smss.workflow.blobs import decode_tensor, to_blobs
from smss.workflow.events import (
    Event,
    Record,
    RunCompleted,
    RunFailed,
    RunParked,
    RunResumed,
    RunStarted,
    StageCompleted,
    StageFailed,
    StageScheduled,
    StageStarted,
    StateWrite,
    TensorRefs,
)
from smss.workflow.replay import Dispatch, RunView, apply, next_steps, replay
from smss.workflow.spec import StageSpec, WorkflowSpec, dependencies, spec_hash, topological_order

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: str
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None


@dataclass
class _Run:
    view: RunView
    spec: WorkflowSpec
    done: asyncio.Future[RunOutcome]
    blobs: dict[str, np.ndarray] = field(default_factory=dict)
    #: Appends not awaited where they were made; all must be durable before the run's end is.
    pending: list[asyncio.Future[Any]] = field(default_factory=list)

    def write(self, append: Awaitable[T]) -> asyncio.Future[T]:
        future = asyncio.ensure_future(append)
        self.pending.append(future)
        return future


class Engine:
    def __init__(
        self,
        log_: EventLog,
        caller: FunctionCaller,
        workflows: Callable[[str], WorkflowSpec],
        clock: Clock,
    ) -> None:
        self._log = log_
        self._caller = caller
        self._workflows = workflows
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        self._session_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._direct_state: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                await self.recover()
                yield self
            finally:
                for run in self._runs.values():
                    if not run.done.done():
                        run.done.set_result(RunOutcome(run.view.run_id, "running"))
                for task in list(self._tasks):
                    task.cancel()
        self._group = None

    def _spawn_driver(self, run: _Run) -> None:
        if self._group is None:
            raise StorageUnavailable("the workflow engine is not running")
        task = self._group.create_task(self._drive(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def recover(self) -> int:
        """Resume every unfinished run in the log; returns how many."""
        resumed = 0
        for run_id in self._log.unfinished_runs():
            if run_id in self._runs:
                continue
            view = replay(self._log.read_run(run_id))
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

    def _adopt(self, view: RunView, spec: WorkflowSpec, start: Awaitable[Any] | None = None) -> _Run:
        run = _Run(view, spec, asyncio.get_running_loop().create_future())
        if start is not None:
            run.write(start)
        self._runs[view.run_id] = run
        self._spawn_driver(run)
        return run

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
        refs, blobs = to_blobs(inputs)
        started = RunStarted(workflow, spec_hash(spec), session, refs, idempotency_key)
        run_id = uuid.uuid4().hex
        if wait and idempotency_key is None:
            # Nothing to decide from the log: drive the run while its start is committed.
            # Every later append of the run is queued behind it, and the outputs are
            # returned only once the run's end (so its start too) is durable.
            run = self._adopt(RunView(run_id, started), spec, self._log.start_run(run_id, started, blobs))
            run.blobs.update({refs[name]: array for name, array in inputs.items()})
            return await self._await(run, timeout_s)
        run_id, created = await self._log.start_run(run_id, started, blobs)
        if not created:
            existing = replay(self._log.read_run(run_id)).started
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
        view = replay(self._log.read_run(run_id))
        return self._outcome_from_view(view)

    async def _await(self, run: _Run, timeout_s: float) -> RunOutcome:
        try:
            return await asyncio.wait_for(asyncio.shield(run.done), timeout_s)
        except TimeoutError:
            return RunOutcome(run.view.run_id, "running")

    def outcome(self, records: list[Record]) -> RunOutcome:
        """A run's outcome as its log tells it (outputs read back from blobs)."""
        return self._outcome_from_view(replay(records))

    def _outcome_from_view(self, view: RunView, cache: dict[str, np.ndarray] | None = None) -> RunOutcome:
        t = view.terminal
        if isinstance(t, RunCompleted):
            return RunOutcome(view.run_id, "completed", self._load(t.outputs, {} if cache is None else cache))
        if isinstance(t, RunFailed):
            return RunOutcome(view.run_id, "failed", error=f"{t.error_type}: {t.message}")
        if isinstance(t, RunParked):
            return RunOutcome(view.run_id, "parked", error=t.reason)
        return RunOutcome(view.run_id, "running")

    async def resume(self, run_id: str) -> RunOutcome:
        """Resume a failed run (or adopt a running one nobody drives)."""
        if run_id in self._runs:
            return RunOutcome(run_id, "running")
        records = self._log.read_run(run_id)
        if not records:
            raise NotFound(f"unknown run {run_id!r}")
        view = replay(records)
        if isinstance(view.terminal, RunCompleted):
            raise Conflict(f"run {run_id} already completed")
        spec = self._workflows(view.started.workflow)
        if spec_hash(spec) != view.started.spec_hash:
            raise Conflict(f"run {run_id} cannot resume: its workflow definition changed since it started")
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
        records = self._log.read_run(run_id)
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
        started = RunStarted(
            old.started.workflow, spec_hash(spec), old.started.session, old.started.inputs, None, run_id
        )
        new_id, _ = await self._log.start_run(uuid.uuid4().hex, started, {})
        if copied:
            await self._log.append(new_id, copied)
        run = self._adopt(replay(self._log.read_run(new_id)), spec)
        return await self._await(run, 300.0) if wait else RunOutcome(new_id, "running")

    async def run_direct(
        self, workflow: str, inputs: Mapping[str, np.ndarray], session: str | None = None
    ) -> RunOutcome:
        """The same stages called one after another through the dispatchers, with no
        log, no blobs and no recovery: the baseline the log's overhead is measured
        against (``durable: false``). State lives in memory only."""
        spec = self._workflows(workflow)
        _check_inputs(spec, inputs)
        values: dict[str, np.ndarray] = {f"request.{k}": v for k, v in inputs.items()}
        for name in topological_order(spec):
            stage = next(s for s in spec.stages if s.name == name)
            fn = self._caller.spec_of(stage.function)
            args = {k: values[src] for k, src in stage.inputs.items()}
            key = (spec.name, session or "")
            if stage.state:
                saved = self._direct_state.get(key, {})
                for t in fn.inputs:
                    if t.name not in stage.inputs:
                        args[t.name] = saved.get(
                            t.name, np.zeros([1 if d == -1 else d for d in t.shape], t.dtype)
                        )
            result = await self._caller.call(
                stage.function, args, tuple(t.name for t in fn.outputs), stage.timeout_s
            )
            if stage.state:
                self._direct_state[key] = {k: v for k, v in result.outputs.items() if k in args}
            values.update({f"{name}.{k}": v for k, v in result.outputs.items()})
        outputs = {k: values[src] for k, src in spec.outputs.items()}
        return RunOutcome("direct", "completed", outputs)

    # ------------------------------------------------------------ driving a run

    async def _drive(self, run: _Run) -> None:
        run_id = run.view.run_id
        tasks: dict[str, asyncio.Task[list[Event]]] = {}
        try:
            while True:
                steps = next_steps(run.view, run.spec, running=tasks.keys())
                if steps.complete is not None:
                    await self._finish(run, [RunCompleted(steps.complete)])
                    return
                if steps.fail is not None:
                    f = steps.fail
                    await self._finish(run, [RunFailed(f.stage, f.error_type, f.message)])
                    return
                for d in steps.dispatch:
                    tasks[d.stage] = asyncio.create_task(self._run_stage(run, d))
                if not tasks:
                    raise StorageUnavailable(f"run {run_id} is stuck: nothing to dispatch")
                finished, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
                for name in [n for n, t in tasks.items() if t in finished]:
                    for event in tasks.pop(name).result():
                        apply(run.view, event)
        except asyncio.CancelledError:
            for t in tasks.values():
                t.cancel()
            await asyncio.gather(*run.pending, return_exceptions=True)
            raise
        except Exception as e:
            await asyncio.gather(*run.pending, return_exceptions=True)
            # A run that cannot continue (the log failed) stops; the engine and other runs go on.
            log.error("run %s stopped: %s", run_id, e, exc_info=not isinstance(e, SmssError))
            if not run.done.done():
                run.done.set_exception(e if isinstance(e, SmssError) else StorageUnavailable(str(e)))
        finally:
            self._runs.pop(run_id, None)

    async def _finish(self, run: _Run, events: list[Event]) -> None:
        # The end is queued behind every earlier append of the run (one writer, in
        # order), so it commits in the same transaction as the last of them or after;
        # waiting for all together saves a commit's latency. Any failure fails the run.
        await asyncio.gather(*run.pending, self._log.append(run.view.run_id, events))
        run.pending.clear()
        for event in events:
            apply(run.view, event)
        if not run.done.done():
            run.done.set_result(self._outcome_from_view(run.view, run.blobs))

    async def _run_stage(self, run: _Run, d: Dispatch) -> list[Event]:
        """Execute one attempt of one stage; returns the events it appended."""
        stage = next(s for s in run.spec.stages if s.name == d.stage)
        for dependent in _dependents(run.spec, stage.name):
            self._caller.prewarm(dependent.function)
        session = run.view.started.session
        if stage.state and session is not None:
            lock = self._session_locks.setdefault((run.spec.name, session), asyncio.Lock())
            async with lock:
                return await self._attempt(run, stage, d.attempt, session)
        return await self._attempt(run, stage, d.attempt, None)

    async def _attempt(self, run: _Run, stage: StageSpec, attempt: int, session: str | None) -> list[Event]:
        run_id = run.view.run_id
        refs = self._input_refs(run, stage)
        inputs = self._load(refs, run.blobs)
        state_version: int | None = None
        state_blobs: dict[str, bytes] = {}
        fn = self._caller.spec_of(stage.function)
        state_names = [t.name for t in fn.inputs if t.name not in stage.inputs] if stage.state else []
        replayed = self._replayed_state(run, stage) if stage.state else None
        if replayed is not None:
            inputs.update(self._load(replayed, run.blobs))
            refs.update(replayed)
            session = None  # a replay re-runs on the logged state and leaves the session alone
        elif stage.state:
            current = self._log.get_state(run.spec.name, session) if session is not None else None
            state_version = current.version if current is not None else 0
            stored = self._load(current.tensors, run.blobs) if current is not None else {}
            fresh = {}
            for name in state_names:
                decl = fn.input(name)
                if name in stored and current is not None:
                    inputs[name] = stored[name]
                    refs[name] = current.tensors[name]
                elif decl is not None:  # the session's first turn: zero state
                    fresh[name] = np.zeros([1 if d == -1 else d for d in decl.shape], decl.dtype)
            fresh_refs, state_blobs = to_blobs(fresh)
            inputs.update(fresh)
            refs.update(fresh_refs)
        starting: list[Event] = [
            StageScheduled(stage.name, attempt),
            StageStarted(stage.name, attempt, stage.function, refs, state_version),
        ]
        # Not awaited before the call: the start is a record for error location;
        # correctness rests on the completion, which is appended after it (one writer, in order).
        # Not awaited: the start is a record for error location; the completion is
        # queued behind it (one writer, in order) and the run's end waits for both.
        run.write(self._log.append(run_id, starting, blobs=state_blobs))
        t0 = self._clock.monotonic()
        wanted = tuple(t.name for t in fn.outputs)
        try:
            result = await self._caller.call(stage.function, inputs, wanted, stage.timeout_s)
        except Exception as e:
            if not isinstance(e, SmssError):
                log.exception("run %s stage %s: unexpected error", run_id, stage.name)
            failed = StageFailed(
                stage.name,
                attempt,
                type(e).__name__,
                e.message if isinstance(e, SmssError) else str(e) or type(e).__name__,
                getattr(e, "traceback", ""),
                getattr(e, "instance", ""),
                getattr(e, "node", ""),
                retryable=not isinstance(e, InvalidInput | InvalidSpec | NotFound),
            )
            await self._log.append(run_id, [failed])
            failures = len(run.view.stage(stage.name).failures) + 1
            if failed.retryable and failures <= stage.retries:
                await asyncio.sleep(min(MAX_BACKOFF_S, 0.05 * 2**failures))
            return [*starting, failed]
        out_refs, blobs = to_blobs(result.outputs)
        state_write = None
        if stage.state and session is not None and state_version is not None:
            new_state = {n: out_refs[n] for n in state_names if n in out_refs}
            state_write = StateWrite(run.spec.name, session, state_version, new_state)
        completed = StageCompleted(
            stage.name,
            attempt,
            out_refs,
            result.instance,
            result.node,
            None if state_write is None else state_version + 1,  # type: ignore[operator]
            (self._clock.monotonic() - t0) * 1000,
        )
        for ref, array in result.outputs.items():
            run.blobs[out_refs[ref]] = array
        if state_write is None:
            # Stateless: the next stage may start at once. Its own completion is queued
            # behind this one, so a crash can never keep its effect and lose this one.
            run.write(self._log.append(run_id, [completed], blobs=blobs))
            return [*starting, completed]
        # Stateful: the session's next turn must see this state, so wait for it.
        outcome = await self._log.append(run_id, [completed], blobs=blobs, state=state_write)
        if outcome.state_conflict:
            # Another writer moved the session on: this attempt's effect is void; run it again.
            log.info("run %s stage %s: state version conflict, re-running", run_id, stage.name)
            return [*starting]
        if outcome.seqs and outcome.seqs[0] == 0:
            # The stage's effect was already recorded: the recorded completion is the truth.
            recorded = replay(self._log.read_run(run_id)).stages[stage.name].completed
            if recorded is not None:
                return [*starting, recorded]
        return [*starting, completed]

    def _replayed_state(self, run: _Run, stage: StageSpec) -> TensorRefs | None:
        """For a replay: the state tensors the original run's stage started with."""
        origin = run.view.started.replay_of
        if origin is None:
            return None
        progress = replay(self._log.read_run(origin)).stages.get(stage.name)
        started = progress.started if progress is not None else None
        if started is None:
            return {}
        return {k: v for k, v in started.inputs.items() if k not in stage.inputs}

    def _input_refs(self, run: _Run, stage: StageSpec) -> TensorRefs:
        refs: TensorRefs = {}
        for name, source in stage.inputs.items():
            origin, _, tensor = source.partition(".")
            if origin == "request":
                refs[name] = run.view.started.inputs[tensor]
            else:
                refs[name] = run.view.stage_outputs(origin)[tensor]
        return refs

    def _load(self, refs: Mapping[str, str], cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, ref in refs.items():
            array = cache.get(ref)
            if array is None:
                array = decode_tensor(self._log.get_blob(ref), ref)
                cache[ref] = array
            out[name] = array
        return out


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


def _dependents(spec: WorkflowSpec, stage: str) -> list[StageSpec]:
    deps = dependencies(spec)
    return [s for s in spec.stages if stage in deps[s.name]]


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
