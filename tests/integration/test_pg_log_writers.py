"""The PostgreSQL log with several writers on one schema (each with its own connection
and writer thread, as engines on different nodes have): the log's rules hold between
them, a run is driven by one engine and taken over when its lease lapses, and a
deadlock between two writers' batches is retried, not failed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from smss.errors import RunNotOwned
from smss.ports import AppendResult
from smss.store.postgres_log import PgEventLog
from smss.workflow.events import (
    RunFailed,
    RunResumed,
    RunStarted,
    StageCompleted,
    StageScheduled,
    StateWrite,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60.0))


def call(make: Any) -> Any:
    """One write in a fresh event loop (a write queues itself when called)."""

    async def go() -> Any:
        return await make()

    return run(go())


def started(key: str | None = None, session: str | None = None) -> RunStarted:
    return RunStarted("wf", "h", session, {}, idempotency_key=key)


@pytest.fixture
def logs(pg_url: str) -> Iterator[list[PgEventLog]]:
    """Two engines' logs on one schema."""
    opened = [PgEventLog(pg_url, owner=f"engine-{i}", lease_s=30.0) for i in range(2)]
    yield opened
    for log in opened:
        log.close()


def test_one_idempotency_key_gives_one_run_across_writers(logs: list[PgEventLog]) -> None:
    async def scenario() -> list[tuple[str, bool]]:
        return await asyncio.gather(
            *(logs[i % 2].start_run(f"r{i}", started(key="k"), {}) for i in range(40))
        )

    results = run(scenario())
    created = [run_id for run_id, new in results if new]
    assert len(created) == 1
    assert {run_id for run_id, _ in results} == set(created)
    assert [r.run_id for r in logs[0].list_runs()] == created


def test_concurrent_completions_of_a_stage_keep_the_first(logs: list[PgEventLog]) -> None:
    """Both writers complete the same 30 stages at once (one engine's two gateways):
    each stage ends up with exactly one StageCompleted, the other is dropped."""
    same = PgEventLog(logs[0]._db.url, owner="engine-0")
    try:

        async def scenario() -> list[AppendResult]:
            await logs[0].start_run("r1", started(), {})
            return await asyncio.gather(
                *(
                    log.append("r1", [StageCompleted(f"s{k}", 1, {}, instance=name)])
                    for k in range(30)
                    for log, name in ((logs[0], "a"), (same, "b"))
                )
            )

        results = run(scenario())
    finally:
        same.close()
    assert sum(1 for r in results if r.seqs[0] == 0) == 30
    completions = [r.event for r in logs[1].read_run("r1") if isinstance(r.event, StageCompleted)]
    assert sorted(c.stage for c in completions) == sorted(f"s{k}" for k in range(30))


def test_state_writes_of_two_engines_never_lose_an_update(logs: list[PgEventLog]) -> None:
    """Runs of one session on two engines write its state conditionally: every turn
    is applied once, none over another."""
    turns = 10

    async def writer(log: PgEventLog, run_id: str, k: int) -> int:
        tries = 0
        while True:
            tries += 1
            seen = log.get_state("wf", "u").version
            done = StageCompleted(f"turn-{k}", 1, {}, instance=run_id, state_version=seen + 1)
            result = await log.append(run_id, [done], state=StateWrite("wf", "u", seen, {"w": f"{k:064x}"}))
            if not result.state_conflict:
                return tries
            await asyncio.sleep(0)

    async def scenario() -> list[int]:
        await logs[0].start_run("a", started(session="u"), {})
        await logs[1].start_run("b", started(session="u"), {})
        return await asyncio.gather(*(writer(logs[k % 2], "ab"[k % 2], k) for k in range(turns)))

    run(scenario())
    assert logs[0].get_state("wf", "u").version == turns
    versions = [
        r.event.state_version
        for run_id in "ab"
        for r in logs[0].read_run(run_id)
        if isinstance(r.event, StageCompleted)
    ]
    assert sorted(v or 0 for v in versions) == list(range(1, turns + 1))


def test_a_run_is_driven_by_one_engine_and_taken_over_once_its_heartbeat_stops(pg_url: str) -> None:
    """A stalls: its heartbeat (every 20 minutes, with its hour's lease) does not move
    while B, whose lease is half a second, watches; B takes A's unfinished runs, and
    A's late records are refused."""
    a = PgEventLog(pg_url, owner="a", lease_s=3600.0)
    b = PgEventLog(pg_url, owner="b", lease_s=0.5)
    try:

        async def start() -> None:
            await a.start_run("r1", started(), {})
            await a.start_run("done", started(), {})
            await a.append("done", [RunFailed(None, "E", "m")])

        run(start())
        assert a.claim_runs() == ["r1"]
        assert b.claim_runs() == []  # A's heartbeat is seen for the first time: alive
        with pytest.raises(RunNotOwned):
            call(lambda: b.append("r1", [StageScheduled("x", 1)]))
        # A finished run is anyone's to resume: its records go to the one that does.
        assert call(lambda: b.append("done", [RunResumed()])).clean
        assert b.claim_runs() == ["done"]

        time.sleep(0.6)  # A's heartbeat has not moved for longer than B's lease
        assert b.claim_runs() == ["r1", "done"]
        # The stalled engine comes back: its late records are refused, the new owner's are not.
        with pytest.raises(RunNotOwned):
            call(lambda: a.append("r1", [StageScheduled("late", 1)]))
        assert call(lambda: b.append("r1", [StageScheduled("y", 1)])).clean
        assert [getattr(r.event, "stage", None) for r in b.read_run("r1")[1:]] == ["y"]
        assert a.claim_runs() == []
    finally:
        a.close()
        b.close()


def test_a_heartbeat_that_moves_keeps_its_runs(pg_url: str) -> None:
    a = PgEventLog(pg_url, owner="a", lease_s=0.3)  # beats every 0.1 s
    b = PgEventLog(pg_url, owner="b", lease_s=0.3)
    try:
        call(lambda: a.start_run("r1", started(), {}))
        for _ in range(8):  # well past the lease, watched all along
            assert b.claim_runs() == []
            time.sleep(0.1)
        assert a.claim_runs() == ["r1"]
    finally:
        a.close()
        b.close()


def test_an_engine_that_stops_hands_its_runs_over_at_once(pg_url: str) -> None:
    a = PgEventLog(pg_url, owner="a", lease_s=3600.0)
    b = PgEventLog(pg_url, owner="b", lease_s=3600.0)
    try:
        call(lambda: a.start_run("r1", started(), {}))
        assert b.claim_runs() == []
        a.close()
        assert b.claim_runs() == ["r1"]  # no need to wait out its hour
    finally:
        a.close()
        b.close()


def test_a_deadlock_between_two_writers_is_retried(logs: list[PgEventLog]) -> None:
    """Writer A's open transaction holds session 1 and wants session 2; writer B's holds
    2 and wants 1. PostgreSQL aborts one transaction; its batch is applied again, and
    every request of both is answered: none fails."""
    url = logs[0]._db.url
    a = PgEventLog(url, owner="a", lazy_delay_s=60.0)
    b = PgEventLog(url, owner="b", lazy_delay_s=60.0)
    try:

        def write(session: str, k: int) -> StateWrite:
            return StateWrite("wf", session, 0, {"h": f"{k:064x}"})

        async def scenario() -> list[AppendResult]:
            await a.start_run("ra", started(), {})
            await b.start_run("rb", started(), {})
            first_a = a.append("ra", [StageScheduled("a1", 1)], state=write("s1", 1), lazy=True)
            await asyncio.sleep(0.2)  # applied, not committed: A's transaction holds s1
            first_b = b.append("rb", [StageScheduled("b1", 1)], state=write("s2", 2), lazy=True)
            await asyncio.sleep(0.2)  # B's holds s2
            second_b = b.append("rb", [StageScheduled("b2", 1)], state=write("s1", 3))  # waits for A
            await asyncio.sleep(0.2)
            second_a = a.append("ra", [StageScheduled("a2", 1)], state=write("s2", 4))  # waits for B
            return list(await asyncio.gather(first_a, first_b, second_b, second_a))

        results = run(scenario())
    finally:
        a.close()
        b.close()
    # Whichever transaction was aborted and applied again: its writes now find the
    # other's committed state (version 1), so they conflict; the other's are written.
    assert sorted(r.state_conflict for r in results) == [False, False, True, True]
    log = logs[0]
    assert {s: log.get_state("wf", s).version for s in ("s1", "s2")} == {"s1": 1, "s2": 1}
    winners = {r.seqs[0] != 0 for r in results[:1] + results[3:]}
    assert len(winners) == 1  # A's two writes went together, and so did B's
