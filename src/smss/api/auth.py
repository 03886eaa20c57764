"""Admin authentication: a bearer token compared in constant time.

Repeated failures from one client are rate-limited (a sliding window per
client address), so a token cannot be guessed at network speed.
"""

from __future__ import annotations

import hmac
from collections import deque

from smss.errors import AuthError, Forbidden, Overloaded
from smss.ports import Clock

MAX_FAILURES = 10
WINDOW_S = 60.0


class TokenAuth:
    def __init__(self, token: str | None, clock: Clock) -> None:
        self._token = token.encode() if token else None
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None, client: str) -> None:
        """Raise unless the Authorization header carries the admin token (no-op without one)."""
        if self._token is None:
            return
        now = self._clock.monotonic()
        failures = self._failures.setdefault(client, deque())
        while failures and now - failures[0] > WINDOW_S:
            failures.popleft()
        if len(failures) >= MAX_FAILURES:
            raise Overloaded("too many failed admin authentications; try later", retry_after_s=WINDOW_S)
        if not authorization:
            failures.append(now)
            raise AuthError("this route needs an admin token: Authorization: Bearer <token>")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            failures.append(now)
            raise Forbidden("invalid admin token")
        if not failures:
            self._failures.pop(client, None)
