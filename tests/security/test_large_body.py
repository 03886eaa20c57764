"""A client that sends a body over the limit reads the 413 (RELIABILITY 24), not a
connection reset: the server answers from the headers, then reads and drops the rest
(bounded) before closing, whether the client keeps the connection or asked to close it.
"""

from __future__ import annotations

import http.client

import pytest
from security_helpers import TOKEN, Server, read_reply, status_of

DEPLOY_LIMIT = 2 * 1024 * 1024  # smss.api.admin.MAX_DEPLOY_BODY


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
@pytest.mark.parametrize("size", [DEPLOY_LIMIT + 1, 64 * 1024 * 1024])
def test_http_client_reads_the_413(open_server: Server, connection: str, size: int) -> None:
    """http.client sends the whole body before it reads anything."""
    conn = http.client.HTTPConnection("127.0.0.1", open_server.port, timeout=60)
    try:
        headers = {"Content-Type": "application/json", "Connection": connection}
        conn.request("POST", "/v1/functions", body=b"x" * size, headers=headers)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 413, body
    assert b"payload_too_large" in body
    assert response.getheader("connection") == "close"


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
def test_raw_socket_stopping_mid_body_reads_the_413_then_eof(open_server: Server, version: str) -> None:
    """Declares 1 GiB, sends 16 MiB of it, then reads: the answer, then a clean close."""
    head = (
        f"POST /v1/functions {version}\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {1 << 30}\r\n\r\n"
    ).encode()
    with open_server.connect() as sock:
        sock.sendall(head)
        for _ in range(16):
            sock.sendall(b"x" * (1 << 20))
        reply = read_reply(sock)  # raises ConnectionResetError on a reset
    assert status_of(reply) == 413, reply[:300]
    assert b"payload_too_large" in reply


def test_upload_over_the_limit_reads_the_413_while_sending(token_server: Server) -> None:
    head = (
        f"PUT /v1/uploads/{'0' * 64} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {5 * 1024**3}\r\n\r\n"
    ).encode()
    with token_server.connect() as sock:
        sock.sendall(head)
        for _ in range(16):
            sock.sendall(b"\0" * (1 << 20))
        reply = read_reply(sock)
    assert status_of(reply) == 413, reply[:300]
    assert b"payload_too_large" in reply
    assert not (token_server.data_dir / "uploads" / ("0" * 64)).exists()
