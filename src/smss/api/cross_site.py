"""Cross-site checks: what keeps a web page the user visits from driving the API.

A browser lets any page send requests to ``http://127.0.0.1:8000``. Two checks,
applied to every request before any route runs, stop it from doing harm:

* **Host** (DNS rebinding): a page on ``evil.example`` that re-points its name at
  127.0.0.1 talks to us with ``Host: evil.example``. On a loopback or specific
  bind, the Host header must name this server: ``127.0.0.1``, ``localhost``,
  ``[::1]``, the bound address or an ``--allow-host`` name, with this server's
  port if it carries one. Otherwise 421. On a wildcard bind (``0.0.0.0``,
  ``::``), which needs a token, any name may reach us, so the check is made
  only against ``--allow-host`` names when some are given.
* **Origin** (CSRF): browsers send ``Origin`` on every request that is not a GET
  or HEAD. A state-changing request whose Origin is not this server itself
  (same scheme-less host and port as its Host header) is refused with 403.
  Clients that are not browsers send no Origin and are unaffected.

Routes with a JSON body also require a JSON ``Content-Type`` (415 otherwise;
see :func:`smss.api.http.require_content_type`): a page can post a form or
``text/plain`` cross-site without asking, never ``application/json``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from smss.api.errors import error_response
from smss.errors import CrossSiteRequest, MisdirectedRequest, SmssError

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _bracketed(host: str) -> str:
    """An IPv6 literal as a Host header writes it."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


@dataclass(frozen=True)
class SitePolicy:
    #: Host names a request may name (lowercase, IPv6 in brackets); None: any.
    hosts: frozenset[str] | None

    @classmethod
    def for_bind(cls, bind_host: str, allowed: Iterable[str] = ()) -> SitePolicy:
        extra = {_bracketed(h.strip().lower()) for h in allowed if h.strip()}
        if bind_host in WILDCARDS:
            return cls(frozenset(extra | set(LOOPBACK_NAMES)) if extra else None)
        return cls(frozenset({*LOOPBACK_NAMES, _bracketed(bind_host.lower()), *extra}))

    def check(self, method: str, host: str | None, origin: str | None, port: int | None) -> SmssError | None:
        """The error a request with these headers gets, or None if it may go on.

        ``port`` is the local port the connection came in on."""
        if host is not None and self.hosts is not None:
            name, host_port = split_host(host)
            if name not in self.hosts or (host_port is not None and port is not None and host_port != port):
                return MisdirectedRequest(
                    "the Host header does not name this server (a DNS rebinding guard); "
                    "use http://127.0.0.1:<port> or start smss serve with --allow-host NAME"
                )
        if origin is not None and method.upper() not in SAFE_METHODS and not same_origin(origin, host):
            return CrossSiteRequest(
                "cross-site request refused: the Origin header is not this server, and only "
                "this server's own pages may change state"
            )
        return None


def split_host(host: str) -> tuple[str, int | None]:
    """``"LocalHost:8000"`` -> ``("localhost", 8000)``; ``"[::1]"`` -> ``("[::1]", None)``."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = (host[: end + 1], host[end + 1 :]) if end >= 0 else (host, "")
    else:
        name, sep, port_text = host.rpartition(":")
        name, rest = (name, sep + port_text) if sep else (host, "")
        if ":" in name:
            return "", None  # an unbracketed IPv6 literal or junk: names nothing we serve
    if not rest:
        return name, None
    if not rest.startswith(":") or not rest[1:].isdigit():
        return "", None  # names nothing we serve
    return name, int(rest[1:])


def same_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` (scheme://host[:port]) is the server named by the Host header."""
    if host is None:
        return False
    try:
        parts = urlsplit(origin.strip().lower())
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return False
    default = _DEFAULT_PORTS[parts.scheme]
    origin_name = _bracketed(parts.hostname)
    name, host_port = split_host(host)
    return origin_name == name and (origin_port or default) == (host_port or default)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class CrossSiteGuard:
    """ASGI middleware applying :class:`SitePolicy` to every HTTP request."""

    def __init__(self, app: ASGIApp, policy: SitePolicy) -> None:
        self._app = app
        self._policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            port = server[1] if server else None
            error = self._policy.check(
                scope["method"], _header(scope, b"host"), _header(scope, b"origin"), port
            )
            if error is not None:
                log.warning("%s %s refused: %s", scope["method"], scope["path"], error.code)
                await error_response(error)(scope, receive, send)
                return
        await self._app(scope, receive, send)
