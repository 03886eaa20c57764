"""The connection cap (RELIABILITY 25): a server holding ``--max-connections`` client
connections answers one more 503 with ``Retry-After`` at once and closes it, while the
connections already open are served as before; once idle connections are closed by the
header timeout, new clients are served again. A real ``smss serve``, real sockets.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from security_helpers import CLIENT_TIMEOUT_S, read_reply, status_of

from smss.testing.server import ServerProcess, start_server, wait_until

pytestmark = pytest.mark.slow

CAP = 8
HEADER_TIMEOUT_S = 3.0
ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--max-connections", str(CAP), "--header-timeout", str(HEADER_TIMEOUT_S)]
    server = start_server(tmp_path_factory.mktemp("capped"), args, env=ENV)
    try:
        yield server
    finally:
        server.stop()


def connect(server: ServerProcess) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S)


def split(reply: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode().strip().lower()] = value.decode().strip()
    return headers, body


def assert_refused(reply: bytes) -> None:
    """503, a JSON error with a stable code, and Retry-After."""
    assert status_of(reply) == 503, reply[:300]
    headers, body = split(reply)
    assert int(headers["retry-after"]) >= 1, headers
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)
    assert error["code"] == "unavailable", error
    assert "connections" in error["error"], error


def test_connections_past_the_cap_get_503_and_open_ones_are_served(capped: ServerProcess) -> None:
    with httpx.Client(base_url=capped.url, timeout=CLIENT_TIMEOUT_S) as regular:
        assert regular.get("/v2/health/live").status_code == 200  # its connection stays open
        # CAP - 1 idle connections fill the cap; the rest are over it.
        idle = [connect(capped) for _ in range(CAP - 1 + 5)]
        try:
            over = idle[CAP - 1 :]
            for sock in over:
                # Sending a request (that the server drops) must not turn the answer into a reset.
                sock.sendall(b"GET /v1/functions HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert_refused(read_reply(sock))
            # The connection opened before the flood is served while the cap holds...
            for _ in range(3):
                assert regular.get("/v1/functions").status_code == 200
            # ...and a new client is refused, quickly and with a readable answer.
            with httpx.Client(base_url=capped.url, timeout=CLIENT_TIMEOUT_S) as late:
                r = late.post("/v2/models/nothing/infer", json={"inputs": []})
                assert r.status_code == 503, r.text
                assert r.json()["code"] == "unavailable"
                assert int(r.headers["retry-after"]) >= 1
            # The idle ones are closed by the header timeout (408), which frees the slots.
            for sock in idle[: CAP - 1]:
                assert status_of(read_reply(sock)) == 408
        finally:
            for sock in idle:
                sock.close()
        assert regular.get("/v1/functions").status_code == 200
    wait_until(
        lambda: httpx.get(f"{capped.url}/v2/health/live", timeout=CLIENT_TIMEOUT_S).status_code == 200,
        30,
        "a new client to be served again",
    )


def test_the_cap_counts_open_connections_not_connections_ever_made(capped: ServerProcess) -> None:
    """Many more connections than the cap, one after another, are all served."""
    for _ in range(4 * CAP):
        with httpx.Client(base_url=capped.url, timeout=CLIENT_TIMEOUT_S) as client:
            assert client.get("/v2/health/live").status_code == 200


def test_nonsense_caps_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="--max-connections must be at least 1"):
        start_server(tmp_path / "data", ["--max-connections", "0"], env=ENV, ready_timeout_s=60)
    with pytest.raises(RuntimeError, match="--queue-limit must be at least 1"):
        start_server(tmp_path / "data2", ["--queue-limit", "0"], env=ENV, ready_timeout_s=60)
