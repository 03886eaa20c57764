"""What each REST route takes and answers, declared as types.

One :class:`Operation` per (method, path) the app registers; the OpenAPI
document (:mod:`smss.api.openapi`) is generated from these and the app's own
route table, and refuses to build when a registered route is not declared here
or a declaration names no route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from smss.api import wire as w
from smss.api.codec import InferRequest
from smss.api.cross_site import SAFE_METHODS
from smss.control.cost import CostReport
from smss.workflow.spec import WorkflowSpec


class RawBytes:
    """A body that is bytes, not JSON (uploads, binary tensors)."""


class Text:
    """A text body (YAML definitions, Prometheus metrics)."""


@dataclass(frozen=True)
class Body:
    """A body of ``type`` sent as ``media``: a type msgspec can describe, or
    :class:`RawBytes` / :class:`Text`."""

    type: Any
    media: str = "application/json"


@dataclass(frozen=True)
class Operation:
    summary: str
    response: tuple[Body, ...]
    #: Success statuses, each with ``response`` as its body.
    ok: tuple[int, ...] = (200,)
    #: Error statuses this operation answers on purpose (bodies: :class:`wire.ErrorBody`).
    errors: tuple[int, ...] = ()
    request: tuple[Body, ...] = ()
    admin: bool = False
    #: A msgspec struct whose fields are the query parameters.
    query: type | None = None
    #: A msgspec struct whose fields (by their encoded names) are request headers.
    headers: type | None = None


def _json(t: Any) -> tuple[Body, ...]:
    return (Body(t),)


def common_errors(method: str) -> tuple[int, ...]:
    """What every route may answer before it runs (smss.api.cross_site): 421 for a Host
    naming another server, and for a state-changing method 403 for another web Origin."""
    return (421,) if method in SAFE_METHODS else (403, 421)


# Statuses common to groups of routes.
_ADMIN = (401, 403, 429)
_BODY = (400, 413, 415)  # 415: a body not of the route's Content-Type
_INFER_ERRORS = (*_BODY, 404, 429, 500, 503, 504)

_TENSOR_EXAMPLE = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.5, 1.0, 1.5, 2.0]}
_INFER_EXAMPLE = {"inputs": [_TENSOR_EXAMPLE]}
_RUN_EXAMPLE = {"inputs": [_TENSOR_EXAMPLE], "session": "user-1"}

_INFER = Operation(
    "Run inference (Open Inference Protocol v2): JSON tensors, or the binary tensor extension",
    (Body(w.InferResponse), Body(RawBytes, "application/octet-stream")),
    errors=_INFER_ERRORS,
    request=(
        Body(Annotated[InferRequest, msgspec.Meta(examples=[_INFER_EXAMPLE])]),
        Body(RawBytes, "application/octet-stream"),
    ),
    headers=w.InferHeaders,
)
_METADATA = Operation("Model or workflow metadata", _json(w.ModelMetadata), errors=(404,))
_MODEL_READY = Operation("Model readiness", _json(w.ModelReady), errors=(404, 503))
_OUTCOME = _json(w.RunOutcomeJson)

OPERATIONS: dict[tuple[str, str], Operation] = {
    # --- Open Inference Protocol v2 ---
    ("GET", "/v2/health/live"): Operation("Liveness", _json(w.Live)),
    ("GET", "/v2/health/ready"): Operation("Readiness", _json(w.Ready), errors=(503,)),
    ("GET", "/v2"): Operation("Server metadata", _json(w.ServerMetadata)),
    ("GET", "/v2/models/{name}"): _METADATA,
    ("GET", "/v2/models/{name}/versions/{version}"): _METADATA,
    ("GET", "/v2/models/{name}/ready"): _MODEL_READY,
    ("GET", "/v2/models/{name}/versions/{version}/ready"): _MODEL_READY,
    ("POST", "/v2/models/{name}/infer"): _INFER,
    ("POST", "/v2/models/{name}/versions/{version}/infer"): _INFER,
    ("POST", "/v2/repository/index"): Operation(
        "Model repository index", _json(list[w.RepositoryEntry]), errors=(*_ADMIN, 415), admin=True
    ),
    ("POST", "/v2/repository/models/{name}/load"): Operation(
        "Start an instance", _json(w.Empty), errors=(*_ADMIN, 404, 415), admin=True
    ),
    ("POST", "/v2/repository/models/{name}/unload"): Operation(
        "Scale to zero", _json(w.Empty), errors=(*_ADMIN, 404, 415), admin=True
    ),
    # --- functions, weights, devices, cost ---
    ("PUT", "/v1/uploads/{sha256}"): Operation(
        "Upload weights, named by their sha256",
        _json(w.Uploaded),
        ok=(201,),
        errors=(*_BODY, *_ADMIN),
        request=(Body(RawBytes, "application/octet-stream"),),
        admin=True,
    ),
    ("GET", "/v1/functions"): Operation("Functions and their instances", _json(w.FunctionList)),
    ("POST", "/v1/functions"): Operation(
        "Deploy a function",
        _json(w.Deployed),
        ok=(201,),
        errors=(*_BODY, *_ADMIN, 404, 409, 503),
        request=_json(w.DeployRequest),
        admin=True,
    ),
    ("GET", "/v1/functions/{name}"): Operation("One function", _json(w.FunctionJson), errors=(404,)),
    ("DELETE", "/v1/functions/{name}"): Operation(
        "Delete a function", _json(w.Deleted), errors=(*_ADMIN, 404, 409), admin=True
    ),
    ("POST", "/v1/functions/{name}/tier"): Operation(
        "Put a function with no instance in a tier of readiness now",
        _json(w.Stepped),
        errors=(*_BODY, *_ADMIN, 404, 409, 503),
        request=_json(w.TierRequest),
        admin=True,
    ),
    ("POST", "/v1/functions/{name}/traffic"): Operation(
        "Route a function's unversioned requests: its default version and a canary split",
        _json(w.TrafficJson),
        errors=(*_BODY, *_ADMIN, 404),
        request=_json(w.TrafficRequest),
        admin=True,
    ),
    ("GET", "/v1/weights"): Operation("Each node's weight store", _json(w.WeightCache)),
    ("DELETE", "/v1/weights/{name}"): Operation(
        "Evict a function's idle weights", _json(w.Evicted), errors=(*_ADMIN, 404), admin=True
    ),
    ("GET", "/v1/devices"): Operation(
        "Each node's devices: capacity, reserved, allocated and what is placed there",
        _json(w.Devices),
    ),
    ("GET", "/v1/cluster"): Operation(
        "The nodes (on a Ray cluster: agents, relays, gateways) and their measured distances",
        _json(w.ClusterJson),
    ),
    ("GET", "/v1/cost"): Operation("Metered usage and its cost", _json(CostReport)),
    ("GET", "/metrics"): Operation("Prometheus metrics", (Body(Text, "text/plain"),)),
    # --- workflows and runs ---
    ("GET", "/v1/workflows"): Operation("Workflow definitions", _json(w.WorkflowList)),
    ("POST", "/v1/workflows"): Operation(
        "Deploy a workflow definition (JSON, or YAML with a yaml content type)",
        _json(w.WorkflowDeployed),
        ok=(201,),
        errors=(*_BODY, *_ADMIN, 409),
        request=(Body(WorkflowSpec), Body(Text, "application/yaml")),
        admin=True,
    ),
    ("GET", "/v1/workflows/{name}"): Operation("One workflow definition", _json(WorkflowSpec), errors=(404,)),
    ("DELETE", "/v1/workflows/{name}"): Operation(
        "Delete a workflow definition", _json(w.Deleted), errors=(*_ADMIN, 404), admin=True
    ),
    ("POST", "/v1/workflows/{name}/runs"): Operation(
        "Start a run (202 while it is still running)",
        _OUTCOME,
        ok=(200, 202),
        errors=(*_BODY, 404, 409, 429, 503),
        request=_json(Annotated[w.RunRequest, msgspec.Meta(examples=[_RUN_EXAMPLE])]),
    ),
    ("GET", "/v1/runs"): Operation(
        "Runs, newest first", _json(w.RunList), errors=(400, *_ADMIN), query=w.RunsQuery, admin=True
    ),
    ("GET", "/v1/log/stats"): Operation("The event log's size", _json(w.LogStats), errors=_ADMIN, admin=True),
    ("GET", "/v1/runs/{run_id}"): Operation(
        "One run and its events", _json(w.RunDetail), errors=(*_ADMIN, 404), admin=True
    ),
    ("POST", "/v1/runs/{run_id}/resume"): Operation(
        "Resume an unfinished run", _OUTCOME, ok=(202,), errors=(*_ADMIN, 404, 409, 415), admin=True
    ),
    ("POST", "/v1/runs/{run_id}/replay"): Operation(
        "Run again from a stage",
        _OUTCOME,
        ok=(200, 202),
        errors=(*_BODY, *_ADMIN, 404, 409),
        request=_json(w.ReplayRequest),
        admin=True,
    ),
    ("GET", "/openapi.json"): Operation("This document", _json(dict[str, Any])),
    # --- the web dashboard (smss.api.dashboard): static files that read the routes above ---
    ("GET", "/ui"): Operation("The web dashboard", (Body(Text, "text/html"),)),
    ("GET", "/ui/{asset}"): Operation(
        "A script or style sheet of the dashboard",
        (Body(Text, "text/javascript"), Body(Text, "text/css")),
        errors=(404,),
    ),
}
