"""Authentication failures: counted per client address, and never a lock on the admin.

Every local process shares 127.0.0.1: if failures locked an address out before the token
was looked at, any of them could lock the admin out by guessing. The token is checked
first; a failing client past the limit gets 429, the right token always passes.
"""

from __future__ import annotations

from security_helpers import TOKEN, Server, error_of, fresh_address


def test_failures_from_an_address_never_lock_out_the_right_token(token_server: Server) -> None:
    shared = fresh_address()
    with token_server.http("guess", address=shared) as guesser:
        statuses = [guesser.post("/v2/repository/index").status_code for _ in range(10)]
        assert statuses == [403] * 10
        limited = guesser.post("/v2/repository/index")
        assert error_of(limited, 429)["code"] == "overloaded"
        assert int(limited.headers["retry-after"]) > 0
    with token_server.http(address=shared) as anonymous:
        assert error_of(anonymous.get("/v1/runs"), 429)["code"] == "overloaded"
    # The admin, from the very same address, is not locked out.
    with token_server.http(TOKEN, address=shared) as admin:
        r = admin.post("/v2/repository/index")
        assert r.status_code == 200, r.text
        assert admin.get("/v1/runs").status_code == 200
    # And the guesser still is.
    with token_server.http("guess", address=shared) as guesser:
        assert guesser.post("/v2/repository/index").status_code == 429


def test_other_addresses_are_not_limited(token_server: Server) -> None:
    with token_server.http("guess", address=fresh_address()) as guesser:
        for _ in range(11):
            guesser.post("/v2/repository/index")
    with token_server.http("guess-again", address=fresh_address()) as other:
        assert error_of(other.post("/v2/repository/index"), 403)["code"] == "forbidden"
