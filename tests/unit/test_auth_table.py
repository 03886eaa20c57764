"""The admin token check and its failure table, on a virtual clock (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smss.api.auth import MAX_CLIENTS, MAX_FAILURES, WINDOW_S, FailureTable, TokenAuth
from smss.errors import AuthError, Forbidden, Overloaded
from smss.testing.clock import FakeClock

TOKEN = "a-long-random-admin-token-0123456789"


def test_the_right_token_passes_while_its_address_is_limited() -> None:
    clock = FakeClock()
    auth = TokenAuth(TOKEN, clock)
    for _ in range(MAX_FAILURES):
        with pytest.raises(Forbidden):
            auth.check("Bearer nope", "127.0.0.1")
    with pytest.raises(Overloaded):
        auth.check("Bearer nope", "127.0.0.1")
    with pytest.raises(Overloaded):
        auth.check(None, "127.0.0.1")
    auth.check(f"Bearer {TOKEN}", "127.0.0.1")  # never locked out
    auth.check(f"bearer {TOKEN}", "127.0.0.1")


def test_a_limit_ends_with_its_window() -> None:
    clock = FakeClock()
    auth = TokenAuth(TOKEN, clock)
    for _ in range(MAX_FAILURES):
        with pytest.raises(AuthError):
            auth.check(None, "10.0.0.1")
    with pytest.raises(Overloaded):
        auth.check(None, "10.0.0.1")
    clock.advance(WINDOW_S + 1)
    with pytest.raises(AuthError) as answer:
        auth.check(None, "10.0.0.1")
    assert not isinstance(answer.value, Overloaded)


def test_wrong_scheme_or_token_fails() -> None:
    auth = TokenAuth(TOKEN, FakeClock())
    for header in (f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", TOKEN, ""):
        with pytest.raises(AuthError):
            auth.check(header, "c")
    assert not auth.proves_admin(f"Basic {TOKEN}")
    assert auth.proves_admin(f"Bearer {TOKEN}")
    assert TokenAuth(None, FakeClock()).is_admin(None)
    assert not TokenAuth(None, FakeClock()).proves_admin("Bearer x")


def test_old_failures_are_pruned() -> None:
    table = FailureTable()
    for i in range(100):
        table.record(f"c{i}", i / 10)
    assert len(table) == 100
    table.record("late", 10 + WINDOW_S + 1)  # every earlier entry is now out of its window
    assert len(table) == 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10 * MAX_CLIENTS), st.floats(0, 1.0)), max_size=3 * MAX_CLIENTS))
def test_the_table_stays_bounded(failures: list[tuple[int, float]]) -> None:
    table = FailureTable()
    now = 0.0
    for client, step in failures:
        now += step
        table.record(f"10.{client}", now)
        assert len(table) <= MAX_CLIENTS
