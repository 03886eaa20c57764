"""An in-memory :class:`smss.ports.EventLog` with the real log's rules, for engine tests.

Same semantics as the SQLite log: one StageCompleted per stage (later ones
dropped), state writes conditional on the version (and base tensors) and
all-or-nothing with their batch, ``requires`` voiding a batch, results of a
stale attempt (older than the stage's latest start) fenced off, idempotency
keys, run status from terminal events. ``fail_appends`` makes appends raise
:class:`StorageUnavailable`, like a log whose fsync failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from smss.errors import NotFound, StorageUnavailable
from smss.ports import AppendResult
from smss.workflow.events import (
    Event,
    Record,
    RunStarted,
    RunSummary,
    SessionState,
    StageCompleted,
    StageFailed,
    StageStarted,
    StateWrite,
    status_of,
)


class MemoryEventLog:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.runs: dict[str, RunSummary] = {}
        self.blobs: dict[str, bytes] = {}
        self.states: dict[tuple[str, str], SessionState] = {}
        self.keys: dict[str, str] = {}
        self.fail_appends = False
        #: While set and not open, appends wait (in order): writes "on their way".
        self.gate: asyncio.Event | None = None
        self._tail: asyncio.Future[None] | None = None
        self.counters = {
            "appends": 0,
            "events": 0,
            "commits": 0,
            "dropped_completions": 0,
            "state_conflicts": 0,
            "voided": 0,
            "fenced": 0,
        }
        #: Requests not marked lazy (those a caller waits for at once).
        self.eager = 0
        self._recorded: dict[tuple[str, str], StageCompleted] = {}
        self._started: dict[tuple[str, str], int] = {}  # the latest attempt started

    async def start_run(
        self, run_id: str, started: RunStarted, blobs: Mapping[str, bytes], *, lazy: bool = False
    ) -> tuple[str, bool]:
        await asyncio.sleep(0)
        self._check()
        self.eager += not lazy
        key = started.idempotency_key
        if key is not None and key in self.keys:
            return self.keys[key], False
        now = time.time()
        self.runs[run_id] = RunSummary(run_id, started.workflow, started.session, "running", now, now)
        if key is not None:
            self.keys[key] = run_id
        self.blobs.update(blobs)
        self._add(run_id, started)
        self.counters["commits"] += 1
        return run_id, True

    async def append(
        self,
        run_id: str,
        events: Sequence[Event],
        *,
        blobs: Mapping[str, bytes] | None = None,
        state: StateWrite | None = None,
        requires: Sequence[StageCompleted] = (),
        lazy: bool = False,
    ) -> AppendResult:
        # Appends take effect in the order they were made, as with the real log's queue.
        previous, self._tail = self._tail, asyncio.get_running_loop().create_future()
        mine = self._tail
        try:
            await asyncio.sleep(0)
            if previous is not None:
                await asyncio.wait([previous])
            if self.gate is not None:
                await self.gate.wait()
            return self._append(run_id, events, blobs, state, requires, lazy)
        finally:
            mine.set_result(None)

    def _append(
        self,
        run_id: str,
        events: Sequence[Event],
        blobs: Mapping[str, bytes] | None,
        state: StateWrite | None,
        requires: Sequence[StageCompleted],
        lazy: bool,
    ) -> AppendResult:
        self._check()
        self.eager += not lazy
        summary = self.runs.get(run_id)
        if summary is None:
            raise NotFound(f"unknown run {run_id!r}")
        self.counters["appends"] += 1
        self.counters["commits"] += 1
        if any(self._recorded.get((run_id, c.stage)) != c for c in requires):
            self.counters["voided"] += 1
            return AppendResult(tuple(0 for _ in events), void=True)
        started = self._started
        stale = [
            e
            for e in events
            if isinstance(e, StageCompleted | StageFailed) and e.attempt < started.get((run_id, e.stage), 0)
        ]
        if stale:
            self.counters["fenced"] += 1
            return AppendResult(tuple(0 for _ in events), fenced=True)
        completions = [e.stage for e in events if isinstance(e, StageCompleted)]
        if state is not None and any((run_id, stage) in self._recorded for stage in completions):
            self.counters["dropped_completions"] += 1  # recorded already: no second state write
            return AppendResult(tuple(0 for _ in events))
        if state is not None:
            current = self.get_state(state.workflow, state.session)
            if current.version != state.expected or state.base not in (None, current.tensors):
                self.counters["state_conflicts"] += 1
                return AppendResult(tuple(0 for _ in events), state_conflict=True)
            self.states[(state.workflow, state.session)] = SessionState(
                state.expected + 1, dict(state.tensors)
            )
        self.blobs.update(blobs or {})
        seqs = []
        for event in events:
            if isinstance(event, StageCompleted):
                if (run_id, event.stage) in self._recorded:
                    self.counters["dropped_completions"] += 1
                    seqs.append(0)
                    continue
                self._recorded[(run_id, event.stage)] = event
            elif isinstance(event, StageStarted):
                key = (run_id, event.stage)
                self._started[key] = max(self._started.get(key, 0), event.attempt)
            seqs.append(self._add(run_id, event))
            status = status_of(event)
            summary = self.runs[run_id]
            self.runs[run_id] = RunSummary(
                run_id,
                summary.workflow,
                summary.session,
                status or summary.status,
                summary.created,
                time.time(),
            )
        return AppendResult(tuple(seqs))

    def _check(self) -> None:
        if self.fail_appends:
            raise StorageUnavailable("the workflow log could not be written: injected failure")

    def _add(self, run_id: str, event: Event) -> int:
        seq = len(self.records) + 1
        self.records.append(Record(seq, run_id, time.time(), event))
        self.counters["events"] += 1
        return seq

    def read_run(self, run_id: str) -> list[Record]:
        return [r for r in self.records if r.run_id == run_id]

    def run_summary(self, run_id: str) -> RunSummary | None:
        return self.runs.get(run_id)

    def list_runs(
        self, status: str | None = None, workflow: str | None = None, limit: int = 100
    ) -> list[RunSummary]:
        runs = [
            r
            for r in self.runs.values()
            if (status is None or r.status == status) and (workflow is None or r.workflow == workflow)
        ]
        # Newest first, in the order the runs were started (``self.runs`` keeps it), as
        # the SQLite log orders them by sequence number: never by timestamps.
        return runs[::-1][:limit]

    def unfinished_runs(self) -> list[str]:
        return [r.run_id for r in self.runs.values() if r.status == "running"]

    def claim_runs(self) -> list[str]:
        return self.unfinished_runs()

    def get_blob(self, ref: str) -> bytes:
        try:
            return self.blobs[ref]
        except KeyError:
            raise NotFound(f"unknown blob {ref[:12]}") from None

    def get_state(self, workflow: str, session: str) -> SessionState:
        return self.states.get((workflow, session), SessionState(0, {}))

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        pass


if TYPE_CHECKING:
    from smss.ports import EventLog

    _check: EventLog = MemoryEventLog()
