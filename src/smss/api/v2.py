"""Open Inference Protocol v2 routes: health, metadata, readiness, infer, repository.

Compatible with ``tritonclient.http`` and KServe clients: JSON tensors and the
binary tensor data extension (``Inference-Header-Content-Length``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smss import __version__
from smss.api import codec, deadlines
from smss.api import wire as w
from smss.api.auth import TokenAuth
from smss.api.context import AppContext
from smss.api.errors import reported, status_of
from smss.api.http import client_of, endpoint, json_response, read_body, require_content_type
from smss.api.metrics import PrometheusMetrics
from smss.app.platform import Answer, Described
from smss.config import Settings
from smss.errors import ModelError, SmssError
from smss.headers import COLD_START, RUN_ID
from smss.ports import Tensors
from smss.spec import FunctionSpec, TensorSpec

HEADER_LENGTH = "inference-header-content-length"


def _tensor_meta(t: TensorSpec) -> w.TensorMetadata:
    return w.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))


def spec_metadata(spec: FunctionSpec, platform: str) -> w.ModelMetadata:
    return w.ModelMetadata(
        name=spec.name,
        versions=[spec.version],
        platform=platform,
        inputs=[_tensor_meta(t) for t in spec.inputs],
        outputs=[_tensor_meta(t) for t in spec.outputs],
    )


class InferenceFace(Protocol):
    """What the inference routes ask: the platform (one process), or a cluster gateway's
    own routing (:mod:`smss.cluster.edge`)."""

    def describe(self, name: str, version: str | None = None) -> Described: ...

    def model_ready(self, name: str, version: str | None = None) -> bool: ...

    async def infer_named(
        self,
        name: str,
        version: str | None,
        inputs: Tensors,
        outputs: tuple[str, ...],
        timeout_s: float,
        *,
        session: str | None = None,
        idempotency_key: str | None = None,
        retry_after_s: float = 1.0,
    ) -> Answer: ...


def routes(ctx: AppContext) -> list[Route]:
    return [
        *inference_routes(ctx.platform, ctx.settings, ctx.metrics, ctx.auth, lambda: ctx.ready),
        *repository_routes(ctx),
    ]


def inference_routes(
    platform: InferenceFace,
    settings: Settings,
    metrics: PrometheusMetrics,
    auth: TokenAuth,
    is_ready: Callable[[], bool],
) -> list[Route]:
    """Health, metadata, readiness and infer: the routes a cluster gateway serves itself."""
    limits, serving = settings.limits, settings.serving

    @endpoint
    async def live(request: Request) -> Response:
        return json_response(w.Live(live=True))

    @endpoint
    async def ready(request: Request) -> Response:
        ok = is_ready()
        return json_response(w.Ready(ready=ok), 200 if ok else 503)

    @endpoint
    async def server_metadata(request: Request) -> Response:
        extensions = ["binary_tensor_data", "model_repository"]
        return json_response(w.ServerMetadata(name="smss", version=__version__, extensions=extensions))

    def name_of(request: Request) -> tuple[str, str | None]:
        return request.path_params["name"], request.path_params.get("version")

    @endpoint
    async def metadata(request: Request) -> Response:
        described = platform.describe(*name_of(request))
        return json_response(spec_metadata(described.spec, described.platform))

    @endpoint
    async def model_ready(request: Request) -> Response:
        name, version = name_of(request)
        ok = platform.model_ready(name, version)
        return json_response(w.ModelReady(name=name, ready=ok), 200 if ok else 503)

    @endpoint
    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        name, version = name_of(request)
        status = "500"
        known = False  # unknown names are not metered: a label per random name would grow without bound
        try:
            timeout_s = deadlines.from_header(
                request.headers.get(deadlines.TIMEOUT_HEADER), serving.request_timeout_s
            )
            spec = platform.describe(name, version).spec
            known = True
            body = await read_body(request, limits.max_body_bytes)
            decoded = codec.decode_request(body, _header_length(request), spec, limits)
            answer = await platform.infer_named(
                name,
                version,
                decoded.inputs,
                tuple(o.name for o in decoded.outputs),
                timeout_s,
                session=request.headers.get("smss-session"),
                idempotency_key=request.headers.get("idempotency-key"),
                retry_after_s=serving.retry_after_s,
            )
            payload, headers = codec.encode_response(
                spec.name, answer.version or spec.version, decoded.id, answer.outputs, decoded
            )
            if answer.run_id is not None:
                headers[RUN_ID] = answer.run_id
            else:
                headers[COLD_START] = "1" if answer.cold else "0"
                if answer.served is not None:
                    metrics.request_split(name, answer.served)
            status = "200"
            return Response(payload, 200, headers)
        except ModelError as e:
            status = "500"
            raise reported(e, detail=auth.proves_admin(request.headers.get("authorization"))) from None
        except SmssError as e:
            status = str(status_of(e))
            raise
        finally:
            if known:
                metrics.request_done(name, status, time.perf_counter() - started)

    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/{name}", metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    ]


def repository_routes(ctx: AppContext) -> list[Route]:
    platform = ctx.platform

    @endpoint
    async def repository_index(request: Request) -> Response:
        ctx.auth.check(request.headers.get("authorization"), client_of(request))
        require_content_type(request, optional=True)
        entries = [
            w.RepositoryEntry(name=m.name, version=m.version, state=m.state, reason=m.reason)
            for m in platform.repository_index()
        ]
        return json_response(entries)

    @endpoint
    async def repository_load(request: Request) -> Response:
        ctx.auth.check(request.headers.get("authorization"), client_of(request))
        require_content_type(request, optional=True)
        platform.load(request.path_params["name"])
        return json_response(w.Empty())

    @endpoint
    async def repository_unload(request: Request) -> Response:
        ctx.auth.check(request.headers.get("authorization"), client_of(request))
        require_content_type(request, optional=True)
        platform.unload(request.path_params["name"])
        return json_response(w.Empty())

    return [
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
    ]


def _header_length(request: Request) -> int | None:
    return codec.parse_header_length(request.headers.get(HEADER_LENGTH))
