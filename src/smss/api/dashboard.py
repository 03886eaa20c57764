"""The web dashboard at ``/ui``: static pages that read the same REST routes as the CLI.

The page, its scripts and its style sheet ship inside the package
(``smss/api/static``) and are read once when the app is built; nothing is fetched
from anywhere else (the Content-Security-Policy says so to the browser too, and
keeps the page out of frames, so its buttons cannot be clicked through another
site). The dashboard has no route of its own for data: it polls ``/v1/...`` and
``/metrics`` like any client, sends the admin token the user typed (kept in the
tab's ``sessionStorage``) as ``Authorization: Bearer``, and its resume and replay
buttons post to ``/v1/runs/{id}/resume`` and ``/replay``, which the cross-site
checks let through because the page is this server's own origin.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smss.api.errors import error_response
from smss.errors import NotFound

#: Asset name -> media type. Only these files are served.
ASSETS = {
    "app.js": "text/javascript",
    "charts.js": "text/javascript",
    "pages.js": "text/javascript",
    "data.js": "text/javascript",
    "style.css": "text/css",
}
PAGE = "index.html"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # The files change only with the package; no-cache still lets the browser revalidate.
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (resources.files("smss.api") / "static" / name).read_bytes()


def routes(token_required: bool) -> list[Route]:
    """The dashboard's routes. ``token_required``: whether the admin routes need a token,
    told to the page (a ``<meta>``) so that it never tries one it may not read: a refused
    request would count against the address's failed authentications."""
    page = _read(PAGE).replace(b"{{token_required}}", b"true" if token_required else b"false")
    assets = {name: (_read(name), media) for name, media in ASSETS.items()}

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html", headers=_HEADERS)

    async def asset(request: Request) -> Response:
        found = assets.get(request.path_params["asset"])
        if found is None:
            return error_response(NotFound(f"no dashboard asset {request.path_params['asset']!r}"))
        body, media = found
        return Response(body, media_type=media, headers=_HEADERS)

    return [
        Route("/ui", index, methods=["GET"]),
        Route("/ui/{asset}", asset, methods=["GET"]),
    ]
