"""A cluster gateway's HTTP app: inference on functions here, every other route at the controller.

The inference routes (health, metadata, readiness, infer) are the platform's own
(:func:`smss.api.v2.inference_routes`) over this gateway's routing
(:class:`~smss.cluster.edge.Edge`); a request naming something this gateway does
not route (a workflow, an unknown name) and every other route go to the
controller's app (:mod:`smss.cluster.proxy`), so a client can use any gateway for
anything. ``/metrics`` is this gateway's own (its requests).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smss.api.auth import TokenAuth
from smss.api.connection import CloseEarlyAnswers
from smss.api.cross_site import CrossSiteGuard, SitePolicy
from smss.api.errors import error_response
from smss.api.http import client_of, endpoint, read_body
from smss.api.metrics import PrometheusMetrics
from smss.api.v2 import inference_routes
from smss.cluster.edge import Edge
from smss.cluster.proxy import Answered, Passed, kept_headers
from smss.config import Settings
from smss.errors import Unavailable

Forward = Callable[[Passed], Awaitable[Answered]]
_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def create_edge_app(
    edge: Edge,
    settings: Settings,
    metrics: PrometheusMetrics,
    auth: TokenAuth,
    forward: Forward,
    is_ready: Callable[[], bool],
) -> Starlette:
    limits = settings.limits

    async def passed_on(request: Request) -> Response:
        upload = request.method == "PUT" and request.url.path.startswith("/v1/uploads/")
        body = await read_body(request, limits.max_upload_bytes if upload else limits.max_body_bytes)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            answer = await forward(
                Passed(
                    request.method, target, kept_headers(request.headers.items()), body, client_of(request)
                )
            )
        except Unavailable:
            raise
        except Exception as e:
            raise Unavailable(
                f"the controller did not answer ({type(e).__name__})",
                retry_after_s=settings.serving.retry_after_s,
            ) from None
        return Response(answer.body, answer.status, dict(answer.headers))

    def here_or_there(route: Route) -> Route:
        handler = route.endpoint

        async def routed(request: Request) -> Response:
            if not edge.routes_locally(request.path_params["name"]):
                return await passed_on(request)
            response: Response = await handler(request)
            return response

        return Route(route.path, endpoint(routed), methods=sorted(route.methods or ()))

    async def own_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    routes = [
        here_or_there(r) if "{name}" in r.path else r
        for r in inference_routes(edge, settings, metrics, auth, is_ready)
    ]
    routes += [
        Route("/metrics", own_metrics, methods=["GET"]),
        Route("/{path:path}", endpoint(passed_on), methods=_METHODS),
    ]

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    policy = SitePolicy.for_bind(settings.host, settings.allowed_hosts)
    return Starlette(
        routes=routes,
        middleware=[Middleware(CloseEarlyAnswers), Middleware(CrossSiteGuard, policy=policy)],
        exception_handlers={500: server_error},
    )
