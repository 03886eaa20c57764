"""The cross-site policy as a pure function of the request's method, Host and Origin."""

from __future__ import annotations

import pytest

from smss.api.cross_site import SitePolicy, same_origin, split_host
from smss.errors import CrossSiteRequest, MisdirectedRequest

LOOPBACK = SitePolicy.for_bind("127.0.0.1")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost:8000", ("localhost", 8000)),
        ("LocalHost", ("localhost", None)),
        ("[::1]:8000", ("[::1]", 8000)),
        ("[::1]", ("[::1]", None)),
        ("127.0.0.1:x", ("", None)),
        ("evil.example:80:80", ("", None)),
    ],
)
def test_split_host(host: str, expected: tuple[str, int | None]) -> None:
    assert split_host(host) == expected


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost", None])
def test_loopback_names_pass(host: str | None) -> None:
    assert LOOPBACK.check("POST", host, None, 8000) is None


@pytest.mark.parametrize("host", ["evil.example:8000", "localhost:8001", "127.0.0.2:8000", "10.0.0.1:8000"])
def test_other_names_are_misdirected(host: str) -> None:
    assert isinstance(LOOPBACK.check("GET", host, None, 8000), MisdirectedRequest)


def test_allowed_and_bound_names_pass() -> None:
    policy = SitePolicy.for_bind("10.0.0.5", ["gpu-box.lan"])
    for host in ("10.0.0.5:8000", "gpu-box.lan:8000", "GPU-BOX.lan", "localhost:8000"):
        assert policy.check("GET", host, None, 8000) is None
    assert isinstance(policy.check("GET", "evil.example", None, 8000), MisdirectedRequest)


def test_a_wildcard_bind_checks_hosts_only_when_some_are_allowed() -> None:
    assert SitePolicy.for_bind("0.0.0.0").check("GET", "anything.example:8000", None, 8000) is None
    named = SitePolicy.for_bind("::", ["api.example"])
    assert named.check("GET", "api.example:8000", None, 8000) is None
    assert isinstance(named.check("GET", "anything.example", None, 8000), MisdirectedRequest)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_foreign_origins_cannot_change_state(method: str) -> None:
    for origin in (
        "http://evil.example",
        "null",
        "http://localhost:9000",
        "file://",
        "http://localhost:8000/x",
    ):
        assert isinstance(LOOPBACK.check(method, "localhost:8000", origin, 8000), CrossSiteRequest), origin
    assert LOOPBACK.check(method, "localhost:8000", "http://localhost:8000", 8000) is None
    assert LOOPBACK.check(method, "localhost:8000", "HTTP://LOCALHOST:8000/", 8000) is None


def test_reads_are_not_origin_checked() -> None:
    assert LOOPBACK.check("GET", "localhost:8000", "http://evil.example", 8000) is None


def test_same_origin_defaults_ports_by_scheme() -> None:
    assert same_origin("http://api.example", "api.example:80")
    assert same_origin("https://api.example", "api.example")
    assert not same_origin("https://api.example", "api.example:80")
    assert same_origin("http://[::1]:8000", "[::1]:8000")
    assert not same_origin("http://localhost:8000", None)
