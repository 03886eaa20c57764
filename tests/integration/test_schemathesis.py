"""schemathesis against a live ``smss serve`` and the OpenAPI document it serves.

Every operation gets schema-driven requests (valid and invalid ones); every
answer must be no 5xx, a documented status, a documented content type and a body
that matches the documented schema. The admin token is sent, so admin routes are
exercised past authentication. Infer requests also go to a deployed model, so the
codec and the data path see the generated bodies too.

Short by default (``SMSS_SCHEMATHESIS_EXAMPLES`` examples per operation, 10);
see the README's Fuzzing section for long runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from smss.client import Client
from smss.testing.server import ServerProcess, start_server

TOKEN = "schemathesis-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = int(os.environ.get("SMSS_SCHEMATHESIS_EXAMPLES", "10"))
ECHO = Path(__file__).parent.parent / "e2e" / "models" / "echo.py"
WORKFLOW = {
    "name": "wf",
    "stages": [{"name": "a", "function": "echo", "inputs": {"x": "request.x"}}],
    "outputs": {"y": "a.y"},
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("schemathesis"), ["--token", TOKEN])
    try:
        with Client(server.url, TOKEN) as client:
            client.deploy(f"{ECHO}:Echo")
        deployed = httpx.post(f"{server.url}/v1/workflows", json=WORKFLOW, headers=AUTH, timeout=30)
        assert deployed.status_code == 201, deployed.text
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@SETTINGS
def test_every_operation_answers_as_documented(case: schemathesis.Case, server: ServerProcess) -> None:
    case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS)


@schema.include(path_regex=r"/infer$|/runs$").parametrize()
@SETTINGS
def test_generated_bodies_against_a_deployed_model_and_workflow(
    case: schemathesis.Case, server: ServerProcess
) -> None:
    """Infer and run bodies for names that exist: the codec, the data path and the
    engine see what the generator makes, not only the 404 of an unknown name."""
    workflow = case.path.endswith("/runs")
    case.path_parameters = {**(case.path_parameters or {}), "name": "wf" if workflow else "echo"}
    if "version" in case.path_parameters:
        case.path_parameters["version"] = "1"
    # A generated x-request-timeout-seconds (5e-324 s) is rightly answered 503/504 by a
    # real model, which the no-5xx check cannot tell from a fault: the server's maximum
    # here. The header's parsing is fuzzed by the test above (unknown names: 404 or 400).
    headers = {**AUTH, "x-request-timeout-seconds": "60"}
    case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS)


def test_an_unsupported_method_is_405_with_allow(server: ServerProcess) -> None:
    response = httpx.request("TRACE", f"{server.url}/v1/functions", timeout=10)
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert response.json()["code"] == "method_not_allowed"
