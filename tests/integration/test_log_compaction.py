"""Compaction of the workflow log, on a real SQLite file, a real PostgreSQL schema, and
PostgreSQL with blobs in a directory (``--blob-dir``), driven by the real engine:
finished runs past the retention age go with their events and the blobs only they
referred to; runs in flight and session states stay whole; under churn the row
counts and the file's size stay bounded; a run in flight across compactions is
resumed after a restart and completes with the failure-free result.

The log runs on a virtual clock (its ``updated`` times and the retention age); the
stage functions are in-process, deterministic arithmetic.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import psycopg
import pytest

from smss.ports import CallResult, EventLog, Tensors
from smss.spec import FunctionSpec, TensorSpec
from smss.store.blob_dir import BlobDirectory
from smss.store.postgres_log import PgEventLog
from smss.store.sqlite_log import Retention, SqliteEventLog
from smss.testing.clock import FakeClock
from smss.workflow.blobs import decode_tensor
from smss.workflow.builder import Workflow
from smss.workflow.engine import Engine
from smss.workflow.events import Event, RunCompleted, RunStarted, StageCompleted, StageStarted
from smss.workflow.spec import WorkflowSpec, validate_workflow

T = TypeVar("T")
AGE_S = 100.0
V = TensorSpec("x", "FP32", (1, 4))


def fn(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> FunctionSpec:
    return FunctionSpec(
        name=name,
        inputs=tuple(TensorSpec(n, "FP32", (1, 4)) for n in inputs),
        outputs=tuple(TensorSpec(n, "FP32", (1, 4)) for n in outputs),
        entrypoint="m.py:M",
    )


FUNCTIONS = {"inc": fn("inc", ("x",), ("y",)), "acc": fn("acc", ("x", "h"), ("h",))}


class Caller:
    """In-process stage functions; ``gate`` holds back calls whose input's first value is in it."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gate: dict[float, asyncio.Event] = {}

    def spec_of(self, function: str) -> FunctionSpec:
        return FUNCTIONS[function]

    async def call(
        self, function: str, inputs: Tensors, outputs: tuple[str, ...], timeout_s: float
    ) -> CallResult:
        self.calls[function] += 1
        x = np.asarray(inputs["x"])
        gate = self.gate.get(float(x[0, 0]))
        if gate is not None:
            await gate.wait()
        if function == "inc":
            return CallResult({"y": x + np.float32(1)}, "inc-1", "local")
        return CallResult({"h": np.asarray(inputs["h"]) + x}, "acc-1", "local")

    def prewarm(self, function: str) -> None:
        pass


def workflow() -> WorkflowSpec:
    wf = (
        Workflow("w")
        .stage("a", "inc", inputs={"x": "request.x"})
        .stage("s", "acc", inputs={"x": "a.y"}, state=True)
        .output("h", "s.h")
    )
    return validate_workflow(wf.spec(), FUNCTIONS)


def engine(log: EventLog, caller: Caller) -> Engine:
    spec = workflow()
    return Engine(log, caller, lambda _name: spec, FakeClock())


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 100.0))


def request(value: float) -> np.ndarray:
    return np.full((1, 4), value, np.float32)


class Store:
    """One backend of the log under test, and a look at its tables behind its back."""

    def __init__(self, kind: str, tmp_path: Path, url: str | None) -> None:
        self.kind = kind
        self.path = tmp_path / "log.db"
        self.url = url
        self.blob_dir = tmp_path / "blobs" if kind == "postgresql+blob-dir" else None

    def open(self, clock: FakeClock, retention: Retention | None = None) -> Any:
        if self.url is None:
            return SqliteEventLog(self.path, clock=clock, retention=retention)
        blobs = None if self.blob_dir is None else BlobDirectory(self.blob_dir)
        return PgEventLog(self.url, clock=clock, retention=retention, blobs=blobs)

    def _query(self, fn: Callable[[Callable[[str], list[Any]]], T]) -> T:
        """``fn`` given a query function, on one snapshot: the writer may be compacting
        meanwhile (it answers a commit first)."""
        if self.url is None:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            try:
                db.execute("BEGIN")
                return fn(lambda sql: db.execute(sql).fetchall())
            finally:
                db.close()
        server, _, query = self.url.partition("?")
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{query.removeprefix("schema=")}"')
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            return fn(lambda sql: conn.execute(sql).fetchall())  # type: ignore[arg-type]

    def counts(self) -> dict[str, int]:
        def count(q: Callable[[str], list[Any]]) -> dict[str, int]:
            out = {t: int(q(f"SELECT count(*) FROM {t}")[0][0]) for t in ("runs", "events")}
            if self.url is None:
                out["pages"] = int(q("PRAGMA page_count")[0][0])
            return out

        out = self._query(count)
        out["blobs"] = len(self._stored(lambda sql: []) if self.blob_dir else self._query(self._stored))
        return out

    def _stored(self, q: Callable[[str], list[Any]]) -> set[str]:
        if self.blob_dir is not None:
            return {p.name for p in self.blob_dir.glob("*/*") if not p.name.startswith(".")}
        return {str(r[0]) for r in q("SELECT ref FROM blobs")}

    def referenced_and_stored(self) -> tuple[set[str], set[str]]:
        """Every blob ref the remaining events and session states name; every blob stored."""
        decoder = msgspec.msgpack.Decoder(dict[str, str])
        events = msgspec.msgpack.Decoder(Event)
        # Files before the database: only compaction runs meanwhile, and it removes a
        # file after its commit, so the listing holds at least what the snapshot refers to.
        files = self._stored(lambda sql: []) if self.blob_dir is not None else None

        def look(q: Callable[[str], list[Any]]) -> tuple[set[str], set[str]]:
            refs: set[str] = set()
            for (body,) in q("SELECT body FROM events"):
                e = events.decode(bytes(body))
                if isinstance(e, RunStarted | StageStarted):
                    refs.update(e.inputs.values())
                elif isinstance(e, StageCompleted | RunCompleted):
                    refs.update(e.outputs.values())
            for (tensors,) in q("SELECT tensors FROM session_state"):
                refs.update(decoder.decode(bytes(tensors)).values())
            return refs, self._stored(q) if files is None else files

        return self._query(look)


@pytest.fixture(params=["sqlite", "postgresql", "postgresql+blob-dir"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    return Store(request.param, tmp_path, url)


SESSIONS = 4


def test_compaction_keeps_the_log_bounded_and_runs_in_flight_whole(store: Store) -> None:
    clock = FakeClock()
    caller = Caller()
    turns: Counter[str] = Counter()  # per session, turns completed: the state is their sum
    sums: dict[str, float] = {}

    async def turn(e: Engine, session: str, value: float) -> None:
        outcome = await e.submit("w", {"x": request(value)}, session=session)
        assert outcome.status == "completed", outcome
        assert outcome.outputs is not None
        sums[session] = sums.get(session, 0.0) + value + 1
        np.testing.assert_array_equal(outcome.outputs["h"], request(sums[session]))
        turns[session] += 1

    sizes: list[dict[str, int]] = []

    async def churn() -> str:
        log = store.open(clock, Retention(AGE_S, every_s=0.0))
        try:
            async with engine(log, caller).running() as e:
                # One run that stays in flight throughout (its stage is held back).
                caller.gate[500.0] = asyncio.Event()
                stuck = (await e.submit("w", {"x": request(500.0)}, session="stuck", wait=False)).run_id
                # A session with one early turn: its run goes, its state must stay.
                await turn(e, "lonely", 7.0)
                for cycle in range(12):
                    for i in range(10):
                        await turn(e, f"s{i % SESSIONS}", float(cycle * 10 + i + 1))
                    # Measured before the clock moves on: a pass that runs after the last
                    # commit finds nothing new to remove, whenever it reads the clock.
                    sizes.append(store.counts())
                    refs, stored = store.referenced_and_stored()
                    assert refs <= stored, f"compaction removed blobs still referred to: {refs - stored}"
                    if store.blob_dir is None:  # files go just after the pass commits: see below
                        assert stored <= refs, f"blobs nothing refers to were kept: {len(stored - refs)}"
                    clock.advance(AGE_S * 2)  # everything finished so far is past the age
                # Each cycle's runs are removed by the next cycle's commits: at most about
                # two cycles' runs (and the stuck one) remain.
                assert sizes[-1]["runs"] <= 2 * 10 + 1, sizes[-1]
                assert log.get_state("w", "lonely").version == 1
                assert log.stats()["compacted_runs"] >= 100
                return stuck
        finally:
            log.close()

    stuck = run(churn())
    refs, stored = store.referenced_and_stored()  # the log closed: its last pass is done
    assert refs <= stored
    assert stored <= refs, f"blobs nothing refers to were kept: {len(stored - refs)}"
    # Bounded under churn: rows do not grow with the number of cycles, nor the file.
    late = sizes[4:]
    assert max(s["runs"] for s in late) <= 21
    assert max(s["events"] for s in late) <= max(s["events"] for s in sizes[:4]) * 1.5
    assert max(s["blobs"] for s in late) <= max(s["blobs"] for s in sizes[:4]) * 1.5
    if "pages" in sizes[-1]:
        assert sizes[-1]["pages"] <= sizes[3]["pages"] * 1.2, [s["pages"] for s in sizes]

    async def restart() -> None:
        log = store.open(clock, Retention(AGE_S, every_s=0.0))
        try:
            summary = log.run_summary(stuck)
            assert summary is not None
            assert summary.status == "running"  # old, but never compacted: in flight
            caller.gate.clear()
            async with engine(log, caller).running() as e:
                await asyncio.sleep(0)
                for _ in range(2000):
                    s = log.run_summary(stuck)
                    if s is not None and s.status != "running":
                        break
                    await asyncio.sleep(0.01)
                # The sessions' states survived compaction: the next turns build on them.
                for session in list(sums):
                    await turn(e, session, 1000.0)
            summary = log.run_summary(stuck)
            assert summary is not None
            assert summary.status == "completed"
            out = [r.event for r in log.read_run(stuck) if isinstance(r.event, RunCompleted)]
            (completed,) = out
            h = decode_tensor(log.get_blob(completed.outputs["h"]), completed.outputs["h"])
            np.testing.assert_array_equal(h, request(501.0))  # zero state + (500 + 1)
        finally:
            log.close()

    run(restart())


def _ref_tables(path: Path) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]]]:
    db = sqlite3.connect(path)
    try:
        runs = {(str(a), str(b)) for a, b in db.execute("SELECT ref, run_id FROM blob_refs")}
        states = {
            (str(a), str(b), str(c))
            for a, b, c in db.execute("SELECT ref, workflow, session FROM state_refs")
        }
    finally:
        db.close()
    return runs, states


def test_a_log_from_before_compaction_is_indexed_when_opened(tmp_path: Path) -> None:
    """A log of schema 1 (no reference tables) gets them filled from its records at open."""
    path = tmp_path / "log.db"
    caller = Caller()

    async def some_runs() -> None:
        log = SqliteEventLog(path)
        try:
            async with engine(log, caller).running() as e:
                for i in range(6):
                    await e.submit("w", {"x": request(float(i))}, session=f"s{i % 2}")
        finally:
            log.close()

    run(some_runs())
    written = _ref_tables(path)
    assert written[0]
    assert len(written[1]) == 2
    db = sqlite3.connect(path)
    for statement in (
        "DROP TABLE blob_refs",
        "DROP TABLE state_refs",
        "DROP INDEX runs_by_updated",
        "PRAGMA user_version = 1",
    ):
        db.execute(statement)
    db.commit()
    db.close()
    SqliteEventLog(path).close()
    assert _ref_tables(path) == written
