"""Every HTTP request gets an id: the client's ``x-request-id`` when it sent a plain one,
else a new one. It is bound for the request's log records (:mod:`smss.logcontext`,
with the function a ``/v2/models/{name}`` path names), answered back in the
``x-request-id`` header, and names a model error's details in the server log."""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smss import logcontext

HEADER = b"x-request-id"
_PLAIN = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)")


def _given(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == HEADER:
            return value.decode() if _PLAIN.fullmatch(value) else None
    return None


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = _given(scope) or os.urandom(8).hex()
        model = _MODEL_PATH.match(scope["path"])

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, request_id.encode())]
            await send(message)

        with logcontext.bound(request=request_id, function=model.group(1) if model else None):
            await self._app(scope, receive, send_with_id)
