"""Per-request timeouts (header and gRPC deadline) and the one error map, HTTP and gRPC."""

from __future__ import annotations

import pytest

from smss import errors as e
from smss.api import deadlines
from smss.api.errors import GRPC_STATUS, STATUS, grpc_status_of, retry_after_of, status_of


def test_a_header_asks_for_less_never_more() -> None:
    assert deadlines.from_header(None, 60.0) == 60.0
    assert deadlines.from_header("2.5", 60.0) == 2.5
    assert deadlines.from_header("600", 60.0) == 60.0
    assert deadlines.from_header(" 1e-3 ", 60.0) == 0.001


@pytest.mark.parametrize("raw", ["", "abc", "0", "-1", "nan", "inf", "-inf", "1s", "0x10"])
def test_a_bad_header_is_invalid_input_naming_it(raw: str) -> None:
    with pytest.raises(e.InvalidInput, match=deadlines.TIMEOUT_HEADER):
        deadlines.from_header(raw, 60.0)


def test_a_grpc_deadline_is_bounded_and_a_passed_one_is_exceeded() -> None:
    assert deadlines.from_remaining(None, 60.0) == 60.0
    assert deadlines.from_remaining(3.0, 60.0) == 3.0
    assert deadlines.from_remaining(3600.0, 60.0) == 60.0
    with pytest.raises(e.DeadlineExceeded):
        deadlines.from_remaining(0.0, 60.0)


def _all(root: type[e.SmssError]) -> list[type[e.SmssError]]:
    return [root, *(sub for child in root.__subclasses__() for sub in _all(child))]


@pytest.mark.parametrize(
    ("kind", "code", "http"),
    [
        (e.InvalidInput, "INVALID_ARGUMENT", 400),
        (e.PayloadTooLarge, "RESOURCE_EXHAUSTED", 413),
        (e.NotFound, "NOT_FOUND", 404),
        (e.Overloaded, "RESOURCE_EXHAUSTED", 429),
        (e.Unavailable, "UNAVAILABLE", 503),
        (e.StartFailed, "UNAVAILABLE", 503),
        (e.InstanceLost, "UNAVAILABLE", 503),
        (e.DeadlineExceeded, "DEADLINE_EXCEEDED", 504),
        (e.AuthError, "UNAUTHENTICATED", 401),
        (e.Forbidden, "PERMISSION_DENIED", 403),
        (e.Conflict, "ALREADY_EXISTS", 409),
        (e.ModelError, "INTERNAL", 500),
    ],
)
def test_each_error_has_its_status_on_both_protocols(kind: type[e.SmssError], code: str, http: int) -> None:
    error = kind("x")
    assert grpc_status_of(error) == code
    assert status_of(error) == http


def test_every_error_type_is_mapped_on_both_protocols_and_the_names_are_grpc_codes() -> None:
    grpc = pytest.importorskip("grpc")
    for kind in _all(e.SmssError):
        if kind is e.SmssError:
            continue
        assert any(issubclass(kind, k) for k, _ in STATUS), kind
        assert any(issubclass(kind, k) for k, _ in GRPC_STATUS), kind
    for _, name in GRPC_STATUS:
        assert grpc.StatusCode[name]


def test_retry_after_for_overload_and_unavailability_only() -> None:
    assert retry_after_of(e.Overloaded("full")) == 1
    assert retry_after_of(e.Unavailable("down", retry_after_s=2.5)) == 3
    assert retry_after_of(e.InvalidInput("bad")) is None
