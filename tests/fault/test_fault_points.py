"""Fault points with real processes: each action does what it says, ``smss serve``
runs them only when told it is a test, a platform killed at ``stage.after_effect``
records the stage once, and a platform stalled there (SIGSTOP) while another one
took the run over has its late completion fenced off (RELIABILITY items 1 and 3).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from wf_helpers import (
    REQUEST_TIMEOUT_S,
    SERVER_ENV,
    STEP,
    TRACE_ENV,
    WAIT_S,
    Platform,
    assert_once_per_stage,
    deploy_stage_models,
    deploy_workflow,
    events_of,
    get_run,
    output,
    platform,
    submit,
    tagged,
    trace,
    wait_terminal,
)

from smss.testing import inject
from smss.testing.server import free_port, wait_until
from smss.workflow.builder import Workflow

pytestmark = pytest.mark.slow


def _hitting(spec: str, point: str) -> subprocess.Popen[str]:
    code = (
        "from smss import faults\n"
        f"faults.install({spec!r}); print('before', flush=True)\n"
        f"faults.hit({point!r}); print('after', flush=True)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_kill_kills_the_process_at_the_point() -> None:
    proc = _hitting("stage.after_effect:kill", "stage.after_effect")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -9
    assert out == "before\n"


def test_stop_stops_the_process_until_it_is_resumed() -> None:
    proc = _hitting("instance.before_reply:stop", "instance.before_reply")
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "before\n"
        inject.wait_state(proc.pid, "Tt", timeout_s=30)
        inject.resume(proc.pid)
        out, _ = proc.communicate(timeout=60)
    finally:
        inject.kill(proc.pid)
        proc.wait()
    assert (out, proc.returncode) == ("after\n", 0)


def test_stop_in_a_thread_stops_that_thread_at_the_point() -> None:
    """The point fires in an event loop's thread while the main thread is busy: the
    calling thread must not run on past the point (a process-directed SIGSTOP would be
    taken by the main thread, and the caller would go on until the group stop caught it)."""
    code = (
        "import threading, time\n"
        "from smss import faults\n"
        "faults.install('instance.before_reply:stop')\n"
        "def loop():\n"
        "    print('before', flush=True)\n"
        "    faults.hit('instance.before_reply')\n"
        "    print('after', flush=True)\n"
        "t = threading.Thread(target=loop); t.start()\n"
        "while t.is_alive(): sum(range(1000))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"before\n"
        inject.wait_state(proc.pid, "Tt", timeout_s=30)
        os.set_blocking(proc.stdout.fileno(), False)
        for _ in range(20):  # whatever the stopped process wrote is in the pipe by now
            assert proc.stdout.read() in (None, b""), "the caller ran on past the point"
        os.set_blocking(proc.stdout.fileno(), True)
        inject.resume(proc.pid)
        out, _ = proc.communicate(timeout=60)
    finally:
        inject.kill(proc.pid)
        proc.wait()
    assert (out, proc.returncode) == (b"after\n", 0)


def _serve(tmp_path: Path, spec: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "smss.cli",
            "serve",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **SERVER_ENV, "SMSS_FAULT": spec},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_serve_refuses_fault_points_unless_told_it_is_a_test(tmp_path: Path) -> None:
    refused = _serve(tmp_path, "stage.after_effect:kill")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "SMSS_FAULT" in refused.stderr
    assert "--allow-faults" in refused.stderr
    bad = _serve(tmp_path, "stage.nowhere:kill", "--allow-faults")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "stage.nowhere" in bad.stderr


def two_stages() -> Workflow:
    return (
        Workflow("two")
        .stage("first", "wf_first", inputs={"x": "request.x"})
        .stage("last", "wf_last", inputs={"x": "first.y"})
        .output("y", "last.y")
    )


def _deploy(p: Platform) -> None:
    deploy_stage_models(p.url, ["First", "Last"])
    with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
        deploy_workflow(client, two_stages())


def _results(log_db: Path, stage: str) -> list[tuple[str, int]]:
    db = sqlite3.connect(f"{log_db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT type, attempt FROM events WHERE stage = ? AND type IN "
            "('StageStarted', 'StageCompleted', 'StageFailed') ORDER BY seq",
            (stage,),
        ).fetchall()
    finally:
        db.close()
    return [(str(t), int(a)) for t, a in rows]


@pytest.mark.timeout(300)
def test_a_kill_between_effect_and_record_runs_the_stage_again_and_records_it_once(tmp_path: Path) -> None:
    """RELIABILITY 1: ``stage.after_effect:kill`` kills the platform after the first
    stage executed and before its completion was recorded; after a restart (no fault)
    the stage runs again, one StageCompleted is recorded, and the run completes."""
    traces = tmp_path / "trace"
    traces.mkdir()
    with platform(tmp_path / "data", {TRACE_ENV: str(traces), "SMSS_FAULT": "stage.after_effect:kill"}) as p:
        p.start("--keep-alive", "300")
        _deploy(p)
        assert p.server is not None
        process = p.server.process
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            run_id = submit(client, "two", {"x": tagged(7)}, wait=False)["run_id"]
        process.wait(WAIT_S)
        assert process.returncode == -9, p.log()[-3000:]
        p.kill9()  # what the dead platform left behind
        assert trace(traces, "wf_first") == {7: 1}
        assert _results(p.log_db, "first") == [("StageStarted", 1)]

        p.env.pop("SMSS_FAULT")
        p.start("--keep-alive", "300")
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            run = wait_terminal(client, [run_id])[run_id]
        p.stop()
    assert run["status"] == "completed", run
    assert_once_per_stage(run, ("first", "last"))
    assert output(run, "y").tolist() == (tagged(7) + 2 * STEP).tolist()
    assert trace(traces, "wf_first") == {7: 2}  # at least once: again after the kill
    assert _results(p.log_db, "first") == [("StageStarted", 1), ("StageStarted", 2), ("StageCompleted", 2)]


@pytest.mark.timeout(300)
def test_a_stalled_platforms_late_completion_is_fenced_off(tmp_path: Path) -> None:
    """RELIABILITY 3: platform A stops itself (SIGSTOP) after stage ``first`` executed,
    before recording it. Platform B, on the same data directory, recovers the run,
    starts ``first`` again (attempt 2) and completes the run. A is resumed: its late
    completion of attempt 1 is rejected by the log (fenced), A says so in its log
    counters and reports the run as completed; the log holds one completion, B's.
    (``@1``: A stops at its first pass only.)"""
    traces = tmp_path / "trace"
    traces.mkdir()
    data = tmp_path / "data"
    env = {TRACE_ENV: str(traces)}
    with platform(data, {**env, "SMSS_FAULT": "stage.after_effect:stop@1"}) as a, platform(data, env) as b:
        a.start("--keep-alive", "300")
        _deploy(a)
        assert a.server is not None
        pid = a.server.process.pid
        try:
            with httpx.Client(base_url=a.url, timeout=REQUEST_TIMEOUT_S) as client:
                run_id = submit(client, "two", {"x": tagged(9)}, wait=False)["run_id"]
            inject.wait_state(pid, "Tt", timeout_s=WAIT_S)
            assert trace(traces, "wf_first") == {9: 1}
            assert _results(a.log_db, "first") == [("StageStarted", 1)]

            b.start("--keep-alive", "300")
            with httpx.Client(base_url=b.url, timeout=REQUEST_TIMEOUT_S) as client:
                run = wait_terminal(client, [run_id])[run_id]
            assert run["status"] == "completed", run
        finally:
            inject.resume(pid)
        with httpx.Client(base_url=a.url, timeout=REQUEST_TIMEOUT_S) as client:
            wait_until(
                lambda: client.get("/v1/log/stats").json().get("fenced", 0) == 1, WAIT_S, "A's fenced result"
            )
            seen_by_a = get_run(client, run_id)
        a.stop()
        b.stop()
    assert seen_by_a["status"] == "completed", seen_by_a
    assert_once_per_stage(run, ("first", "last"))
    done = events_of(run, "StageCompleted", "first")
    assert [e["attempt"] for e in done] == [2], done
    assert output(run, "y").tolist() == (tagged(9) + 2 * STEP).tolist()
    assert _results(data / "log.db", "first") == [
        ("StageStarted", 1),
        ("StageStarted", 2),
        ("StageCompleted", 2),
    ]
    assert trace(traces, "wf_first") == {9: 2}  # executed by both, recorded once
    # A records optimistically (smss.workflow.driver): it may call 'last' on its own,
    # fenced, result of 'first' before it hears of the refusal. That call's records
    # require A's completion of 'first', so they are void: recorded once, B's.
    assert trace(traces, "wf_last")[9] in (1, 2)


@pytest.mark.timeout(300)
def test_a_failing_log_commit_answers_503_and_acknowledges_nothing(tmp_path: Path) -> None:
    """RELIABILITY 6 through ``log.before_commit:eio`` in a real ``smss serve``: the run's
    start is not acknowledged (503 with an error body) and nothing of it is in the log
    after a restart without the fault."""
    traces = tmp_path / "trace"
    traces.mkdir()
    with platform(tmp_path / "data", {TRACE_ENV: str(traces), "SMSS_FAULT": "log.before_commit:eio"}) as p:
        p.start("--keep-alive", "300")
        _deploy(p)
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            r = client.post(
                "/v1/workflows/two/runs",
                json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [3, 0, 0, 0]}]},
            )
            assert r.status_code == 503, r.text
            assert isinstance(r.json()["error"], str)
            again = client.post(
                "/v1/workflows/two/runs",
                json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [4, 0, 0, 0]}]},
            )
            assert again.status_code == 503, again.text  # fatal to the writer: no retry-and-continue
        p.stop(check=False)
        p.env.pop("SMSS_FAULT")
        p.start("--keep-alive", "300")
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            assert client.get("/v1/runs").json()["runs"] == []
            ok = submit(client, "two", {"x": tagged(5)})
        p.stop()
    assert ok["status"] == "completed", ok


def _infer_first(url: str, value: float, timeout_s: float = 10.0) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [value, 0, 0, 0]}]}
    return httpx.post(f"{url}/v2/models/wf_first/infer", json=body, timeout=timeout_s)


@pytest.mark.timeout(300)
def test_request_and_instance_points_fire_in_the_gateway_and_the_instance(tmp_path: Path) -> None:
    """``request.before_dispatch`` runs in the gateway (``kill`` ends the platform at the
    first request); ``instance.before_reply`` runs in the instance (``kill``: the
    instance that computed the answer dies before replying, the platform goes on)."""
    traces = tmp_path / "trace"
    traces.mkdir()
    env = {TRACE_ENV: str(traces), "SMSS_FAULT": "request.before_dispatch:kill"}
    with platform(tmp_path / "data", env) as p:
        p.start("--keep-alive", "300")
        deploy_stage_models(p.url, ["First"])
        assert p.server is not None
        process = p.server.process
        with pytest.raises(httpx.TransportError):
            _infer_first(p.url, 1.0, timeout_s=60.0)
        process.wait(WAIT_S)
        assert process.returncode == -9
        assert trace(traces, "wf_first") == {}  # killed before the request was sent
        p.kill9()

        p.env["SMSS_FAULT"] = "instance.before_reply:kill"
        p.start("--keep-alive", "300")
        assert p.server is not None
        # Every instance dies after computing, before replying: the request is retried
        # once on a replacement, then refused; never answered with the model's output.
        try:
            status = _infer_first(p.url, 2.0, timeout_s=60.0).status_code
        except httpx.TimeoutException:
            status = 0
        assert status != 200
        assert trace(traces, "wf_first")[2] >= 1  # computed, never answered
        assert p.server.process.poll() is None  # the platform itself is unaffected
        p.stop()


def test_filled_reserves_the_space_and_gives_it_back(tmp_path: Path) -> None:
    """``inject.filled`` leaves at most ``leave_bytes`` free (here: takes about 16 MiB of
    a shared disk, not all of it), with real allocated blocks, and removes its file."""
    free = inject.free_bytes(tmp_path)
    want = 16 << 20
    with inject.filled(tmp_path, leave_bytes=free - want, chunk_bytes=4 << 20) as path:
        allocated = os.stat(path).st_blocks * 512
        assert allocated >= want - (4 << 20), allocated  # others may use the disk meanwhile
        assert allocated <= want + (4 << 20), allocated
    assert not path.exists()
