"""RELIABILITY 10: a session's turn k killed exactly before, and exactly after, its new
state is recorded, through the named fault points in a real ``smss serve``:

* ``before``: ``stage.after_effect:kill`` at turn k's stateful stage (it computed the
  new state, nothing of it is recorded);
* ``after``: ``state.after_record:kill`` at turn k (the append carrying the new state
  was committed; the run's last stage is still computing).

Either way the log's session state is the last recorded turn (k-1 before, k after);
after a restart the client's retry of turn k (the same ``Idempotency-Key``) is the one
run the log holds, whose answer is what a failure-free run answers at turn k, and the
turn is applied to the session once: turn k+1 answers from state k, and the session
ends with exactly k+1 turns applied (``h2`` counts them, its version too).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from wf_helpers import (
    REQUEST_TIMEOUT_S,
    TRACE_ENV,
    WAIT_S,
    Platform,
    deploy_workflow,
    output,
    platform,
    run_body,
)

from smss.client import Client
from smss.workflow.blobs import decode_tensor
from smss.workflow.builder import Workflow

pytestmark = pytest.mark.slow

MODELS = Path(__file__).parent / "models" / "turns.py"
SESSION = "s1"
#: The turn that is killed, of TURNS turns.
KILLED, TURNS = 2, 3
TAG = 100


def turns() -> Workflow:
    return (
        Workflow("turns")
        .stage("acc", "turn_acc", inputs={"x": "request.x"}, state=True)
        .stage("out", "turn_out", inputs={"x": "acc.h"})
        .output("y", "out.y")
    )


def state_after(turn: int) -> list[list[float]]:
    """The session's state once turns 1..turn were each applied once, in order."""
    return [[TAG + turn, turn * (turn + 1) / 2, turn, 0]]


def answer_at(turn: int) -> list[list[float]]:
    return [[*state_after(turn)[0][:3], 100]]


def post_turn(client: httpx.Client, turn: int) -> httpx.Response:
    x = np.array([[TAG + turn, turn, 0, 0]], np.float32)
    return client.post(
        "/v1/workflows/turns/runs",
        content=msgspec.json.encode(run_body({"x": x}, SESSION, wait=True)),
        headers={"Content-Type": "application/json", "Idempotency-Key": f"turn-{turn}"},
    )


def completed(r: httpx.Response, turn: int) -> dict[str, Any]:
    assert r.status_code == 200, (r.status_code, r.text[:500])
    run: dict[str, Any] = r.json()
    assert run["status"] == "completed", run
    assert output(run, "y").tolist() == answer_at(turn), (turn, run["outputs"])
    return run


def session_state(log_db: Path) -> tuple[int, list[list[float]]] | None:
    """(version, h) of the session in the log on disk, or None before its first turn."""
    db = sqlite3.connect(f"{log_db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT version, tensors FROM session_state WHERE workflow = 'turns' AND session = ?", (SESSION,)
        ).fetchone()
        if row is None:
            return None
        ref = msgspec.msgpack.decode(row[1], type=dict[str, str])["h"]
        blob = db.execute("SELECT data FROM blobs WHERE ref = ?", (ref,)).fetchone()[0]
        return int(row[0]), decode_tensor(bytes(blob), ref).tolist()
    finally:
        db.close()


def log_rows(log_db: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"{log_db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def executions(trace_dir: Path) -> Counter[tuple[str, int]]:
    path = trace_dir / "turns.trace"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter((f, int(tag) - TAG) for f, tag in (line.split() for line in lines))


def _deploy(p: Platform) -> None:
    with Client(p.url) as admin:
        admin.deploy(f"{MODELS}:Acc")
        admin.deploy(f"{MODELS}:Out")
    with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
        deploy_workflow(client, turns())


# stage.after_effect passes twice a turn (acc, then out): turn k's acc is pass 2k-1.
FAULTS = {
    "before": f"stage.after_effect:kill@{2 * KILLED - 1}",
    "after": f"state.after_record:kill@{KILLED}",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("moment", ["before", "after"])
def test_a_turn_killed_around_its_state_record_keeps_the_last_recorded_state_and_applies_once(
    tmp_path: Path, moment: str
) -> None:
    traces = tmp_path / "trace"
    traces.mkdir()
    with platform(tmp_path / "data", {TRACE_ENV: str(traces), "SMSS_FAULT": FAULTS[moment]}) as p:
        p.start("--keep-alive", "300")
        _deploy(p)
        assert p.server is not None
        process = p.server.process
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            for turn in range(1, KILLED):
                completed(post_turn(client, turn), turn)
            with pytest.raises(httpx.TransportError):
                post_turn(client, KILLED)  # the platform dies under it
        process.wait(WAIT_S)
        assert process.returncode == -9, p.log()[-3000:]
        p.kill9()

        # What the dead platform recorded: the last recorded turn, nothing of a later one.
        recorded = KILLED - 1 if moment == "before" else KILLED
        assert session_state(p.log_db) == (recorded, state_after(recorded))
        assert executions(traces)[("turn_acc", KILLED)] == 1
        acc_done = log_rows(
            p.log_db, "SELECT count(*) FROM events WHERE type = 'StageCompleted' AND stage = 'acc'"
        )
        assert acc_done == [(recorded,)]
        assert log_rows(p.log_db, "SELECT status, count(*) FROM runs GROUP BY status ORDER BY status") == [
            ("completed", KILLED - 1),
            ("running", 1),
        ]

        p.env.pop("SMSS_FAULT")
        p.start("--keep-alive", "300")
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            retried = completed(post_turn(client, KILLED), KILLED)  # the client's retry
            again = completed(post_turn(client, KILLED), KILLED)  # and once more: the same run
            for turn in range(KILLED + 1, TURNS + 1):
                completed(post_turn(client, turn), turn)
        p.stop()

    assert again["run_id"] == retried["run_id"]
    assert session_state(p.log_db) == (TURNS, state_after(TURNS))
    assert log_rows(p.log_db, "SELECT status, count(*) FROM runs GROUP BY status") == [("completed", TURNS)]
    per_run = "SELECT count(*) FROM events WHERE type = 'StageCompleted' AND stage = 'acc' GROUP BY run_id"
    acc = [n for (n,) in log_rows(p.log_db, per_run)]
    assert acc == [1] * TURNS, acc
    ran = executions(traces)
    # Before the record, turn k's state is computed again after the restart (on state
    # k-1); after it, never again: the recorded state is the one the run goes on with.
    assert ran[("turn_acc", KILLED)] == (2 if moment == "before" else 1)
    assert all(ran[("turn_acc", t)] == 1 for t in range(1, TURNS + 1) if t != KILLED), ran
