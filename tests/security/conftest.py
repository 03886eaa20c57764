"""Security fixtures: two real ``smss serve`` processes on loopback, one without a token
(the default) and one with, each with an ``echo`` model, a ``failing`` one (its predict()
raises, quoting a secret) and workflows over them. Slow-client timeouts are short (2 s)
so the slow-client tests finish quickly; nothing asserts a duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from security_helpers import BODY_TIMEOUT_S, ECHO, FAILING, HEADER_TIMEOUT_S, TOKEN, Server

from smss.client import Client
from smss.testing.server import start_server, wait_until
from smss.workflow.builder import Workflow

#: Settings come from flags only, never from the developer's shell.
SERVER_ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}


def _workflows() -> list[dict[str, Any]]:
    echo_flow = (
        Workflow("echo-flow").stage("double", "echo", inputs={"x": "request.x"}).output("y", "double.y")
    )
    failing_flow = (
        Workflow("failing-flow")
        .stage("boom", "failing", inputs={"x": "request.x"}, retries=0)
        .output("y", "boom.y")
    )
    return [msgspec.to_builtins(w.spec()) for w in (echo_flow, failing_flow)]


def _start(data: Path, token: str | None) -> Iterator[Server]:
    args = ["--keep-alive", "300", "--header-timeout", str(HEADER_TIMEOUT_S)]
    args += ["--body-timeout", str(BODY_TIMEOUT_S)]
    if token is not None:
        args += ["--token", token]
    process = start_server(data, args, env=SERVER_ENV)
    try:
        wait_until(lambda: "smss serving on" in process.log(), 120, "smss serve to finish starting")
        with Client(process.url, token) as admin:
            admin.deploy(f"{ECHO}:Echo")
            admin.deploy(f"{FAILING}:Failing")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=process.url, headers=headers, timeout=60) as http:
            for wf in _workflows():
                r = http.post("/v1/workflows", json=wf)
                assert r.status_code == 201, r.text
        yield Server(process, token)
    finally:
        process.stop()


@pytest.fixture(scope="session")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default: loopback, no token."""
    yield from _start(tmp_path_factory.mktemp("open-server"), None)


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _start(tmp_path_factory.mktemp("token-server"), TOKEN)
