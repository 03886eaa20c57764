"""Small HTTP helpers shared by the route modules: error wrapping, bounded bodies, JSON."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from smss.api.errors import error_response
from smss.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


def endpoint(handler: Handler) -> Handler:
    """Turn every exception a handler raises into the protocol's error body."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as error:
            return error_response(error)

    return wrapped


def json_response(data: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(data), status, media_type="application/json")


def check_length(request: Request, limit: int) -> None:
    """413 from the Content-Length header alone, before any of the body is read."""
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError:
        raise InvalidInput("invalid Content-Length header") from None
    if length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {limit} bytes")


JSON_TYPES = ("application/json",)


def require_content_type(
    request: Request, accepted: tuple[str, ...] = JSON_TYPES, *, optional: bool = False
) -> str:
    """415 unless the body is declared as one of ``accepted`` (``+json`` types count as JSON),
    or (``optional``, routes without a body or with raw bytes) declared not at all.

    A web page can send a form or ``text/plain`` to any address without the browser
    asking first, never ``application/json``: so a JSON route that checks this cannot
    be driven by a cross-site form (see :mod:`smss.api.cross_site`)."""
    declared = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json = declared.startswith("application/") and declared.endswith("+json")
    if declared in accepted or (is_json and "application/json" in accepted) or (optional and not declared):
        return declared
    raise UnsupportedMediaType(
        f"this route takes Content-Type {' or '.join(accepted)}, not {declared[:100] or 'none'}"
    )


async def read_body(request: Request, limit: int) -> bytes:
    check_length(request, limit)
    chunks = []
    size = 0
    async for chunk in body_chunks(request):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        # The client went away (or was closed for stalling): no one reads the answer.
        raise InvalidInput("the client disconnected before sending the whole body") from None


async def read_json(request: Request, limit: int, type: type[T]) -> T:
    body = await read_body(request, limit)
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.ValidationError as e:
        raise InvalidInput(f"invalid request body: {e}") from None
    except (msgspec.DecodeError, RecursionError):
        raise InvalidInput("request body is not valid JSON") from None


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"
