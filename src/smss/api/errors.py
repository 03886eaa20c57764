"""The ONE place where SMSS errors become HTTP responses and gRPC status codes.

HTTP bodies follow the Open Inference Protocol: ``{"error": "<message>"}``, plus a
stable ``code``. Messages are the error's own plain text; tracebacks, paths
and SQL never reach a client (unexpected errors are logged and answered with a
generic 500).
"""

from __future__ import annotations

import logging
import math
import uuid

import msgspec
from starlette.responses import Response

from smss import errors as e
from smss import logcontext

log = logging.getLogger(__name__)

STATUS: tuple[tuple[type[e.SmssError], int], ...] = (
    # Most specific first: the first match wins.
    (e.PayloadTooLarge, 413),
    (e.UnsupportedMediaType, 415),
    (e.MisdirectedRequest, 421),
    (e.RequestTimeout, 408),
    (e.InvalidInput, 400),
    (e.InvalidSpec, 400),
    (e.UnsafeArtifact, 400),
    (e.NotFound, 404),
    (e.Conflict, 409),
    (e.Forbidden, 403),
    (e.AuthError, 401),
    (e.Overloaded, 429),
    # Retryable: the database comes back (Retry-After from the error, 1 s by default).
    (e.StorageUnreachable, 503),
    (e.Unavailable, 503),
    (e.DeadlineExceeded, 504),
    (e.ModelError, 500),
)


#: gRPC status codes by name (``grpc.StatusCode[name]``; named so this module, and the
#: HTTP path, do not import grpc). The same order rule as STATUS.
GRPC_STATUS: tuple[tuple[type[e.SmssError], str], ...] = (
    (e.PayloadTooLarge, "RESOURCE_EXHAUSTED"),
    (e.InvalidInput, "INVALID_ARGUMENT"),
    (e.InvalidSpec, "INVALID_ARGUMENT"),
    (e.UnsafeArtifact, "INVALID_ARGUMENT"),
    (e.NotFound, "NOT_FOUND"),
    (e.Conflict, "ALREADY_EXISTS"),
    (e.Forbidden, "PERMISSION_DENIED"),
    (e.AuthError, "UNAUTHENTICATED"),
    (e.Overloaded, "RESOURCE_EXHAUSTED"),
    (e.StorageUnreachable, "UNAVAILABLE"),
    (e.Unavailable, "UNAVAILABLE"),
    (e.DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (e.ModelError, "INTERNAL"),
)


def status_of(error: e.SmssError) -> int:
    return next((status for kind, status in STATUS if isinstance(error, kind)), 500)


def grpc_status_of(error: e.SmssError) -> str:
    """The name of the gRPC status code of an error (``INTERNAL`` for the unexpected)."""
    return next((status for kind, status in GRPC_STATUS if isinstance(error, kind)), "INTERNAL")


def retry_after_of(error: e.SmssError) -> int | None:
    """Whole seconds a client should wait before retrying, for overload and unavailability."""
    if error.retry_after_s is not None or status_of(error) in (429, 503):
        return max(1, math.ceil(error.retry_after_s or 1))
    return None


def error_response(error: Exception) -> Response:
    if isinstance(error, e.SmssError):
        status = status_of(error)
        body = {"error": error.message, "code": error.code}
        if isinstance(error, e.ModelError) and error.request_id is not None:
            body["request_id"] = error.request_id
        headers = {}
        retry_after = retry_after_of(error)
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
    else:
        log.exception("unexpected error while handling a request", exc_info=error)
        status, headers = 500, {}
        body = {"error": "internal server error", "code": "internal"}
    return Response(msgspec.json.encode(body), status, headers, media_type="application/json")


def reported(error: e.ModelError, *, detail: bool) -> e.ModelError:
    """What a caller sees of a failed predict(): its text (and a request id) only when
    ``detail`` (the admin); otherwise "model error" and the request id, which names the
    failure in the server log, where its message and traceback always go."""
    request_id = logcontext.current("request") or uuid.uuid4().hex[:16]  # the request's own id
    trace = getattr(error, "traceback", "")  # set by the instance channel on predict() failures
    log.warning("model error, request id %s: %s%s", request_id, error.message, f"\n{trace}" if trace else "")
    if detail:
        return e.ModelError(f"{error.message} (request id {request_id})", request_id=request_id)
    return e.ModelError(f"model error (request id {request_id})", request_id=request_id)
