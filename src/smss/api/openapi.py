"""The OpenAPI document of the REST routes, served at ``/openapi.json``.

Generated, not written: the paths are the app's registered routes, and every
schema is derived (``msgspec.json.schema_components``) from the types each
route declares in :mod:`smss.api.operations`. A registered route without a
declaration, or a declaration without a route, is an error when the app is
built, so the document cannot fall behind the server.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec
from starlette.routing import BaseRoute, Route

from smss import __version__
from smss.api import wire
from smss.api.operations import OPERATIONS, Body, Operation, RawBytes, Text, common_errors

_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"{(\w+)(?::\w+)?}")
_REASONS = {
    200: "ok",
    201: "created",
    202: "accepted: still running",
    400: "invalid request",
    401: "no admin token",
    403: "wrong admin token, or a request from another web origin",
    404: "not found",
    409: "conflict",
    413: "too large",
    415: "a body not of the route's Content-Type",
    421: "the Host header names another server",
    429: "overloaded, or too many failed authentications",
    500: "the model's predict() raised",
    503: "unavailable: retry after Retry-After",
    504: "deadline exceeded",
}


def registered(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    """(method, path) of every route, HEAD left out (Starlette adds it to each GET)."""
    out = []
    for route in routes:
        if isinstance(route, Route):
            out += [(m, route.path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


def document(routes: Iterable[BaseRoute]) -> dict[str, object]:
    """The document of exactly ``routes``; raises ``LookupError`` when they and the
    declared operations differ."""
    keys = registered(routes)
    undeclared = [f"{m} {p}" for m, p in keys if (m, p) not in OPERATIONS]
    unrouted = [f"{m} {p}" for m, p in OPERATIONS if (m, p) not in keys]
    if undeclared or unrouted:
        raise LookupError(
            f"routes without a declared operation: {undeclared}; operations without a route: {unrouted}"
        )
    ops = [(method, path, OPERATIONS[method, path]) for method, path in keys]
    schemas = _Schemas([wire.ErrorBody, *(t for _, _, op in ops for t in _types(op))])
    paths: dict[str, dict[str, object]] = {}
    for method, path, op in ops:
        paths.setdefault(path, {})[method.lower()] = _operation(path, op, common_errors(method), schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "SMSS", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


class _Schemas:
    """The JSON Schema of each type, with shared definitions as components."""

    def __init__(self, types: list[Any]) -> None:
        unique = list(dict.fromkeys(types))
        generated, self.components = msgspec.json.schema_components(unique, ref_template=_REF)
        self._of = dict(zip(unique, generated, strict=True))

    def of(self, t: Any) -> dict[str, Any]:
        if t is RawBytes:
            return {"type": "string", "format": "binary"}
        if t is Text:
            return {"type": "string"}
        schema: dict[str, Any] = self._of[t]
        return schema


def _types(op: Operation) -> list[Any]:
    bodies = (*op.request, *op.response)
    found = [b.type for b in bodies if b.type not in (RawBytes, Text)]
    return found + [t for t in (op.query, op.headers) if t is not None]


def _operation(path: str, op: Operation, common: tuple[int, ...], schemas: _Schemas) -> dict[str, object]:
    out: dict[str, object] = {"summary": op.summary}
    params = [
        {"name": m.group(1), "in": "path", "required": True, "schema": {"type": "string"}}
        for m in _PATH_PARAM.finditer(path)
    ]
    params += _fields_as_params(op.query, "query", schemas)
    params += _fields_as_params(op.headers, "header", schemas)
    if params:
        out["parameters"] = params
    if op.request:
        out["requestBody"] = {"required": True, "content": _content(op.request, schemas)}
    responses: dict[str, object] = {
        str(status): {"description": _REASONS[status], "content": _content(op.response, schemas)}
        for status in op.ok
    }
    error = {"content": {"application/json": {"schema": schemas.of(wire.ErrorBody)}}}
    errors = sorted({*op.errors, *common})
    responses.update({str(s): {"description": _REASONS[s], **error} for s in errors})
    out["responses"] = responses
    if op.admin:
        out["security"] = [{"bearer": []}, {}]  # the token is needed only when one is set
    return out


def _content(bodies: tuple[Body, ...], schemas: _Schemas) -> dict[str, object]:
    return {b.media: {"schema": schemas.of(b.type)} for b in bodies}


def _fields_as_params(struct: type | None, where: str, schemas: _Schemas) -> list[dict[str, object]]:
    if struct is None:
        return []
    schema = schemas.of(struct)
    definition = schemas.components[schema["$ref"].rsplit("/", 1)[-1]]
    required = set(definition.get("required", ()))
    return [
        {"name": name, "in": where, "required": name in required, "schema": _not_null(prop)}
        for name, prop in definition["properties"].items()
    ]


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without the ``null`` of an optional field: a query or a header
    is absent, never null."""
    options = [s for s in schema.get("anyOf", ()) if s != {"type": "null"}]
    if len(options) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**options[0], **rest}
