"""The OpenAPI document of the REST routes, served at ``/openapi.json``."""

from __future__ import annotations

from smss import __version__

_ERR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _op(summary: str, *codes: int, admin: bool = False, body: bool = False) -> dict[str, object]:
    op: dict[str, object] = {
        "summary": summary,
        "responses": {"200": {"description": "ok"}, **{str(c): _ERR for c in codes}},
    }
    if admin:
        op["security"] = [{"bearer": []}]
    if body:
        op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
    return op


def _name(*extra: str) -> list[dict[str, object]]:
    return [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in ("name", *extra)
    ]


def document() -> dict[str, object]:
    infer = {**_op("Run inference (OIP v2, JSON or binary tensors)", 400, 404, 413, 429, 503, 504, body=True)}
    paths: dict[str, object] = {
        "/v2/health/live": {"get": _op("Liveness")},
        "/v2/health/ready": {"get": _op("Readiness", 503)},
        "/v2": {"get": _op("Server metadata")},
        "/v2/models/{name}": {"get": {**_op("Model metadata", 404), "parameters": _name()}},
        "/v2/models/{name}/versions/{version}": {
            "get": {**_op("Model metadata", 404), "parameters": _name("version")}
        },
        "/v2/models/{name}/ready": {"get": {**_op("Model readiness", 404, 503), "parameters": _name()}},
        "/v2/models/{name}/versions/{version}/ready": {
            "get": {**_op("Model readiness", 404, 503), "parameters": _name("version")}
        },
        "/v2/models/{name}/infer": {"post": {**infer, "parameters": _name()}},
        "/v2/models/{name}/versions/{version}/infer": {"post": {**infer, "parameters": _name("version")}},
        "/v2/repository/index": {"post": _op("Model repository index", 401, 403, admin=True)},
        "/v2/repository/models/{name}/load": {
            "post": {**_op("Start an instance", 401, 403, 404, admin=True), "parameters": _name()}
        },
        "/v2/repository/models/{name}/unload": {
            "post": {**_op("Scale to zero", 401, 403, 404, admin=True), "parameters": _name()}
        },
        "/v1/uploads/{sha256}": {
            "put": {
                **_op("Upload weights, named by their sha256", 400, 401, 403, 413, admin=True),
                "parameters": [
                    {"name": "sha256", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            }
        },
        "/v1/functions": {
            "get": _op("List functions and their instances"),
            "post": _op(
                "Deploy a function: {spec, source, weights_sha256}", 400, 401, 403, admin=True, body=True
            ),
        },
        "/v1/functions/{name}": {
            "get": {**_op("One function", 404), "parameters": _name()},
            "delete": {**_op("Delete a function", 401, 403, 404, admin=True), "parameters": _name()},
        },
        "/v1/devices": {
            "get": _op("Each node's devices: capacity, total, reserved, allocated and what is placed there")
        },
        "/metrics": {"get": _op("Prometheus metrics")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "SMSS", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
