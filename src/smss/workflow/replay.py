"""Replay: a run's log -> where the run stands -> what to do next. Pure.

``replay`` folds a run's records into a :class:`RunView`; ``next_steps``
decides from a view and the workflow's DAG which stages to dispatch, or that
the run completed or failed. The live engine and recovery after a crash run
the same two functions, so a resumed run makes exactly the decisions a
never-interrupted one would have: completed stages are never dispatched
again, a stage that was in flight (started, neither completed nor failed) is
dispatched again with the next attempt number.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass, field

from smss.errors import StorageUnavailable
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
    TensorRefs,
)
from smss.workflow.spec import WorkflowSpec, dependencies


@dataclass
class StageProgress:
    completed: StageCompleted | None = None
    last_attempt: int = 0
    failures: list[StageFailed] = field(default_factory=list)
    started: StageStarted | None = None  # the latest start


@dataclass
class RunView:
    run_id: str
    started: RunStarted
    stages: dict[str, StageProgress] = field(default_factory=dict)
    terminal: RunCompleted | RunFailed | RunParked | None = None

    def stage(self, name: str) -> StageProgress:
        return self.stages.setdefault(name, StageProgress())

    def stage_outputs(self, name: str) -> TensorRefs:
        progress = self.stages.get(name)
        if progress is None or progress.completed is None:
            raise KeyError(name)
        return progress.completed.outputs


def apply(view: RunView, event: Event) -> None:
    """Fold one event into the view (the live engine applies what it appends)."""
    if isinstance(event, StageScheduled):
        p = view.stage(event.stage)
        p.last_attempt = max(p.last_attempt, event.attempt)
    elif isinstance(event, StageStarted):
        p = view.stage(event.stage)
        p.last_attempt = max(p.last_attempt, event.attempt)
        p.started = event
    elif isinstance(event, StageCompleted):
        p = view.stage(event.stage)
        if p.completed is None:  # the first completion wins
            p.completed = event
    elif isinstance(event, StageFailed):
        view.stage(event.stage).failures.append(event)
    elif isinstance(event, RunCompleted | RunFailed | RunParked):
        view.terminal = event
    elif isinstance(event, RunResumed):
        view.terminal = None
        for progress in view.stages.values():
            progress.failures.clear()


def replay(records: Iterable[Record]) -> RunView:
    view: RunView | None = None
    for record in records:
        if isinstance(record.event, RunStarted):
            view = RunView(record.run_id, record.event)
        elif view is None:
            raise StorageUnavailable(f"run log does not begin with RunStarted (seq {record.seq})")
        else:
            apply(view, record.event)
    if view is None:
        raise StorageUnavailable("run has no RunStarted event")
    return view


@dataclass(frozen=True)
class Dispatch:
    stage: str
    attempt: int


@dataclass(frozen=True)
class Steps:
    dispatch: tuple[Dispatch, ...] = ()
    complete: TensorRefs | None = None
    fail: StageFailed | None = None


def next_steps(view: RunView, spec: WorkflowSpec, running: Set[str] = frozenset()) -> Steps:
    """What the run should do now; ``running`` are stages this process is executing."""
    if view.terminal is not None:
        return Steps()
    by_name = {s.name: s for s in spec.stages}
    for name, progress in view.stages.items():
        stage = by_name.get(name)
        if stage is None or progress.completed is not None or not progress.failures:
            continue
        last = progress.failures[-1]
        if not last.retryable or len(progress.failures) > stage.retries:
            return Steps(fail=last)
    deps = dependencies(spec)
    done = {n for n, p in view.stages.items() if p.completed is not None}
    if len(done) >= len(spec.stages) and all(s.name in done for s in spec.stages):
        outputs = {}
        for out_name, source in spec.outputs.items():
            stage_name, _, tensor = source.partition(".")
            outputs[out_name] = view.stage_outputs(stage_name)[tensor]
        return Steps(complete=outputs)
    ready = [
        Dispatch(s.name, view.stage(s.name).last_attempt + 1)
        for s in spec.stages
        if s.name not in done and s.name not in running and deps[s.name] <= done
    ]
    return Steps(dispatch=tuple(ready))
