"""RELIABILITY 8 under a real ``smss serve``: its wall clock jumps a day forward, then
two hours back, while requests are in flight, and nothing that keeps time notices.

Without root (and with no libfaketime here) the system clock cannot be moved for one
process, so the jump is made where SMSS reads the wall clock: a ``sitecustomize``
module on the server's ``PYTHONPATH`` shifts ``time.time`` / ``time.time_ns`` of the
server and every process it starts by the seconds written in a file. (C code's own
reads, SQLite's for one, are not shifted; SMSS stores only timestamps that Python
passed it.) The source rule behind this is ``tests/unit/test_wall_clock.py``.

Checked: a request in flight across each jump, with a 10 s deadline, is answered (no
504); no instance is stopped or replaced (keep-alive, health checks and stall
detection run on the monotonic clock); workflow runs complete, and the log lists them
in the order they were started although their timestamps go back two hours. The
timestamps show the shift did reach the server.
"""

from __future__ import annotations

import os
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from wf_helpers import (
    REQUEST_TIMEOUT_S,
    TRACE_ENV,
    Platform,
    deploy_stage_models,
    deploy_workflow,
    get_run,
    platform,
    submit,
    tagged,
)

from smss.client import Client
from smss.headers import REQUEST_TIMEOUT
from smss.workflow.builder import Workflow

pytestmark = pytest.mark.slow

SLEEPER = Path(__file__).parent / "models" / "sleeper.py"
DAY_S, TWO_HOURS_S = 86_400.0, 7_200.0
SHIFT_ENV = "SMSS_TEST_WALL_SHIFT_FILE"

SHIM = '''
"""Test shim: time.time() and time.time_ns() shifted by the seconds in ${SHIFT_ENV}."""
import os
import time

_PATH = os.environ.get("SHIFT_ENV")
if _PATH:
    _time, _time_ns = time.time, time.time_ns

    def _shift():
        try:
            with open(_PATH) as f:
                return float(f.read() or 0)
        except (OSError, ValueError):
            return 0.0

    time.time = lambda: _time() + _shift()
    time.time_ns = lambda: _time_ns() + int(_shift() * 1e9)
'''


def one_stage() -> Workflow:
    return Workflow("one").stage("a", "wf_first", inputs={"x": "request.x"}).output("y", "a.y")


def instances(url: str) -> dict[str, list[str]]:
    out = {}
    for name in ("sleeper", "wf_first"):
        r = httpx.get(f"{url}/v1/functions/{name}", timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 200, r.text
        out[name] = sorted(i["id"] for i in r.json()["instances"])
    return out


def sleep_request(url: str, seconds: float, answers: list[Any]) -> threading.Thread:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [seconds]}]}

    def send() -> None:
        try:
            r = httpx.post(
                f"{url}/v2/models/sleeper/infer", json=body, headers={REQUEST_TIMEOUT: "10"}, timeout=30
            )
            answers.append(r.status_code)
        except httpx.HTTPError as e:
            answers.append(repr(e))

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def _wait_in_flight(url: str) -> None:
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/functions/sleeper", timeout=REQUEST_TIMEOUT_S).json()
        if any(i["in_flight"] for i in r["instances"]):
            return
        time.sleep(0.05)
    raise AssertionError("the sleeper request never got to its instance")


def _jump_during_a_request(p: Platform, shift_file: Path, shift_s: float) -> Any:
    answers: list[Any] = []
    thread = sleep_request(p.url, 2.0, answers)
    _wait_in_flight(p.url)
    shift_file.write_text(str(shift_s))
    thread.join(60)
    assert not thread.is_alive()
    return answers[0]


@pytest.mark.timeout(300)
def test_wall_clock_jumps_change_no_deadline_lease_or_order(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent(SHIM).replace("SHIFT_ENV", SHIFT_ENV))
    shift_file = tmp_path / "shift"
    shift_file.write_text("0")
    traces = tmp_path / "trace"
    traces.mkdir()
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    env = {TRACE_ENV: str(traces), SHIFT_ENV: str(shift_file), "PYTHONPATH": path}
    with platform(tmp_path / "data", env) as p:
        p.start("--keep-alive", "300")
        with Client(p.url) as admin:
            admin.deploy(f"{SLEEPER}:Sleeper")
        deploy_stage_models(p.url, ["First"])
        with httpx.Client(base_url=p.url, timeout=REQUEST_TIMEOUT_S) as client:
            deploy_workflow(client, one_stage())
            runs = [submit(client, "one", {"x": tagged(1)})]
            warm: list[Any] = []
            sleep_request(p.url, 0.0, warm).join(60)
            assert warm == [200]
            before = instances(p.url)

            forward = _jump_during_a_request(p, shift_file, DAY_S)
            runs.append(submit(client, "one", {"x": tagged(2)}))
            back = _jump_during_a_request(p, shift_file, -TWO_HOURS_S)
            runs.append(submit(client, "one", {"x": tagged(3)}))
            time.sleep(2.0)  # some ticks of the controller and its health checks
            after = instances(p.url)
            documents = [get_run(client, r["run_id"]) for r in runs]
            listed = [r["run_id"] for r in client.get("/v1/runs").json()["runs"]]
        p.stop()

    assert (forward, back) == (200, 200)
    assert after == before, "an instance was stopped or replaced when the wall clock jumped"
    assert all(d["status"] == "completed" for d in documents), documents
    # Newest first, by start: not by timestamps, which went back two hours.
    assert listed == [r["run_id"] for r in reversed(runs)]
    started = [d["events"][0]["ts"] for d in documents]
    assert started[1] - started[0] > DAY_S - 600, started  # the shift reached the server
    assert started[2] < started[0], started
