"""Helpers of the security tests: servers, clients on chosen loopback addresses, raw sockets."""

from __future__ import annotations

import itertools
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from smss.testing.server import ServerProcess

HERE = Path(__file__).parent
ECHO = HERE.parent / "e2e" / "models" / "echo.py"
FAILING = HERE / "models" / "failing.py"
TOKEN = "security-suite-token-7f3a9c1e5b2d4086"
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
#: Client-side bound on anything: a hang fails the test instead of the suite.
CLIENT_TIMEOUT_S = 60.0
#: What an error body read without the admin token must never contain.
LEAKY = ("Traceback", ".py", "/srv/private", "s3cr3t-predict-detail")
X4 = np.array([[1.0, -2.0, 3.5, 0.25]], dtype=np.float32)
# Auth failures are counted per client address: tests that fail on purpose each use
# an address of their own (127.0.1.N), so they never lock out one another.
_addresses = itertools.count(2)


def fresh_address() -> str:
    return f"127.0.1.{next(_addresses)}"


@dataclass(frozen=True)
class Server:
    process: ServerProcess
    token: str | None

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def data_dir(self) -> Path:
        return self.process.data_dir

    def http(self, token: str | None = None, *, address: str | None = None, **headers: str) -> httpx.Client:
        """An HTTP client, with ``token`` as a bearer token if given, from ``address``."""
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        transport = httpx.HTTPTransport(local_address=address) if address else None
        return httpx.Client(base_url=self.url, headers=headers, transport=transport, timeout=CLIENT_TIMEOUT_S)

    def admin(self) -> httpx.Client:
        return self.http(self.token)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT_S)


def json_infer_body(x: np.ndarray = X4) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def run_body(x: np.ndarray = X4) -> dict[str, Any]:
    return {"inputs": json_infer_body(x)["inputs"], "wait": True, "timeout_s": 60}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """``status`` with a structured JSON error body (``error`` and ``code``); the body."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    for field in ("error", "code"):
        assert isinstance(body.get(field), str), body
        assert body[field], body
    return body


def assert_no_leak(text: str) -> None:
    for word in LEAKY:
        assert word not in text, f"{word!r} leaked into {text[:500]!r}"


def read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (EOF)."""
    reply = b""
    while data := sock.recv(65536):
        reply += data
    return reply


def status_of(reply: bytes) -> int:
    line = reply.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1."), reply[:300]
    return int(line.split()[1])
