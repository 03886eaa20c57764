"""A request's own timeout, bounded by the server's maximum (HTTP header and gRPC deadline).

A client may ask for less time than ``ServingSettings.request_timeout_s`` (Ray
Serve's ``x-request-timeout-seconds`` header, or a gRPC deadline), never more:
a longer request is cut to the server's maximum rather than refused, so a
client's generous default does not break it. A value that is not a positive
finite number of seconds is the client's error (400 / INVALID_ARGUMENT).
"""

from __future__ import annotations

import math

from smss.errors import DeadlineExceeded, InvalidInput
from smss.headers import REQUEST_TIMEOUT

#: The HTTP request header (lower case, as Starlette looks it up).
TIMEOUT_HEADER = REQUEST_TIMEOUT


def from_header(raw: str | None, maximum_s: float) -> float:
    """The timeout a request's header asks for, at most ``maximum_s`` (absent: the maximum)."""
    if raw is None:
        return maximum_s
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{TIMEOUT_HEADER} must be a number of seconds, not {raw[:32]!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise InvalidInput(f"{TIMEOUT_HEADER} must be a positive finite number of seconds")
    return min(value, maximum_s)


def from_remaining(remaining_s: float | None, maximum_s: float) -> float:
    """The timeout of a call whose deadline leaves ``remaining_s`` (None: no deadline)."""
    if remaining_s is None:
        return maximum_s
    if remaining_s <= 0:
        raise DeadlineExceeded("the request's deadline passed before it was served")
    return min(remaining_s, maximum_s)
