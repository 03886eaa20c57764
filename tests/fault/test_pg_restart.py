"""PostgreSQL stopped with ``pg_ctl stop -m immediate`` (no shutdown checkpoint, every
connection cut: what a crash of the server does) while the workflow log appends, then
started again (RELIABILITY 11). On a private server this test starts itself
(``initdb`` in a temporary directory, its own port), never the shared one.

* appends in flight fail with :class:`StorageUnreachable` (retryable: 503 with
  ``Retry-After``), none hangs;
* nothing acknowledged is lost, and nothing is written twice: every append's events
  are in the log whole, once, or (failed appends only) not at all;
* the log recovers by itself when the server is back: appends succeed again on the
  same log object, with no reopen.

The platform-level half (HTTP 503 while the database is down, runs resumed after) is
in ``test_the_platform_answers_503_while_the_database_is_down_and_recovers``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from wf_helpers import (
    REQUEST_TIMEOUT_S,
    STEP,
    TRACE_ENV,
    assert_once_per_stage,
    deploy_stage_models,
    deploy_workflow,
    output,
    platform,
    run_body,
    submit,
    tagged,
    wait_terminal,
    wait_until,
)

from postgres_fixtures import PrivateServer
from smss.api.errors import status_of
from smss.errors import StorageUnavailable, StorageUnreachable
from smss.store.postgres_log import PgEventLog
from smss.workflow.builder import Workflow
from smss.workflow.events import RunStarted, StageScheduled

APPENDERS = 8
OUTAGE_S = 1.5


def test_appends_across_an_immediate_stop_lose_nothing_acknowledged(private_pg: PrivateServer) -> None:
    log = PgEventLog(f"{private_pg.url}?schema=fault", owner="e1", lease_s=3600.0)
    acked: list[tuple[str, ...]] = []  # the stages of every acknowledged append
    failed: list[tuple[str, ...]] = []
    errors: list[BaseException] = []
    phase = {"name": "before"}
    after_restart: Counter[str] = Counter()

    async def appender(k: int, stop_at: float) -> None:
        i = 0
        # Until it was acknowledged a few times after the restart (or the deadline).
        while time.monotonic() < stop_at and after_restart[str(k)] < 3:
            i += 1
            stages = tuple(f"{k}/{i}/{j}" for j in range(1 + i % 3))  # a new name each try
            try:
                result = await asyncio.wait_for(
                    log.append("r", [StageScheduled(s, 1) for s in stages]), timeout=30
                )
            except StorageUnavailable as e:
                errors.append(e)
                failed.append(stages)
                await asyncio.sleep(0.05)
                continue
            assert result.clean
            acked.append(stages)
            if phase["name"] == "after":
                after_restart[str(k)] += 1

    async def scenario() -> None:
        await log.start_run("r", RunStarted("wf", "h", None, {}), {})
        stop_at = time.monotonic() + 60
        tasks = [asyncio.ensure_future(appender(k, stop_at)) for k in range(APPENDERS)]
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(private_pg.stop, "immediate")
        phase["name"] = "down"
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(private_pg.start)
        phase["name"] = "after"
        await asyncio.gather(*tasks)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
        records = log.read_run("r")
    finally:
        log.close()

    assert acked
    assert failed, "no append was in flight or made while the server was down"
    # Retryable, every one: the server was down, not the request wrong.
    assert all(isinstance(e, StorageUnreachable) for e in errors), {type(e).__name__ for e in errors}
    assert all(status_of(e) == 503 and e.retry_after_s for e in errors)
    # It recovered by itself: every appender was acknowledged again after the restart.
    assert set(after_restart) == {str(k) for k in range(APPENDERS)}, after_restart

    present = Counter(getattr(r.event, "stage", "") for r in records[1:])
    assert max(present.values()) == 1, "an event is in the log twice"
    for stages in acked:
        assert all(present[s] == 1 for s in stages), f"acknowledged append lost: {stages}"
    for stages in failed:  # a COMMIT cut off may have committed: then whole, never in part
        assert len({present[s] for s in stages}) == 1, f"failed append torn: {stages}"
    written = {s for stages in acked + failed for s in stages}
    assert set(present) <= written


@pytest.mark.slow
def test_the_platform_answers_503_while_the_database_is_down_and_recovers(
    private_pg: PrivateServer, tmp_path: Path
) -> None:
    """``smss serve --store`` on the private server: a workflow run submitted while the
    database is down gets 503 with ``Retry-After`` (quickly, not after a hang); once it
    is back, new runs complete, and runs acknowledged before the outage complete too."""
    traces = tmp_path / "trace"
    traces.mkdir()
    with platform(tmp_path / "data", {TRACE_ENV: str(traces)}) as p:
        p.start("--store", f"{private_pg.url}?schema=platform", "--run-lease", "2")
        deploy_stage_models(p.url, ["First", "Block"])
        wf = (
            Workflow("two")
            .stage("first", "wf_first", inputs={"x": "request.x"})
            .stage("block", "wf_block", inputs={"x": "first.y"})
            .output("y", "block.y")
        )
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            deploy_workflow(client, wf)
            # In flight across the outage: held in 'block' until the test lets it go.
            early = [submit(client, "two", {"x": tagged(t)}, wait=False)["run_id"] for t in (1, 2)]
            private_pg.stop("immediate")
            t0 = time.monotonic()
            down = client.post("/v1/workflows/two/runs", json=run_body({"x": tagged(3)}))
            assert down.status_code == 503, down.text
            assert int(down.headers["Retry-After"]) >= 1
            assert "Traceback" not in down.text
            assert time.monotonic() - t0 < 15  # refused, not hung
            (traces / "release").touch()  # the early runs' stage ends while the database is down
            time.sleep(1.0)
            private_pg.start()

            def completes() -> bool:
                r = client.post("/v1/workflows/two/runs", json=run_body({"x": tagged(4)}))
                return r.status_code == 200 and r.json()["status"] == "completed"

            wait_until(completes, 60, "a run to complete once the database is back")
            runs = wait_terminal(client, early, timeout_s=60)
        p.stop()
    for tag, run_id in zip((1, 2), early, strict=True):
        run = runs[run_id]
        assert run["status"] == "completed", run
        assert_once_per_stage(run, ("first", "block"))
        assert output(run, "y").tolist() == (tagged(tag) + 2 * STEP).tolist()
