"""Admin authentication: a bearer token compared in constant time.

The token is checked first: a request carrying the right token always passes,
so clients that share its address (every local process shares 127.0.0.1) can
never lock the admin out by failing. Failures are counted per client address
in a sliding window; past :data:`MAX_FAILURES` a failing client is answered
429 instead of 401/403, which keeps its noise out of the way and tells it to
back off. The failure table is bounded: entries older than the window are
pruned, and past :data:`MAX_CLIENTS` the least recently failing client is
forgotten, so no stream of addresses makes it grow without bound.

Guessing is defeated by the token's length, not by the limit (a correct guess
passes even while its client is over the limit): use a long random token
(``smss serve`` warns about one under :data:`MIN_TOKEN_CHARS` characters).
"""

from __future__ import annotations

import hmac
from collections import OrderedDict, deque

from smss.errors import AuthError, Forbidden, Overloaded
from smss.ports import Clock

MAX_FAILURES = 10
WINDOW_S = 60.0
#: Client addresses whose failures are remembered at once.
MAX_CLIENTS = 4096
MIN_TOKEN_CHARS = 16


class FailureTable:
    """Recent authentication failures per client: bounded in clients and per client."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S) -> None:
        self._max = max_failures
        self._window_s = window_s
        # Least recently failing first; each deque holds at most max_failures times.
        self._by_client: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_client)

    def limited(self, client: str, now: float) -> bool:
        """Whether ``client`` failed ``max_failures`` times within the window before ``now``."""
        failures = self._by_client.get(client)
        if failures is None:
            return False
        self._expire(failures, now)
        if not failures:
            del self._by_client[client]
            return False
        return len(failures) >= self._max

    def record(self, client: str, now: float) -> None:
        self._prune(now)
        failures = self._by_client.pop(client, None)
        if failures is None:
            failures = deque(maxlen=self._max)
        failures.append(now)
        self._by_client[client] = failures
        while len(self._by_client) > MAX_CLIENTS:
            self._by_client.popitem(last=False)

    def _expire(self, failures: deque[float], now: float) -> None:
        while failures and now - failures[0] > self._window_s:
            failures.popleft()

    def _prune(self, now: float) -> None:
        # Entries are ordered by their last failure: stop at the first one still recent.
        while self._by_client:
            client, failures = next(iter(self._by_client.items()))
            if now - failures[-1] <= self._window_s:
                return
            del self._by_client[client]


class TokenAuth:
    def __init__(self, token: str | None, clock: Clock) -> None:
        self._token = token.encode() if token else None
        self._clock = clock
        self._failures = FailureTable()

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def is_admin(self, authorization: str | None) -> bool:
        """Whether a request with this header may see what only the admin sees (run logs,
        failure detail): without a configured token every caller may (see README, Security)."""
        return self._token is None or self._matches(authorization)

    def proves_admin(self, authorization: str | None) -> bool:
        """Whether a token is configured and this header carries it: what a data-plane answer
        needs before it may carry failure detail (predict()'s exception text)."""
        return self._matches(authorization)

    def check(self, authorization: str | None, client: str) -> None:
        """Raise unless the Authorization header carries the admin token (no-op without one)."""
        if self._token is None or self._matches(authorization):
            return
        now = self._clock.monotonic()
        if self._failures.limited(client, now):
            raise Overloaded("too many failed admin authentications; try later", retry_after_s=WINDOW_S)
        self._failures.record(client, now)
        if not authorization:
            raise AuthError("this route needs an admin token: Authorization: Bearer <token>")
        raise Forbidden("invalid admin token")

    def _matches(self, authorization: str | None) -> bool:
        if self._token is None or not authorization:
            return False
        scheme, _, given = authorization.partition(" ")
        # compare_digest before the scheme test: the time taken does not depend on which failed.
        same = hmac.compare_digest(given.strip().encode(), self._token)
        return same and scheme.lower() == "bearer"
