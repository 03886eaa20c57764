"""Slow clients are closed (RELIABILITY 25): headers a byte at a time (slowloris), a
connection that sends nothing, a body that stalls. Each gets 408 and is closed, while
other clients are served; a body that arrives slowly but steadily is not cut off.

The servers run with 2 s header and body timeouts (conftest); the clients here would
take far longer than that to finish, so only a timeout can end them.
"""

from __future__ import annotations

import select
import socket
import time

import httpx
import msgspec
from security_helpers import BODY_TIMEOUT_S, Server, read_reply, run_body, status_of


def served(server: Server) -> bool:
    return httpx.get(f"{server.url}/v2/health/live", timeout=30).status_code == 200


def closed_by_server(sock: socket.socket, wait_s: float) -> bytes | None:
    """What the server sent if it answered (and closed) within ``wait_s``; else None."""
    readable, _, _ = select.select([sock], [], [], wait_s)
    return read_reply(sock) if readable else None


def dribble(sock: socket.socket, data: bytes, step: int, pause_s: float) -> tuple[bytes | None, int]:
    """Send ``data`` ``step`` bytes per ``pause_s``; stop early if the server answers.
    Returns the answer (or None) and how many bytes were sent."""
    sent = 0
    while sent < len(data):
        try:
            sock.sendall(data[sent : sent + step])
        except (BrokenPipeError, ConnectionResetError):
            return read_reply(sock), sent
        sent = min(sent + step, len(data))
        if (reply := closed_by_server(sock, pause_s)) is not None:
            return reply, sent
    return None, sent


def test_headers_sent_a_byte_at_a_time_are_cut_off(open_server: Server) -> None:
    head = b"GET /v1/functions HTTP/1.1\r\nHost: localhost\r\n" + b"X-Padding: " + b"p" * 400 + b"\r\n\r\n"
    # At one byte per 0.25 s these headers would take about two minutes.
    with open_server.connect() as sock:
        reply, sent = dribble(sock, head, 1, 0.25)
        assert reply is not None, "the server waited for the whole slow header"
    assert sent < len(head)
    assert status_of(reply) == 408, reply[:300]
    assert b"request_timeout" in reply
    assert b"headers not received in time" in reply  # the header timeout, nothing else
    assert served(open_server)


def test_a_connection_that_sends_nothing_is_closed(open_server: Server) -> None:
    with open_server.connect() as sock:
        reply = read_reply(sock)
    assert status_of(reply) == 408, reply[:300]
    assert served(open_server)


def test_a_stalled_body_is_closed(open_server: Server) -> None:
    body = msgspec.json.encode(run_body())
    head = (
        b"POST /v1/workflows/echo-flow/runs HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with open_server.connect() as sock:
        sock.sendall(head + body[:10])
        reply = read_reply(sock)  # the rest never comes
    assert status_of(reply) == 408, reply[:300]
    assert b"request_timeout" in reply
    assert b"body stalled" in reply
    assert served(open_server)


def test_many_slow_clients_do_not_starve_others(open_server: Server) -> None:
    socks = [open_server.connect() for _ in range(50)]
    try:
        for s in socks:
            s.sendall(b"GET /v1/functions HTTP/1.1\r\nHo")
        assert served(open_server)
        replies = [read_reply(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert {status_of(r) for r in replies} == {408}
    assert served(open_server)


def test_a_slow_but_steady_body_is_served(open_server: Server) -> None:
    """The body timeout is idle time, not a total: chunks every half timeout keep it open
    well past the timeout, and the run is answered."""
    body = msgspec.json.encode(run_body())
    head = (
        b"POST /v1/workflows/echo-flow/runs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    step = len(body) // 6 + 1
    with open_server.connect() as sock:
        sock.sendall(head)
        started = time.monotonic()
        reply, sent = dribble(sock, body, step, BODY_TIMEOUT_S / 2)
        assert sent == len(body), f"cut off after {sent} of {len(body)} bytes: {reply!r}"
        # Longer than the body timeout in all: only the idle time between chunks counts.
        assert time.monotonic() - started > BODY_TIMEOUT_S
        reply = reply if reply is not None else read_reply(sock)
    assert status_of(reply) == 200, reply[:500]
    assert b'"completed"' in reply
