"""Two workflow engines, each a real process, on one PostgreSQL log: one submits runs
and is killed with SIGKILL while they are in flight; the other, alive all along,
resumes them once the dead one's lease lapses and completes every one, with the
failure-free result, one ``StageCompleted`` per stage, and no stage the dead engine
completed executed again.

The stage functions are in-process arithmetic (each call noted in a file of its
engine's, one ``write(2)`` a line), slow enough that the kill lands mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from postgres_fixtures import pg_execute
from smss.store._log_ops import decode_event
from smss.workflow.blobs import decode_tensor
from smss.workflow.events import RunCompleted, RunStarted, StageCompleted

RUNS = 24
LEASE_S = 1.0

ENGINE = r"""
import asyncio, os, sys
import numpy as np
from smss.ports import CallResult, SystemClock
from smss.spec import FunctionSpec, TensorSpec
from smss.store.postgres_log import PgEventLog
from smss.workflow.builder import Workflow
from smss.workflow.engine import Engine
from smss.workflow.spec import validate_workflow

url, name, calls_path = sys.argv[1:4]
runs, lease = int(sys.argv[4]), float(sys.argv[5])
X, Y = (TensorSpec("x", "FP32", (1, 4)),), (TensorSpec("y", "FP32", (1, 4)),)
FN = {"inc": FunctionSpec(name="inc", inputs=X, outputs=Y, entrypoint="m.py:M")}
wf = (Workflow("w").stage("a", "inc", inputs={"x": "request.x"}).stage("b", "inc", inputs={"x": "a.y"})
      .stage("c", "inc", inputs={"x": "b.y"}).output("z", "c.y"))
SPEC = validate_workflow(wf.spec(), FN)
calls = os.open(calls_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

class Caller:
    def spec_of(self, function):
        return FN[function]
    async def call(self, function, inputs, outputs, timeout_s):
        x = np.asarray(inputs["x"])
        await asyncio.sleep(0.05)
        os.write(calls, f"{float(x[0, 0])}\n".encode())
        return CallResult({"y": x + np.float32(1)}, name, name)
    def prewarm(self, function):
        pass

async def main():
    log = PgEventLog(url, owner=name, lease_s=lease)
    engine = Engine(log, Caller(), lambda _n: SPEC, SystemClock(), rescan_s=lease / 4)
    async with engine.running() as e:
        for i in range(runs):
            x = np.full((1, 4), 1000.0 * (i + 1), np.float32)
            await e.submit("w", {"x": x}, wait=False)
        print("ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def _engine(url: str, name: str, calls: Path, runs: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", ENGINE, url, name, str(calls), str(runs), str(LEASE_S)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", "the engine did not start"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_a_live_engine_resumes_the_runs_of_a_killed_one_exactly_once(pg_url: str, tmp_path: Path) -> None:
    survivor = _engine(pg_url, "survivor", tmp_path / "survivor.calls", 0)
    victim = _engine(pg_url, "victim", tmp_path / "victim.calls", RUNS)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it once some stages completed, not all
            (done,) = pg_execute(pg_url, "SELECT count(*) FROM events WHERE type = 'StageCompleted'")[0]
            if int(done) >= RUNS // 2:
                break
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        unfinished = {r for (r,) in pg_execute(pg_url, "SELECT run_id FROM runs WHERE status = 'running'")}
        assert unfinished, "every run finished before the kill: nothing to resume"

        while time.monotonic() < killed_at + 60:
            running = pg_execute(pg_url, "SELECT count(*) FROM runs WHERE status <> 'completed'")
            if int(running[0][0]) == 0:
                break
            time.sleep(0.1)
        statuses = dict(pg_execute(pg_url, "SELECT run_id, status FROM runs"))
        assert len(statuses) == RUNS
        assert set(statuses.values()) == {"completed"}, statuses
        owners = dict(pg_execute(pg_url, "SELECT run_id, owner FROM runs"))
        assert {owners[r] for r in unfinished} == {"survivor"}  # it took every unfinished one over
    finally:
        _stop(victim)
        _stop(survivor)

    # One completion per stage of every run, by one engine or the other.
    completions = pg_execute(
        pg_url, "SELECT run_id, stage, count(*) FROM events WHERE type = 'StageCompleted' GROUP BY 1, 2"
    )
    assert len(completions) == RUNS * 3
    assert {int(n) for *_, n in completions} == {1}
    # No stage the victim completed ran again on the survivor: run i's stage k sees the
    # input 1000 (i + 1) + k, so each call names its stage of its run.
    survivor_calls = [float(v) for v in (tmp_path / "survivor.calls").read_text().split()]
    assert survivor_calls, "the survivor resumed nothing"
    assert len(set(survivor_calls)) == len(survivor_calls)  # nothing ran twice there either
    first_input: dict[str, float] = {}
    finals: dict[str, float] = {}
    by_victim: set[tuple[str, str]] = set()
    for run_id, body, crc, seq in pg_execute(pg_url, "SELECT run_id, body, crc, seq FROM events"):
        event = decode_event(int(seq), bytes(body), int(crc))
        if isinstance(event, RunStarted):
            first_input[run_id] = _value(pg_url, event.inputs["x"])
        elif isinstance(event, RunCompleted):
            finals[run_id] = _value(pg_url, event.outputs["z"])
        elif isinstance(event, StageCompleted) and event.instance == "victim":
            by_victim.add((run_id, event.stage))
    assert by_victim, "the victim completed nothing before it died"
    again = [(r, st) for r, st in by_victim if first_input[r] + "abc".index(st) in survivor_calls]
    assert not again, f"stages completed by the killed engine ran again: {again[:5]}"
    assert finals == {r: x + 3 for r, x in first_input.items()}  # the failure-free result


def _value(url: str, ref: str) -> float:
    (data,) = pg_execute(url, "SELECT data FROM blobs WHERE ref = ?", [ref])[0]
    return float(decode_tensor(bytes(data), ref).ravel()[0])
