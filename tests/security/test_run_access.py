"""Who reads runs and failure detail.

With a token set, run reads (``GET /v1/runs``, ``/v1/runs/{id}``, ``/v1/log/stats``)
need it: runs hold outputs, session names and tracebacks with file paths. Failure detail
(predict()'s exception text, tracebacks) never reaches a body read without the token: an
infer that fails says "model error" and a request id, which names the detail in the
server log; a failed run's answer says it failed and where to look.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from security_helpers import (
    TOKEN,
    Server,
    assert_no_leak,
    error_of,
    fresh_address,
    json_infer_body,
    run_body,
)

from smss.testing.server import wait_until

SECRET = "s3cr3t-predict-detail"


def failed_run(server: Server) -> str:
    with server.http() as anonymous:
        r = anonymous.post("/v1/workflows/failing-flow/runs", json=run_body())
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "failed", answer
    assert_no_leak(r.text)
    return str(answer["run_id"])


@pytest.mark.parametrize("path", ["/v1/runs", "/v1/runs/{run_id}", "/v1/log/stats", "/v1/runs?status=failed"])
def test_run_reads_need_the_token(token_server: Server, path: str) -> None:
    path = path.format(run_id=failed_run(token_server))
    with token_server.http(address=fresh_address()) as anonymous:
        r = anonymous.get(path)
        assert error_of(r, 401)["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert_no_leak(r.text)
    with token_server.http("wrong-token", address=fresh_address()) as wrong:
        r = wrong.get(path)
        assert error_of(r, 403)["code"] == "forbidden"
        assert_no_leak(r.text)
    with token_server.admin() as admin:
        assert admin.get(path).status_code == 200


def test_the_admin_reads_the_failure_in_the_run_log(token_server: Server) -> None:
    run_id = failed_run(token_server)
    with token_server.admin() as admin:
        run = admin.get(f"/v1/runs/{run_id}").json()
    assert run["status"] == "failed"
    (failure,) = [e for e in run["events"] if e["type"] == "StageFailed"]
    assert SECRET in failure["message"]
    assert "failing.py" in failure["traceback"]
    assert SECRET in run["error"]


def test_a_failed_run_answer_hides_detail_without_the_token(token_server: Server) -> None:
    with token_server.http() as anonymous:
        r = anonymous.post("/v1/workflows/failing-flow/runs", json=run_body())
        assert r.json()["status"] == "failed"
        assert_no_leak(r.text)
        assert r.json()["run_id"] in r.json()["error"]
    with token_server.admin() as admin:
        r = admin.post("/v1/workflows/failing-flow/runs", json=run_body())
        assert SECRET in r.json()["error"]


@pytest.mark.parametrize("route", ["/v2/models/failing/infer", "/v2/models/failing-flow/infer"])
def test_infer_failure_says_model_error_and_a_request_id(token_server: Server, route: str) -> None:
    with token_server.http() as anonymous:
        r = anonymous.post(route, json=json_infer_body())
    body = error_of(r, 500)
    assert body["code"] == "model_error"
    assert_no_leak(r.text)
    request_id = body["request_id"]
    assert re.fullmatch(r"[0-9a-f]{16}", request_id), body
    assert body["error"] == f"model error (request id {request_id})"
    # The detail is in the server log under that id.
    wait_until(lambda: request_id in token_server.process.log(), 30, "the failure in the server log")
    logged = next(line for line in token_server.process.log().splitlines() if request_id in line)
    assert SECRET in logged


def test_infer_failure_detail_goes_to_the_token_holder(token_server: Server) -> None:
    with token_server.http(TOKEN) as admin:
        body = error_of(admin.post("/v2/models/failing/infer", json=json_infer_body()), 500)
    assert SECRET in body["error"]
    assert body["request_id"] in body["error"]
    with token_server.http("not-the-token") as wrong:
        r = wrong.post("/v2/models/failing/infer", json=json_infer_body())
        assert error_of(r, 500)["code"] == "model_error"
        assert_no_leak(r.text)


def test_without_a_token_infer_hides_detail_and_runs_stay_readable(open_server: Server) -> None:
    """The default (loopback, no token): every local caller may deploy code and so read runs,
    but a data-plane answer still carries no predict() text."""
    with open_server.http() as anonymous:
        r = anonymous.post("/v2/models/failing/infer", json=json_infer_body())
        assert error_of(r, 500)["code"] == "model_error"
        assert_no_leak(r.text)
        assert anonymous.get("/v1/runs").status_code == 200


def smss_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SMSS_TOKEN": "", "SMSS_URL": ""}
    return subprocess.run(
        [sys.executable, "-m", "smss.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_smss_runs_commands_send_the_token(token_server: Server) -> None:
    run_id = failed_run(token_server)
    refused = smss_cli("runs", "list", "--url", token_server.url, "--json")
    assert refused.returncode != 0
    assert "401" in refused.stderr
    assert "Traceback" not in refused.stderr
    listed = smss_cli("runs", "list", "--url", token_server.url, "--token", TOKEN, "--json")
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout
    shown = smss_cli("runs", "show", run_id, "--url", token_server.url, "--token", TOKEN, "--json")
    assert shown.returncode == 0, shown.stderr
    assert SECRET in shown.stdout
