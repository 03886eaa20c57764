"""The ASGI app factory: routes, errors, and the platform's lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smss.api import admin, dashboard, openapi, v2, workflows
from smss.api.connection import CloseEarlyAnswers
from smss.api.context import AppContext
from smss.api.cross_site import CrossSiteGuard, SitePolicy
from smss.api.errors import error_response
from smss.api.request_ids import RequestIds
from smss.errors import NotFound


@contextlib.asynccontextmanager
async def _grpc(ctx: AppContext) -> AsyncIterator[None]:
    """The gRPC face beside this app, in its event loop (``grpc_port`` 0: none)."""
    if not ctx.settings.grpc_port:
        yield
        return
    from smss.api.grpc_api.server import serving  # grpcio is an extra: imported only when used

    async with serving(ctx, ctx.settings.host, ctx.settings.grpc_port):
        yield


def create_app(ctx: AppContext) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with ctx.platform.running(), _grpc(ctx):
                ctx.ready = not ctx.settings.demo  # with --demo: once the demo models are deployed
                try:
                    yield
                finally:
                    ctx.ready = False
        finally:
            # Here, not after uvicorn returns: on SIGTERM uvicorn re-raises the signal
            # once the lifespan has ended, so code after it would never run.
            for hook in ctx.on_shutdown:
                hook()

    async def spec(request: Request) -> Response:
        return Response(document, media_type="application/json")

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(NotFound(f"no route {request.method} {request.url.path}"))

    async def not_allowed(request: Request, exc: Exception) -> Response:
        # Starlette's own Allow names only the first route of the path; a path may have several.
        allow = sorted({m for r in routes if r.path_regex.match(request.url.path) for m in r.methods or ()})
        return Response(
            b'{"error":"method not allowed","code":"method_not_allowed"}',
            405,
            {"Allow": ", ".join(allow)},
            media_type="application/json",
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    routes = [
        *v2.routes(ctx),
        *admin.routes(ctx),
        *workflows.routes(ctx),
        Route("/openapi.json", spec, methods=["GET"]),
        *dashboard.routes(ctx.auth.enabled),
    ]
    document = msgspec.json.encode(openapi.document(routes))
    policy = SitePolicy.for_bind(ctx.settings.host, ctx.settings.allowed_hosts)
    return Starlette(
        routes=routes,
        # Outermost first: a refused cross-site request, whose body is never read, closes too.
        middleware=[
            Middleware(CloseEarlyAnswers),
            Middleware(RequestIds),
            Middleware(CrossSiteGuard, policy=policy),
        ],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: not_allowed, 500: server_error},
    )
