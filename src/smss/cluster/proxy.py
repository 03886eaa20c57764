"""The routes a cluster gateway does not serve itself, passed to the controller's app.

A gateway serves inference on functions itself (:mod:`smss.cluster.edge`); everything
else (deploys, uploads, workflow runs, status, devices, cost, the weight stores, the
OpenAPI document) is the controller's: the gateway hands the request, buffered and
bounded, to the controller (:class:`Passed`, over a Ray actor call) and the
controller runs it through the platform's own ASGI app in its process
(:class:`AppPassthrough`), so there is one implementation of every route.

The gateway has already applied the cross-site checks for its own address
(:mod:`smss.api.cross_site`); the request reaches the controller's app as a loopback
request (``Host: 127.0.0.1``, no ``Origin``) from the client's address, so the admin
token check and its rate limit still see who asked.
"""

from __future__ import annotations

import httpx
import msgspec
from starlette.types import ASGIApp

#: Headers that describe one hop, not the request: never passed on.
HOP_HEADERS = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "origin",
        "referer",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
    }
)


class Passed(msgspec.Struct, frozen=True):
    method: str
    #: Path and query string, as the client sent them.
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client: str = "127.0.0.1"


class Answered(msgspec.Struct, frozen=True):
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


_enc = msgspec.msgpack.Encoder()
_passed = msgspec.msgpack.Decoder(Passed)
_answered = msgspec.msgpack.Decoder(Answered)


def encode(message: Passed | Answered) -> bytes:
    return _enc.encode(message)


def decode_passed(data: bytes) -> Passed:
    return _passed.decode(data)


def decode_answered(data: bytes) -> Answered:
    return _answered.decode(data)


def kept_headers(headers: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers if k.lower() not in HOP_HEADERS)


class AppPassthrough:
    """Runs passed requests through an ASGI app in this process."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, passed: Passed) -> Answered:
        transport = httpx.ASGITransport(app=self._app, client=(passed.client, 0))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            response = await client.request(
                passed.method, passed.target, headers=list(passed.headers), content=passed.body
            )
            body = await response.aread()
        headers = kept_headers([(k, v) for k, v in response.headers.multi_items()])
        return Answered(response.status_code, (*headers, ("content-length", str(len(body)))), body)
