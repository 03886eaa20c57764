"""Admin and platform routes under ``/v1``: uploads, deploy, delete, list, status, devices.

Deploying a model runs its code, so every mutating route here checks the
admin token (when one is configured) and the body's Content-Type before
reading the body (see smss.api.cross_site for why the type matters).
"""

from __future__ import annotations

import time

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smss.api import wire as w
from smss.api.context import AppContext
from smss.api.http import (
    body_chunks,
    check_length,
    client_of,
    endpoint,
    json_response,
    read_json,
    require_content_type,
)
from smss.app.platform import FunctionStatus
from smss.app.versions import Traffic
from smss.control.cost import report as cost_report
from smss.spec import public_name

MAX_DEPLOY_BODY = 2 * 1024 * 1024


def function_json(st: FunctionStatus) -> w.FunctionJson:
    return w.FunctionJson(
        name=st.spec.name,
        version=st.spec.version,
        generation=st.generation,
        runtime=st.spec.runtime,
        spec=st.spec,
        instances=list(st.instances),
        starting=st.starting,
        queued=st.queued,
        cold_starts=st.cold_starts,
        last_error=st.last_error,
        state=st.state,
        replaced=st.replaced,
        tier=st.tier,
    )


def routes(ctx: AppContext) -> list[Route]:
    platform, limits = ctx.platform, ctx.settings.limits

    def admin(request: Request) -> None:
        ctx.auth.check(request.headers.get("authorization"), client_of(request))

    @endpoint
    async def upload(request: Request) -> Response:
        admin(request)
        require_content_type(request, ("application/octet-stream",), optional=True)
        check_length(request, limits.max_upload_bytes)
        sha = request.path_params["sha256"]
        size = await platform.artifacts.save_upload(sha, body_chunks(request), limits.max_upload_bytes)
        return json_response(w.Uploaded(sha256=sha, size=size), 201)

    @endpoint
    async def deploy(request: Request) -> Response:
        admin(request)
        require_content_type(request)
        body = await read_json(request, MAX_DEPLOY_BODY, w.DeployRequest)
        record = await platform.deploy(body.spec, body.source, body.weights_sha256)
        spec = record.spec
        return json_response(
            w.Deployed(name=public_name(spec.name)[0], version=spec.version, generation=record.generation),
            201,
        )

    @endpoint
    async def traffic(request: Request) -> Response:
        admin(request)
        require_content_type(request)
        body = await read_json(request, MAX_DEPLOY_BODY, w.TrafficRequest)
        name = request.path_params["name"]
        now = platform.versions.get(name)
        default = now.default if isinstance(body.default, msgspec.UnsetType) else body.default
        split = now.split if isinstance(body.split, msgspec.UnsetType) else body.split
        default, split = platform.set_traffic(name, Traffic(default, dict(split)))
        return json_response(w.TrafficJson(name=name, default=default, split=split))

    @endpoint
    async def list_functions(request: Request) -> Response:
        return json_response(w.FunctionList(functions=[function_json(st) for st in platform.status()]))

    @endpoint
    async def get_function(request: Request) -> Response:
        name = request.path_params["name"]
        platform.function(name)
        st = next(s for s in platform.status() if s.spec.name == name)
        return json_response(function_json(st))

    @endpoint
    async def delete_function(request: Request) -> Response:
        admin(request)
        await platform.delete(request.path_params["name"])
        return json_response(w.Deleted(deleted=request.path_params["name"]))

    @endpoint
    async def step_tier(request: Request) -> Response:
        admin(request)
        require_content_type(request)
        body = await read_json(request, MAX_DEPLOY_BODY, w.TierRequest)
        name = request.path_params["name"]
        tier = await platform.step_tier(name, body.tier)
        return json_response(w.Stepped(name=name, tier=tier))

    @endpoint
    async def weights(request: Request) -> Response:
        return json_response(platform.backend.weight_cache())

    @endpoint
    async def evict_weights(request: Request) -> Response:
        admin(request)
        name = request.path_params["name"]
        return json_response(w.Evicted(name=name, evicted=platform.evict_weights(name)))

    @endpoint
    async def devices(request: Request) -> Response:
        return json_response(w.Devices(devices=platform.devices()))

    @endpoint
    async def cluster(request: Request) -> Response:
        if ctx.cluster is not None:
            return json_response(ctx.cluster())
        nodes = [w.ClusterNode(node) for node in platform.backend.nodes()]
        return json_response(w.ClusterJson("local", nodes))

    @endpoint
    async def cost(request: Request) -> Response:
        meter, now = platform.controller.meter, time.monotonic()
        specs = {rt.name: rt.record.spec for rt in platform.controller.functions()}
        result = cost_report(meter.usage(now), ctx.prices, ctx.metered_period_s(), specs, meter.overhead(now))
        return json_response(result)

    @endpoint
    async def metrics(request: Request) -> Response:
        text = ctx.metrics.render(
            platform.backend.weight_cache(),  # type: ignore[arg-type]
            platform.devices(),
        )
        return Response(text, media_type="text/plain; version=0.0.4")

    return [
        Route("/v1/uploads/{sha256}", upload, methods=["PUT"]),
        Route("/v1/functions", list_functions, methods=["GET"]),
        Route("/v1/functions", deploy, methods=["POST"]),
        Route("/v1/functions/{name}", get_function, methods=["GET"]),
        Route("/v1/functions/{name}", delete_function, methods=["DELETE"]),
        Route("/v1/functions/{name}/tier", step_tier, methods=["POST"]),
        Route("/v1/functions/{name}/traffic", traffic, methods=["POST"]),
        Route("/v1/weights", weights, methods=["GET"]),
        Route("/v1/devices", devices, methods=["GET"]),
        Route("/v1/cluster", cluster, methods=["GET"]),
        Route("/v1/cost", cost, methods=["GET"]),
        Route("/v1/weights/{name}", evict_weights, methods=["DELETE"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
