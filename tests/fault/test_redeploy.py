"""RELIABILITY 9: a workflow's definition changed under a real ``smss serve`` while
runs of it are in flight, then the platform killed and restarted.

Runs of ``changing`` and of ``steady`` (the same stages, never redeployed) wait in
their second stage (``wf_block``). ``changing`` is redeployed with another second
stage; new runs take the new definition at once. The platform is killed with SIGKILL
and restarted. At recovery the divergence is detected: the runs of ``changing`` are
parked with a status and a reason that say so, their stages never run again (not the
first, not the old second, not the new one) and resuming them is refused (409); the
runs of ``steady`` resume and answer what a failure-free run answers.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from wf_helpers import (
    REQUEST_TIMEOUT_S,
    STEP,
    TRACE_ENV,
    WAIT_S,
    assert_error,
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

from smss.testing.server import wait_until
from smss.workflow.builder import Workflow

pytestmark = pytest.mark.slow

CHANGING = (1, 2, 3)
STEADY = (11, 12)
NEW = 21


def blocking(name: str) -> Workflow:
    return (
        Workflow(name)
        .stage("a", "wf_first", inputs={"x": "request.x"})
        .stage("b", "wf_block", inputs={"x": "a.y"})
        .output("y", "b.y")
    )


def changed() -> Workflow:
    return (
        Workflow("changing")
        .stage("a", "wf_first", inputs={"x": "request.x"})
        .stage("b", "wf_last", inputs={"x": "a.y"})
        .output("y", "b.y")
    )


@pytest.mark.timeout(300)
def test_a_definition_changed_under_runs_in_flight_parks_them_at_recovery(tmp_path: Path) -> None:
    traces = tmp_path / "trace"
    traces.mkdir()
    with platform(tmp_path / "data", {TRACE_ENV: str(traces)}) as p:
        p.start("--keep-alive", "300")
        deploy_stage_models(p.url, ["First", "Block", "Last"])
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            deploy_workflow(client, blocking("changing"))
            deploy_workflow(client, blocking("steady"))
            ids = {
                tag: submit(
                    client, "changing" if tag in CHANGING else "steady", {"x": tagged(tag)}, wait=False
                )["run_id"]
                for tag in (*CHANGING, *STEADY)
            }

            def all_in_b() -> bool:
                return all(events_of(get_run(client, r), "StageStarted", "b") for r in ids.values())

            wait_until(all_in_b, WAIT_S, "every run to be in its blocking stage", interval_s=0.2)

            deploy_workflow(client, changed())  # under the runs in flight
            fresh = submit(client, "changing", {"x": tagged(NEW)})
            assert fresh["status"] == "completed", fresh
            assert output(fresh, "y").tolist() == (tagged(NEW) + 2 * STEP).tolist()
            started = events_of(get_run(client, fresh["run_id"]), "StageStarted", "b")
            assert [e["function"] for e in started] == ["wf_last"], started
            assert all(get_run(client, r)["status"] == "running" for r in ids.values())
        p.kill9()
        assert trace(traces, "wf_block") == {}  # none got past its wait
        (traces / "release").touch()  # a re-dispatched wf_block would now complete

        p.start("--keep-alive", "300")
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            runs = wait_terminal(client, list(ids.values()))
            listed = client.get("/v1/runs", params={"status": "parked"})
            assert listed.status_code == 200, listed.text
            parked = {r["run_id"] for r in listed.json()["runs"]}
            refusals = {tag: client.post(f"/v1/runs/{ids[tag]}/resume") for tag in CHANGING}
            after = {tag: get_run(client, ids[tag]) for tag in CHANGING}
        p.stop()

    assert parked == {ids[tag] for tag in CHANGING}
    for tag in CHANGING:
        run = runs[ids[tag]]
        assert run["status"] == "parked", run
        assert "definition changed" in run["error"], run
        assert run["events"][-1]["type"] == "RunParked", run["events"][-1]
        assert [e["stage"] for e in events_of(run, "StageCompleted")] == ["a"], run["events"]
        assert "definition changed" in assert_error(refusals[tag], 409)
        assert after[tag]["status"] == "parked"  # the refused resume changed nothing
    for tag in STEADY:
        run = runs[ids[tag]]
        assert run["status"] == "completed", run
        assert_once_per_stage(run, ("a", "b"))
        assert output(run, "y").tolist() == (tagged(tag) + 2 * STEP).tolist()
    # Nothing of a parked run executed again, under the old definition or the new.
    assert trace(traces, "wf_first") == {tag: 1 for tag in (*CHANGING, *STEADY, NEW)}
    assert trace(traces, "wf_block") == {tag: 1 for tag in STEADY}
    assert trace(traces, "wf_last") == {NEW: 1}
