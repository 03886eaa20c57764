"""The workflow log: its contract and group commit, for both backends (SQLite and
PostgreSQL: ``open_log`` is parametrized over them); SQLite's failures, damaged files
and crash recovery; PostgreSQL's failed commits.

Crashes of the SQLite log are simulated in-process by *snapshots*: the database file plus the bytes
of the ``-wal`` file that existed at one instant, copied while the writer keeps
going. Nothing checkpoints in those tests, so the database file does not change
and the ``-wal`` file only grows: the copy is exactly what a process killed at that
instant leaves behind (real kills are in tests/integration/test_log_crash.py).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import shutil
import sqlite3
import struct
import tempfile
import threading
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postgres_fixtures import pg_execute
from smss.errors import Conflict, InvalidSpec, NotFound, Overloaded, StorageUnavailable
from smss.ports import AppendResult
from smss.store import _wal
from smss.store._log_schema import SCHEMA_VERSION
from smss.store.postgres_log import PgEventLog
from smss.store.sqlite_log import FaultHooks, SqliteEventLog
from smss.testing.faults import log_faults, on_pass
from smss.workflow.blobs import ref_of
from smss.workflow.events import (
    Event,
    Record,
    RunCompleted,
    RunFailed,
    RunParked,
    RunStarted,
    StageCompleted,
    StageFailed,
    StageScheduled,
    StageStarted,
    StateWrite,
    status_of,
)

T = TypeVar("T")
NO_CHECKPOINT = 1 << 40


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30.0))


def call(make: Callable[[], Awaitable[T]]) -> T:
    """Run one write of the log in a fresh event loop (a write queues itself when
    called, so it needs the loop then)."""

    async def go() -> T:
        return await make()

    return run(go())


def started(
    workflow: str = "wf", session: str | None = None, key: str | None = None, mark: str = "h"
) -> RunStarted:
    return RunStarted(workflow, mark, session, {"x": "0" * 64}, idempotency_key=key)


#: A test of SQLite's own behaviour (files, snapshots, checkpoints, fatal fsync errors).
SQLITE_ONLY = pytest.mark.parametrize("open_log", ["sqlite"], indirect=True)


class Opener:
    """Opens logs of one backend (by default on one file, or one schema) and, with
    ``execute``, runs SQL (``?`` placeholders) on their database behind their back."""

    def __init__(self, backend: str, tmp_path: Path, url: str | None) -> None:
        self.backend = backend
        self.path = tmp_path / "log.db"
        self.url = url
        self.opened: list[Any] = []

    def __call__(self, path: Path | None = None, **kwargs: Any) -> Any:
        if self.backend == "sqlite":
            log: Any = SqliteEventLog(path or self.path, **kwargs)
        else:
            assert path is None
            assert self.url is not None
            kwargs.pop("checkpoint_bytes", None)  # SQLite's
            log = PgEventLog(self.url, **kwargs)
        self.opened.append(log)
        return log

    def execute(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        if self.url is not None:
            return pg_execute(self.url, sql, args)
        with sqlite3.connect(self.path) as db:
            rows = db.execute(sql, args).fetchall()
        db.close()
        return rows


def _opener(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None

    def threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name in ("smss-log-writer", "smss-log-lease")]

    before = set(threads())
    opener = Opener(backend, tmp_path, url)
    yield opener
    for log in opener.opened:
        log.close()
    assert not set(threads()) - before


@pytest.fixture(params=["sqlite", "postgresql"])
def open_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens logs of each backend in turn: the contract both keep."""
    yield from _opener(request.param, request, tmp_path)


@pytest.fixture
def open_sqlite_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """SQLite's own behaviour: files, snapshots, checkpoints, fatal fsync errors."""
    yield from _opener("sqlite", request, tmp_path)


@pytest.fixture
def open_pg_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    yield from _opener("postgresql", request, tmp_path)


def example_events() -> list[Event]:
    """One of every event type but RunStarted; fails when a type is added without one."""
    examples: list[Event] = [
        StageScheduled("a", 1),
        StageStarted("a", 1, "fn", {"x": "1" * 64}, state_version=3),
        StageFailed("a", 1, "ModelError", "boom", "Traceback ...", "i-1", "node-1", retryable=False),
        StageCompleted("a", 2, {"y": "2" * 64}, "i-2", "node-1", state_version=4, duration_ms=1.5),
        RunFailed("a", "ModelError", "boom"),
        RunParked("definition changed"),
        RunCompleted({"y": "2" * 64}),
    ]
    for t in typing.get_args(Event):  # types added later (e.g. RunResumed) with their defaults
        if t is not RunStarted and not any(type(e) is t for e in examples):
            examples.append(t())
    return examples


# ---------------------------------------------------------------- the contract


def test_every_event_type_round_trips_and_survives_reopen(open_log: Opener) -> None:
    log = open_log()
    first = started(session="u1", key="k")

    async def scenario() -> list[int]:
        run_id, created = await log.start_run("r1", first, {})
        assert (run_id, created) == ("r1", True)
        seqs = [1]
        for event in example_events():
            result = await log.append("r1", [event])
            assert result.state_conflict is False
            seqs.extend(result.seqs)
            summary = log.run_summary("r1")
            assert summary is not None
            assert summary.status == (status_of(event) or summary.status)
        return seqs

    seqs = run(scenario())
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert 0 not in seqs
    expected = [first, *example_events()]
    records = log.read_run("r1")
    assert [r.event for r in records] == expected
    assert [r.seq for r in records] == seqs
    assert {r.run_id for r in records} == {"r1"}
    assert [r.ts for r in records] == sorted(r.ts for r in records)
    log.close()

    again = open_log()
    assert again.read_run("r1") == records
    summary = again.run_summary("r1")
    assert summary is not None
    assert (summary.workflow, summary.session) == ("wf", "u1")
    assert summary.created <= summary.updated
    assert again.read_run("nope") == []
    assert again.run_summary("nope") is None


def test_second_stage_completed_is_dropped(open_log: Opener) -> None:
    log = open_log()

    async def scenario() -> list[AppendResult]:
        await log.start_run("r1", started(), {})
        await log.start_run("r2", started(), {})
        return [
            await log.append("r1", [StageCompleted("a", 1, {}), StageCompleted("a", 2, {})]),
            await log.append("r1", [StageCompleted("a", 3, {}), StageScheduled("b", 1)]),
            await log.append("r1", [StageCompleted("b", 1, {})]),
            await log.append("r2", [StageCompleted("a", 1, {})]),  # another run: its own stage
        ]

    first, second, other_stage, other_run = run(scenario())
    assert first.seqs[0] > 0
    assert first.seqs[1] == 0
    assert second.seqs[0] == 0
    assert second.seqs[1] > 0
    assert other_stage.seqs[0] > 0
    assert other_run.seqs[0] > 0
    completions = [r.event for r in log.read_run("r1") if isinstance(r.event, StageCompleted)]
    assert [(c.stage, c.attempt) for c in completions] == [("a", 1), ("b", 1)]
    assert log.stats()["dropped_completions"] == 2


def test_results_of_a_reassigned_attempt_are_fenced_off(open_log: Opener) -> None:
    """Attempt 1 of stage a was reassigned (attempt 2 started): attempt 1's completion
    or failure is rejected whole, state write included, before and after attempt 2
    completes; attempt 2's completion is recorded once; a fenced result never appears."""
    log = open_log()
    blob = b"new state"
    ref = hashlib.sha256(blob).hexdigest()
    late_state = StateWrite("wf", "s", 0, {"h": ref})

    async def scenario() -> list[AppendResult]:
        await log.start_run("r1", started(session="s"), {})
        await log.append("r1", [StageStarted("a", 1, "fn", {})])
        await log.append("r1", [StageStarted("a", 2, "fn", {})])  # reassigned
        return [
            await log.append("r1", [StageCompleted("a", 1, {}), StageScheduled("b", 1)]),
            await log.append("r1", [StageFailed("a", 1, "InstanceLost", "gone")]),
            await log.append("r1", [StageCompleted("a", 2, {})]),
            await log.append("r1", [StageCompleted("a", 1, {"h": ref})], blobs={ref: blob}, state=late_state),
        ]

    early, failed, current, late = run(scenario())
    assert (early.fenced, failed.fenced, late.fenced) == (True, True, True)
    assert (early.clean, failed.clean, late.clean) == (False, False, False)
    assert current.clean
    assert not current.fenced
    events = [r.event for r in log.read_run("r1")]
    results = [(type(e).__name__, e.attempt) for e in events if isinstance(e, StageCompleted | StageFailed)]
    assert results == [("StageCompleted", 2)]
    assert not any(isinstance(e, StageScheduled) for e in events)  # nothing of a fenced batch
    assert log.get_state("wf", "s").version == 0  # the late state write never applied
    assert log.stats()["fenced"] == 3


def test_state_write_is_conditional_and_all_or_nothing(open_log: Opener) -> None:
    log = open_log()
    blob = b"state tensor"
    ref = ref_of(blob)

    async def scenario() -> tuple[AppendResult, AppendResult, AppendResult]:
        await log.start_run("r1", started(session="u1"), {})
        ok = await log.append(
            "r1",
            [StageCompleted("a", 1, {}, state_version=1)],
            state=StateWrite("wf", "u1", 0, {"h": "a" * 64}),
        )
        ok2 = await log.append(
            "r1", [StageScheduled("b", 1)], state=StateWrite("wf", "u1", 1, {"h": "b" * 64})
        )
        before = log.run_summary("r1")
        stale = await log.append(
            "r1",
            [StageScheduled("c", 1), StageCompleted("c", 1, {})],
            blobs={ref: blob},
            state=StateWrite("wf", "u1", 1, {"h": "c" * 64}),
        )
        assert log.run_summary("r1") == before  # not even its time of update
        return ok, ok2, stale

    ok, ok2, stale = run(scenario())
    assert not ok.state_conflict
    assert not ok2.state_conflict
    assert stale == AppendResult((0, 0), state_conflict=True)
    state = log.get_state("wf", "u1")
    assert (state.version, state.tensors) == (2, {"h": "b" * 64})
    # nothing of the conflicting batch: no events, no blob, no status or time change
    assert [type(r.event).__name__ for r in log.read_run("r1")] == [
        "RunStarted",
        "StageCompleted",
        "StageScheduled",
    ]
    with pytest.raises(NotFound):
        log.get_blob(ref)
    assert log.stats()["state_conflicts"] == 1
    assert log.get_state("wf", "other").version == 0
    assert log.get_state("wf", "other").tensors == {}


def test_a_state_write_computed_from_other_tensors_conflicts(open_log: Opener) -> None:
    """``base``: the version alone cannot tell two writers' states apart."""
    log = open_log()

    async def scenario() -> tuple[AppendResult, AppendResult]:
        await log.start_run("r1", started(session="u"), {})
        await log.append(
            "r1", [StageScheduled("a", 1)], state=StateWrite("wf", "u", 0, {"h": "x" * 64}, base={})
        )
        wrong = await log.append(
            "r1",
            [StageScheduled("b", 1)],
            state=StateWrite("wf", "u", 1, {"h": "y" * 64}, base={"h": "z" * 64}),
        )
        right = await log.append(
            "r1",
            [StageScheduled("c", 1)],
            state=StateWrite("wf", "u", 1, {"h": "y" * 64}, base={"h": "x" * 64}),
        )
        return wrong, right

    wrong, right = run(scenario())
    assert wrong.state_conflict
    assert not wrong.clean
    assert right.clean
    assert log.get_state("wf", "u").tensors == {"h": "y" * 64}


def test_an_append_requiring_a_completion_not_recorded_is_void(
    open_log: Opener,
) -> None:
    log = open_log()
    ours = StageCompleted("a", 1, {"y": "1" * 64}, "i-1")
    theirs = StageCompleted("a", 1, {"y": "2" * 64}, "i-2")

    async def scenario() -> tuple[AppendResult, ...]:
        await log.start_run("r1", started(), {})
        missing = await log.append("r1", [StageCompleted("b", 1, {})], requires=[ours])
        first = await log.append("r1", [theirs])
        other = await log.append("r1", [StageStarted("b", 1, "fn", {"x": "1" * 64})], requires=[ours])
        met = await log.append("r1", [StageStarted("b", 1, "fn", {"x": "2" * 64})], requires=[theirs])
        return missing, first, other, met

    missing, first, other, met = run(scenario())
    assert missing == AppendResult((0,), void=True)
    assert first.clean
    assert other.void  # a completion of that stage is recorded, but not the one relied on
    assert met.clean
    assert [type(r.event).__name__ for r in log.read_run("r1")] == [
        "RunStarted",
        "StageCompleted",
        "StageStarted",
    ]
    assert log.stats()["voided"] == 2


def test_lazy_appends_share_the_next_eager_commit(open_log: Opener) -> None:
    log = open_log(lazy_delay_s=60.0)

    async def scenario() -> None:
        await log.start_run("r1", started(), {})
        commits = log.stats()["commits"]
        lazy = [
            asyncio.ensure_future(log.append("r1", [StageScheduled(f"s{i}", 1)], lazy=True)) for i in range(5)
        ]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in lazy)  # held back: nothing waits for them yet
        end = await log.append("r1", [RunCompleted({})])
        results = await asyncio.gather(*lazy)
        assert all(r.clean for r in results)
        assert end.seqs[0] > max(r.seqs[0] for r in results)  # in order
        assert log.stats()["commits"] == commits + 1

    run(scenario())


def test_an_applied_lazy_append_is_invisible_until_its_commit(
    open_log: Opener,
) -> None:
    """The writer applies a lazy append early, in its open transaction: readers (and a
    crash) see nothing of it before the commit that acknowledges it."""
    log = open_log(lazy_delay_s=60.0)

    async def scenario() -> None:
        await log.start_run("r1", started(), {})
        lazy = asyncio.ensure_future(log.append("r1", [StageScheduled("a", 1)], lazy=True))
        await asyncio.sleep(0.1)  # well past the apply delay, far from the commit delay
        assert not lazy.done()
        assert [type(r.event).__name__ for r in log.read_run("r1")] == ["RunStarted"]
        await log.append("r1", [StageScheduled("b", 1)])
        assert (await lazy).clean

    run(scenario())
    assert [r.event for r in log.read_run("r1")[1:]] == [StageScheduled("a", 1), StageScheduled("b", 1)]


def test_a_lazy_append_is_durable_within_its_delay(open_log: Opener) -> None:
    log = open_log(lazy_delay_s=0.01)

    async def scenario() -> None:
        await log.start_run("r1", started(), {})
        result = await asyncio.wait_for(log.append("r1", [StageScheduled("a", 1)], lazy=True), 10)
        assert result.clean

    run(scenario())
    assert [type(r.event).__name__ for r in log.read_run("r1")] == ["RunStarted", "StageScheduled"]


def test_blobs_are_content_addressed_and_verified(open_log: Opener) -> None:
    log = open_log()
    data = b"\x00tensor bytes" * 100
    ref = ref_of(data)

    async def scenario() -> None:
        await log.start_run("r1", started(), {ref: data})
        await log.append("r1", [StageScheduled("a", 1)], blobs={ref: data})  # stored once

    run(scenario())
    assert log.get_blob(ref) == data
    with pytest.raises(NotFound):
        log.get_blob("f" * 64)
    log.close()
    assert open_log.execute("SELECT count(*) FROM blobs") == [(1,)]
    open_log.execute("UPDATE blobs SET data = ? WHERE ref = ?", b"rotten" + data[6:], ref)
    with pytest.raises(StorageUnavailable, match="corrupt"):
        open_log().get_blob(ref)


def test_start_run_is_idempotent(open_log: Opener) -> None:
    log = open_log()

    async def scenario() -> list[tuple[str, bool]]:
        # 100 submissions at once with one key: one run, everyone gets its id
        return await asyncio.gather(*(log.start_run(f"r{i}", started(key="k"), {}) for i in range(100)))

    results = run(scenario())
    assert results[0] == ("r0", True)
    assert set(results[1:]) == {("r0", False)}
    assert [r.run_id for r in log.list_runs()] == ["r0"]
    assert len(log.read_run("r0")) == 1
    assert call(lambda: log.start_run("r9", started(key="k"), {})) == ("r0", False)
    assert call(lambda: log.start_run("s1", started(), {})) == ("s1", True)
    with pytest.raises(Conflict):
        call(lambda: log.start_run("s1", started(), {}))
    assert log.stats()["runs_started"] == 2


def test_append_to_unknown_run_fails_alone(open_log: Opener) -> None:
    log = open_log()

    async def scenario() -> list[AppendResult | BaseException]:
        await log.start_run("r1", started(), {})
        return await asyncio.gather(
            log.append("r1", [StageScheduled("a", 1)]),
            log.append("ghost", [StageScheduled("a", 1)]),
            log.append("r1", [StageScheduled("b", 1)]),
            return_exceptions=True,
        )

    first, ghost, last = run(scenario())
    assert isinstance(ghost, NotFound)
    assert isinstance(first, AppendResult)
    assert isinstance(last, AppendResult)
    assert [r.seq for r in log.read_run("r1")] == [1, first.seqs[0], last.seqs[0]]
    assert log.read_run("ghost") == []
    with pytest.raises(TypeError, match="RunStarted"):
        call(lambda: log.append("r1", [started()]))


def test_runs_are_listed_by_seq_with_their_status(open_log: Opener) -> None:
    log = open_log()

    async def scenario() -> None:
        for i, wf in enumerate(["a", "b", "a", "b", "a"]):
            await log.start_run(f"r{i}", started(workflow=wf), {})
        await log.append("r1", [RunCompleted({})])
        await log.append("r2", [RunFailed(None, "E", "m")])
        await log.append("r3", [RunParked("changed")])

    run(scenario())
    assert [r.run_id for r in log.list_runs()] == ["r4", "r3", "r2", "r1", "r0"]
    assert [r.run_id for r in log.list_runs(limit=2)] == ["r4", "r3"]
    assert [r.run_id for r in log.list_runs(workflow="a")] == ["r4", "r2", "r0"]
    assert [r.run_id for r in log.list_runs(status="running", workflow="a")] == ["r4", "r0"]
    assert [r.run_id for r in log.list_runs(status="failed")] == ["r2"]
    assert log.list_runs(limit=0) == []
    assert log.unfinished_runs() == ["r0", "r4"]
    assert {r.run_id: r.status for r in log.list_runs()} == {
        "r0": "running",
        "r1": "completed",
        "r2": "failed",
        "r3": "parked",
        "r4": "running",
    }


# ---------------------------------------------------------------- group commit and concurrency


def test_group_commit_acknowledges_every_append_with_few_commits(
    open_log: Opener,
) -> None:
    log = open_log()

    async def scenario() -> list[AppendResult]:
        await log.start_run("r1", started(), {})
        return await asyncio.gather(*(log.append("r1", [StageScheduled(f"s{i}", 1)]) for i in range(500)))

    results = run(scenario())
    seqs = [r.seqs[0] for r in results]
    assert seqs == list(range(2, 502))  # one queue, in submission order
    stats = log.stats()
    assert stats["appends"] == 500
    assert stats["events"] == 501
    assert stats["commits"] < stats["appends"]
    assert [r.event for r in log.read_run("r1")[1:]] == [StageScheduled(f"s{i}", 1) for i in range(500)]


def test_concurrent_state_writers_never_lose_an_update(open_log: Opener) -> None:
    log = open_log()
    writers = 12

    async def writer(k: int) -> int:
        tries = 0
        while True:
            tries += 1
            seen = log.get_state("wf", "u").version
            completed = StageCompleted(f"turn-{k}", 1, {}, instance=f"w{k}", state_version=seen + 1)
            result = await log.append(
                "r1", [completed], state=StateWrite("wf", "u", seen, {"w": f"{k:064x}"})
            )
            if not result.state_conflict:
                return tries
            await asyncio.sleep(0)

    async def scenario() -> list[int]:
        await log.start_run("r1", started(session="u"), {})
        return await asyncio.gather(*(writer(k) for k in range(writers)))

    tries = run(scenario())
    assert log.get_state("wf", "u").version == writers
    completions = [r.event for r in log.read_run("r1") if isinstance(r.event, StageCompleted)]
    assert sorted(c.state_version or 0 for c in completions) == list(range(1, writers + 1))
    assert sorted(c.instance for c in completions) == sorted(f"w{k}" for k in range(writers))
    assert log.stats()["state_conflicts"] == sum(tries) - writers


def test_close_finishes_queued_appends_and_leaks_nothing(open_log: Opener) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    log = open_log()

    async def scenario() -> list[AppendResult | BaseException]:
        await log.start_run("r1", started(), {})
        tasks = [asyncio.ensure_future(log.append("r1", [StageScheduled(f"s{i}", 1)])) for i in range(50)]
        await asyncio.sleep(0)  # every task has queued its append
        log.close()
        with pytest.raises(StorageUnavailable, match="closed"):
            await log.append("r1", [StageScheduled("late", 1)])
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(scenario())
    assert all(isinstance(r, AppendResult) for r in results)
    with pytest.raises(StorageUnavailable, match="closed"):
        log.read_run("r1")
    log.close()  # idempotent
    assert len(os.listdir("/proc/self/fd")) == fds_before
    reopened = open_log()
    assert len(reopened.read_run("r1")) == 51


def test_a_new_run_is_refused_while_the_queue_is_full_and_appends_are_not(
    open_log: Opener,
) -> None:
    gate, entered = threading.Event(), threading.Event()
    gate.set()

    def hold() -> None:  # the writer, at a COMMIT: a store that fell behind
        entered.set()
        gate.wait(10)

    log = open_log(fault=FaultHooks(before_commit=hold), max_queued=3)

    async def scenario() -> None:
        await log.start_run("r1", started(), {})
        gate.clear()
        entered.clear()
        first = log.append("r1", [StageScheduled("a", 1)])
        await asyncio.to_thread(entered.wait, 10)  # the writer holds this one's commit
        queued = [log.append("r1", [StageScheduled(f"q{i}", 1)]) for i in range(3)]
        with pytest.raises(Overloaded, match="behind") as refused:
            log.start_run("r2", started(mark="2"), {})
        assert refused.value.retry_after_s is not None
        queued.append(log.append("r1", [StageScheduled("more", 1)]))  # a started run goes on
        gate.set()
        results = await asyncio.gather(first, *queued)
        assert all(r.clean for r in results)
        assert (await log.start_run("r2", started(mark="2"), {}))[1]  # room again

    run(scenario())
    assert len(log.read_run("r1")) == 6


# ---------------------------------------------------------------- failures


@SQLITE_ONLY
def test_failed_commit_acknowledges_nothing_and_is_fatal(open_log: Opener) -> None:
    calls = []

    def fail_second() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")

    log = open_log(fault=FaultHooks(before_commit=fail_second))

    async def scenario() -> list[AppendResult | BaseException]:
        await log.start_run("r1", started(), {})  # commit 1
        results = await asyncio.gather(
            *(log.append("r1", [StageScheduled(f"lost{i}", 1)]) for i in range(10)), return_exceptions=True
        )
        with pytest.raises(StorageUnavailable, match="could not be written"):
            await log.append("r1", [StageScheduled("after", 1)])
        with pytest.raises(StorageUnavailable):
            await log.start_run("r2", started(), {})
        return results

    results = run(scenario())
    assert all(isinstance(r, StorageUnavailable) for r in results)
    assert "Input/output error" in str(results[0])
    assert len(calls) == 2  # failed at once afterwards: no retry, no further commit
    assert len(log.read_run("r1")) == 1  # reads still work
    log.close()

    reopened = open_log()
    assert [r.event for r in reopened.read_run("r1")] == [started()]
    result = call(lambda: reopened.append("r1", [StageScheduled("again", 1)]))
    assert result.seqs == (2,)


@SQLITE_ONLY
def test_failure_after_commit_may_keep_the_batch_but_never_half(
    open_log: Opener,
) -> None:
    """Killed between COMMIT and the answer: the batch is durable, nobody was told."""
    log = open_log(fault=log_faults("log.after_commit:eio@2"))

    async def scenario() -> list[AppendResult | BaseException]:
        await log.start_run("r1", started(), {})
        return await asyncio.gather(
            *(log.append("r1", [StageScheduled(f"s{i}", 1), StageScheduled(f"t{i}", 1)]) for i in range(5)),
            return_exceptions=True,
        )

    results = run(scenario())
    assert all(isinstance(r, StorageUnavailable) for r in results)
    log.close()
    stages = [getattr(r.event, "stage", None) for r in open_log().read_run("r1")[1:]]
    # whole appends, in order: a prefix of s0 t0 s1 t1 ...
    assert stages == [x for i in range(len(stages) // 2) for x in (f"s{i}", f"t{i}")]
    assert stages  # the first batch at least was committed


def test_a_failed_commit_fails_its_batch_alone(open_pg_log: Opener) -> None:
    """PostgreSQL: a COMMIT that fails (here before it was sent) acknowledges nothing of
    its batch, and is not fatal: the server, not this process, owns the fsyncs, so the
    next batch commits on its own."""
    calls = []

    def fail_second() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")

    log = open_pg_log(fault=FaultHooks(before_commit=fail_second))

    async def scenario() -> list[AppendResult | BaseException]:
        await log.start_run("r1", started(), {})  # commit 1
        results = await asyncio.gather(
            *(log.append("r1", [StageScheduled(f"lost{i}", 1)]) for i in range(10)), return_exceptions=True
        )
        after = await log.append("r1", [StageScheduled("after", 1)])
        assert after.clean
        return results

    results = run(scenario())
    failed = [r for r in results if isinstance(r, StorageUnavailable)]
    assert failed  # the batch of commit 2 (perhaps not all ten: later ones may be in commit 3)
    assert all(isinstance(r, AppendResult | StorageUnavailable) for r in results)
    log.close()
    stages = [getattr(r.event, "stage", None) for r in open_pg_log().read_run("r1")[1:]]
    acked = [f"lost{i}" for i, r in enumerate(results) if isinstance(r, AppendResult)]
    assert stages == [*acked, "after"]  # nothing failed is there, everything acknowledged is


def test_a_failure_after_commit_keeps_the_batch_and_the_log_goes_on(open_pg_log: Opener) -> None:
    """PostgreSQL: an error between COMMIT and the answer (a connection lost as the
    server answered): the batch is durable, its callers were told it failed (they
    read the log to find out), and later batches commit."""
    log = open_pg_log(fault=log_faults("log.after_commit:eio@2"))

    async def scenario() -> list[AppendResult | BaseException]:
        await log.start_run("r1", started(), {})
        return await asyncio.gather(
            *(log.append("r1", [StageScheduled(f"s{i}", 1), StageScheduled(f"t{i}", 1)]) for i in range(5)),
            return_exceptions=True,
        )

    results = run(scenario())
    assert any(isinstance(r, StorageUnavailable) for r in results)
    assert call(lambda: log.append("r1", [StageScheduled("after", 1)])).clean
    stages = [getattr(r.event, "stage", None) for r in log.read_run("r1")[1:]]
    assert stages == [x for i in range(5) for x in (f"s{i}", f"t{i}")] + ["after"]  # all of it, once


def test_fault_specs() -> None:
    assert log_faults("").before_commit is None
    hooks = log_faults("log.before_commit:eio, log.after_checkpoint:enospc@2")
    assert hooks.before_commit is not None
    with pytest.raises(OSError, match="Input/output"):
        hooks.before_commit()
    assert hooks.after_checkpoint is not None
    hooks.after_checkpoint()
    with pytest.raises(OSError, match="No space"):
        hooks.after_checkpoint()
    for bad in ("log.nowhere:eio", "log.before_commit:explode", "log.before_commit:eio@x"):
        with pytest.raises(InvalidSpec):
            log_faults(bad)
    fired: list[int] = []
    hook = on_pass(3, lambda: fired.append(1))
    for _ in range(5):
        hook()
    assert fired == [1]


# ---------------------------------------------------------------- damaged files


def _populate(log: SqliteEventLog, runs: int = 1, appends: int = 30, first: int = 0) -> None:
    async def scenario() -> None:
        for r in range(first, first + runs):
            await log.start_run(f"r{r}", started(), {})
            for i in range(appends):  # one commit each: one transaction per append in the -wal
                await log.append(f"r{r}", [StageScheduled(f"s{i}", 1)])

    run(scenario())


def snapshot(src: Path, dst: Path) -> Path:
    """What a process killed now would leave: the database file and the bytes of the
    -wal file that exist at this instant (it only grows while nothing checkpoints)."""
    dst.mkdir(parents=True, exist_ok=True)
    wal = Path(f"{src}-wal")
    size = wal.stat().st_size if wal.exists() else 0
    shutil.copyfile(src, dst / src.name)
    with wal.open("rb") if size else open(os.devnull, "rb") as f:
        Path(f"{dst / src.name}-wal").write_bytes(f.read(size))
    return dst / src.name


def _seqs(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        seqs = [r[0] for r in db.execute("SELECT seq FROM events ORDER BY seq")]
    db.close()
    return seqs


@pytest.fixture
def crashed(open_sqlite_log: Opener, tmp_path: Path) -> tuple[Path, int]:
    """A crash snapshot of a log with one run of 31 events, 31 transactions in its -wal."""
    log = open_sqlite_log(checkpoint_bytes=NO_CHECKPOINT)
    _populate(log)
    path = snapshot(log.path, tmp_path / "crash")
    log.close()
    return path, 31


@SQLITE_ONLY
def test_a_crash_snapshot_keeps_every_acknowledged_event(crashed: tuple[Path, int], open_log: Opener) -> None:
    path, events = crashed
    assert Path(f"{path}-wal").stat().st_size > 0
    log = open_log(path)
    assert [r.seq for r in log.read_run("r0")] == list(range(1, events + 1))


@SQLITE_ONLY
def test_truncated_wal_recovers_a_prefix_of_transactions(
    crashed: tuple[Path, int], open_log: Opener, tmp_path: Path
) -> None:
    """What SQLite promises for a -wal file cut short: the database as of the last
    commit frame wholly inside what is left, exactly. (Transactions after the cut are
    lost although they were acknowledged: a shortened file is indistinguishable from
    one that never had them. What was checkpointed survives any cut: see
    tests/integration/test_log_crash.py.)"""
    path, events = crashed
    wal = Path(f"{path}-wal").read_bytes()
    frame = 24 + (_wal.page_size(path) or 4096)
    commit_ends = [  # where each transaction's commit frame ends: one event per transaction here
        end
        for end in range(32 + frame, len(wal) + 1, frame)
        if struct.unpack_from(">I", wal, end - frame + 4)[0]
    ]
    # The first transaction is the one-frame write that opened this -wal generation
    # after the checkpoint at open (see smss.store.sqlite_log); then one per event.
    assert len(commit_ends) == events + 1
    commit_ends = commit_ends[1:]
    rng = random.Random(7)
    cuts = sorted(
        {0, 32, len(wal) - 1, len(wal), *commit_ends[:3], *(rng.randrange(len(wal)) for _ in range(12))}
    )
    for n, cut in enumerate(cuts):
        copy = tmp_path / f"cut{n}" / path.name
        copy.parent.mkdir()
        shutil.copyfile(path, copy)
        Path(f"{copy}-wal").write_bytes(wal[:cut])
        log = open_log(copy)
        seqs = [r.seq for r in log.read_run("r0")]
        log.close()
        assert seqs == list(range(1, sum(end <= cut for end in commit_ends) + 1)), f"cut at {cut}"


def _frame_offset(page: int, index: int) -> int:
    return 32 + index * (24 + page)


def test_damaged_wal_frame_in_the_middle_is_refused(crashed: tuple[Path, int], tmp_path: Path) -> None:
    path, events = crashed
    wal_path = Path(f"{path}-wal")
    wal = bytearray(wal_path.read_bytes())
    page = _wal.page_size(path) or 4096
    frames = (len(wal) - 32) // (24 + page)
    wal[_frame_offset(page, frames // 3) + 24 + 200] ^= 0x55  # one bit flip in a page image
    wal_path.write_bytes(wal)
    for _ in range(2):  # refusing leaves the files as they were: it refuses again
        with pytest.raises(StorageUnavailable, match="-wal file is damaged"):
            SqliteEventLog(path)
        assert wal_path.read_bytes() == wal
    # SQLite alone opens it "fine" and silently drops every later transaction (and, on
    # closing, checkpoints what it kept and deletes the evidence):
    assert 1 <= len(_seqs(snapshot(path, tmp_path / "plain"))) < events // 2


@SQLITE_ONLY
def test_damaged_wal_header_is_refused(crashed: tuple[Path, int], open_log: Opener) -> None:
    path, _ = crashed
    wal_path = Path(f"{path}-wal")
    wal = bytearray(wal_path.read_bytes())
    wal[25] ^= 0x01  # the header's checksum: SQLite would ignore the whole file
    wal_path.write_bytes(wal)
    for _ in range(2):
        with pytest.raises(StorageUnavailable, match="-wal file is damaged"):
            SqliteEventLog(path)
        assert wal_path.read_bytes() == wal


@SQLITE_ONLY
def test_damage_in_the_last_commit_frame_reads_as_a_torn_tail(
    crashed: tuple[Path, int], open_log: Opener
) -> None:
    """The limit of detection: the last transaction's commit frame damaged looks exactly
    like that transaction torn by a crash, so it is dropped (the only loss possible)."""
    path, events = crashed
    wal_path = Path(f"{path}-wal")
    wal = bytearray(wal_path.read_bytes())
    wal[-1] ^= 0xFF
    wal_path.write_bytes(wal)
    assert [r.seq for r in open_log(path).read_run("r0")] == list(range(1, events))


@SQLITE_ONLY
def test_corrupt_or_foreign_files_are_refused(tmp_path: Path, open_log: Opener) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    with pytest.raises(StorageUnavailable, match="corrupt or unreadable"):
        SqliteEventLog(garbage)

    log = open_log(tmp_path / "big.db")
    call(lambda: log.start_run("r0", started(), {}))
    call(lambda: log.append("r0", [StageScheduled(f"s{i}" * 50, 1) for i in range(2000)]))
    log.close()
    size = (tmp_path / "big.db").stat().st_size
    with (tmp_path / "big.db").open("r+b") as f:  # truncated database file
        f.truncate(size // 2)
    truncated = (tmp_path / "big.db").read_bytes()
    with pytest.raises(StorageUnavailable, match="corrupt"):
        SqliteEventLog(tmp_path / "big.db")
    assert (tmp_path / "big.db").read_bytes() == truncated  # left as found, for whoever repairs it

    newer = tmp_path / "newer.db"
    open_log(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StorageUnavailable, match="newer"):
        SqliteEventLog(newer)


def test_an_unreadable_record_is_named_by_its_seq(open_log: Opener) -> None:
    log = open_log()
    _populate(log, appends=3)
    log.close()
    open_log.execute("UPDATE events SET body = ?, crc = 0 WHERE seq = 3", b"\xc1\xc1\xc1")  # undecodable
    body = open_log.execute("SELECT body FROM events WHERE seq = 4")[0][0]
    open_log.execute("UPDATE events SET body = ? WHERE seq = 4", bytes(body) + b"\x00")  # crc mismatch
    log = open_log()
    with pytest.raises(StorageUnavailable, match="seq 3"):
        log.read_run("r0")
    open_log.execute("DELETE FROM events WHERE seq = 3")
    with pytest.raises(StorageUnavailable, match="seq 4"):
        log.read_run("r0")


@SQLITE_ONLY
def test_the_writer_checkpoints_and_reuses_the_wal(open_log: Opener, tmp_path: Path) -> None:
    """Each checkpoint starts a new -wal generation (new salts) in the same file, not
    truncated: the frames of older generations are void, the file stays about one
    generation long, and a crash copy of the files recovers every event."""
    wal = Path(tmp_path / "log.db-wal")
    seen: list[tuple[bytes, int]] = []  # (salts, file size) after each checkpoint
    checkpointing = threading.Lock()  # held by the writer while it checkpoints

    def after() -> None:
        seen.append((wal.read_bytes()[16:24], wal.stat().st_size))
        checkpointing.release()

    log = open_log(
        checkpoint_bytes=64 * 1024,
        fault=FaultHooks(before_checkpoint=checkpointing.acquire, after_checkpoint=after),
    )
    for r in range(6):
        _populate(log, runs=1, appends=20, first=r)
    assert len({salts for salts, _ in seen}) == len(seen) >= 3, "a checkpoint did not start a new generation"
    # Each generation is counted from the wal-index, not from the file's size (which
    # would call for a checkpoint after every commit once the file is reused).
    assert len(seen) < log.stats()["commits"] / 2
    assert all(size >= 64 * 1024 for _, size in seen[1:]), "the -wal file was truncated, not reused"
    assert wal.stat().st_size < 3 * 64 * 1024
    index = _wal.WalIndex(tmp_path / "log.db-shm")
    current = index.wal_bytes()
    index.close()
    assert current is not None
    assert current <= wal.stat().st_size  # 0 when read just after the writer's checkpoint
    with checkpointing:  # a copy taken across a checkpoint would be no crash's
        copy = snapshot(log.path, tmp_path / "crash")
    assert [len(log.read_run(f"r{r}")) for r in range(6)] == [21] * 6
    log.close()
    again = open_log(copy)
    assert [len(again.read_run(f"r{r}")) for r in range(6)] == [21] * 6


def _reference_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("width", [8, 24, 4104, 65560])
def test_vectorised_wal_checksum_matches_sqlites_loop(big_endian: bool, width: int) -> None:
    rng = np.random.default_rng(width)
    rows = rng.integers(0, 256, size=(3, width), dtype=np.uint8)
    starts = [(0, 0), (0xFFFFFFFF, 1), (123456789, 0xDEADBEEF)]
    got = _wal.checksum(rows, big_endian, starts)
    assert got == [
        _reference_checksum(r.tobytes(), big_endian, *s) for r, s in zip(rows, starts, strict=True)
    ]


# ---------------------------------------------------------------- crashes, property-based


@dataclass
class Op:
    """One request of the property test, with what its caller was told."""

    id: int
    segment: int  # requests between two crashes share a segment
    run: str
    events: list[Event] = field(default_factory=list)
    state: StateWrite | None = None
    start: RunStarted | None = None
    answer: str = "pending"  # acked | conflict | existing | failed
    existing: str | None = None  # start_run's answer for a used idempotency key
    seqs: tuple[int, ...] = ()
    known: bool = True  # False: answered after the crash instant, so its fate is unknown
    refused: bool = False  # failed before its COMMIT: must not be in the log


Spec = tuple[str, int, int, int, bool]
GROUP = st.lists(
    st.tuples(
        st.sampled_from(["append", "append", "append", "state", "start"]),
        st.integers(0, 3),  # which run / idempotency key
        st.integers(1, 3),  # events
        st.sampled_from([0, 0, 0, -1, 1]),  # offset of a state write's expected version
        st.booleans(),  # add a StageCompleted of a shared stage (perhaps a duplicate)
    ),
    min_size=1,
    max_size=8,
)
CRASH = st.sampled_from(["none", "reopen", "snapshot", "snapshot at commit", "before_commit", "after_commit"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(GROUP, CRASH), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_any_interleaving_of_appends_and_crashes_replays_to_the_same_state(
    steps: list[tuple[list[Spec], str]], seed: int
) -> None:
    """Groups of concurrent requests, each group followed by nothing, a clean restart,
    a crash snapshot taken while it runs (from the event loop, or from the writer right
    after a COMMIT, before anyone was answered), or a COMMIT failing (before or after
    it hit the disk). After every step the log must hold what :func:`_verify` says."""
    with tempfile.TemporaryDirectory() as tmp:
        run(_crash_scenario(Path(tmp), steps, random.Random(seed)))


PG_CRASH = st.sampled_from(["none", "reopen", "before_commit", "after_commit"])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(GROUP, PG_CRASH), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_any_interleaving_of_appends_and_failed_commits_on_postgresql_replays_to_the_same_state(
    pg_server: str, steps: list[tuple[list[Spec], str]], seed: int
) -> None:
    """The same property on PostgreSQL (a fresh schema each example): groups of
    concurrent requests, each followed by nothing, a reopen, or a COMMIT failing before
    it was sent or after it returned (the batch failed alone: the log goes on)."""
    schema = f"t_{random.Random(seed).getrandbits(64):016x}_{len(steps)}"
    url = f"{pg_server}?schema={schema}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run(_crash_scenario(Path(tmp), steps, random.Random(seed), pg_url=url))
    finally:
        pg_execute(url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def _crash_scenario(
    tmp: Path, steps: list[tuple[list[Spec], str]], rng: random.Random, pg_url: str | None = None
) -> None:
    armed: set[str] = set()
    taken: list[tuple[Path, set[int]]] = []  # a snapshot from the writer: (path, requests answered then)
    batch: list[Op] = []
    log: SqliteEventLog

    def after_commit() -> None:
        if "after_commit" in armed:
            armed.clear()
            raise OSError(errno.EIO, "injected")
        if "snapshot at commit" in armed:  # durable, nobody answered yet: a kill right here
            armed.clear()
            answered = {op.id for op in batch if op.answer != "pending"}
            taken.append((snapshot(log.path, tmp / f"{len(ops)}w"), answered))

    def before_commit() -> None:
        if "before_commit" in armed:
            armed.clear()
            raise OSError(errno.EIO, "injected")

    hooks = FaultHooks(before_commit=before_commit, after_commit=after_commit)
    (tmp / "0").mkdir()

    def reopen(path: Path) -> Any:
        if pg_url is not None:
            return PgEventLog(pg_url, owner="e", fault=hooks)
        return SqliteEventLog(path, fault=hooks, checkpoint_bytes=NO_CHECKPOINT)

    log = reopen(tmp / "0" / "log.db")
    ops: list[Op] = []
    try:
        for name in ("r0", "r1"):
            ops.append(Op(len(ops), 0, name, start=RunStarted("wf", f"o{len(ops)}", "u", {})))
            await _submit(log, ops[-1])
        for segment, (group, crash) in enumerate(steps, start=1):
            live = _verify(log, ops)
            batch = [_make_op(len(ops) + i, segment, spec, live, log) for i, spec in enumerate(group)]
            ops.extend(batch)
            if crash in ("before_commit", "after_commit", "snapshot at commit"):
                armed.add(crash)
            tasks = [asyncio.ensure_future(_submit(log, op)) for op in batch]
            path = getattr(log, "path", tmp)
            answered = {op.id for op in batch}
            if crash == "snapshot":
                when = rng.choice(["at once", "queued", "first answer"])
                if when == "queued":
                    await asyncio.sleep(0)
                elif when == "first answer":
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                answered = {op.id for op in batch if op.answer != "pending"}
                path = snapshot(log.path, tmp / str(segment))
            await asyncio.gather(*tasks)
            if crash == "snapshot at commit" and taken:
                path, answered = taken.pop()
            for op in batch:
                op.known = op.id in answered
                op.refused = crash == "before_commit" and op.answer == "failed"
            armed.clear()
            if crash != "none":
                log.close()
                log = reopen(path)
        _verify(log, ops)
    finally:
        log.close()


def _make_op(op_id: int, segment: int, spec: Spec, live: list[str], log: SqliteEventLog) -> Op:
    kind, which, count, offset, completion = spec
    if kind == "start":
        key = None if which == 3 else f"k{which}"
        return Op(
            op_id, segment, f"n{op_id}", start=RunStarted("wf", f"o{op_id}", "u", {}, idempotency_key=key)
        )
    op = Op(op_id, segment, live[which % len(live)])
    op.events = [StageScheduled(f"o{op_id}.{i}", 1) for i in range(count)]
    if completion:
        op.events.append(StageCompleted(f"shared{which % 2}", 1, {}, instance=f"o{op_id}"))
    if kind == "state":
        seen = log.get_state("wf", "u").version
        op.state = StateWrite("wf", "u", max(0, seen + offset), {"s": f"{op_id:064x}"})
    return op


async def _submit(log: SqliteEventLog, op: Op) -> None:
    try:
        if op.start is not None:
            run_id, created = await log.start_run(op.run, op.start, {})
            op.answer = "acked" if created else "existing"
            op.existing = None if created else run_id
        else:
            result = await log.append(op.run, op.events, state=op.state)
            op.answer = "conflict" if result.state_conflict else "acked"
            op.seqs = result.seqs
    except StorageUnavailable:
        op.answer = "failed"


def _op_of(record: Record) -> int:
    event = record.event
    if isinstance(event, RunStarted):
        mark = event.spec_hash
    elif isinstance(event, StageCompleted):
        mark = event.instance
    else:
        mark = getattr(event, "stage", "")
    return int(mark[1:].split(".")[0])


def _verify(log: SqliteEventLog, ops: list[Op]) -> list[str]:
    """Check the log against every request so far; return the runs it holds.

    Requests are applied in submission order (one queue), each all or nothing, so
    the log must hold every request acknowledged before a crash, none that was
    refused, conflicted or found its key used, and of the rest (answered after the
    crash instant, or failing after COMMIT) whatever a crash at one instant leaves:
    a prefix. Replaying what it holds must reproduce every stored seq, each dropped
    completion, and the session state, with no stale state write applied."""
    runs = [s.run_id for s in reversed(log.list_runs(limit=10_000))]
    records = sorted((r for run_id in runs for r in log.read_run(run_id)), key=lambda r: r.seq)
    held: dict[int, list[Record]] = {}
    for record in records:
        held.setdefault(_op_of(record), []).append(record)
    assert list(held) == sorted(held), "requests out of submission order"
    index = {r.seq: i for i, r in enumerate(records)}
    version, tensors = 0, {}
    completed: set[tuple[str, str]] = set()
    keys: dict[str | None, str] = {}
    for op_id, recs in held.items():
        op = ops[op_id]
        assert not op.refused, f"request {op_id} failed before its COMMIT but is in the log"
        assert not (op.known and op.answer in ("conflict", "existing")), (
            f"request {op_id} was not to be written"
        )
        first = index[recs[0].seq]
        assert [index[r.seq] for r in recs] == list(range(first, first + len(recs))), "a request was split"
        assert {r.run_id for r in recs} == {op.run}
        if op.start is not None:
            assert [r.event for r in recs] == [op.start]
            key = op.start.idempotency_key
            assert key is None or key not in keys, "an idempotency key was used twice"
            keys[key] = op.run
            continue
        if op.state is not None:
            assert op.state.expected == version, "a stale state write was applied"
            version, tensors = version + 1, dict(op.state.tensors)
        expected: list[Event] = []
        seqs = iter(r.seq for r in recs)
        answer = []
        for event in op.events:
            if isinstance(event, StageCompleted):
                if (op.run, event.stage) in completed:
                    answer.append(0)  # dropped: the stage already has its completion
                    continue
                completed.add((op.run, event.stage))
            expected.append(event)
            answer.append(next(seqs, -1))
        assert [r.event for r in recs] == expected
        if op.known and op.answer == "acked":
            assert op.seqs == tuple(answer)

    def void(op: Op) -> bool:
        """A completion with a state write for a stage an earlier held request completed:
        the log writes nothing of it (its state must not apply twice)."""
        stages = {e.stage for e in op.events if isinstance(e, StageCompleted)}
        return op.state is not None and any(
            isinstance(r.event, StageCompleted) and r.event.stage in stages and r.run_id == op.run
            for held_id, recs in held.items()
            if held_id < op.id
            for r in recs
        )

    for op in ops:
        if op.known and op.answer == "acked" and void(op):
            assert op.id not in held
            assert set(op.seqs) == {0}
            continue
        if op.known and op.answer == "acked":
            assert op.id in held, f"acknowledged request {op.id} was lost"
        if op.known and op.answer == "existing" and op.start is not None:
            assert keys.get(op.start.idempotency_key) == op.existing
        later = [o.id for o in ops if o.segment == op.segment and o.id > op.id and o.id in held]
        if op.answer == "acked" and later and not void(op):
            assert op.id in held, f"request {op.id} missing before {later[0]}: not a prefix"
    state = log.get_state("wf", "u")
    assert (state.version, state.tensors) == (version, tensors)
    return runs


def test_requests_keep_their_order_wherever_they_are_applied(
    open_log: Opener,
) -> None:
    """Lazy requests are applied on the caller's loop when the writer is not using the
    connection, and by the writer otherwise; two loops in two threads, mixing lazy and
    eager requests, still find their events in the order they made them."""
    log = open_log(lazy_delay_s=0.002)

    async def session(run_id: str, seed: int) -> list[int]:
        rng = random.Random(seed)
        await log.start_run(run_id, started(), {})
        futures = []
        for i in range(120):
            futures.append(log.append(run_id, [StageScheduled(f"s{i}", 1)], lazy=rng.random() < 0.7))
            if rng.random() < 0.5:
                await asyncio.sleep(0 if rng.random() < 0.8 else 0.001)
        return [r.seqs[0] for r in await asyncio.gather(*futures)]

    results: dict[str, list[int]] = {}

    def thread(run_id: str, seed: int) -> None:
        results[run_id] = run(session(run_id, seed))

    threads = [threading.Thread(target=thread, args=(f"r{k}", k)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for run_id, seqs in results.items():
        assert len(seqs) == 120
        assert all(s > 0 for s in seqs)
        assert seqs == sorted(seqs)
        stages = [r.event.stage for r in log.read_run(run_id)[1:]]  # type: ignore[union-attr]
        assert stages == [f"s{i}" for i in range(120)]


class _PausingLock:
    """The log's connection lock, which can hold the writer thread at its next
    ``with`` until released: the moment between deciding to apply and applying."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False
        self.paused = threading.Event()
        self.resume = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self.inner.acquire(blocking, timeout))

    def release(self) -> None:
        self.inner.release()

    def __enter__(self) -> _PausingLock:
        if self.armed and threading.current_thread().name == "smss-log-writer":
            self.armed = False
            self.paused.set()
            self.resume.wait(10)
        self.inner.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.release()


@SQLITE_ONLY
def test_a_request_the_writer_is_about_to_apply_is_not_overtaken_by_a_later_one(
    open_log: Opener,
) -> None:
    """The writer takes a lazy request its caller's loop was too busy to apply; a
    request made after it, applied by that loop while the writer waits for the
    connection, must still come after it in the log."""
    log = open_log(lazy_delay_s=60.0)
    lock = _PausingLock(log._db_lock)
    log._db_lock = lock  # type: ignore[assignment]

    async def scenario() -> None:
        await log.start_run("r1", started(), {})
        lock.armed = True
        first = log.append("r1", [StageScheduled("first", 1)], lazy=True)
        assert lock.paused.wait(10)  # the loop is busy: the writer came for it instead
        second = log.append("r1", [StageScheduled("second", 1)], lazy=True)
        for _ in range(5):  # the loop's own apply gets its turn now
            await asyncio.sleep(0)
        lock.resume.set()
        await asyncio.gather(first, second, log.append("r1", [StageScheduled("third", 1)]))

    run(scenario())
    stages = [r.event.stage for r in log.read_run("r1")[1:]]  # type: ignore[union-attr]
    assert stages == ["first", "second", "third"]


def test_an_error_after_a_request_began_writing_loses_its_whole_batch(open_log: Opener) -> None:
    """A request is refused alone only before its first write; one that fails while
    writing (here a trigger aborts its event's insert, after the run's row was updated)
    takes its transaction with it: nothing of it, nor of the requests sharing its
    commit, is present or acknowledged, and the log goes on."""
    log = open_log(lazy_delay_s=60.0)

    async def start() -> None:
        await log.start_run("r1", started(), {})

    run(start())
    if open_log.backend == "sqlite":
        open_log.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON events WHEN NEW.stage = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
    else:
        open_log.execute(
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.stage = 'boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$"
        )
        open_log.execute("CREATE TRIGGER boom BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION boom()")

    async def scenario() -> list[object]:
        shared = log.append("r1", [StageScheduled("a", 1)], lazy=True)
        failing = log.append("r1", [StageScheduled("b", 1), RunFailed("boom", "E", "m")], lazy=True)
        await asyncio.sleep(0.05)  # both applied to the open transaction, not committed
        eager = log.append("r1", [StageScheduled("boom", 1)])
        return list(await asyncio.gather(shared, failing, eager, return_exceptions=True))

    results = run(scenario())
    assert all(isinstance(r, StorageUnavailable) for r in results)
    assert [type(r.event).__name__ for r in log.read_run("r1")] == ["RunStarted"]
    assert log.run_summary("r1").status == "running"  # type: ignore[union-attr]

    async def later() -> AppendResult:
        return await log.append("r1", [StageScheduled("c", 1)])

    assert run(later()).clean
    assert [type(r.event).__name__ for r in log.read_run("r1")] == ["RunStarted", "StageScheduled"]
