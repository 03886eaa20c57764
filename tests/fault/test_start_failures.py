"""A model whose start keeps failing, with a real ``smss serve``: bounded retries with
back-off that stop and report, 503 naming the model, and an explicit load that
tries again once the fault is fixed.

The model (models/fussy.py) keeps one instance (``min_instances=1``), so the
platform retries on its own, with no request asking; it loads only once a file
``ok`` lies beside its installed code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from smss.client import Client
from smss.testing.server import ServerProcess, start_server, wait_until

pytestmark = pytest.mark.slow

MODEL = Path(__file__).parent / "models" / "fussy.py"
ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}
MAX_FAILURES = 3  # back-offs of 0.5 s and 1 s between the three tries
WAIT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
REASON = "the file it needs is not there yet"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    args = ["--max-start-failures", str(MAX_FAILURES), "--keep-alive", "300", "--adopt-window", "0"]
    s = start_server(tmp_path / "data", args, env=ENV)
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0, f"smss serve exited with {code}:\n{s.log()[-4000:]}"


def status(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/functions/fussy", timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def failed_starts(server: ServerProcess) -> int:
    """Start attempts the controller reported failed (one log line each)."""
    return sum("model 'fussy' failed to start" in line for line in server.log().splitlines())


def infer(url: str) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]}
    return httpx.post(f"{url}/v2/models/fussy/infer", json=body, timeout=REQUEST_TIMEOUT_S)


def cli_status(url: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "smss.cli", "status", "--url", url],
        capture_output=True,
        text=True,
        timeout=REQUEST_TIMEOUT_S,
        env={**os.environ, **ENV, "COLUMNS": "400"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_failing_starts_stop_after_the_bound_report_and_are_retried_on_load(server: ServerProcess) -> None:
    url = server.url
    with Client(url) as client:
        generation = client.deploy(f"{MODEL}:Fussy")["generation"]
    installed = server.data_dir / "functions" / "fussy" / f"g{generation}"
    assert installed.is_dir()

    st = wait_until(lambda: (s := status(url))["state"] == "failed" and s, WAIT_S, "the function to fail")
    assert REASON in st["last_error"], st
    assert f"{MAX_FAILURES} times in a row" in st["last_error"], st
    assert st["instances"] == []
    assert st["starting"] == 0
    assert failed_starts(server) == MAX_FAILURES
    # No more tries: the next back-off (2 s) passes and nothing starts, not even for a request.
    time.sleep(3.0)
    r = infer(url)
    assert r.status_code == 503, r.text
    assert "fussy" in r.json()["error"]
    assert failed_starts(server) == MAX_FAILURES
    assert status(url)["state"] == "failed"
    shown = cli_status(url)
    assert "failed:" in shown, shown
    assert REASON in shown, shown

    # The fault is fixed on the node; an explicit load tries again at once.
    (installed / "ok").write_text("")
    loaded = httpx.post(f"{url}/v2/repository/models/fussy/load", timeout=REQUEST_TIMEOUT_S)
    assert loaded.status_code == 200, loaded.text
    wait_until(lambda: status(url)["state"] == "ready", WAIT_S, "the function to serve")
    r = infer(url)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [2.0, 4.0]
    st = status(url)
    assert st["last_error"] is None, st
    assert st["cold_starts"] == 1, st
    assert failed_starts(server) == MAX_FAILURES


def test_an_explicit_load_of_a_still_broken_model_tries_once_more_and_reports_it(
    server: ServerProcess,
) -> None:
    url = server.url
    with Client(url) as client:
        client.deploy(f"{MODEL}:Fussy")
    wait_until(lambda: status(url)["state"] == "failed", WAIT_S, "the function to fail")
    httpx.post(f"{url}/v2/repository/models/fussy/load", timeout=REQUEST_TIMEOUT_S)
    # The count starts again: it is retried with back-off up to the bound, then fails again.
    wait_until(lambda: failed_starts(server) == 2 * MAX_FAILURES, WAIT_S, "the retries after the load")
    st = wait_until(lambda: (s := status(url))["state"] == "failed" and s, WAIT_S, "the function to fail")
    assert REASON in st["last_error"]
    time.sleep(3.0)
    assert failed_starts(server) == 2 * MAX_FAILURES
