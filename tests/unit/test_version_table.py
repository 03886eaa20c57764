"""The per-name version table: internal names, traffic validation and the seeded split."""

from __future__ import annotations

import pytest

from smss.app.versions import Traffic, VersionTable, internal_name, public_name
from smss.errors import InvalidSpec
from smss.spec import check_name, check_stored_name


def test_internal_names_round_trip_and_users_cannot_give_one() -> None:
    stored = internal_name("mlp", "2")
    assert public_name(stored) == ("mlp", "2")
    assert public_name("mlp") == ("mlp", None)
    assert check_stored_name(stored) == stored
    with pytest.raises(InvalidSpec):
        check_name("function", stored)
    with pytest.raises(InvalidSpec):
        check_stored_name("mlp~../x")


def test_without_traffic_the_plain_name_answers() -> None:
    assert VersionTable().pick("mlp") is None


def test_a_default_version_takes_every_request() -> None:
    table = VersionTable()
    table.set("mlp", Traffic(default="2"))
    assert {table.pick("mlp") for _ in range(50)} == {"2"}


def test_a_split_sends_its_share_and_the_rest_to_the_default() -> None:
    table = VersionTable(seed=7)
    table.set("mlp", Traffic(default="1", split={"2": 0.1}))
    picks = [table.pick("mlp") for _ in range(10_000)]
    assert 800 <= picks.count("2") <= 1200
    assert picks.count("1") == len(picks) - picks.count("2")


def test_the_same_seed_draws_the_same_versions() -> None:
    def draws() -> list[str | None]:
        table = VersionTable(seed=3)
        table.set("mlp", Traffic(split={"2": 0.5}))
        return [table.pick("mlp") for _ in range(100)]

    assert draws() == draws()


@pytest.mark.parametrize("split", [{"2": 1.5}, {"2": -0.1}, {"2": 0.6, "3": 0.6}, {"a~b": 0.1}])
def test_bad_splits_are_refused(split: dict[str, float]) -> None:
    with pytest.raises(InvalidSpec):
        VersionTable().set("mlp", Traffic(split=split))
