"""The OpenAPI document is generated from the app's own routes and their declared types."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smss.api import openapi
from smss.api.app import create_app
from smss.api.context import AppContext
from smss.api.operations import OPERATIONS
from smss.compose import build
from smss.config import Settings


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[AppContext]:
    ctx = build(Settings(data_dir=tmp_path))
    yield ctx
    for hook in ctx.on_shutdown:
        hook()


@pytest.fixture
def app(ctx: AppContext) -> Starlette:
    return create_app(ctx)


def test_every_registered_route_is_in_the_document(app: Starlette) -> None:
    document = openapi.document(app.routes)
    paths = document["paths"]
    assert isinstance(paths, dict)
    registered = openapi.registered(app.routes)
    assert len(registered) >= 30  # the app's whole surface, not a part of it
    for method, path in registered:
        operation = paths[path][method.lower()]
        assert operation["summary"]
        assert operation["responses"]
    # Nothing documented that the server does not serve.
    documented = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    assert documented == set(registered)


def test_schemas_are_generated_from_the_route_types(app: Starlette) -> None:
    document = openapi.document(app.routes)
    components = document["components"]["schemas"]  # type: ignore[index]
    # Request and response types of the routes, with their fields.
    assert set(components["DeployRequest"]["required"]) == {"spec", "source"}
    assert components["FunctionSpec"]["properties"]["runtime"]["enum"] == ["onnx", "python", "torch"]
    assert set(components["RunOutcomeJson"]["required"]) == {"run_id", "status"}
    assert components["ReplayRequest"]["required"] == ["from"]
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]  # type: ignore[index]
    body = infer["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/InferRequest"
    assert body["examples"][0]["inputs"][0]["name"] == "x"
    assert infer["requestBody"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert [p["name"] for p in infer["parameters"]] == [
        "name",
        "Inference-Header-Content-Length",
        "x-request-timeout-seconds",
    ]
    runs = document["paths"]["/v1/runs"]["get"]  # type: ignore[index]
    limit = next(p for p in runs["parameters"] if p["name"] == "limit")
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}


def test_a_route_without_declared_types_is_refused() -> None:
    async def handler(request: Request) -> Response:
        return Response()

    declared = [Route(path, handler, methods=[method]) for method, path in OPERATIONS]
    openapi.document(declared)
    with pytest.raises(LookupError, match="/v1/undeclared"):
        openapi.document([*declared, Route("/v1/undeclared", handler, methods=["GET"])])
    with pytest.raises(LookupError, match="operations without a route"):
        openapi.document(declared[1:])


def test_the_workflow_run_weight_cost_and_dashboard_routes_are_documented(app: Starlette) -> None:
    paths = openapi.document(app.routes)["paths"]
    assert isinstance(paths, dict)
    expected = {
        "/v1/workflows": {"get", "post"},
        "/v1/workflows/{name}": {"get", "delete"},
        "/v1/workflows/{name}/runs": {"post"},
        "/v1/runs": {"get"},
        "/v1/runs/{run_id}": {"get"},
        "/v1/runs/{run_id}/resume": {"post"},
        "/v1/runs/{run_id}/replay": {"post"},
        "/v1/log/stats": {"get"},
        "/v1/weights": {"get"},
        "/v1/weights/{name}": {"delete"},
        "/v1/cost": {"get"},
        "/v1/devices": {"get"},
        "/ui": {"get"},
        "/ui/{asset}": {"get"},
    }
    for path, methods in expected.items():
        assert set(paths[path]) == methods, path
    assert "text/html" in paths["/ui"]["get"]["responses"]["200"]["content"]
